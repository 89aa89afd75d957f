"""xapi's role names, least to most privileged (the schema declares the same list)."""

from __future__ import annotations

ROLES: tuple[str, ...] = ("read-only", "vm-operator", "vm-admin", "vm-power-admin", "pool-operator", "pool-admin")


def validate_role(name: str) -> str:
    if name not in ROLES:
        raise ValueError(f"unknown role {name!r} (expected one of: {', '.join(ROLES)})")
    return name


def role_at_least(role: str, minimum: str) -> bool:
    return ROLES.index(role) >= ROLES.index(minimum)
