"""The VM power-state machine through the dispatcher, on the sim driver with a fake clock."""

from __future__ import annotations

import pytest

from support import vm_record


@pytest.fixture
def vm(admin):
    return admin("VM.create", vm_record())


def state(admin, vm):
    return admin("VM.get_power_state", vm)


def test_create_gives_halted_vm_with_metrics(admin, vm):
    """VM.create returns a Halted VM with a metrics object and xapi's defaults."""
    record = admin("VM.get_record", vm)
    assert record["power_state"] == "Halted"
    assert record["domid"] == -1
    assert record["resident_on"] == "OpaqueRef:NULL"
    assert record["HVM_shadow_multiplier"] == 1.0
    assert record["memory_static_max"] == 512 << 20
    assert admin("VM_metrics.get_record", record["metrics"])["memory_actual"] == 0
    assert "start" in record["allowed_operations"] and "pause" not in record["allowed_operations"]


def test_create_requires_xapi_fields(admin):
    """A create record missing a required field fails with FIELD_TYPE_ERROR naming it."""
    record = vm_record()
    del record["PV_kernel"]
    assert admin.fails("VM.create", record) == ["FIELD_TYPE_ERROR", "PV_kernel"]


def test_create_ignores_unknown_and_runtime_fields(admin):
    """Unknown fields are ignored and power_state cannot be forced at create."""
    vm = admin("VM.create", vm_record(power_state="Running", no_such_field="x"))
    assert admin("VM.get_power_state", vm) == "Halted"


def test_create_checks_memory_constraint(admin):
    """static_min ≤ dynamic_min ≤ dynamic_max ≤ static_max is enforced."""
    bad = vm_record(memory_dynamic_min=str(1 << 30))
    assert admin.fails("VM.create", bad)[0] == "MEMORY_CONSTRAINT_VIOLATION"


def test_full_lifecycle(admin, vm, env):
    """start, pause, unpause, suspend, resume, reboot and shutdown move through xapi's states."""
    admin("VM.start", vm, False, False)
    assert state(admin, vm) == "Running"
    domid = admin("VM.get_domid", vm)
    assert domid > 0
    assert admin("VM.get_resident_on", vm) == env.api.host_ref
    admin("VM.pause", vm)
    assert state(admin, vm) == "Paused"
    admin("VM.unpause", vm)
    assert state(admin, vm) == "Running"
    admin("VM.suspend", vm)
    assert state(admin, vm) == "Suspended"
    assert (env.api.state_dir / "suspend" / f"{admin('VM.get_uuid', vm)}.img").exists()
    admin("VM.resume", vm, False, False)
    assert state(admin, vm) == "Running"
    admin("VM.clean_reboot", vm)
    assert state(admin, vm) == "Running"
    assert admin("VM.get_domid", vm) != domid
    admin("VM.hard_reboot", vm)
    admin("VM.clean_shutdown", vm)
    assert state(admin, vm) == "Halted"
    assert admin("VM.get_domid", vm) == -1
    admin("VM.start", vm, True, False)
    assert state(admin, vm) == "Paused"
    admin("VM.hard_shutdown", vm)
    assert state(admin, vm) == "Halted"
    admin("VM.destroy", vm)
    assert admin.fails("VM.get_record", vm) == ["HANDLE_INVALID", "VM", vm]


def test_bad_power_state_has_xapi_parameters(admin, vm):
    """VM_BAD_POWER_STATE carries the ref, allowed states in xapi's order, and the actual state."""
    assert admin.fails("VM.pause", vm) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    admin("VM.start", vm, False, False)
    assert admin.fails("VM.start", vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert admin.fails("VM.destroy", vm) == ["VM_BAD_POWER_STATE", vm, "halted, suspended", "running"]
    admin("VM.pause", vm)
    assert admin.fails("VM.suspend", vm) == ["VM_BAD_POWER_STATE", vm, "running", "paused"]


def test_templates_cannot_start(admin):
    """Starting a template fails with VM_IS_TEMPLATE."""
    vm = admin("VM.create", vm_record(is_a_template=True))
    assert admin.fails("VM.start", vm, False, False) == ["VM_IS_TEMPLATE", vm, "start"]
    assert "start" not in admin("VM.get_allowed_operations", vm)


def test_control_domain_cannot_be_shut_down(admin, env):
    """dom0 exists, runs, and refuses lifecycle operations."""
    dom0 = env.api.store.get(env.api.host_ref).fields["control_domain"]
    record = admin("VM.get_record", dom0)
    assert record["is_control_domain"] and record["power_state"] == "Running" and record["domid"] == 0
    assert admin.fails("VM.clean_shutdown", dom0)[0] == "OPERATION_NOT_ALLOWED"
    assert admin.fails("VM.hard_shutdown", dom0)[0] == "OPERATION_NOT_ALLOWED"
    assert admin.fails("VM.destroy", dom0)[0] == "OPERATION_NOT_ALLOWED"


def test_not_enough_memory(admin):
    """A VM larger than the host's free memory fails with HOST_NOT_ENOUGH_FREE_MEMORY and stays Halted."""
    big = str(64 << 30)
    vm = admin("VM.create", vm_record(memory_static_max=big, memory_dynamic_max=big))
    error = admin.fails("VM.start", vm, False, False)
    assert error[0] == "HOST_NOT_ENOUGH_FREE_MEMORY"
    assert int(error[1]) > int(error[2])
    assert admin("VM.get_power_state", vm) == "Halted"
    assert admin("VM.get_current_operations", vm) == {}


def test_pv_guest_needs_a_kernel(admin):
    """A PV VM with neither kernel nor bootloader is refused before anything is built."""
    vm = admin("VM.create", vm_record(PV_kernel=""))
    assert admin.fails("VM.start", vm, False, False)[0] == "VALUE_NOT_SUPPORTED"


def test_live_vcpus_and_memory(admin, vm, env):
    """set_VCPUs_number_live and set_memory_dynamic_range change a running domain."""
    admin("VM.start", vm, False, False)
    admin("VM.set_VCPUs_number_live", vm, "2")
    metrics = admin("VM.get_metrics", vm)
    assert admin("VM_metrics.get_VCPUs_number", metrics) == 2
    assert env.api.hypervisor.driver.domain_info(admin("VM.get_uuid", vm)).vcpus == 2
    assert admin.fails("VM.set_VCPUs_number_live", vm, "3") == ["INVALID_VALUE", "nvcpu", "3"]
    admin("VM.set_memory_dynamic_range", vm, str(256 << 20), str(384 << 20))
    assert admin("VM_metrics.get_memory_actual", metrics) == 384 << 20
    assert admin("VM.get_memory_dynamic_max", vm) == 384 << 20
    assert admin.fails("VM.set_memory_dynamic_range", vm, str(600 << 20), str(700 << 20))[0] == \
        "MEMORY_CONSTRAINT_VIOLATION"


def test_static_changes_need_halted(admin, vm):
    """Static memory and VCPU limits change only while Halted."""
    admin("VM.set_VCPUs_max", vm, "4")
    admin("VM.set_memory_limits", vm, str(128 << 20), str(1 << 30), str(256 << 20), str(1 << 30))
    assert admin("VM.get_memory_static_max", vm) == 1 << 30
    admin("VM.start", vm, False, False)
    assert admin.fails("VM.set_VCPUs_max", vm, "8")[0] == "VM_BAD_POWER_STATE"
    assert admin.fails("VM.set_VCPUs_at_startup", vm, "5")[0] == "VM_BAD_POWER_STATE"


def test_blocked_operation(admin, vm):
    """An operation listed in blocked_operations fails with OPERATION_BLOCKED and its reason."""
    admin("VM.add_to_blocked_operations", vm, "start", "maintenance")
    assert admin.fails("VM.start", vm, False, False) == ["OPERATION_BLOCKED", vm, "maintenance"]
    assert "start" not in admin("VM.get_allowed_operations", vm)


def test_clean_shutdown_timeout_falls_back_in_shutdown(admin, env):
    """A guest without PV drivers ignores clean shutdown; VM.shutdown then hard-stops it."""
    vm = admin("VM.create", vm_record(platform={"sim-no-pv-drivers": "true"}))
    admin("VM.start", vm, False, False)
    assert admin.fails("VM.clean_shutdown", vm)[0] == "VM_SHUTDOWN_TIMEOUT"
    assert admin("VM.get_power_state", vm) == "Running"
    admin("VM.shutdown", vm)
    assert admin("VM.get_power_state", vm) == "Halted"


def test_disabled_host_refuses_start(admin, vm, env):
    """host.disable makes VM.start fail with HOST_DISABLED until host.enable."""
    admin("host.disable", env.api.host_ref)
    assert admin.fails("VM.start", vm, False, False) == ["HOST_DISABLED", env.api.host_ref]
    admin("host.enable", env.api.host_ref)
    admin("VM.start", vm, False, False)


def test_driver_fault_leaves_state(admin, vm, env):
    """A driver failure during start leaves the VM Halted with no operation in progress."""
    from xapid.backend.interface import BackendError

    env.api.hypervisor.driver.inject_fault("create_domain", BackendError("disk on fire"))
    assert admin.fails("VM.start", vm, False, False) == ["INTERNAL_ERROR", "create_domain: disk on fire"]
    assert admin("VM.get_power_state", vm) == "Halted"
    assert admin("VM.get_current_operations", vm) == {}
    assert "start" in admin("VM.get_allowed_operations", vm)


def test_restart_reconciles(admin, vm, env):
    """After a daemon restart running VMs are still Running (the domains kept running)."""
    admin("VM.start", vm, False, False)
    domid = admin("VM.get_domid", vm)
    env.restart()
    admin2 = env.login()
    assert admin2("VM.get_power_state", vm) == "Running"
    assert admin2("VM.get_domid", vm) == domid


def test_restart_marks_vanished_domains_halted(admin, vm, env):
    """A VM whose domain disappeared while the daemon was down comes back Halted."""
    admin("VM.start", vm, False, False)
    env.api.hypervisor.driver.destroy_domain(admin("VM.get_uuid", vm))
    env.restart()
    admin2 = env.login()
    assert admin2("VM.get_power_state", vm) == "Halted"
    assert admin2("VM.get_resident_on", vm) == "OpaqueRef:NULL"
