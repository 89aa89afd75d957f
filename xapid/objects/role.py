"""``role.*``, ``subject.*`` and ``auth.*``: RBAC as xapi serves it without external authentication.

Roles and permissions are static ``role`` objects generated from the schema (:mod:`xapid.auth.rbac`);
the getters, records and lookups are the generic ones.  xapid's users and their roles live in
its users file, not in a directory, so it behaves as xapi with external authentication off:
there are no subjects, and ``subject.create`` and every ``auth.*`` query answer
``AUTH_IS_DISABLED`` (``xapi_auth.ml``, ``extauth.ml``).
"""

from __future__ import annotations

from typing import Any

from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import message


def _subroles(ctx: CallContext, ref: str) -> list[str]:
    return list(ctx.store.get(ref).fields["subroles"])


def _permissions(ctx: CallContext, role: str) -> list[str]:
    """A role's permission refs; a permission (no subroles) is its own (xapi_role.ml)."""
    return _subroles(ctx, role) or [role]


def _name(ctx: CallContext, ref: str) -> str:
    return ctx.store.get(ref).fields["name_label"]


def _composite_roles(ctx: CallContext) -> list[str]:
    rbac = ctx.api.rbac
    return [rbac.role_ref(r) for r in rbac.roles]


@message("role.get_permissions")
def role_get_permissions(ctx: CallContext, self: str) -> list[str]:
    return _permissions(ctx, self)


@message("role.get_permissions_name_label")
def role_get_permissions_name_label(ctx: CallContext, self: str) -> list[str]:
    return [_name(ctx, p) for p in _permissions(ctx, self)]


@message("role.get_by_permission")
def role_get_by_permission(ctx: CallContext, permission: str) -> list[str]:
    """The roles (never the permission itself) whose permissions include *permission*."""
    return [r for r in _composite_roles(ctx) if r != permission and permission in _subroles(ctx, r)]


@message("role.get_by_permission_name_label")
def role_get_by_permission_name_label(ctx: CallContext, label: str) -> list[str]:
    rbac = ctx.api.rbac
    return [rbac.role_ref(r) for r in rbac.roles_with(label)]


@message("subject.create")
def subject_create(ctx: CallContext, args: dict[str, Any]) -> str:
    """xapi asks the external directory about the new subject; with none configured that is
    AUTH_IS_DISABLED (a duplicate identifier would be SUBJECT_ALREADY_EXISTS first)."""
    identifier = args.get("subject_identifier", "")
    if any(ctx.store.get(s).fields["subject_identifier"] == identifier for s in ctx.store.refs("subject")):
        raise XenAPIError("SUBJECT_ALREADY_EXISTS")
    raise XenAPIError("AUTH_IS_DISABLED")


def _role_ref(ctx: CallContext, role: str) -> str:
    if role not in _composite_roles(ctx) and not ctx.store.exists(role, "role"):
        raise XenAPIError("ROLE_NOT_FOUND")
    return role


@message("subject.add_to_roles")
def subject_add_to_roles(ctx: CallContext, self: str, role: str) -> str:
    roles = list(ctx.store.get(self).fields["roles"])
    if _role_ref(ctx, role) in roles:
        raise XenAPIError("ROLE_ALREADY_EXISTS")
    ctx.store.update(self, {"roles": [*roles, role]})
    return ""


@message("subject.remove_from_roles")
def subject_remove_from_roles(ctx: CallContext, self: str, role: str) -> str:
    roles = list(ctx.store.get(self).fields["roles"])
    if role not in roles:
        raise XenAPIError("ROLE_NOT_FOUND")
    ctx.store.update(self, {"roles": [r for r in roles if r != role]})
    return ""


@message("subject.get_permissions_name_label")
def subject_get_permissions_name_label(ctx: CallContext, self: str) -> list[str]:
    names: dict[str, None] = {}
    for role in ctx.store.get(self).fields["roles"]:
        if ctx.store.exists(role, "role"):  # a role that disappeared is ignored, as in xapi
            names.update(dict.fromkeys(_name(ctx, p) for p in _permissions(ctx, role)))
    return list(names)


def _auth_is_disabled() -> XenAPIError:
    return XenAPIError("AUTH_IS_DISABLED")


@message("auth.get_subject_identifier")
def auth_get_subject_identifier(ctx: CallContext, subject_name: str) -> str:
    raise _auth_is_disabled()


@message("auth.get_subject_information_from_identifier")
def auth_get_subject_information_from_identifier(ctx: CallContext, subject_identifier: str) -> dict[str, str]:
    raise _auth_is_disabled()


@message("auth.get_group_membership")
def auth_get_group_membership(ctx: CallContext, subject_identifier: str) -> list[str]:
    raise _auth_is_disabled()
