"""Disks, CD drives, NICs and their linked objects through the official XenAPI SDK over real sockets."""

from __future__ import annotations

import os
import re
import time

import pytest
import XenAPI

import invariants
from support import PASSWORD, vm_record

NULL = "OpaqueRef:NULL"
MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def x(daemon):
    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD, "1.0", "xapid-device-tests")
    yield s.xenapi
    s.logout()


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


def default_sr(x) -> str:
    return x.pool.get_default_SR(x.pool.get_all()[0])


def iso_sr(x) -> str:
    return next(r for r, rec in x.SR.get_all_records().items() if rec["content_type"] == "iso")


def sr_dir(x, sr) -> str:
    return x.PBD.get_device_config(x.SR.get_PBDs(sr)[0])["location"]


def xenbr0(x) -> str:
    return next(r for r, rec in x.network.get_all_records().items() if rec["bridge"] == "xenbr0")


def vdi_file(x, vdi) -> str:
    return os.path.join(sr_dir(x, x.VDI.get_SR(vdi)), x.VDI.get_location(vdi))


def vdi_record(sr, size, name="disk"):
    return {"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": name}


def vbd_record(vm, vdi, userdevice="autodetect", **overrides):
    record = {"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": False, "mode": "RW", "type": "Disk",
              "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}
    record.update(overrides)
    return record


def vif_record(vm, network, device):
    return {"device": device, "network": network, "VM": vm, "MAC": "", "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def add_iso(x, name: str, size: int) -> str:
    """Drop an ISO file into the ISO SR's directory, scan, and return its VDI."""
    sr = iso_sr(x)
    with open(os.path.join(sr_dir(x, sr), name), "wb") as f:
        f.write(b"\x01" * size)
    x.SR.scan(sr)
    (vdi,) = [v for v in x.SR.get_VDIs(sr) if x.VDI.get_name_label(v) == name]
    return vdi


def build(x, iso: str) -> dict:
    """A VM with a 1 GiB and a 2 GiB disk, a CD drive holding *iso*, and two NICs on xenbr0."""
    sr = default_sr(x)
    vm = x.VM.create(vm_record(name_label="sdk-devices"))
    disks = [x.VDI.create(vdi_record(sr, size, f"disk{i}")) for i, size in enumerate((GiB, 2 * GiB))]
    vbds = [x.VBD.create(vbd_record(vm, d)) for d in disks]
    cd = x.VBD.create(vbd_record(vm, iso, "3", type="CD", mode="RO"))
    net = xenbr0(x)
    vifs = [x.VIF.create(vif_record(vm, net, str(i))) for i in range(2)]
    return {"vm": vm, "sr": sr, "disks": disks, "sizes": [GiB, 2 * GiB], "vbds": vbds, "cd": cd, "iso": iso,
            "net": net, "vifs": vifs}


def read_back(x, vm: str) -> dict:
    """get_record of the VM and of every object linked to it, each link checked from both ends."""
    records = {"VM": x.VM.get_record(vm), "VBD": {}, "VDI": {}, "SR": {}, "VIF": {}, "network": {}, "console": {},
               "VBD_metrics": {}, "VIF_metrics": {}}
    vm_rec = records["VM"]
    for vbd in vm_rec["VBDs"]:
        rec = records["VBD"][vbd] = x.VBD.get_record(vbd)
        assert rec["VM"] == vm
        records["VBD_metrics"][vbd] = x.VBD_metrics.get_record(rec["metrics"])
        if rec["empty"]:
            assert rec["VDI"] == NULL
            continue
        vdi = records["VDI"][rec["VDI"]] = x.VDI.get_record(rec["VDI"])
        assert vbd in vdi["VBDs"]
        sr = records["SR"][vdi["SR"]] = x.SR.get_record(vdi["SR"])
        assert rec["VDI"] in sr["VDIs"]
        for pbd in sr["PBDs"]:
            assert x.PBD.get_record(pbd)["SR"] == vdi["SR"]
    for vif in vm_rec["VIFs"]:
        rec = records["VIF"][vif] = x.VIF.get_record(vif)
        assert rec["VM"] == vm
        records["VIF_metrics"][vif] = x.VIF_metrics.get_record(rec["metrics"])
        net = records["network"][rec["network"]] = x.network.get_record(rec["network"])
        assert vif in net["VIFs"]
    for console in vm_rec["consoles"]:
        rec = records["console"][console] = x.console.get_record(console)
        assert rec["VM"] == vm
    records["VM_metrics"] = x.VM_metrics.get_record(vm_rec["metrics"])
    if vm_rec["resident_on"] != NULL:
        assert vm in x.host.get_record(vm_rec["resident_on"])["resident_VMs"]
    return records


def test_build_start_hotplug_cd_and_read_back(x):
    """A VM with two disks, an ISO in its CD drive and two NICs starts; a hot-plugged disk and a CD
    eject/insert show up in every linked object's record, ints as strings, files of the right size."""
    iso = add_iso(x, "sdk-tools.iso", 6144)
    iso_rec = x.VDI.get_record(iso)
    assert iso_rec["read_only"] is True and iso_rec["virtual_size"] == "6144" and iso_rec["SR"] == iso_sr(x)
    b = build(x, iso)
    vm = b["vm"]
    for disk, size in zip(b["disks"], b["sizes"]):
        assert os.path.getsize(vdi_file(x, disk)) == size
        assert x.VDI.get_virtual_size(disk) == str(size)
    assert [x.VBD.get_userdevice(v) for v in b["vbds"]] == ["0", "1"]
    assert [x.VBD.get_device(v) for v in b["vbds"]] == ["xvda", "xvdb"]
    macs = [x.VIF.get_MAC(v) for v in b["vifs"]]
    assert len(set(macs)) == 2 and all(re.fullmatch(r"00:16:3e(:[0-9a-f]{2}){3}", m) for m in macs)
    assert x.VM.get_allowed_VBD_devices(vm) == ["2", *map(str, range(4, 16))]
    assert x.VM.get_allowed_VIF_devices(vm) == ["2", "3", "4", "5", "6"]

    x.VM.start(vm, False, False)
    # hot-plug a third disk into the running VM
    extra_disk = x.VDI.create(vdi_record(b["sr"], 512 * MiB, "hotplugged"))
    extra = x.VBD.create(vbd_record(vm, extra_disk))
    assert x.VBD.get_userdevice(extra) == "2" and x.VBD.get_currently_attached(extra) is False
    x.VBD.plug(extra)
    assert x.VBD.get_currently_attached(extra) is True
    assert failure(x.VBD.plug, extra) == ["DEVICE_ALREADY_ATTACHED", extra]
    # eject the CD, then put the ISO back
    cd = b["cd"]
    x.VBD.eject(cd)
    assert x.VBD.get_empty(cd) is True and x.VBD.get_VDI(cd) == NULL
    assert cd not in x.VDI.get_VBDs(iso)
    assert failure(x.VBD.eject, cd) == ["VBD_IS_EMPTY", cd]
    x.VBD.insert(cd, iso)
    assert x.VBD.get_empty(cd) is False and x.VBD.get_VDI(cd) == iso
    assert failure(x.VBD.insert, cd, iso) == ["VBD_NOT_EMPTY", cd]

    r = read_back(x, vm)
    v = r["VM"]
    assert v["power_state"] == "Running" and v["name_label"] == "sdk-devices"
    assert set(v["VBDs"]) == {*b["vbds"], cd, extra} and set(v["VIFs"]) == set(b["vifs"])
    # ints travel as decimal strings, as xapi sends them
    assert v["memory_static_max"] == str(512 << 20) and v["VCPUs_max"] == "2" and v["user_version"] == "1"
    assert isinstance(v["domid"], str) and int(v["domid"]) > 0
    assert r["VM_metrics"]["memory_actual"] == str(512 << 20) and r["VM_metrics"]["VCPUs_number"] == "1"
    assert all(isinstance(rec["physical_size"], str) and int(rec["physical_size"]) > 0 for rec in r["SR"].values())
    assert {vif: rec["MTU"] for vif, rec in r["VIF"].items()} == {vif: "1500" for vif in b["vifs"]}
    # every device is attached and points where it should
    assert all(rec["currently_attached"] for rec in [*r["VBD"].values(), *r["VIF"].values()])
    assert r["VBD"][cd]["type"] == "CD" and r["VBD"][cd]["mode"] == "RO" and r["VBD"][cd]["VDI"] == iso
    assert r["VBD"][cd]["device"] == "xvdd" and r["VBD"][extra]["device"] == "xvdc"
    sizes = {disk: str(size) for disk, size in [*zip(b["disks"], b["sizes"]), (extra_disk, 512 * MiB)]}
    assert {d: r["VDI"][d]["virtual_size"] for d in sizes} == sizes
    assert all(r["VDI"][d]["SR"] == b["sr"] for d in sizes) and r["VDI"][iso]["SR"] == iso_sr(x)
    for disk, size in sizes.items():
        assert os.path.getsize(vdi_file(x, disk)) == int(size)
    assert set(r["network"]) == {b["net"]} and set(b["vifs"]) <= set(r["network"][b["net"]]["VIFs"])
    assert len(r["console"]) == 1
    (console,) = r["console"].values()
    assert console["protocol"] == "vt100" and f"/console?uuid={console['uuid']}" in console["location"]
    assert set(r["VBD_metrics"]) == set(v["VBDs"]) and set(r["VIF_metrics"]) == set(v["VIFs"])
    assert len({m["uuid"] for m in [*r["VBD_metrics"].values(), *r["VIF_metrics"].values()]}) == 6
    assert failure(x.VDI.destroy, b["disks"][0]) == ["VDI_IN_USE", b["disks"][0], "destroy"]
    x.VM.hard_shutdown(vm)
    assert x.VM.get_consoles(vm) == []
    assert not any(x.VBD.get_currently_attached(d) for d in x.VM.get_VBDs(vm))


def test_destroy_keeps_disks_and_drops_devices(x):
    """VM.destroy removes the VBDs, VIFs, consoles and metrics; the VDIs and their files stay and no
    network, VDI or SR still lists what went."""
    iso = add_iso(x, "sdk-destroy.iso", 2048)
    b = build(x, iso)
    vm = b["vm"]
    x.VM.start(vm, False, False)
    r = read_back(x, vm)
    assert failure(x.VM.destroy, vm) == ["VM_BAD_POWER_STATE", vm, "halted, suspended", "running"]
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)
    gone = [("VM", vm), ("VM_metrics", r["VM"]["metrics"]),
            *[("VBD", v) for v in r["VBD"]], *[("VIF", v) for v in r["VIF"]],
            *[("console", c) for c in r["console"]],
            *[("VBD_metrics", rec["metrics"]) for rec in r["VBD"].values()],
            *[("VIF_metrics", rec["metrics"]) for rec in r["VIF"].values()]]
    assert len(gone) == 1 + 1 + 3 + 2 + 1 + 3 + 2
    for cls, ref in gone:
        assert failure(getattr(x, cls).get_record, ref) == ["HANDLE_INVALID", cls, ref], cls
        assert ref not in getattr(x, cls).get_all(), cls
    for disk, size in zip(b["disks"], b["sizes"]):
        rec = x.VDI.get_record(disk)
        assert rec["VBDs"] == [] and rec["virtual_size"] == str(size) and disk in x.SR.get_VDIs(b["sr"])
        assert os.path.getsize(vdi_file(x, disk)) == size
    assert x.VDI.get_VBDs(iso) == [] and os.path.exists(vdi_file(x, iso))
    assert not set(b["vifs"]) & set(x.network.get_VIFs(b["net"]))
    assert not set(b["vifs"]) & set(x.network.get_record(b["net"])["VIFs"])
    # the disks can still be used, then destroyed with their files
    for disk in b["disks"]:
        path = vdi_file(x, disk)
        x.VDI.destroy(disk)
        assert not os.path.exists(path) and disk not in x.SR.get_VDIs(b["sr"])


def test_async_clone_polled_with_task_get_status(x):
    """Async.VM.clone returns a task at once; polled with task.get_status it succeeds with the clone's
    ref as result, and the clone has its own copy of the disk (same data) and a new MAC."""
    sr = default_sr(x)
    vm = x.VM.create(vm_record(name_label="sdk-clone-source"))
    disk = x.VDI.create(vdi_record(sr, 8 * MiB))
    x.VBD.create(vbd_record(vm, disk))
    vif = x.VIF.create(vif_record(vm, xenbr0(x), "0"))
    with open(vdi_file(x, disk), "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"written by the guest")
    task = x.Async.VM.clone(vm, "sdk-clone")
    assert task.startswith("OpaqueRef:")
    deadline = time.monotonic() + 20
    while x.task.get_status(task) == "pending":
        assert time.monotonic() < deadline, "the clone task never finished"
        time.sleep(0.05)
    record = x.task.get_record(task)
    assert record["status"] == "success", record["error_info"]
    assert record["error_info"] == [] and float(record["progress"]) == 1.0
    match = re.fullmatch(r"<value>(OpaqueRef:[0-9a-f-]+)</value>", record["result"])
    assert match, record["result"]
    clone = match.group(1)
    c = x.VM.get_record(clone)
    assert c["name_label"] == "sdk-clone" and c["power_state"] == "Halted" and c["parent"] == vm
    assert clone in x.VM.get_children(vm)
    (clone_vbd,) = c["VBDs"]
    clone_disk = x.VBD.get_VDI(clone_vbd)
    assert clone_disk != disk and x.VDI.get_VBDs(clone_disk) == [clone_vbd]
    assert x.VDI.get_virtual_size(clone_disk) == str(8 * MiB)
    with open(vdi_file(x, clone_disk), "rb") as f:
        f.seek(3 * MiB)
        assert f.read(20) == b"written by the guest"
    (clone_vif,) = c["VIFs"]
    assert x.VIF.get_MAC(clone_vif) != x.VIF.get_MAC(vif) and x.VIF.get_network(clone_vif) == xenbr0(x)
    x.task.destroy(task)
    assert failure(x.task.get_record, task)[0] == "HANDLE_INVALID"


def test_daemon_store_is_consistent_after_the_scenarios(daemon, x):
    """After the scenarios above no object points at a missing one, files match VDIs, and nothing crashed."""
    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD)
    try:
        assert invariants.problems(invariants.sdk_caller(s)) == []
    finally:
        s.logout()
    log = daemon.log.read_text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
