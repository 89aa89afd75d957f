"""xapi's RBAC roles, from least to most privileged, as the schema declares them.

The one source of truth is the ``<roles>`` element of ``xapid/data/xenapi.xml`` (which also
gives each role its minimum-role messages, :mod:`xapid.auth.rbac`); this module reads only that
element, so the users file and the command line need not load the whole schema.
"""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from xapid.schema import DEFAULT_SCHEMA


def read_roles(path: str | Path = DEFAULT_SCHEMA) -> tuple[str, ...]:
    """The role names of the schema at *path*, least privileged first (ValueError when it has no ``<roles>``)."""
    for _, node in etree.iterparse(str(path), events=("end",), tag="roles"):
        return tuple(str(role.get("name")) for role in node.iterfind("role"))
    raise ValueError(f"{path}: no <roles> element")


ROLES: tuple[str, ...] = read_roles()


def validate_role(name: object) -> str:
    """*name* if it is a known role; otherwise ValueError listing the known ones."""
    if not isinstance(name, str) or name not in ROLES:
        raise ValueError(f"unknown role {name!r} (expected one of: {', '.join(ROLES)})")
    return name


def role_at_least(role: str, minimum: str) -> bool:
    """Whether *role* has at least the privileges of *minimum* (ValueError for an unknown role)."""
    return ROLES.index(validate_role(role)) >= ROLES.index(validate_role(minimum))
