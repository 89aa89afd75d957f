"""Who may act on which task or session, checked by the dispatcher after the role check.

- **Tasks** (xapi's model): a message that acts on a task (``task.cancel``, ``task.destroy``,
  every setter and set/map update) is allowed on the tasks created by any session of the
  caller's user; anyone else's task needs pool-operator or above (xapi's ``task.destroy/any``).
  Reads (getters, records, lookups) stay open to every role, as in xapi.  Setting a client
  task's status back to ``pending`` counts against the pending-task caps like ``task.create``.
- **Sessions**: setters and map/set updates only on the caller's own session; getters,
  ``get_record`` and ``get_by_uuid`` of a session of another user only for pool-admin (xapi
  leaves them open: its session refs are secrets, but uuids are not).

Refusals are ``RBAC_PERMISSION_DENIED [permission, message]``, as the role check words them.
"""

from __future__ import annotations

from typing import Any

from xapid.auth.rbac import permission_denied
from xapid.schema import MessageSpec

READS = frozenset({"get", "get_record", "get_by_uuid", "get_by_name_label", "get_all", "get_all_records",
                   "get_all_records_where", "get_all_where"})
SESSION_ADMIN = "pool-admin"  # may read and change other users' sessions


def check(api: Any, session: Any, spec: MessageSpec, values: list[Any]) -> None:
    """RBAC_PERMISSION_DENIED when *session* may call *spec* with *values* by role but not on
    the task or session the call names."""
    if spec.cls == "task":
        _task(api, session, spec, values)
    elif spec.cls == "session":
        _session(api, session, spec, values)


def _first_ref(spec: MessageSpec, cls: str) -> bool:
    return bool(spec.params) and spec.params[0].type.kind == "ref" and spec.params[0].type.name == cls


def _task(api: Any, session: Any, spec: MessageSpec, values: list[Any]) -> None:
    if spec.kind in READS or not _first_ref(spec, "task"):
        return
    task = values[0]
    tasks = api.tasks
    tasks.authorize(api.schema, session, task, spec.wire_name)
    if spec.kind == "set" and spec.field is not None and spec.field.name == "status" \
            and values[1] == "pending" and not tasks.is_pending(task):
        owner = tasks.owner(task)
        if owner is not None and owner.client:
            tasks.check_pending_caps(owner.session, owner.user)


def _session(api: Any, session: Any, spec: MessageSpec, values: list[Any]) -> None:
    if spec.kind == "get_by_uuid":
        obj = api.store.by_uuid(values[0])
        if obj is None or obj.cls != "session":
            return  # the lookup answers UUID_INVALID
        target = obj.ref
    elif _first_ref(spec, "session"):
        target = values[0]
    else:
        return
    if target == session.ref or api.schema.role_allows(session.role, SESSION_ADMIN):
        return
    if spec.kind in READS:
        other = api.sessions.get(target)
        user = other.user if other is not None else _stored_user(api, target)
        if user == session.user:
            return  # the caller's user's other sessions may be read
        what = "on a session of another user"
    else:
        what = "on another session than the caller's own"
    raise permission_denied(api.schema, session.role, spec.wire_name.lower(), SESSION_ADMIN, what)


def _stored_user(api: Any, ref: str) -> str | None:
    obj = api.store.find(ref)
    return obj.fields.get("auth_user_name") if obj is not None else None
