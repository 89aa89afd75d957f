"""xapi's RBAC roles, from least to most privileged."""

from __future__ import annotations

ROLES: tuple[str, ...] = ("read-only", "vm-operator", "vm-admin", "vm-power-admin", "pool-operator", "pool-admin")


def validate_role(name: object) -> str:
    """*name* if it is a known role; otherwise ValueError listing the known ones."""
    if not isinstance(name, str) or name not in ROLES:
        raise ValueError(f"unknown role {name!r} (expected one of: {', '.join(ROLES)})")
    return name


def role_at_least(role: str, minimum: str) -> bool:
    """Whether *role* has at least the privileges of *minimum* (ValueError for an unknown role)."""
    return ROLES.index(validate_role(role)) >= ROLES.index(validate_role(minimum))
