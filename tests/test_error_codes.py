"""Every ``XenAPIError`` raised in xapid/ is declared in the schema with a parameter count it allows.

A static scan with the AST: each ``XenAPIError("CODE", ...)`` call (and each call of a helper
of xapid/errors.py, which are themselves such calls) must name a code of ``xapid/data/xenapi.xml``
and pass a number of parameters its ``<param>`` list accepts (``optional`` ones may be left off,
a ``repeated`` one may come any number of times; a ``*args`` tail needs a repeated parameter).
Calls whose code is not a literal are listed in ``COMPUTED`` with where their codes come from.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from xapid.errors import XenAPIError
from xapid.schema import DEFAULT_SCHEMA, ErrorArity, SchemaError, load_schema

ROOT = Path(__file__).resolve().parent.parent / "xapid"
SCHEMA = load_schema()

#: (file, code expression) of calls whose code is computed, and the literal codes they can take
COMPUTED: dict[tuple[str, str], tuple[str, ...]] = {
    # _kind_refuses returns one of these; VM_IS_TEMPLATE is raised with (vm, op), the others bare
    ("objects/vm_ops.py", "refused"): ("ONLY_PROVISION_TEMPLATE", "ONLY_REVERT_SNAPSHOT", "VM_IS_TEMPLATE"),
    # a plugin's own ErrorDescription, passed through as xapi does (any code the plugin chooses)
    ("objects/plugin.py", "*[str(d) for d in description]"): (),
}


def error_calls() -> list[tuple[str, int, ast.Call]]:
    """Every ``XenAPIError(...)`` call under xapid/: (file relative to xapid/, line, call)."""
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name == "XenAPIError":
                    calls.append((path.relative_to(ROOT).as_posix(), node.lineno, node))
    return calls


def literal_code(call: ast.Call) -> str | None:
    first = call.args[0] if call.args else None
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def count_problem(code: str, call: ast.Call) -> str | None:
    """Why *call*'s parameters do not fit *code*'s declaration, or None."""
    arity = SCHEMA.error_arity[code]
    rest = call.args[1:]
    fixed = sum(not isinstance(a, ast.Starred) for a in rest)
    if len(rest) != fixed:  # a *args tail: any number of parameters
        if arity.most is not None:
            return f"{code} takes {arity.most} parameters, called with a *args tail"
        return None
    if not arity.accepts(fixed):
        return f"{code} takes {arity.least}..{arity.most} parameters {SCHEMA.errors[code]}, called with {fixed}"
    return None


def test_scan_finds_the_calls():
    """The scan sees the dispatcher's and the helpers' calls (a broken scan would pass vacuously)."""
    calls = error_calls()
    assert len(calls) > 100
    files = {f for f, _, _ in calls}
    assert {"errors.py", "dispatch.py", "tasks.py"} <= files


def test_every_raised_code_is_declared_with_a_matching_parameter_count():
    problems = []
    for path, line, call in error_calls():
        code = literal_code(call)
        if code is None:
            key = (path, ast.unparse(call.args[0]) if call.args else "")
            if key not in COMPUTED:
                problems.append(f"{path}:{line}: code is not a literal; list it in COMPUTED")
            continue
        if code not in SCHEMA.errors:
            problems.append(f"{path}:{line}: {code} is not declared in xapid/data/xenapi.xml")
            continue
        why = count_problem(code, call)
        if why is not None:
            problems.append(f"{path}:{line}: {why}")
    assert problems == []


def test_computed_codes_are_declared():
    for codes in COMPUTED.values():
        assert set(codes) <= set(SCHEMA.errors)
    assert SCHEMA.error_arity["VM_IS_TEMPLATE"].accepts(2)
    assert SCHEMA.error_arity["ONLY_PROVISION_TEMPLATE"].accepts(0)
    assert SCHEMA.error_arity["ONLY_REVERT_SNAPSHOT"].accepts(0)


def test_the_check_catches_a_wrong_count_and_an_unknown_code():
    """The checker itself: a call with too many parameters, or a *args tail on a fixed error, is caught."""
    def call(src: str) -> ast.Call:
        node = ast.parse(src, mode="eval").body
        assert isinstance(node, ast.Call)
        return node

    assert count_problem("SESSION_INVALID", call('XenAPIError("SESSION_INVALID", a, b)')) is not None
    assert count_problem("SESSION_INVALID", call('XenAPIError("SESSION_INVALID", *refs)')) is not None
    assert count_problem("SESSION_INVALID", call('XenAPIError("SESSION_INVALID", a)')) is None
    assert count_problem("INVALID_VALUE", call('XenAPIError("INVALID_VALUE", f, v, why)')) is None
    assert count_problem("INVALID_VALUE", call('XenAPIError("INVALID_VALUE", f, v, why, more)')) is not None
    assert count_problem("NETWORK_CONTAINS_VIF", call('XenAPIError("NETWORK_CONTAINS_VIF", *vifs)')) is None
    assert "NO_SUCH_CODE" not in SCHEMA.errors


def test_helpers_of_errors_module_match_their_declarations():
    """The helpers in xapid/errors.py build errors the schema accepts (checked at run time too)."""
    from xapid import errors

    built = [errors.method_unknown("m"), errors.parameter_count_mismatch("m", 1, 2), errors.session_invalid("s"),
             errors.handle_invalid("VM", "r"), errors.uuid_invalid("VM", "u"), errors.field_type_error("f"),
             errors.invalid_value("f", "v"), errors.internal_error("x"), errors.internal_error_with_id()[1],
             errors.operation_not_allowed("why"), errors.vm_bad_power_state("r", ["Halted"], "Running")]
    for error in built:
        assert isinstance(error, XenAPIError)
        assert SCHEMA.error_arity[error.code].accepts(len(error.params)), error


@pytest.mark.parametrize("params, message", [
    ('<param optional="true">a</param><param>b</param>', "a required parameter follows an optional one"),
    ('<param repeated="true">a</param><param>b</param>', "only the last parameter may be repeated"),
])
def test_schema_refuses_badly_ordered_error_parameters(tmp_path, params, message):
    text = DEFAULT_SCHEMA.read_text(encoding="utf-8")
    marker = '<error code="ROLE_NOT_FOUND" doc="Unknown role."/>'
    assert marker in text
    bad = tmp_path / "xenapi.xml"
    bad.write_text(text.replace(marker, f'<error code="ROLE_NOT_FOUND" doc="Unknown role.">{params}</error>'),
                   encoding="utf-8")
    with pytest.raises(SchemaError, match=message):
        load_schema(bad)


def test_arity_counts():
    assert ErrorArity(1, None).accepts(5) and not ErrorArity(1, None).accepts(0)
    assert ErrorArity(2, 3).accepts(2) and ErrorArity(2, 3).accepts(3) and not ErrorArity(2, 3).accepts(4)



def test_rbac_permission_denied_is_worded_in_one_place():
    """The dispatcher, task ownership and session ownership all word RBAC_PERMISSION_DENIED through
    :func:`xapid.auth.rbac.permission_denied`."""
    from xapid.auth.rbac import permission_denied

    assert {path for path, _, call in error_calls() if literal_code(call) == "RBAC_PERMISSION_DENIED"} \
        == {"auth/rbac.py"}
    error = permission_denied(SCHEMA, "read-only", "vm.start", "vm-operator")
    assert error.params[0] == "vm.start" and "role read-only" in error.params[1]
    assert "perform this operation. " in error.params[1]
    assert "vm-operator, vm-admin" in error.params[1]
    on = permission_denied(SCHEMA, "read-only", "task.destroy/any", "pool-operator", "on a task created by another user")
    assert "perform this operation on a task created by another user. " in on.params[1]
