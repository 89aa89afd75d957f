"""Dispatch order, sessions, roles and the schema-derived messages."""

from __future__ import annotations

import pytest

from support import PASSWORD, vm_record
from xapid.errors import XenAPIError


def test_unknown_method(env, admin):
    """An unknown method fails with MESSAGE_METHOD_UNKNOWN before anything else."""
    assert admin.fails("VM.no_such_thing") == ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_thing"]
    with pytest.raises(XenAPIError) as info:
        env.raw("VM.nope", [])
    assert info.value.code == "MESSAGE_METHOD_UNKNOWN"


def test_parameter_count_excludes_session(admin):
    """MESSAGE_PARAMETER_COUNT_MISMATCH counts parameters without the session, as xapi."""
    assert admin.fails("VM.get_record") == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "1", "0"]
    assert admin.fails("VM.start", "a", True) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "2"]


def test_count_checked_before_session(env):
    """A wrong argument count is reported even with a bad session."""
    with pytest.raises(XenAPIError) as info:
        env.raw("VM.get_all", ["OpaqueRef:bogus", "extra"])
    assert info.value.code == "MESSAGE_PARAMETER_COUNT_MISMATCH"


def test_bad_session(env):
    """A bad session ref fails with SESSION_INVALID naming it."""
    with pytest.raises(XenAPIError) as info:
        env.raw("VM.get_all", ["OpaqueRef:bogus"])
    assert info.value.description == ["SESSION_INVALID", "OpaqueRef:bogus"]


def test_login_variants(env):
    """login_with_password takes 2, 3 or 4 arguments and returns an OpaqueRef."""
    for args in (["admin", PASSWORD], ["admin", PASSWORD, "1.0"], ["admin", PASSWORD, "2.21", "tests"]):
        ref = env.raw("session.login_with_password", args)
        assert ref.startswith("OpaqueRef:") and len(ref) == len("OpaqueRef:") + 36


def test_bad_credentials_look_the_same(env):
    """Unknown user and wrong password give the same SESSION_AUTHENTICATION_FAILED."""
    errors = []
    for user, password in (("admin", "wrong"), ("nobody", PASSWORD)):
        with pytest.raises(XenAPIError) as info:
            env.raw("session.login_with_password", [user, password])
        errors.append(info.value.description)
    assert errors == [["SESSION_AUTHENTICATION_FAILED", "admin", "Authentication failure"],
                      ["SESSION_AUTHENTICATION_FAILED", "nobody", "Authentication failure"]]


def test_logout_invalidates(env, admin):
    """After session.logout the ref is SESSION_INVALID."""
    admin("session.logout")
    assert admin.fails("pool.get_all") == ["SESSION_INVALID", admin.session]


def test_idle_expiry(tmp_path, clock):
    """A session idle past the timeout expires; activity keeps it alive."""
    from support import ApiEnv

    env = ApiEnv(tmp_path, clock, session_idle_timeout=100.0)
    client = env.login()
    clock.advance(90)
    client("pool.get_all")
    clock.advance(90)
    client("pool.get_all")
    clock.advance(101)
    assert client.fails("pool.get_all")[0] == "SESSION_INVALID"


def test_session_getters(env, admin):
    """session.get_this_host and get_this_user name the host and the user."""
    assert admin("session.get_this_host", admin.session) == env.api.host_ref
    user = admin("session.get_this_user", admin.session)
    assert admin("user.get_short_name", user) == "admin"


def test_read_only_role(env):
    """read-only may read but not write; the denial names the permission."""
    reader = env.login("reader")
    vms = reader("VM.get_all")
    assert vms
    error = reader.fails("VM.create", vm_record())
    assert error[0] == "RBAC_PERMISSION_DENIED" and error[1] == "vm.create"
    assert reader.fails("VM.set_name_label", vms[0], "x")[:2] == ["RBAC_PERMISSION_DENIED", "vm.set_name_label"]
    assert reader("session.get_this_host", reader.session) == env.api.host_ref


def test_role_hierarchy(env):
    """vm-operator may start VMs but not create them; vm-admin may create."""
    admin = env.login("admin")
    vm = admin("VM.create", vm_record())
    operator = env.login("operator")
    operator("VM.start", vm, False, False)
    assert operator.fails("VM.create", vm_record())[0] == "RBAC_PERMISSION_DENIED"
    env.login("vmadmin")("VM.create", vm_record())


def test_handle_invalid_for_wrong_class(env, admin):
    """A ref of another class is HANDLE_INVALID for the declared class."""
    host = env.api.host_ref
    assert admin.fails("VM.get_record", host) == ["HANDLE_INVALID", "VM", host]


def test_field_type_error(admin):
    """A value of the wrong type for a parameter is FIELD_TYPE_ERROR naming it."""
    vm = admin("VM.create", vm_record())
    assert admin.fails("VM.start", vm, "yes please", False) == ["FIELD_TYPE_ERROR", "start_paused"]
    assert admin.fails("VM.set_VCPUs_max", vm, "lots") == ["FIELD_TYPE_ERROR", "value"]


def test_implicit_accessors(admin):
    """Getters, setters, set and map updates, lookups come from the schema."""
    vm = admin("VM.create", vm_record(name_label="alpha"))
    admin("VM.set_name_label", vm, "beta")
    assert admin("VM.get_name_label", vm) == "beta"
    assert admin("VM.get_by_name_label", "beta") == [vm]
    assert admin("VM.get_by_name_label", "alpha") == []
    uuid = admin("VM.get_uuid", vm)
    assert admin("VM.get_by_uuid", uuid) == vm
    assert admin.fails("VM.get_by_uuid", "nope") == ["UUID_INVALID", "VM", "nope"]
    admin("VM.add_tags", vm, "web")
    admin("VM.add_tags", vm, "web")
    assert admin("VM.get_tags", vm) == ["web"]
    admin("VM.remove_tags", vm, "web")
    assert admin("VM.get_tags", vm) == []
    admin("VM.add_to_other_config", vm, "k", "v")
    assert admin.fails("VM.add_to_other_config", vm, "k", "w") == ["MAP_DUPLICATE_KEY", "VM", "other_config", uuid, "k"]
    admin("VM.remove_from_other_config", vm, "k")
    admin("VM.remove_from_other_config", vm, "k")
    assert admin("VM.get_other_config", vm) == {}
    assert vm in admin("VM.get_all")
    assert admin("VM.get_all_records")[vm]["name_label"] == "beta"


def test_read_only_fields_have_no_setter(admin):
    """There is no setter for a runtime field."""
    vm = admin("VM.create", vm_record())
    assert admin.fails("VM.set_power_state", vm, "Running")[0] == "MESSAGE_METHOD_UNKNOWN"


def test_inverse_references(admin, env):
    """host.resident_VMs mirrors VM.resident_on as VMs start and stop."""
    vm = admin("VM.create", vm_record())
    host = env.api.host_ref
    assert vm not in admin("host.get_resident_VMs", host)
    admin("VM.start", vm, False, False)
    assert vm in admin("host.get_resident_VMs", host)
    admin("VM.hard_shutdown", vm)
    assert vm not in admin("host.get_resident_VMs", host)


def test_inventory(env, admin):
    """One pool whose master is the host; host_cpus match the sim's 4 CPUs; 16 GiB."""
    pools = admin("pool.get_all")
    assert len(pools) == 1
    host = admin("pool.get_master", pools[0])
    record = admin("host.get_record", host)
    assert (record["API_version_major"], record["API_version_minor"]) == (2, 21)
    assert {"product_version", "xapid", "xen"} <= set(record["software_version"])
    assert record["cpu_info"]["cpu_count"] == "4"
    cpus = admin("host.get_host_CPUs", host)
    assert sorted(admin("host_cpu.get_number", c) for c in cpus) == [0, 1, 2, 3]
    assert admin("host_metrics.get_memory_total", record["metrics"]) == 16 << 30


def test_list_methods(env):
    """system.listMethods needs no session and lists implicit messages."""
    names = env.raw("system.listMethods", [])
    assert "VM.get_all_records" in names and "VM.start" in names and "host_cpu.get_all_records" in names
    assert "session.get_all_records" not in names


def test_every_explicit_message_has_a_handler(env):
    """The dispatcher refuses to start when handlers and schema disagree."""
    from xapid.dispatch import Dispatcher
    from xapid.objects import collect_handlers

    handlers = collect_handlers()
    handlers["VM.not_declared"] = lambda ctx: None
    with pytest.raises(ValueError, match="undeclared"):
        Dispatcher(env.api, handlers)
    handlers = collect_handlers()
    del handlers["VM.start"]
    with pytest.raises(ValueError, match="no handler"):
        Dispatcher(env.api, handlers)


def test_objects_survive_restart(env, admin):
    """Objects keep their refs and uuids across a restart."""
    vm = admin("VM.create", vm_record(name_label="keep"))
    uuid = admin("VM.get_uuid", vm)
    pool = admin("pool.get_all")[0]
    env.restart()
    again = env.login()
    assert again("VM.get_by_uuid", uuid) == vm
    assert again("VM.get_name_label", vm) == "keep"
    assert again("pool.get_all") == [pool]
