"""The metrics engine: sampler, archives, live metrics fields, data-source calls and the cooked calls."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone

import numpy as np
import pytest
from twisted.internet.defer import Deferred

from support import ApiEnv, RealDaemon, resolve, vm_record
from test_devices import default_sr, network, vbd_record, vdi_record, vif_record
from xapid.backend.interface import BackendError
from xapid.config import ConfigError, parse_config
from xapid.stats.rrd import RRDTable

T0 = 1_700_000_000  # the fake clock's start (tests/conftest.py), a multiple of the 5-s step


def tick(env: ApiEnv, seconds: float = 5) -> None:
    """Advance the fake clock and run one sampler tick."""
    env.clock.advance(seconds)
    resolve(Deferred.fromCoroutine(env.api.stats.tick()), env.clock)


def running_vm(admin, env, load=0.5, name="vm"):
    """A started 1-vCPU VM whose vCPU runs *load* of the time; returns (ref, uuid)."""
    vm = admin("VM.create", vm_record(name_label=name))
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    env.api.hypervisor.driver.set_load(uuid, load)
    return vm, uuid


def host_uuid(admin):
    return admin("host.get_uuid", admin("host.get_all")[0])


# dom0: 4 vCPUs at 0.05 on 4 pCPUs → 0.05 per pCPU; a 1-vCPU guest at load L adds L/4.
def host_busy(*loads):
    return 0.05 + sum(loads) / 4


def test_exact_cpu_fractions_at_5s_and_in_the_minute_archive(env, admin):
    """A known sim load gives exact vCPU and pCPU fractions in the 5-s and 1-min archives."""
    _, uuid = running_vm(admin, env, 0.5)
    table = env.api.stats.table
    tick(env)
    tick(env)
    assert table.last(f"vm:{uuid}", "cpu0") == pytest.approx(0.5, abs=1e-12)
    assert table.last(f"vm:{uuid}", "cpu_usage") == pytest.approx(0.5, abs=1e-12)
    host = f"host:{host_uuid(admin)}"
    assert table.last(host, "cpu0") == pytest.approx(host_busy(0.5), abs=1e-12)
    assert table.last(host, "cpu_avg") == pytest.approx(host_busy(0.5), abs=1e-12)
    for _ in range(24):
        tick(env)
    export = table.fetch([(f"vm:{uuid}", "cpu0"), (host, "cpu3")], "AVERAGE", start=-60, interval=60)
    assert export.step == 60
    assert export.values[0].tolist() == pytest.approx([0.5, host_busy(0.5)], abs=1e-12)
    assert table.average([(f"vm:{uuid}", "cpu0")], 60, "MAX")[0] == pytest.approx(0.5, abs=1e-12)


def test_reboot_does_not_spike_and_archive_continues(env, admin):
    """A rebuilt domain (new domid, counters reset) gives one unknown step, then the same archive goes on."""
    vm, uuid = running_vm(admin, env, 0.01)
    table = env.api.stats.table
    for _ in range(3):
        tick(env)
    assert table.last(f"vm:{uuid}", "cpu0") == pytest.approx(0.01, abs=1e-12)
    domid = admin("VM.get_domid", vm)
    admin("VM.hard_reboot", vm)
    assert admin("VM.get_domid", vm) != domid
    env.api.hypervisor.driver.set_load(uuid, 1.0)  # the new counter overtakes the old one at once
    tick(env)
    assert math.isnan(table.last(f"vm:{uuid}", "cpu0"))
    tick(env)
    assert table.last(f"vm:{uuid}", "cpu0") == pytest.approx(1.0, abs=1e-12)
    rows = table.fetch([(f"vm:{uuid}", "cpu0")], start=-25).values[:, 0]
    assert rows[0] == pytest.approx(1.0) and math.isnan(rows[1]) and rows[2] == pytest.approx(0.01)
    assert max(np.nan_to_num(rows)) <= 1.0


def test_live_metrics_fields(env, admin):
    """VM_metrics, host_cpu, host_metrics, VBD_metrics and VIF_metrics follow the samples."""
    vm = admin("VM.create", vm_record())
    vdi = admin("VDI.create", vdi_record(default_sr(admin)))
    vbd = admin("VBD.create", vbd_record(vm, vdi))
    vif = admin("VIF.create", vif_record(vm, network(admin)))
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    sim = env.api.hypervisor.driver
    sim.set_load(uuid, 0.25)
    sim.set_io(uuid, disk_read=2048, disk_write=1024, net_rx=512, net_tx=4096)
    tick(env)
    tick(env)
    metrics = admin("VM_metrics.get_record", admin("VM.get_metrics", vm))
    assert metrics["VCPUs_utilisation"] == {"0": pytest.approx(0.25)}
    assert (metrics["memory_actual"], metrics["VCPUs_number"]) == (512 << 20, 1)
    for cpu in admin("host_cpu.get_all"):
        assert admin("host_cpu.get_utilisation", cpu) == pytest.approx(host_busy(0.25))
    host_metrics = admin("host.get_metrics", admin("host.get_all")[0])
    sim.set_memory_target(uuid, 256 << 20)  # behind the API's back: only the sampler notices
    before = admin("host_metrics.get_memory_free", host_metrics)
    tick(env)
    assert admin("host_metrics.get_memory_free", host_metrics) == sim.free_memory() == before + (256 << 20)
    assert admin("VM_metrics.get_memory_actual", admin("VM.get_metrics", vm)) == 256 << 20
    vbd_metrics = admin("VBD_metrics.get_record", admin("VBD.get_metrics", vbd))
    assert (vbd_metrics["io_read_kbs"], vbd_metrics["io_write_kbs"]) == (2.0, 1.0)
    vif_metrics = admin("VIF_metrics.get_record", admin("VIF.get_metrics", vif))
    assert (vif_metrics["io_read_kbs"], vif_metrics["io_write_kbs"]) == (0.5, 4.0)


def test_unchanged_values_write_nothing(env, admin):
    """A tick whose values did not change emits no metrics event (at most one per object per tick)."""
    running_vm(admin, env, 0.5)
    tick(env)
    tick(env)
    token = admin("event.from", ["vm_metrics", "host_cpu", "host_metrics"], "", 0)["token"]
    tick(env)
    assert admin("event.from", ["vm_metrics", "host_cpu", "host_metrics"], token, 0)["events"] == []


def test_changed_values_are_one_event_per_object_for_every_watcher(env, admin):
    """A tick that changes a VM's memory gives event.from watchers one mod per object, carrying the
    new values, and legacy event.register/next sessions the same mods; a changed CPU rate alone is
    no event, yet reads show it."""
    vm, uuid = running_vm(admin, env, 0.25)
    tick(env)
    tick(env)
    legacy = env.login("admin")
    legacy("event.register", ["vm_metrics"])
    token = admin("event.from", ["vm_metrics", "vm"], "", 0)["token"]
    sim = env.api.hypervisor.driver
    sim.set_load(uuid, 0.75)
    tick(env)
    assert admin("event.from", ["vm_metrics", "vm"], token, 0)["events"] == []
    sim.set_memory_target(uuid, 384 << 20)  # behind the API's back: only the sampler notices
    tick(env)
    sim.set_memory_target(uuid, 256 << 20)
    tick(env)  # two ticks, both changing the memory: still one event per object
    events = admin("event.from", ["vm_metrics", "vm"], token, 0)["events"]
    metrics = admin("VM.get_metrics", vm)
    assert [(e["class"], e["operation"], e["ref"]) for e in events] == [("vm_metrics", "mod", metrics)]
    assert events[0]["snapshot"].value["memory_actual"] == 256 << 20
    assert events[0]["snapshot"].value["VCPUs_utilisation"] == {"0": pytest.approx(0.75)}  # read fresh
    queued = legacy("event.next")
    assert {(e["class"], e["operation"], e["ref"]) for e in queued} == {("vm_metrics", "mod", metrics)}
    assert queued[-1]["snapshot"]["memory_actual"] == 256 << 20


def test_device_rates_are_computed_when_read_without_events(env, admin):
    """VBD_metrics and VIF_metrics rates follow the latest sample on every read (getter, record,
    all records) but change without events: a rate is not a write (xapi moved them to RRDs)."""
    vm = admin("VM.create", vm_record())
    vbd = admin("VBD.create", vbd_record(vm, admin("VDI.create", vdi_record(default_sr(admin)))))
    vif = admin("VIF.create", vif_record(vm, network(admin)))
    vbd_metrics, vif_metrics = admin("VBD.get_metrics", vbd), admin("VIF.get_metrics", vif)
    admin("VM.start", vm, False, False)
    uuid = admin("VM.get_uuid", vm)
    sim = env.api.hypervisor.driver
    sim.set_io(uuid, disk_read=2048, disk_write=1024, net_rx=512, net_tx=4096)
    tick(env)
    tick(env)
    assert admin("VBD_metrics.get_record", vbd_metrics)["io_read_kbs"] == 2.0
    token = admin("event.from", ["vbd_metrics", "vif_metrics"], "", 0)["token"]
    sim.set_io(uuid, disk_read=8192, disk_write=0, net_rx=1024, net_tx=0)
    tick(env)
    assert admin("VBD_metrics.get_io_read_kbs", vbd_metrics) == 8.0
    assert admin("VBD_metrics.get_all_records")[vbd_metrics]["io_write_kbs"] == 0.0
    record = admin("VIF_metrics.get_record", vif_metrics)
    assert (record["io_read_kbs"], record["io_write_kbs"]) == (1.0, 0.0)
    assert record["last_updated"] == datetime.fromtimestamp(T0 + 15, tz=timezone.utc)  # the last sample
    assert admin("event.from", ["vbd_metrics", "vif_metrics"], token, 0)["events"] == []
    host = admin("host.get_all")[0]
    eth0 = next(r for r, rec in admin("PIF.get_all_records").items() if rec["device"] == "eth0")
    pif = admin("PIF_metrics.get_record", admin("PIF.get_metrics", eth0))
    assert pif["io_read_kbs"] == admin("host.query_data_source", host, "pif_eth0_rx") / 1024 > 1.0  # guests' rx too
    assert pif["io_write_kbs"] == admin("host.query_data_source", host, "pif_eth0_tx") / 1024
    vbd2 = admin("VBD.create", vbd_record(vm, admin("VDI.create", vdi_record(default_sr(admin))), userdevice="1"))
    assert admin("VBD_metrics.get_io_read_kbs", admin("VBD.get_metrics", vbd2)) == 0.0  # not sampled yet


def test_failing_tick_is_skipped_and_loop_goes_on(env, admin):
    """A read_counters failure is logged and skipped; the next tick samples normally."""
    _, uuid = running_vm(admin, env, 0.5)
    stats = env.api.stats
    env.api.hypervisor.driver.inject_fault("read_counters", BackendError("counters unreadable"))
    stats.start()
    try:
        env.clock.advance(5)
        assert (stats.failures, stats.ticks) == (1, 0)
        env.clock.advance(5)
        env.clock.advance(5)
        assert (stats.failures, stats.ticks) == (1, 2)
        assert stats.table.last(f"vm:{uuid}", "cpu0") == pytest.approx(0.5)
    finally:
        resolve(Deferred.fromCoroutine(stats.stop()), env.clock)


def test_archives_survive_a_restart(env, admin):
    """Archives are saved at stop and restored at start; the downtime is unknown, not zero."""
    _, uuid = running_vm(admin, env, 0.5)
    key = (f"vm:{uuid}", "cpu0")
    for _ in range(3):
        tick(env)
    resolve(Deferred.fromCoroutine(env.api.stats.stop()), env.clock)
    assert (env.tmp_path / "state" / "rrd.npz").exists()
    env.clock.advance(20)
    env.restart()
    table = env.api.stats.table
    tick(env)
    tick(env)
    export = table.fetch([key], start=-50)
    rows = export.values[:, 0]
    assert export.timestamps[0] == T0 + 45
    assert rows[:2] == pytest.approx([0.5, 0.5])  # the counters went on: the first rate after the restart is known
    assert np.isnan(rows[2:6]).all()  # T0+35 … T0+20: the 20 s the daemon was down
    assert rows[6:8] == pytest.approx([0.5, 0.5])  # T0+15, T0+10: restored from the saved archives
    assert math.isnan(rows[8])  # T0+5: the first tick only set the baseline


def test_data_source_calls(env, admin):
    """get/query/record/forget data sources on VM and host, with xapi's names and INVALID_VALUE."""
    vm, _ = running_vm(admin, env, 0.5)
    host = admin("host.get_all")[0]
    tick(env)
    tick(env)
    sources = {r["name_label"]: r for r in admin("VM.get_data_sources", vm)}
    assert {"cpu0", "cpu_usage", "memory", "memory_target"} <= set(sources)
    assert sources["cpu0"] == {"name_label": "cpu0", "name_description": "CPU0 usage", "enabled": True,
                               "standard": True, "units": "(fraction)", "min": 0.0, "max": 1.0,
                               "value": pytest.approx(0.5)}
    assert admin("VM.query_data_source", vm, "cpu0") == pytest.approx(0.5)
    assert admin("VM.query_data_source", vm, "memory") == float(512 << 20)
    assert admin.fails("VM.query_data_source", vm, "cpu7") == ["INVALID_VALUE", "data_source", "cpu7"]
    host_names = {r["name_label"] for r in admin("host.get_data_sources", host)}
    assert {"cpu0", "cpu3", "cpu_avg", "memory_total_kib", "memory_free_kib", "pif_eth0_rx", "pif_eth0_tx"} <= host_names
    free = env.api.hypervisor.driver.free_memory() / 1024
    assert admin("host.query_data_source", host, "memory_free_kib") == free
    assert admin("VM.record_data_source", vm, "cpu0") == ""
    reader = env.login("reader")
    assert reader.fails("VM.record_data_source", vm, "cpu0")[0] == "RBAC_PERMISSION_DENIED"
    assert reader("VM.query_data_source", vm, "cpu0") == pytest.approx(0.5)
    admin("VM.forget_data_source_archives", vm, "cpu0")
    assert "cpu0" not in {r["name_label"] for r in admin("VM.get_data_sources", vm)}
    tick(env)  # sampling starts the source again, with empty archives
    assert admin("VM.query_data_source", vm, "cpu0") == 0.0
    assert admin.fails("host.forget_data_source_archives", host, "nope") == ["INVALID_VALUE", "data_source", "nope"]


def test_query_stats_with_wildcards(env, admin):
    """host.query_stats: glob patterns over owners and names, one value per matching source."""
    _, a = running_vm(admin, env, 0.2, "a")
    _, b = running_vm(admin, env, 0.6, "b")
    host = admin("host.get_all")[0]
    huuid = host_uuid(admin)
    for _ in range(7):
        tick(env)
    result = admin("host.query_stats", host, ["vm:*:cpu?", f"host:{huuid}:memory_free_kib", "vm:nobody:*"], 30.0,
                   "AVERAGE")
    free = env.api.hypervisor.driver.free_memory() / 1024
    assert result[f"vm:{a}:cpu0"] == pytest.approx(0.2)
    assert result[f"vm:{b}:cpu0"] == pytest.approx(0.6)
    assert result[f"host:{huuid}:memory_free_kib"] == free
    assert not any(k.endswith(":cpu_usage") for k in result)
    assert f"vm:{admin('VM.get_uuid', admin('host.get_control_domain', host))}:cpu3" in result  # dom0 is a VM
    one = admin("host.query_stats", host, [f"vm:{a}:cpu*"], 5, "average")
    assert one == {f"vm:{a}:cpu0": pytest.approx(0.2), f"vm:{a}:cpu_usage": pytest.approx(0.2)}
    both = admin("host.query_stats", host, [f"vm:{a}:cpu[0]", f"vm:{a}:cpu*", f"vm:{b[:4]}*:mem?ry"], 5, "AVERAGE")
    assert list(both) == [f"vm:{a}:cpu0", f"vm:{a}:cpu_usage", f"vm:{b}:memory"]  # overlaps once, first-match order
    assert admin("host.query_stats", host, [f"vm:{a.upper()}:cpu0", "vm:*:CPU0"], 5, "AVERAGE") == {}  # case matters
    assert admin.fails("host.query_stats", host, ["vm:*:cpu0"], 30.0, "LAST") == ["INVALID_VALUE", "cf", "LAST"]
    assert admin.fails("host.query_stats", host, ["vm:*:cpu0"], 1.0, "AVERAGE")[:2] == ["INVALID_VALUE", "window"]
    assert admin.fails("host.query_stats", host, ["sr:*:x"], 30.0, "AVERAGE") == ["INVALID_VALUE", "sources", "sr:*:x"]


def test_query_stats_leaves_unknown_values_out(env, admin):
    """Sources with no known value over the window are absent from the map (XML-RPC has no NaN)."""
    _, uuid = running_vm(admin, env, 0.5)
    host = admin("host.get_all")[0]
    tick(env)  # the first tick only sets the DERIVE baselines
    result = admin("host.query_stats", host, [f"vm:{uuid}:*"], 5, "AVERAGE")
    assert f"vm:{uuid}:cpu0" not in result and f"vm:{uuid}:memory" in result


def test_top_vms_order(env, admin):
    """host.top_VMs: the n VMs with the largest value, largest first."""
    loads = {"low": 0.1, "high": 0.9, "mid": 0.5, "idle": 0.0}
    uuids = {name: running_vm(admin, env, load, name)[1] for name, load in loads.items()}
    host = admin("host.get_all")[0]
    for _ in range(3):
        tick(env)
    top = admin("host.top_VMs", host, "cpu_usage", 10.0, "AVERAGE", 2)
    assert list(top) == [uuids["high"], uuids["mid"]]
    assert list(top.values()) == pytest.approx([0.9, 0.5])
    assert len(admin("host.top_VMs", host, "cpu_usage", 10.0, "AVERAGE", 100)) == 5  # with dom0
    assert admin.fails("host.top_VMs", host, "cpu_usage", 10.0, "AVERAGE", -1) == ["INVALID_VALUE", "n", "-1"]


def test_stats_config():
    """[stats] period defaults to 5 s and must be at least 1; save_interval must be positive."""
    assert parse_config("", "x").stats.period == 5.0
    assert parse_config("[stats]\nperiod = 1\nsave_interval = 60\n", "x").stats.save_interval == 60.0
    with pytest.raises(ConfigError, match=r"\[stats\] period"):
        parse_config("[stats]\nperiod = 0.5\n", "x")
    with pytest.raises(ConfigError, match=r"\[stats\] save_interval"):
        parse_config("[stats]\nsave_interval = 0\n", "x")


# -- a real daemon sampling every second, through the official SDK ----------------------------


@pytest.fixture(scope="module")
def fast_daemon(tmp_path_factory):
    d = RealDaemon(tmp_path_factory.mktemp("stats-daemon"), config="[stats]\nperiod = 1\n")
    yield d
    d.stop()


def test_sdk_query_stats_and_data_sources(fast_daemon):
    """The XenAPI SDK reads host.query_stats and VM.get_data_sources from a running daemon."""
    import XenAPI

    session = XenAPI.Session(fast_daemon.url)
    session.xenapi.login_with_password("admin", "s3cret pass", "1.0", "test")
    try:
        host = session.xenapi.host.get_all()[0]
        huuid = session.xenapi.host.get_uuid(host)
        dom0 = session.xenapi.host.get_control_domain(host)
        deadline = time.monotonic() + 20
        result: dict = {}
        while time.monotonic() < deadline:
            result = session.xenapi.host.query_stats(host, ["host:*:memory_free_kib", "vm:*:cpu0"], 5.0, "AVERAGE")
            if len(result) >= 2:
                break
            time.sleep(0.5)
        assert result[f"host:{huuid}:memory_free_kib"] > 0
        assert result[f"vm:{session.xenapi.VM.get_uuid(dom0)}:cpu0"] == pytest.approx(0.05)
        names = {r["name_label"] for r in session.xenapi.VM.get_data_sources(dom0)}
        assert {"cpu0", "memory"} <= names
    finally:
        session.xenapi.session.logout()


def test_periodic_save(env, admin):
    """The running loop saves the archives every save_interval seconds (3600 s = 720 ticks by default)."""
    path = env.tmp_path / "state" / "rrd.npz"
    stats = env.api.stats
    stats.start()
    try:
        for _ in range(719):
            env.clock.advance(5)
        assert not path.exists()
        env.clock.advance(5)
        assert path.exists() and stats.ticks == 720
        saved = path.stat().st_mtime_ns
        path.unlink()
        for _ in range(720):
            env.clock.advance(5)
        assert path.exists() and stats.ticks == 1440 and path.stat().st_mtime_ns >= saved
    finally:
        resolve(Deferred.fromCoroutine(stats.stop()), env.clock)


class HeldRunner:
    """A runner whose calls wait until the test releases them (a slow worker thread, made deterministic)."""

    def __init__(self):
        self.held = []

    def run(self, fn, *args):
        d = Deferred()
        self.held.append((fn, args, d))
        return d

    def release(self):
        fn, args, d = self.held.pop(0)
        d.callback(fn(*args))


def test_save_copies_off_the_reactor_and_a_tick_waits_for_the_copy(env, admin):
    """A save exports (copies) the table in the runner; a tick due meanwhile waits for the copy,
    so the file holds the table as it was, whole, and the tick's sample is not lost."""
    _, uuid = running_vm(admin, env, 0.5)
    stats = env.api.stats
    for _ in range(3):
        tick(env)
    saved_at = stats.table.last_update
    runner = stats.runner = HeldRunner()
    saving = Deferred.fromCoroutine(stats.save())
    assert [fn.__name__ for fn, _, _ in runner.held] == ["export"]
    env.clock.advance(5)
    ticking = Deferred.fromCoroutine(stats.tick())
    env.clock.advance(0)
    assert not ticking.called and stats.table.last_update == saved_at  # held behind the copy
    runner.release()  # the copy is done: the tick runs while the file is written
    assert ticking.called and stats.table.last_update == saved_at + 5
    assert [fn.__name__ for fn, _, _ in runner.held] == ["write_image"] and not saving.called
    runner.release()
    assert saving.called
    loaded, warning = RRDTable.load(env.tmp_path / "state" / "rrd.npz")
    assert warning is None and loaded.last_update == saved_at
    assert loaded.last(f"vm:{uuid}", "cpu0") == pytest.approx(0.5)


def test_destroyed_vm_archives_are_dropped(env, admin):
    """A halted VM keeps its archives; a destroyed one loses them."""
    vm, uuid = running_vm(admin, env, 0.5)
    tick(env)
    tick(env)
    admin("VM.hard_shutdown", vm)
    tick(env)
    assert f"vm:{uuid}" in env.api.stats.table.owners()
    assert math.isnan(env.api.stats.table.last(f"vm:{uuid}", "cpu0"))
    admin("VM.destroy", vm)
    tick(env)
    assert f"vm:{uuid}" not in env.api.stats.table.owners()


def test_archives_of_a_vm_destroyed_while_stopped_are_dropped_after_restart(env, admin):
    """Archives restored at start whose VM no longer exists go at the first tick."""
    vm, uuid = running_vm(admin, env, 0.5)
    _, keep = running_vm(admin, env, 0.5, "kept")
    tick(env)
    tick(env)
    resolve(Deferred.fromCoroutine(env.api.stats.stop()), env.clock)
    admin("VM.hard_shutdown", vm)
    admin("VM.destroy", vm)
    env.restart()
    assert {f"vm:{uuid}", f"vm:{keep}"} <= set(env.api.stats.table.owners())  # as saved
    tick(env)
    owners = env.api.stats.table.owners()
    assert f"vm:{uuid}" not in owners and f"vm:{keep}" in owners


def test_restart_after_halt_is_not_a_spike(env, admin):
    """A VM started again after a halt (new domain, counters from zero) gives one unknown step, not a bogus rate."""
    vm, uuid = running_vm(admin, env, 0.01)
    tick(env)
    tick(env)
    admin("VM.hard_shutdown", vm)
    tick(env)
    admin("VM.start", vm, False, False)
    env.api.hypervisor.driver.set_load(uuid, 1.0)
    tick(env)
    assert math.isnan(env.api.stats.table.last(f"vm:{uuid}", "cpu0"))
    tick(env)
    assert env.api.stats.table.last(f"vm:{uuid}", "cpu0") == pytest.approx(1.0)
