"""Writes that cost what the written object costs (issue 20): mirrored sets changed one member at a
time and not stored, SR sizes as running totals, deletes that find what points at an object
without scanning; with the same answers, events, restarts and rollbacks as before."""

from __future__ import annotations

from typing import Any

from support import disk_full, resolve, stored, vm_record

from xapid.store import Store

MiB = 1 << 20


def vdi_record(sr: str, size: int = MiB, name: str = "disk") -> dict[str, Any]:
    return {"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": name}


def vbd_record(vm: str, vdi: str, device: str = "autodetect") -> dict[str, Any]:
    return {"VM": vm, "VDI": vdi, "userdevice": device, "bootable": False, "mode": "RW", "type": "Disk",
            "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}


def default_sr(admin: Any) -> str:
    return str(admin("pool.get_default_SR", admin("pool.get_all")[0]))


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


def vif_record(vm: str, network: str, device: str, mac: str = "") -> dict[str, Any]:
    return {"device": device, "network": network, "VM": vm, "MAC": mac, "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def rate_sources_from_scratch(store: Store) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Where every rate field comes from, computed the way the sampler did before issue 20: a full
    pass over every VM, VBD, VIF, host CPU and PIF."""
    out: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for vm in store.all("VM"):
        out[vm.fields["metrics"]] = ("vcpus", f"vm:{vm.fields['uuid']}", ())
    for cls, names in (("VBD", ("vbd_{}_read", "vbd_{}_write")), ("VIF", ("vif_{}_rx", "vif_{}_tx"))):
        for dev in store.all(cls):
            vm = store.peek(dev.fields.get("VM", ""))
            device = dev.fields.get("device")
            if vm is not None and device:
                out[dev.fields["metrics"]] = ("io", f"vm:{vm.fields['uuid']}",
                                              (names[0].format(device), names[1].format(device)))
    hosts = {h.ref: f"host:{h.fields['uuid']}" for h in store.all("host")}
    for cpu in [store.peek(r) for r in store.refs("host_cpu")]:  # as stored: reading refreshes host CPUs
        assert cpu is not None
        if cpu.fields.get("host") in hosts:
            out[cpu.ref] = ("cpu", hosts[cpu.fields["host"]], (f"cpu{cpu.fields['number']}",))
    for pif in store.all("PIF"):
        if pif.fields.get("physical") and pif.fields.get("host") in hosts:
            device = pif.fields["device"]
            out[pif.fields["metrics"]] = ("io", hosts[pif.fields["host"]], (f"pif_{device}_rx", f"pif_{device}_tx"))
    return out


def test_rate_source_map_kept_per_object_equals_a_full_rebuild(env, admin, monkeypatch):
    """After a random run of VM, disk and NIC creates, plugs, starts, stops and destroys (and a
    failed commit rolled back), the sampler's map of where rates come from, kept one object at a
    time, is the map a full pass computes; and the rates read through the API are the same."""
    import random

    from test_stats import tick

    rng = random.Random(20)
    store: Store = env.api.store
    rates = env.api.stats._rates
    sr, net = default_sr(admin), admin("network.get_all")[0]
    assert rates.sources == rate_sources_from_scratch(store)  # built here; kept by events from now on
    vms: list[str] = []

    def attempt(method: str, *args: Any) -> Any:
        try:
            return admin(method, *args)
        except Exception:  # refused in this state (running, attached…): part of the random run
            return None

    for step in range(160):
        op = rng.choice(["vm", "vm", "vbd", "vbd", "vif", "vif", "start", "stop", "plug", "unplug",
                         "destroy_vbd", "destroy_vif", "destroy_vm"])
        vm = rng.choice(vms) if vms else None
        if op == "vm" or vm is None:
            vms.append(admin("VM.create", vm_record(name_label=f"vm{step}")))
        elif op == "vbd":
            attempt("VBD.create", vbd_record(vm, admin("VDI.create", vdi_record(sr))))
        elif op == "vif":
            attempt("VIF.create", vif_record(vm, net, str(rng.randrange(4))))
        elif op == "start":
            attempt("VM.start", vm, False, False)
        elif op == "stop":
            attempt("VM.hard_shutdown", vm)
        elif op in ("plug", "unplug", "destroy_vbd", "destroy_vif"):
            devices = admin("VM.get_VIFs" if op == "destroy_vif" or rng.random() < 0.3 else "VM.get_VBDs", vm)
            if devices:
                cls = "VIF" if devices[0] in admin("VM.get_VIFs", vm) else "VBD"
                device = rng.choice(devices)
                attempt(f"{cls}.{'destroy' if op.startswith('destroy') else op}", device)
        elif op == "destroy_vm":
            attempt("VM.hard_shutdown", vm)
            for vbd in admin("VM.get_VBDs", vm):
                attempt("VBD.destroy", vbd)
            if attempt("VM.destroy", vm) is not None or not store.exists(vm, "VM"):
                vms.remove(vm)
        if step == 100:  # a write the disk refuses: rolled back, the map follows the objects back
            disk_full(monkeypatch, env)
            if vms:
                attempt("VM.destroy", vms[0])
            attempt("VM.create", vm_record())
            monkeypatch.undo()
        if step % 40 == 0:
            tick(env)
            assert rates.sources == rate_sources_from_scratch(store)
    assert any(kind == "io" and owner.startswith("vm:") for kind, owner, _ in rates.sources.values())
    assert rates.sources == rate_sources_from_scratch(store)
    tick(env)
    tick(env)
    kept = {r: admin("VBD_metrics.get_record", r) for r in admin("VBD_metrics.get_all")}
    rates._sources = None  # from scratch, as before issue 20
    assert {r: admin("VBD_metrics.get_record", r) for r in kept} == kept


def test_long_sets_keep_their_order_through_removals_adds_and_a_rollback(env, admin, monkeypatch):
    """A set long enough to have a position index (SR.VDIs with hundreds of disks) lists exactly
    the members a plain list would, in the same order, through random removals and adds, failed
    commits, and a held snapshot."""
    import random

    from xapid.store import INDEXED

    rng = random.Random(7)
    store: Store = env.api.store
    sr = default_sr(admin)
    model = list(admin("SR.get_VDIs", sr))
    for i in range(200):
        model.append(store.add("VDI", {"SR": sr, "name_label": f"v{i}"}))
    assert store.get(sr).fields["VDIs"] == model
    for round_ in range(600):
        if rng.random() < 0.6 and len(model) > INDEXED // 2:
            gone = rng.choice(model)
            store.remove(gone)
            model.remove(gone)
        else:
            model.append(store.add("VDI", {"SR": sr, "name_label": f"w{round_}"}))
        if round_ == 300:
            held = store.get(sr).fields["VDIs"]
            held_copy = list(held)
        assert store.get(sr).fields["VDIs"] == model
    assert held == held_copy  # a list someone holds is not changed under them
    resolve(store.flush(), env.clock)
    committed = list(model)
    disk_full(monkeypatch, env)
    for _ in range(5):  # removals, and adds, that a failed commit undoes
        for gone in rng.sample(committed, 4):
            store.remove(gone)
        store.add("VDI", {"SR": sr})
        failed: list[Any] = []
        store.flush().addErrback(failed.append)
        env.settle()
        assert failed and store.rollbacks
        assert store.get(sr).fields["VDIs"] == committed
    monkeypatch.undo()
    for gone in (committed[1], committed[-1], committed[len(committed) // 2]):
        store.remove(gone)
        committed.remove(gone)
        assert admin("SR.get_VDIs", sr) == committed
    committed.append(admin("VDI.create", vdi_record(sr)))
    assert admin("SR.get_VDIs", sr) == committed
    admin("VDI.destroy", committed[-1])
    assert admin("SR.get_VDIs", sr) == committed[:-1]


def test_generated_macs_avoid_those_in_use_through_an_index(env, admin, monkeypatch):
    """VIF.create with no MAC skips a generated MAC another VIF has (in any case), and may give it
    out again once that VIF is gone."""
    import random

    net = admin("network.get_all")[0]
    vm = admin("VM.create", vm_record())
    taken = admin("VIF.create", vif_record(vm, net, "0", "00:16:3E:01:02:03"))
    assert admin("VIF.get_MAC", taken) == "00:16:3e:01:02:03"
    draws = iter([1, 2, 3, 1, 2, 4] * 2)
    monkeypatch.setattr(random, "randrange", lambda _: next(draws))
    second = admin("VIF.create", vif_record(vm, net, "1"))
    assert admin("VIF.get_MAC", second) == "00:16:3e:01:02:04"  # 01:02:03 is in use
    admin("VIF.destroy", taken)
    third = admin("VIF.create", vif_record(vm, net, "2"))
    assert admin("VIF.get_MAC", third) == "00:16:3e:01:02:03"  # free again
