"""The official XenAPI Python SDK against a real daemon over real sockets."""

from __future__ import annotations

import XenAPI
import pytest

from support import PASSWORD, vm_record


@pytest.fixture(scope="module")
def session(daemon):
    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD, "1.0", "xapid-tests")
    yield s
    s.logout()


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


def test_login_and_api_version(session):
    """login_with_password with four arguments works and API_version reads the host's version."""
    assert session.API_version == "2.21"


def test_login_with_two_arguments(daemon):
    """A two-argument login (what most scripts do) returns a session."""
    s = XenAPI.Session(daemon.url)
    s.login_with_password("reader", PASSWORD)
    assert s.xenapi.pool.get_all()
    s.logout()


def test_bad_password(daemon):
    """Wrong credentials raise XenAPI.Failure SESSION_AUTHENTICATION_FAILED."""
    s = XenAPI.Session(daemon.url)
    with pytest.raises(XenAPI.Failure) as info:
        s.login_with_password("admin", "wrong")
    assert info.value.details[0] == "SESSION_AUTHENTICATION_FAILED"


def test_read_inventory(session):
    """Pools, hosts, host_cpus and VMs are listed and read, with ints as strings as xapi sends them."""
    x = session.xenapi
    pools = x.pool.get_all_records()
    assert len(pools) == 1
    pool = next(iter(pools.values()))
    host = x.host.get_record(pool["master"])
    assert host["API_version_major"] == "2"
    assert set(host["software_version"]) >= {"product_version", "xapid", "xen"}
    assert len(x.host_cpu.get_all()) == 4
    assert sorted(x.host_cpu.get_record(c)["number"] for c in host["host_CPUs"]) == ["0", "1", "2", "3"]
    vms = x.VM.get_all_records()
    dom0 = [r for r in vms.values() if r["is_control_domain"]]
    assert len(dom0) == 1 and dom0[0]["power_state"] == "Running"
    metrics = x.host_metrics.get_record(host["metrics"])
    assert int(metrics["memory_total"]) == 16 << 30


def test_vm_lifecycle_with_the_sdk(session):
    """Create from a record, start, pause/unpause, suspend/resume, reboot, shut down and destroy."""
    x = session.xenapi
    vm = x.VM.create(vm_record(name_label="sdk-vm"))
    assert x.VM.get_power_state(vm) == "Halted"
    x.VM.start(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running"
    x.VM.pause(vm)
    assert x.VM.get_power_state(vm) == "Paused"
    x.VM.unpause(vm)
    x.VM.suspend(vm)
    assert x.VM.get_power_state(vm) == "Suspended"
    x.VM.resume(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running"
    x.VM.clean_reboot(vm)
    x.VM.hard_reboot(vm)
    x.VM.set_VCPUs_number_live(vm, "2")
    assert x.VM_metrics.get_VCPUs_number(x.VM.get_metrics(vm)) == "2"
    x.VM.set_memory_dynamic_range(vm, str(256 << 20), str(300 << 20))
    assert x.VM_metrics.get_memory_actual(x.VM.get_metrics(vm)) == str(300 << 20)
    x.VM.clean_shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted"
    x.VM.start(vm, True, False)
    assert x.VM.get_power_state(vm) == "Paused"
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)
    assert failure(x.VM.get_record, vm) == ["HANDLE_INVALID", "VM", vm]


def test_misuse_gives_exact_failures(session):
    """Misuse returns xapi's failure codes with their parameters."""
    x = session.xenapi
    vm = x.VM.create(vm_record())
    assert failure(x.VM.pause, vm) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    assert failure(x.VM.start, vm, False) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "2"]
    assert failure(x.VM.get_record, "OpaqueRef:nope") == ["HANDLE_INVALID", "VM", "OpaqueRef:nope"]
    assert failure(x.VM.no_such_message, vm) == ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_message"]
    assert failure(x.VM.get_by_uuid, "nope") == ["UUID_INVALID", "VM", "nope"]
    template = x.VM.create(vm_record(is_a_template=True))
    assert failure(x.VM.start, template, False, False) == ["VM_IS_TEMPLATE", template, "start"]
    x.VM.destroy(vm)
    x.VM.destroy(template)


def test_read_only_user_is_denied_writes(daemon):
    """A read-only user reads but gets RBAC_PERMISSION_DENIED for writes."""
    s = XenAPI.Session(daemon.url)
    s.login_with_password("reader", PASSWORD)
    vm = s.xenapi.VM.get_all()[0]
    details = failure(s.xenapi.VM.set_name_label, vm, "x")
    assert details[:2] == ["RBAC_PERMISSION_DENIED", "vm.set_name_label"]
    s.logout()


def test_relogin_after_session_dies(daemon):
    """When its session is logged out behind its back, the SDK logs in again and retries."""
    import xmlrpc.client

    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD)
    old = s._session
    xmlrpc.client.ServerProxy(daemon.url).session.logout(old)
    assert s.xenapi.pool.get_all()
    assert s._session != old
