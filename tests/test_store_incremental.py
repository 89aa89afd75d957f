"""Writes that cost what the written object costs (issue 20): mirrored sets changed one member at a
time and not stored, SR sizes as running totals, deletes that find what points at an object
without scanning; with the same answers, events, restarts and rollbacks as before."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from typing import Any

from support import ROOT, vm_record

from xapid.store import Database, Store

MiB = 1 << 20


def vdi_record(sr: str, size: int = MiB, name: str = "disk") -> dict[str, Any]:
    return {"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": name}


def vbd_record(vm: str, vdi: str, device: str = "autodetect") -> dict[str, Any]:
    return {"VM": vm, "VDI": vdi, "userdevice": device, "bootable": False, "mode": "RW", "type": "Disk",
            "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}


def stored(env: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    db = Database(env.api.database.path)
    try:
        return {ref: (cls, data) for cls, ref, data in db.read_all()}
    finally:
        db.close()


def default_sr(admin: Any) -> str:
    return str(admin("pool.get_default_SR", admin("pool.get_all")[0]))


def disk_full(monkeypatch: Any, env: Any) -> None:
    def write(batch: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(env.api.database, "write", write)


def test_rows_leave_mirrored_sets_out_and_a_restart_rebuilds_them_in_order(env, admin):
    """The SR's row does not grow with its disks; after a restart SR.VDIs, VM.VBDs and VDI.VBDs
    list the same members in the same order."""
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record())
    vdis = [admin("VDI.create", vdi_record(sr, name=f"d{i}")) for i in range(3)]
    row_with_3 = len(repr(stored(env)[sr][1]))
    vdis += [admin("VDI.create", vdi_record(sr, name=f"d{i}")) for i in range(3, 40)]
    vbds = [admin("VBD.create", vbd_record(vm, vdi)) for vdi in vdis[:3]]
    rows = stored(env)
    assert "VDIs" not in rows[sr][1] and "VBDs" not in rows[vm][1] and "VBDs" not in rows[vdis[0]][1]
    assert len(repr(rows[sr][1])) <= row_with_3 + 16  # sizes grow by digits only, not by 37 refs
    before = (admin("SR.get_VDIs", sr), admin("VM.get_VBDs", vm), admin("VDI.get_VBDs", vdis[0]))
    assert before[0][-40:] == vdis and before[1] == vbds and before[2] == vbds[:1]
    env.restart()
    admin = env.login()
    assert (admin("SR.get_VDIs", sr), admin("VM.get_VBDs", vm), admin("VDI.get_VBDs", vdis[0])) == before


def test_a_set_someone_holds_does_not_change_under_them(env, admin):
    """Legacy event.next snapshots keep the set as it was when the event was queued, and a list
    got from a record earlier is not changed by later writes."""
    sr = default_sr(admin)
    held = env.api.store.get(sr).fields["VDIs"]
    held_copy = list(held)
    admin("event.register", ["sr"])
    first = admin("VDI.create", vdi_record(sr))
    second = admin("VDI.create", vdi_record(sr))
    admin("VDI.destroy", first)
    assert held == held_copy
    snapshots = [e["snapshot"]["VDIs"] for e in admin("event.next") if e["ref"] == sr and e["operation"] == "mod"]
    members = [set(s) & {first, second} for s in snapshots]
    assert {first} in members and {first, second} in members and members[-1] == {second}
    assert admin("SR.get_VDIs", sr)[-1] == second and first not in admin("SR.get_VDIs", sr)


def test_sr_sizes_are_running_totals_of_its_disks(env, admin):
    """virtual_allocation is the sum of the SR's VDIs' virtual sizes through create, resize,
    destroy and a restart."""
    sr = default_sr(admin)
    base = int(admin("SR.get_virtual_allocation", sr))
    made = [admin("VDI.create", vdi_record(sr, size=(i + 1) * MiB)) for i in range(5)]
    assert int(admin("SR.get_virtual_allocation", sr)) == base + 15 * MiB
    admin("VDI.resize", made[0], str(10 * MiB))
    admin("VDI.destroy", made[4])
    assert int(admin("SR.get_virtual_allocation", sr)) == base + 15 * MiB - MiB + 10 * MiB - 5 * MiB
    expected = sum(int(admin("VDI.get_virtual_size", v)) for v in admin("SR.get_VDIs", sr))
    assert int(admin("SR.get_virtual_allocation", sr)) == expected
    env.restart()
    admin = env.login()
    made.append(admin("VDI.create", vdi_record(sr, size=MiB)))
    assert int(admin("SR.get_virtual_allocation", sr)) == expected + MiB


def test_failed_commit_puts_sets_back_in_their_order_and_totals_right(env, admin, monkeypatch):
    """On a full disk a VBD.destroy, a VDI.destroy (with its VBD) and a VM.destroy are undone: the
    sets list their members in the original order and the SR's sizes are as before."""
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record())
    vdis = [admin("VDI.create", vdi_record(sr, size=(i + 1) * MiB)) for i in range(3)]
    vbds = [admin("VBD.create", vbd_record(vm, vdi)) for vdi in vdis]
    sr_vdis, allocation = admin("SR.get_VDIs", sr), admin("SR.get_virtual_allocation", sr)
    disk_full(monkeypatch, env)
    for method, ref in (("VBD.destroy", vbds[0]), ("VDI.destroy", vdis[1]), ("VM.destroy", vm)):
        assert admin.fails(method, ref)[0] == "INTERNAL_ERROR"
        assert admin("VM.get_VBDs", vm) == vbds
        assert admin("SR.get_VDIs", sr) == sr_vdis
        assert [admin("VDI.get_VBDs", v) for v in vdis] == [[b] for b in vbds]
        assert admin("SR.get_virtual_allocation", sr) == allocation
    monkeypatch.undo()
    admin("VBD.destroy", vbds[1])
    admin("VDI.destroy", vdis[1])
    assert admin("VM.get_VBDs", vm) == [vbds[0], vbds[2]]
    assert int(admin("SR.get_virtual_allocation", sr)) == int(allocation) - 2 * MiB
    env.restart()
    admin = env.login()
    assert admin("VM.get_VBDs", vm) == [vbds[0], vbds[2]]
    assert int(admin("SR.get_virtual_allocation", sr)) == int(allocation) - 2 * MiB


def test_removing_an_object_clears_plain_refs_to_it(env, admin):
    """A VDI's parent and a VM's suspend_VDI become OpaqueRef:NULL when that VDI goes, also after
    a reload counted again who points where."""
    store: Store = env.api.store
    sr = store.all("SR")[0].ref
    parent = store.add("VDI", {"SR": sr})
    child = store.add("VDI", {"SR": sr, "parent": parent})
    vm = store.add("VM", {"suspend_VDI": parent, "name_label": "suspended"})
    other = store.add("VDI", {"SR": sr})
    store.remove(other)
    assert store.get(child).fields["parent"] == parent
    store.remove(parent)
    assert store.get(child).fields["parent"] == "OpaqueRef:NULL"
    assert store.get(vm).fields["suspend_VDI"] == "OpaqueRef:NULL"
    again = admin("VDI.create", vdi_record(sr))
    store.update(vm, {"suspend_VDI": again})
    env.settle()
    env.restart()
    admin = env.login()
    admin("VDI.destroy", again)
    assert admin("VM.get_suspend_VDI", vm) == "OpaqueRef:NULL"


def test_scale_benchmark_quick_run():
    """benchmarks/scale.py --quick runs (the smoke size) and reports every figure."""
    done = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for text in ("calls/s", "VDI.destroy", "daemon start-up", "goals:", "RSS"):
        assert text in done.stdout, done.stdout
