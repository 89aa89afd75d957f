"""Domains that change on their own: the VM follows its actions_after_* (sim driver, fake clock)."""

from __future__ import annotations

import pytest
from support import vm_record

SHUTDOWN_CASES = [
    # (reason, field, action, power state after, domain kept)
    ("poweroff", "actions_after_shutdown", "destroy", "Halted", False),
    ("poweroff", "actions_after_shutdown", "restart", "Running", True),
    ("reboot", "actions_after_reboot", "restart", "Running", True),
    ("reboot", "actions_after_reboot", "destroy", "Halted", False),
    ("crash", "actions_after_crash", "destroy", "Halted", False),
    ("crash", "actions_after_crash", "coredump_and_restart", "Running", True),
    ("crash", "actions_after_crash", "preserve", "Paused", True),
    ("watchdog", "actions_after_crash", "rename_restart", "Running", True),
]


@pytest.mark.parametrize(("reason", "field", "action", "after", "kept"), SHUTDOWN_CASES)
def test_guest_shutdown_follows_actions(admin, env, reason, field, action, after, kept):
    """A guest that shuts down, reboots or crashes by itself gets its VM's configured action."""
    vm = admin("VM.create", vm_record(**{field: action}))
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    domid = admin("VM.get_domid", vm)
    sim = env.api.hypervisor.driver
    sim.guest_shutdown(uuid, reason)
    env.settle()
    assert admin("VM.get_power_state", vm) == after
    domains = {d.uuid: d for d in sim.list_domains()}
    assert (uuid in domains) == kept
    if after == "Running":
        assert admin("VM.get_domid", vm) == domains[uuid].domid > domid
        assert domains[uuid].state == "running"
    elif after == "Halted":
        assert admin("VM.get_domid", vm) == -1
        assert all(not admin("VBD.get_currently_attached", vbd) for vbd in admin("VM.get_VBDs", vm))
    else:
        assert domains[uuid].state == "crashed"
        admin("VM.hard_shutdown", vm)
        assert admin("VM.get_power_state", vm) == "Halted"
        assert uuid not in {d.uuid for d in sim.list_domains()}


def test_domain_vanishing_halts_vm(admin, env):
    """A domain destroyed behind xapid's back leaves its VM Halted once reported."""
    from xapid.objects.vm_watch import domain_changed

    vm = admin("VM.create", vm_record())
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    env.api.hypervisor.driver.destroy_domain(uuid)
    domain_changed(env.api, uuid)
    env.settle()
    assert admin("VM.get_power_state", vm) == "Halted"


def test_operation_in_flight_is_left_alone(admin, env):
    """A report about a VM with an operation in flight changes nothing (the operation owns it)."""
    from xapid.objects.vm_watch import domain_changed

    vm = admin("VM.create", vm_record())
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    env.api.store.update(vm, {"current_operations": {"OpaqueRef:x": "clean_shutdown"}})
    env.api.hypervisor.driver.destroy_domain(uuid)
    domain_changed(env.api, uuid)
    env.settle()
    assert admin("VM.get_power_state", vm) == "Running"


def test_failing_action_is_logged_and_leaves_the_vm(admin, env):
    """When the restart action fails in the driver, the failure is logged and nothing crashes."""
    from xapid.backend.interface import BackendError

    vm = admin("VM.create", vm_record(actions_after_crash="restart"))
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    sim = env.api.hypervisor.driver
    sim.inject_fault("reboot_domain", BackendError("the host is out of luck"))
    sim.guest_shutdown(uuid, "crash")
    env.settle()
    assert admin("VM.get_power_state", vm) == "Running"  # unchanged: the domain is still there, crashed
    assert admin("VM.get_current_operations", vm) == {}
    assert sim.domain_info(uuid).state == "crashed"
