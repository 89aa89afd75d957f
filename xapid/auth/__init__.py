"""Who may call: the users file, roles, the password checker, RBAC tables, ownership of tasks and sessions."""
