"""Storage, disks, CD drives, network cards and consoles through the dispatcher, with real files."""

from __future__ import annotations

import os


from support import vm_record

GiB = 1 << 30


def default_sr(admin):
    return admin("pool.get_default_SR", admin("pool.get_all")[0])


def iso_sr(admin):
    return next(r for r, rec in admin("SR.get_all_records").items() if rec["content_type"] == "iso")


def sr_dir(admin, sr):
    pbd = admin("SR.get_PBDs", sr)[0]
    return admin("PBD.get_device_config", pbd)["location"]


def vdi_record(sr, size=GiB, **overrides):
    record = {"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
              "other_config": {}, "name_label": "disk"}
    record.update(overrides)
    return record


def vbd_record(vm, vdi, userdevice="autodetect", **overrides):
    record = {"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": False, "mode": "RW", "type": "Disk",
              "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}
    record.update(overrides)
    return record


def vif_record(vm, network, device="0", mac=""):
    return {"device": device, "network": network, "VM": vm, "MAC": mac, "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def network(admin):
    return next(r for r, rec in admin("network.get_all_records").items() if rec["bridge"] == "xenbr0")


def test_first_start_inventory(admin, env):
    """The sim's first start makes a default file SR with a PBD, an ISO SR, and xenbr0 with a PIF."""
    sr = default_sr(admin)
    record = admin("SR.get_record", sr)
    assert record["type"] == "file" and len(record["PBDs"]) == 1
    assert record["physical_size"] > 0
    pbd = admin("PBD.get_record", record["PBDs"][0])
    assert pbd["host"] == env.api.host_ref and pbd["currently_attached"]
    assert admin("SR.get_type", iso_sr(admin)) == "iso"
    net = network(admin)
    pifs = admin("network.get_PIFs", net)
    assert len(pifs) == 1 and admin("PIF.get_device", pifs[0]) == "eth0"
    assert pifs[0] in admin("host.get_PIFs", env.api.host_ref)
    assert record["PBDs"][0] in admin("host.get_PBDs", env.api.host_ref)


def test_vdi_is_a_sparse_file(admin):
    """VDI.create makes a sparse file of virtual_size; destroy deletes it."""
    sr = default_sr(admin)
    vdi = admin("VDI.create", vdi_record(sr, 4 * GiB))
    path = os.path.join(sr_dir(admin, sr), admin("VDI.get_location", vdi))
    assert os.path.getsize(path) == 4 * GiB
    assert os.stat(path).st_blocks * 512 < 1 << 20
    assert vdi in admin("SR.get_VDIs", sr)
    assert admin("SR.get_virtual_allocation", sr) >= 4 * GiB
    admin("VDI.destroy", vdi)
    assert not os.path.exists(path)
    assert vdi not in admin("SR.get_VDIs", sr)


def test_vdi_resize_grows_only(admin):
    """VDI.resize grows the file and refuses to shrink."""
    sr = default_sr(admin)
    vdi = admin("VDI.create", vdi_record(sr, GiB))
    admin("VDI.resize", vdi, str(2 * GiB))
    path = os.path.join(sr_dir(admin, sr), admin("VDI.get_location", vdi))
    assert os.path.getsize(path) == 2 * GiB
    assert admin.fails("VDI.resize", vdi, str(GiB)) == ["INVALID_VALUE", "size", str(GiB)]


def test_vdi_copy_keeps_contents(admin):
    """VDI.copy and VDI.clone make independent files with the same data."""
    sr = default_sr(admin)
    vdi = admin("VDI.create", vdi_record(sr, 8 << 20))
    path = os.path.join(sr_dir(admin, sr), admin("VDI.get_location", vdi))
    with open(path, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"hello")
    clone = admin("VDI.clone", vdi, {})
    copy = admin("VDI.copy", vdi, sr)
    for other in (clone, copy):
        with open(os.path.join(sr_dir(admin, sr), admin("VDI.get_location", other)), "rb") as f:
            f.seek(5 << 20)
            assert f.read(5) == b"hello"
    snap = admin("VDI.snapshot", vdi, {})
    assert admin("VDI.get_snapshot_of", snap) == vdi and admin("VDI.get_is_a_snapshot", snap)
    assert snap in admin("VDI.get_snapshots", vdi)


def test_permission_error_is_clear_and_leaves_nothing(admin, monkeypatch):
    """A permission error creating a disk is SR_BACKEND_FAILURE EACCES with the reason; nothing is left."""
    import errno

    from xapid.backend import storage
    sr = default_sr(admin)
    directory = sr_dir(admin, sr)
    before, vdis = set(os.listdir(directory)), admin("SR.get_VDIs", sr)

    def denied(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(storage.os, "open", denied)
    error = admin.fails("VDI.create", vdi_record(sr))
    monkeypatch.undo()
    assert error[:2] == ["SR_BACKEND_FAILURE", "EACCES"] and "Permission denied" in error[3]
    assert set(os.listdir(directory)) == before and admin("SR.get_VDIs", sr) == vdis


def test_disk_full_leaves_nothing(admin, env, monkeypatch):
    """A disk-full failure while copying is SR_BACKEND_FAILURE ENOSPC and leaves no file or VDI."""
    import errno

    from xapid.backend import storage
    sr = default_sr(admin)
    vdi = admin("VDI.create", vdi_record(sr, 4 << 20))
    path = os.path.join(sr_dir(admin, sr), admin("VDI.get_location", vdi))
    with open(path, "r+b") as f:
        f.write(b"x" * 4096)
    directory = sr_dir(admin, sr)
    before, vdis = set(os.listdir(directory)), admin("SR.get_VDIs", sr)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", full)
    error = admin.fails("VDI.copy", vdi, sr)
    monkeypatch.setattr(storage.os, "fsync", real_fsync)
    assert error[:2] == ["SR_BACKEND_FAILURE", "ENOSPC"] and "No space left" in error[3]
    assert set(os.listdir(directory)) == before and admin("SR.get_VDIs", sr) == vdis


def test_sr_scan_reconciles_files(admin):
    """SR.scan introduces files added behind the daemon's back and forgets vanished ones."""
    sr = default_sr(admin)
    directory = sr_dir(admin, sr)
    vdi = admin("VDI.create", vdi_record(sr, 1 << 20))
    os.unlink(os.path.join(directory, admin("VDI.get_location", vdi)))
    with open(os.path.join(directory, "imported.img"), "wb") as f:
        f.truncate(3 << 20)
    admin("SR.scan", sr)
    records = {admin("VDI.get_location", v): v for v in admin("SR.get_VDIs", sr)}
    assert vdi not in records.values()
    assert admin("VDI.get_virtual_size", records["imported.img"]) == 3 << 20


def test_iso_library(admin):
    """ISO files dropped in the ISO SR's directory appear as read-only VDIs after a scan."""
    sr = iso_sr(admin)
    with open(os.path.join(sr_dir(admin, sr), "debian.iso"), "wb") as f:
        f.write(b"\0" * 2048)
    admin("SR.scan", sr)
    (vdi,) = [v for v in admin("SR.get_VDIs", sr) if admin("VDI.get_name_label", v) == "debian.iso"]
    assert admin("VDI.get_read_only", vdi)
    assert admin.fails("VDI.create", vdi_record(sr))[0] == "SR_OPERATION_NOT_SUPPORTED"


def test_vbd_rules(admin):
    """Slots are autodetected, duplicates refused, CDs must be read-only, limits enforced."""
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record())
    vdi = admin("VDI.create", vdi_record(sr))
    first = admin("VBD.create", vbd_record(vm, vdi))
    assert admin("VBD.get_userdevice", first) == "0" and admin("VBD.get_device", first) == "xvda"
    assert admin.fails("VBD.create", vbd_record(vm, vdi, "0")) == ["DEVICE_ALREADY_EXISTS", "0"]
    assert admin.fails("VBD.create", vbd_record(vm, "OpaqueRef:NULL", type="CD", empty=True)) == \
        ["VBD_CDS_MUST_BE_READONLY"]
    assert admin.fails("VBD.create", vbd_record(vm, "OpaqueRef:bad"))[:2] == ["HANDLE_INVALID", "VDI"]
    assert admin("VM.get_allowed_VBD_devices", vm) == [str(i) for i in range(1, 16)]
    for _ in range(15):
        admin("VBD.create", vbd_record(vm, vdi))
    assert admin("VM.get_allowed_VBD_devices", vm) == []
    assert admin.fails("VBD.create", vbd_record(vm, vdi))[0] == "DEVICE_ALREADY_EXISTS"
    assert len(admin("VDI.get_VBDs", vdi)) == 16


def test_full_vm_build_start_hotplug_cd(admin, env):
    """Two disks, a CD with an ISO and two NICs: start attaches them, hot-plug and CD swaps reach the driver."""
    sr, isos = default_sr(admin), iso_sr(admin)
    with open(os.path.join(sr_dir(admin, isos), "tools.iso"), "wb") as f:
        f.write(b"iso")
    admin("SR.scan", isos)
    iso = next(v for v in admin("SR.get_VDIs", isos) if admin("VDI.get_name_label", v) == "tools.iso")
    vm = admin("VM.create", vm_record())
    disks = [admin("VDI.create", vdi_record(sr)) for _ in range(2)]
    vbds = [admin("VBD.create", vbd_record(vm, d)) for d in disks]
    cd = admin("VBD.create", vbd_record(vm, iso, "3", type="CD", mode="RO"))
    net = network(admin)
    vifs = [admin("VIF.create", vif_record(vm, net, str(i))) for i in range(2)]
    assert all(admin("VIF.get_MAC", v).startswith("00:16:3e:") for v in vifs)
    assert admin("VM.get_allowed_VIF_devices", vm) == ["2", "3", "4", "5", "6"]
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    devices = env.api.hypervisor.driver.devices(uuid)
    assert [d.device for d in devices["disks"]] == ["xvda", "xvdb", "xvdd"]
    assert devices["disks"][2].kind == "cdrom" and devices["disks"][2].path.endswith("tools.iso")
    assert [n.bridge for n in devices["nics"]] == ["xenbr0", "xenbr0"]
    assert all(admin("VBD.get_currently_attached", v) for v in [*vbds, cd])
    consoles = admin("VM.get_consoles", vm)
    assert len(consoles) == 1 and admin("console.get_protocol", consoles[0]) == "vt100"
    assert "/console?uuid=" in admin("console.get_location", consoles[0])
    # hot-plug a third disk
    extra = admin("VBD.create", vbd_record(vm, admin("VDI.create", vdi_record(sr))))
    assert not admin("VBD.get_currently_attached", extra)
    admin("VBD.plug", extra)
    assert admin.fails("VBD.plug", extra) == ["DEVICE_ALREADY_ATTACHED", extra]
    assert "xvdc" in [d.device for d in env.api.hypervisor.driver.devices(uuid)["disks"]]
    admin("VBD.unplug", extra)
    assert admin.fails("VBD.unplug", extra) == ["DEVICE_ALREADY_DETACHED", extra]
    # CD eject / insert
    assert admin.fails("VBD.insert", cd, iso) == ["VBD_NOT_EMPTY", cd]
    admin("VBD.eject", cd)
    assert admin("VBD.get_empty", cd) and admin.fails("VBD.eject", cd) == ["VBD_IS_EMPTY", cd]
    assert env.api.hypervisor.driver.devices(uuid)["disks"][-1].path == ""
    admin("VBD.insert", cd, iso)
    assert admin.fails("VBD.eject", vbds[0]) == ["VBD_NOT_REMOVABLE_MEDIA", vbds[0]]
    assert admin.fails("VBD.insert", cd, disks[0])[0] == "VBD_NOT_EMPTY"
    # a disk in use cannot be destroyed
    assert admin.fails("VDI.destroy", disks[0]) == ["VDI_IN_USE", disks[0], "destroy"]
    admin("VM.hard_shutdown", vm)
    assert not any(admin("VBD.get_currently_attached", v) for v in vbds)
    assert admin("VM.get_consoles", vm) == []
    # destroying the VM removes its devices but not its disks
    admin("VM.destroy", vm)
    for ref, cls in [(vbds[0], "VBD"), (vifs[0], "VIF"), (cd, "VBD")]:
        assert admin.fails(f"{cls}.get_record", ref)[0] == "HANDLE_INVALID"
    assert all(admin("VDI.get_VBDs", d) == [] for d in disks)
    assert vifs[0] not in admin("network.get_VIFs", net)


def test_hotplug_needs_running_vm(admin):
    """VBD.plug on a halted VM is VM_BAD_POWER_STATE."""
    vm = admin("VM.create", vm_record())
    vbd = admin("VBD.create", vbd_record(vm, admin("VDI.create", vdi_record(default_sr(admin)))))
    assert admin.fails("VBD.plug", vbd) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]


def test_hvm_console_is_rfb(admin):
    """An HVM guest gets an rfb console; a PV one vt100."""
    vm = admin("VM.create", vm_record(HVM_boot_policy="BIOS order", HVM_boot_params={"order": "dc"}, PV_kernel=""))
    admin("VM.start", vm, False, False)
    assert admin("console.get_protocol", admin("VM.get_consoles", vm)[0]) == "rfb"


def test_vif_rules(admin):
    """VIF MACs are validated and unique slots enforced; networks in use cannot be destroyed."""
    vm = admin("VM.create", vm_record())
    net = admin("network.create", {"name_label": "internal", "other_config": {}})
    assert admin("network.get_bridge", net).startswith("xapi")
    vif = admin("VIF.create", vif_record(vm, net, "0", "00:16:3E:AA:BB:CC"))
    assert admin("VIF.get_MAC", vif) == "00:16:3e:aa:bb:cc"
    assert admin.fails("VIF.create", vif_record(vm, net, "0")) == ["DEVICE_ALREADY_EXISTS", "0"]
    assert admin.fails("VIF.create", vif_record(vm, net, "1", "zz")) == ["INVALID_VALUE", "MAC", "zz"]
    assert admin.fails("VIF.create", vif_record(vm, net, "7"))[0] == "INVALID_VALUE"
    assert admin.fails("network.destroy", net) == ["NETWORK_CONTAINS_VIF", vif]
    admin("VIF.destroy", vif)
    admin("network.destroy", net)
    pif = admin("PIF.get_all")[0]
    assert admin.fails("PIF.destroy", pif) == ["PIF_IS_PHYSICAL", pif]


def test_vm_clone_copy_snapshot(admin):
    """clone and copy duplicate the VM with new disks and NICs; snapshot links to its source."""
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record(name_label="orig"))
    vdi = admin("VDI.create", vdi_record(sr, 1 << 20))
    admin("VBD.create", vbd_record(vm, vdi))
    admin("VIF.create", vif_record(vm, network(admin)))
    clone = admin("VM.clone", vm, "clone")
    record = admin("VM.get_record", clone)
    assert record["name_label"] == "clone" and record["power_state"] == "Halted"
    assert record["uuid"] != admin("VM.get_uuid", vm)
    (vbd,) = record["VBDs"]
    assert admin("VBD.get_VDI", vbd) != vdi
    (vif,) = record["VIFs"]
    assert admin("VIF.get_MAC", vif) != admin("VIF.get_MAC", admin("VM.get_VIFs", vm)[0])
    copy = admin("VM.copy", vm, "copy", sr)
    assert admin("VM.get_name_label", copy) == "copy"
    snap = admin("VM.snapshot", vm, "snap", [])
    assert admin("VM.get_is_a_snapshot", snap) and admin("VM.get_snapshot_of", snap) == vm
    assert snap in admin("VM.get_snapshots", vm)
    admin("VM.start", vm, False, False)
    assert admin.fails("VM.clone", vm, "x")[0] == "VM_BAD_POWER_STATE"


def test_devices_survive_restart(admin, env):
    """Disks, drives and cards keep their links across a restart; files and VDIs still agree."""
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record())
    vdi = admin("VDI.create", vdi_record(sr))
    vbd = admin("VBD.create", vbd_record(vm, vdi))
    env.restart()
    again = env.login()
    assert again("VM.get_VBDs", vm) == [vbd] and again("VDI.get_VBDs", vdi) == [vbd]
    assert vdi in again("SR.get_VDIs", sr)


def test_destroyed_sr_leaves_no_dangling_refs(admin, env, tmp_path):
    """Refs to a destroyed SR elsewhere (VM.suspend_SR, host's SR fields) become OpaqueRef:NULL."""
    sr = admin("SR.create", env.api.host_ref, {"location": str(env.api.state_dir / "extra")}, "0", "extra", "",
               "file", "user", False, {})
    vm = admin("VM.create", vm_record(suspend_SR=sr))
    admin("host.set_suspend_image_sr", env.api.host_ref, sr)
    for pbd in admin("SR.get_PBDs", sr):
        admin("PBD.unplug", pbd)
    admin("SR.destroy", sr)
    assert admin("VM.get_suspend_SR", vm) == "OpaqueRef:NULL"
    assert admin("host.get_suspend_image_sr", env.api.host_ref) == "OpaqueRef:NULL"
