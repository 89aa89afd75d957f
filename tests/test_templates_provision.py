"""Default templates, VM.provision, VM.revert, VM.checkpoint and VM.snapshot_with_quiesce (issue 16).

Facts: xapi's ``xapi_templates.ml`` / ``xapi_vm.ml`` (provision), ``xapi_vm_snapshot.ml`` (revert,
checkpoint), ``xapi_vm_clone.ml`` (clone of a template), ``datamodel_vm.ml`` (snapshot_with_quiesce
removed in Quebec), ``xenserver/guest-templates-json`` (the default set).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import XenAPI
from support import PASSWORD, RealDaemon

from xapid.templates import DEFAULT_TEMPLATES, ParseFailure, parse_disks

GiB = 1 << 30


def default_sr(admin: Any) -> str:
    return admin("pool.get_default_SR", admin("pool.get_all")[0])


def templates(admin: Any) -> dict[str, dict[str, Any]]:
    return {rec["reference_label"]: {**rec, "ref": ref} for ref, rec in admin("VM.get_all_records").items()
            if rec["is_a_template"] and rec["is_default_template"]}


def disk_path(admin: Any, vdi: str) -> Path:
    sr = admin("VDI.get_SR", vdi)
    pbd = admin("SR.get_PBDs", sr)[0]
    return Path(admin("PBD.get_device_config", pbd)["location"]) / admin("VDI.get_location", vdi)


def sr_xml(admin: Any, vm: str, sr_uuid: str) -> None:
    other = admin("VM.get_other_config", vm)
    other["disks"] = other["disks"].replace('sr=""', f'sr="{sr_uuid}"')
    admin("VM.set_other_config", vm, other)


# -- the default set ------------------------------------------------------------------------


def test_default_templates_at_first_start(admin):
    found = templates(admin)
    assert set(found) == {t.reference_label for t in DEFAULT_TEMPLATES}
    other = found["other-install-media"]
    assert other["name_label"] == "Other install media" and other["HVM_boot_policy"] == "BIOS order"
    assert other["other_config"]["install-methods"] == "cdrom" and "disks" not in other["other_config"]
    debian = found["debian-12"]
    assert debian["name_label"] == "Debian Bookworm 12" and debian["HVM_boot_params"]["firmware"] == "uefi"
    assert debian["memory_static_min"] == GiB and debian["memory_static_max"] == 2 * GiB
    assert debian["other_config"]["linux_template"] == "true"
    assert debian["other_config"]["install-methods"] == "cdrom,nfs,http,ftp"
    assert debian["other_config"]["disks"] == (f'<provision><disk device="0" size="{10 * GiB}" sr="" '
                                               'bootable="true" type="system"/></provision>')
    assert debian["uuid"] == "07d91aaa-43f7-430a-bf84-0edb6714df0f"  # guest-templates-json's uuid
    pv = found["generic-linux-pv"]
    assert pv["HVM_boot_policy"] == "" and pv["PV_bootloader"] == "pygrub" and pv["domain_type"] == "pv"
    assert "provision" in debian["allowed_operations"] and "start" not in debian["allowed_operations"]
    assert admin.fails("VM.destroy", debian["ref"])[0] == "VM_CANNOT_DELETE_DEFAULT_TEMPLATE"
    assert admin.fails("VM.start", debian["ref"], False, False)[0] == "VM_IS_TEMPLATE"


def test_defaults_refreshed_on_restart_user_templates_untouched(tmp_path):
    """An upgrade (simulated by editing a default template in the DB) is undone at the next start;
    a user's template and a default template the user unmarked are left alone."""
    d = RealDaemon(tmp_path)
    try:
        s = XenAPI.Session(d.url)
        s.login_with_password("admin", PASSWORD)
        x = s.xenapi
        debian = x.VM.get_by_name_label("Debian Bookworm 12")[0]
        mine = x.VM.clone(debian, "my template")  # a user template from a default one
        assert not x.VM.get_is_default_template(mine)
        assert x.VM.get_other_config(mine)["base_template_name"] == "Debian Bookworm 12"
        x.VM.set_name_description(mine, "mine")
        x.VM.set_memory_limits(debian, str(GiB), str(8 * GiB), str(8 * GiB), str(8 * GiB))  # older values
        x.VM.set_name_label(debian, "Debian 12 (old)")
        rocky = x.VM.get_by_name_label("Rocky Linux 9")[0]
        x.VM.set_is_default_template(rocky, False)  # now the user's
        x.VM.set_name_description(rocky, "kept")
        s.xenapi.session.logout()
        d.stop()
        d.start()
        s = XenAPI.Session(d.url)
        s.login_with_password("admin", PASSWORD)
        x = s.xenapi
        rec = x.VM.get_record(debian)  # same ref, definition restored
        assert rec["name_label"] == "Debian Bookworm 12" and rec["memory_static_max"] == str(2 * GiB)
        assert x.VM.get_name_description(mine) == "mine" and x.VM.get_name_label(mine) == "my template"
        assert x.VM.get_name_description(rocky) == "kept"
        fresh = [r for r in x.VM.get_by_name_label("Rocky Linux 9") if x.VM.get_is_default_template(r)]
        assert len(fresh) == 1 and fresh[0] != rocky  # the default set is whole again
    finally:
        d.stop()


# -- provision ------------------------------------------------------------------------------


def test_provision_creates_disks_as_xapi(admin):
    sr = default_sr(admin)
    debian = templates(admin)["debian-12"]["ref"]
    vm = admin("VM.clone", debian, "web")
    rec = admin("VM.get_record", vm)
    assert rec["is_a_template"] and not rec["is_default_template"] and "default_template" not in rec["other_config"]
    sr_xml(admin, vm, admin("SR.get_uuid", sr))
    admin("VM.provision", vm)
    rec = admin("VM.get_record", vm)
    assert not rec["is_a_template"] and "disks" not in rec["other_config"]
    (vbd,) = rec["VBDs"]
    vbd_rec = admin("VBD.get_record", vbd)
    assert vbd_rec["userdevice"] == "0" and vbd_rec["mode"] == "RW" and vbd_rec["type"] == "Disk"
    assert vbd_rec["bootable"] and not vbd_rec["unpluggable"] and vbd_rec["other_config"] == {"owner": ""}
    vdi = admin("VDI.get_record", vbd_rec["VDI"])
    assert vdi["name_label"] == "0" and vdi["name_description"] == "Created by template provisioner"
    assert vdi["virtual_size"] == 10 * GiB and vdi["SR"] == sr and vdi["sm_config"]["vmhint"] == rec["uuid"]
    assert admin.fails("VM.provision", vm) == ["ONLY_PROVISION_TEMPLATE"]


def test_provision_errors(admin):
    sr = default_sr(admin)
    debian = templates(admin)["debian-12"]["ref"]
    vdis_before = set(admin("VDI.get_all"))
    # sr="" as shipped: xapi resolves sr only by uuid (no default-SR fallback)
    vm = admin("VM.clone", debian, "a")
    assert admin.fails("VM.provision", vm) == ["UUID_INVALID", "sr", ""]
    # an unknown SR uuid after a good first disk: the first disk is destroyed again
    vm = admin("VM.clone", debian, "b")
    uuid = admin("SR.get_uuid", sr)
    admin("VM.add_to_other_config", vm, "x", "y")
    other = admin("VM.get_other_config", vm)
    other["disks"] = (f'<provision><disk device="0" size="1048576" sr="{uuid}" bootable="true"/>'
                      f'<disk device="1" size="1048576" sr="00000000-0000-0000-0000-000000000000" '
                      f'bootable="false" type="user"/></provision>')
    admin("VM.set_other_config", vm, other)
    assert admin.fails("VM.provision", vm)[0] == "UUID_INVALID"
    assert admin("VM.get_VBDs", vm) == [] and set(admin("VDI.get_all")) == vdis_before
    # bad XML: INTERNAL_ERROR, as xapi's unhandled parse failure
    vm = admin("VM.clone", debian, "c")
    other = admin("VM.get_other_config", vm)
    other["disks"] = "<provision><disk size='1'/></provision>"
    admin("VM.set_other_config", vm, other)
    assert admin.fails("VM.provision", vm)[0] == "INTERNAL_ERROR"
    other["disks"] = "not xml"
    vm2 = admin("VM.clone", debian, "d")
    admin("VM.set_other_config", vm2, other)
    assert admin.fails("VM.provision", vm2)[0] == "INTERNAL_ERROR"
    # not a template
    plain = admin("VM.create", {**admin("VM.get_record", debian), "is_a_template": False, "name_label": "p"})
    assert admin.fails("VM.provision", plain) == ["ONLY_PROVISION_TEMPLATE"]


def test_parse_disks_rules():
    (d,) = parse_disks('<provision><disk device="1" size="5" sr="u" bootable="false" type="odd"/></provision>')
    assert (d.device, d.size, d.sr, d.bootable, d.type) == ("1", 5, "u", False, "system")
    for bad in ('<provision a="1"/>', '<p><disk device="0" size="1" sr="" bootable="true"/></p>',
                '<provision><disk device="0" size="x" sr="" bootable="true"/></provision>',
                '<provision><disk device="0" size="1" sr=""/></provision>', '<provision>'):
        with pytest.raises(ParseFailure):
            parse_disks(bad)


# -- snapshots ------------------------------------------------------------------------------


def installed_vm(admin: Any, name: str) -> tuple[str, Path]:
    sr = default_sr(admin)
    vm = admin("VM.clone", templates(admin)["debian-12"]["ref"], name)
    other = admin("VM.get_other_config", vm)
    other["disks"] = f'<provision><disk device="0" size="1048576" sr="{admin("SR.get_uuid", sr)}" bootable="true"/></provision>'
    admin("VM.set_other_config", vm, other)
    admin("VM.provision", vm)
    vdi = admin("VBD.get_VDI", admin("VM.get_VBDs", vm)[0])
    return vm, disk_path(admin, vdi)


def test_revert_halted_snapshot_restores_disk_and_fields(admin):
    vm, path = installed_vm(admin, "r")
    path.write_bytes(b"before" + bytes(1048570))
    snap = admin("VM.snapshot", vm, "s1", [])
    assert admin("VM.get_is_a_template", snap) and "revert" in admin("VM.get_allowed_operations", snap)
    path_after = disk_path(admin, admin("VBD.get_VDI", admin("VM.get_VBDs", vm)[0]))
    path_after.write_bytes(b"after!" + bytes(1048570))
    admin("VM.set_name_description", vm, "changed")
    admin("VM.set_VCPUs_max", vm, 4)
    admin("VM.revert", snap)
    rec = admin("VM.get_record", vm)
    assert rec["power_state"] == "Halted" and rec["VCPUs_max"] == 1 and rec["name_description"] != "changed"
    assert rec["parent"] == snap and not rec["is_a_template"] and rec["name_label"] == "r"
    new_path = disk_path(admin, admin("VBD.get_VDI", rec["VBDs"][0]))
    assert new_path.read_bytes()[:6] == b"before"
    assert admin.fails("VM.revert", vm) == ["ONLY_REVERT_SNAPSHOT"]
    admin("VM.start", vm, False, False)
    admin("VM.revert", snap)  # a running VM is shut down first
    assert admin("VM.get_power_state", vm) == "Halted"


def test_checkpoint_and_revert_to_suspended(admin):
    vm, path = installed_vm(admin, "c")
    path.write_bytes(b"state1" + bytes(1048570))
    admin("VM.start", vm, False, False)
    cp = admin("VM.checkpoint", vm, "cp")
    assert admin("VM.get_power_state", vm) == "Running"
    rec = admin("VM.get_record", cp)
    assert rec["power_state"] == "Suspended" and rec["is_a_snapshot"] and rec["snapshot_of"] == vm
    admin("VM.hard_shutdown", vm)
    disk_path(admin, admin("VBD.get_VDI", admin("VM.get_VBDs", vm)[0])).write_bytes(b"state2" + bytes(1048570))
    admin("VM.revert", cp)
    assert admin("VM.get_power_state", vm) == "Suspended"
    assert disk_path(admin, admin("VBD.get_VDI", admin("VM.get_VBDs", vm)[0])).read_bytes()[:6] == b"state1"
    admin("VM.resume", vm, False, False)
    assert admin("VM.get_power_state", vm) == "Running"


def test_snapshot_with_quiesce_is_removed(admin):
    vm, _ = installed_vm(admin, "q")
    assert admin.fails("VM.snapshot_with_quiesce", vm, "x") == ["MESSAGE_REMOVED"]


# -- client sequences over the wire -----------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = RealDaemon(tmp_path_factory.mktemp("provision"))
    yield d
    d.stop()


def sdk(d: RealDaemon) -> Any:
    s = XenAPI.Session(d.url)
    s.login_with_password("admin", PASSWORD)
    return s


def test_ansible_xenserver_guest_deploy(daemon):
    """A deploy from a template that keeps the template's provisioning XML (sr= rewritten to the SR
    uuid, as xe vm-install does): VM.get_by_name_label(template) → VM.clone → VM.provision → set fields
    → VIF.create → VM.start → wait for guest_metrics networks "0/ip".  Ansible's exact sequence (which
    deletes ``disks`` and makes the disks itself) is replayed in tests/test_client_replays.py.
    (module_utils/xenserver.py wait_for_vm_ip_address)."""
    s = sdk(daemon)
    x = s.xenapi
    template = x.VM.get_by_name_label("Debian Bookworm 12")[0]
    vm = x.VM.clone(template, "ansible-vm")
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    other = x.VM.get_other_config(vm)
    other["disks"] = other["disks"].replace('sr=""', f'sr="{x.SR.get_uuid(sr)}"')
    x.VM.set_other_config(vm, other)
    x.VM.provision(vm)
    x.VM.set_name_description(vm, "deployed by Ansible")
    x.VM.set_VCPUs_max(vm, "2")
    x.VM.set_VCPUs_at_startup(vm, "2")
    x.VM.set_memory_limits(vm, str(GiB), str(GiB), str(GiB), str(GiB))
    network = next(n for n, r in x.network.get_all_records().items() if r["bridge"] == "xenbr0")
    x.VIF.create({"device": "0", "network": network, "VM": vm, "MAC": "", "MTU": "1500", "other_config": {},
                  "qos_algorithm_type": "", "qos_algorithm_params": {}})  # its "networks" parameter
    x.VM.start(vm, False, False)
    deadline = time.monotonic() + 30
    ip = ""
    while time.monotonic() < deadline and not ip:
        gm = x.VM.get_guest_metrics(vm)
        if gm != "OpaqueRef:NULL":
            ip = x.VM_guest_metrics.get_networks(gm).get("0/ip", "")
        time.sleep(0.2)
    assert ip
    x.VM.hard_shutdown(vm)


def test_xo_create_vm_and_xe_vm_install(daemon):
    """A copy of a template onto an SR with its provisioning XML rewritten and provisioned, then the
    fields set (Xen Orchestra's exact createVm is replayed in tests/test_client_replays.py); and
    ``xe vm-install`` (cli_operations.ml vm_install_real:
    VM.copy onto the SR, suspend_SR, sr= rewritten, VM.provision) via the async form with a task."""
    s = sdk(daemon)
    x = s.xenapi
    template = x.VM.get_by_name_label("Ubuntu Noble Numbat 24.04")[0]
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vm = x.VM.copy(template, "xo-vm", sr)
    other = x.VM.get_other_config(vm)
    other["disks"] = other["disks"].replace('sr=""', f'sr="{x.SR.get_uuid(sr)}"')
    x.VM.set_other_config(vm, other)
    task = x.Async.VM.provision(vm)
    deadline = time.monotonic() + 30
    while x.task.get_status(task) == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert x.task.get_status(task) == "success" and x.task.get_progress(task) == 1.0
    assert not x.VM.get_is_a_template(vm) and len(x.VM.get_VBDs(vm)) == 1
    x.VM.set_name_description(vm, "made by XO")
    assert x.VM.get_other_config(vm)["base_template_name"] == "Ubuntu Noble Numbat 24.04"
