"""xapi's RBAC roles and permissions, generated from the schema, as ``role`` objects.

xapi (``ocaml/idl/ocaml_backend/gen_rbac.ml``, ``ocaml/xapi/xapi_role.ml``) serves a static
table: one *permission* per message (``name_label`` the lower-cased wire name, no subroles,
``is_internal`` true, description "A basic permission") and the six roles, each listing in
``subroles`` every permission it holds (a role holds the permissions of the roles below it).
Refs are ``OpaqueRef:<uuid>`` and uuids the MD5 digest of the name (the wire name as declared,
or the role name) read as a uuid, so they never change and are the same as xapi's.

Here the table is derived from ``xapid/data/xenapi.xml``: a role's permissions are the messages whose
declared minimum role it reaches (every served message: implicit ones, explicit ones and the
session-less login family; not those of removed classes), plus xapi's extra permission
``task.destroy/any`` (pool-operator and above), which :mod:`xapid.auth.ownership` checks.

A session of a users-file user gets, as xapi gives an externally authenticated user,
``rbac_permissions`` = its role's name followed by the role's permissions
(:meth:`Rbac.session_permissions`); a local superuser session gets none (it bypasses RBAC).
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Mapping

from xapid.errors import XenAPIError
from xapid.schema import Schema

PERMISSION_DESCRIPTION = "A basic permission"
ANY_TASK_PERMISSION = "task.destroy/any"  # xapi's one "any" permission: act on anyone's tasks
ANY_TASK_ROLE = "pool-operator"
#: xapi's permissions that are not messages, with the least role holding them
EXTRA_PERMISSIONS: dict[str, str] = {ANY_TASK_PERMISSION: ANY_TASK_ROLE}


def permission_denied(schema: Schema, role: str, permission: str, minimum: str, what: str = "") -> XenAPIError:
    """RBAC_PERMISSION_DENIED [permission, message], the message naming the session's *role* and
    the roles that would allow it (*minimum* and above); *what* says on what, when it matters."""
    allowed = ", ".join(schema.roles_at_least(minimum))
    operation = f"this operation {what}" if what else "this operation"
    return XenAPIError("RBAC_PERMISSION_DENIED", permission,
                       f"No permission in this session to perform {operation}. "
                       f"Your session has the role {role}; these roles would allow it: {allowed}")


def name_uuid(name: str) -> str:
    """xapi's uuid for a role or permission: the MD5 digest of *name* as a uuid."""
    return str(uuidlib.UUID(bytes=hashlib.md5(name.encode()).digest()))


def name_ref(name: str) -> str:
    return f"OpaqueRef:{name_uuid(name)}"


@dataclass(frozen=True)
class Rbac:
    """The static table: roles least to most privileged, each with its permissions."""

    roles: tuple[str, ...]
    permissions: Mapping[str, tuple[str, ...]]  # role -> its permission names (lower case), sorted
    minimum: Mapping[str, str]  # permission name -> the least role holding it
    declared: Mapping[str, str]  # permission name -> the name its uuid is made from (wire name as declared)

    def session_permissions(self, role: str) -> list[str]:
        """``session.rbac_permissions`` of a session with *role*: the role's name, then its permissions."""
        return [role, *self.permissions[role]]

    def role_ref(self, role: str) -> str:
        return name_ref(role)

    def permission_ref(self, permission: str) -> str:
        return name_ref(self.declared[permission])

    def roles_with(self, permission: str) -> list[str]:
        """The roles holding *permission*, least privileged first ([] for an unknown name)."""
        least = self.minimum.get(permission)
        return [] if least is None else list(self.roles[self.roles.index(least):])


def build(schema: Schema) -> Rbac:
    """The table for *schema*."""
    minimum: dict[str, str] = {}
    declared: dict[str, str] = {}
    for wire, spec in schema.messages.items():
        if schema.classes[spec.cls].removed or spec.removed:
            continue
        name = wire.lower()
        if name in minimum:  # two wire names differing only in case would share a permission
            raise ValueError(f"two messages named {name!r} ignoring case")
        minimum[name], declared[name] = spec.role, wire
    for name, role in EXTRA_PERMISSIONS.items():
        minimum[name], declared[name] = role, name
    roles = schema.roles
    permissions = {role: tuple(sorted(p for p, least in minimum.items() if schema.role_allows(role, least)))
                   for role in roles}
    return Rbac(roles, permissions, minimum, declared)


def install(store: Any, schema: Schema, descriptions: Mapping[str, str] | None = None) -> Rbac:
    """Add the ``role`` objects (not stored: the same refs and uuids at every start) and return
    the table.  *descriptions*: role -> name_description (default: the schema's role docs)."""
    rbac = build(schema)
    docs = dict(descriptions if descriptions is not None else schema.role_docs)
    for permission in rbac.minimum:
        ref = rbac.permission_ref(permission)
        if store.find(ref) is None:
            store.add("role", {"uuid": name_uuid(rbac.declared[permission]), "name_label": permission,
                               "name_description": PERMISSION_DESCRIPTION, "subroles": [],
                               "is_internal": True}, ref=ref)
    for role in rbac.roles:
        ref = rbac.role_ref(role)
        if store.find(ref) is None:
            store.add("role", {"uuid": name_uuid(role), "name_label": role,
                               "name_description": docs.get(role, ""),
                               "subroles": [rbac.permission_ref(p) for p in rbac.permissions[role]],
                               "is_internal": False}, ref=ref)
    return rbac
