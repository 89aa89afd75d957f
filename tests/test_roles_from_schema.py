"""The role list (xapid.auth.roles) is read from the schema's <roles>, the one place roles are declared."""

from __future__ import annotations

import pytest

from xapid.auth import rbac
from xapid.auth.roles import ROLES, read_roles
from xapid.schema import DEFAULT_SCHEMA, load_schema


def test_roles_are_the_schemas():
    """The users file, the CLI and RBAC see the same roles in the same order as the schema."""
    schema = load_schema()
    assert ROLES == schema.roles == rbac.build(schema).roles
    assert set(ROLES) == set(schema.role_docs)


def test_roles_follow_an_edited_schema(tmp_path):
    """A role added to <roles> appears in read_roles without any other list to update."""
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8")
    last = '<role name="pool-admin"'
    assert last in text
    edited = tmp_path / "xenapi.xml"
    edited.write_text(text.replace(last, '<role name="extra-admin" doc="x"/>\n    ' + last, 1), encoding="utf-8")
    assert read_roles(edited) == (*ROLES[:-1], "extra-admin", "pool-admin")
    assert load_schema(edited).roles == read_roles(edited)


def test_a_schema_without_roles_is_refused(tmp_path):
    bare = tmp_path / "bare.xml"
    bare.write_text('<api version="1"/>', encoding="utf-8")
    with pytest.raises(ValueError, match="no <roles>"):
        read_roles(bare)
