"""Round-robin archives (xapid.stats.rrd): exact values with a fake clock at every archive level."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xapid.stats.rrd import ARCHIVES, BYTES_PER_SOURCE, HEARTBEAT, STEP, RRDTable

NAN = float("nan")
VM = "vm:2d7a0c1e-0000-4000-8000-000000000001"
HOST = "host:8f1c0000-0000-4000-8000-000000000002"
DAY = 86400


def rows(table: RRDTable, key, resolution: int, start: float, end: float | None = None, cf="AVERAGE"):
    """{row time: value} of one source in the archive of *resolution*, from *start* on."""
    export = table.fetch([key], cf, start=start, end=end, interval=resolution)
    assert export.step == resolution
    return {int(t): float(v) for t, v in zip(export.timestamps, export.values[:, 0])}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def gauge_table(start: float = 0):
    table = RRDTable(start=start)
    slot = table.ensure(VM, "memory", "GAUGE", units="B")
    return table, slot


def feed(table: RRDTable, slot: int, times_values):
    for t, v in times_values:
        table.update_indexed(t, np.array([slot]), np.array([v], dtype=float))


# ------------------------------------------------------------------------------------- values

def test_gauge_sequence_exact_5s_rows_and_1min_average_min_max():
    """A GAUGE sampled on step boundaries: each 5-s row is the sample, the 1-min row its AVERAGE/MIN/MAX."""
    table, slot = gauge_table()
    values = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    feed(table, slot, [(5 * (i + 1), v) for i, v in enumerate(values)])
    key = (VM, "memory")
    assert rows(table, key, 5, 5) == {5 * (i + 1): float(v) for i, v in reversed(list(enumerate(values)))}
    assert rows(table, key, 60, 60) == {60: sum(values) / 12}
    assert rows(table, key, 60, 60, cf="MIN") == {60: 1.0}
    assert rows(table, key, 60, 60, cf="MAX") == {60: 9.0}
    assert table.last(*key) == 8.0


def test_exact_values_at_every_archive_level_over_a_day():
    """A GAUGE k mod 720 and a DERIVE counter at 0.5/s, fed for one day: exact 1 min, 1 h and 1 day rows."""
    table = RRDTable(start=0)
    g = table.ensure(VM, "memory", "GAUGE")
    d = table.ensure(VM, "cpu0", "DERIVE", 0.0, 1.0)
    idx = np.array([g, d])
    for k in range(1, DAY // STEP + 1):
        table.update_indexed(k * STEP, idx, np.array([k % 720, 0.5 * k * STEP]))
    gk, dk = (VM, "memory"), (VM, "cpu0")
    # The last 1-min row: PDPs 17269 … 17280.
    assert rows(table, gk, 60, DAY - 60)[DAY] == sum(k % 720 for k in range(17269, 17281)) / 12
    assert rows(table, gk, 60, DAY - 60, cf="MAX")[DAY] == 719.0
    hour = rows(table, gk, 3600, DAY - 3600 * 3)
    assert hour == {DAY: 359.5, DAY - 3600: 359.5, DAY - 7200: 359.5, DAY - 10800: 359.5}
    assert rows(table, gk, 3600, DAY - 3600, cf="MIN") == {DAY: 0.0, DAY - 3600: 0.0}
    assert rows(table, gk, 86400, DAY) == {DAY: 359.5}
    assert rows(table, gk, 86400, DAY, cf="MAX") == {DAY: 719.0}
    # DERIVE: 0.5 everywhere; the very first PDP is unknown (no previous raw value) and xff absorbs it.
    assert set(rows(table, dk, 60, DAY - 7000).values()) == {0.5}
    assert set(rows(table, dk, 3600, 3600).values()) == {0.5}
    assert rows(table, dk, 86400, DAY) == {DAY: 0.5}
    assert rows(table, dk, 86400, DAY, cf="MIN") == {DAY: 0.5}


def test_derive_cpu_time_gives_exact_fraction():
    """vCPU time in ns growing 0.5 s per second (scaled to seconds) gives exactly 0.5 from the second step."""
    table = RRDTable(start=0)
    slot = table.ensure(VM, "cpu0", "DERIVE", 0.0, 1.0, units="(fraction)")
    feed(table, slot, [(5 * i, (i * 2_500_000_000) / 1e9) for i in range(1, 13)])
    got = rows(table, (VM, "cpu0"), 5, 5)
    assert math.isnan(got[5])  # no previous value yet
    assert all(got[5 * i] == 0.5 for i in range(2, 13))
    assert rows(table, (VM, "cpu0"), 60, 60) == {60: 0.5}  # 11 known of 12


def test_counter_reset_on_reboot_gives_one_unknown_step():
    """A VM reboot resets its counters: exactly one unknown DERIVE step, then the rate again."""
    table = RRDTable(start=0)
    slot = table.ensure(VM, "vif_0_rx", "DERIVE", 0.0)
    counter = [0, 500, 1000, 1500, 100, 600, 1100]  # the VM rebooted between 20 s and 25 s
    feed(table, slot, [(5 * i, c) for i, c in enumerate(counter, start=1)])
    got = rows(table, (VM, "vif_0_rx"), 5, 10)
    assert [got[t] for t in (35, 30, 20, 15, 10)] == [100.0] * 5
    assert math.isnan(got[25])


def test_counter_wrap_gives_one_unknown_step():
    """A 32-bit counter wrapping to a small value yields one unknown step, never a huge or negative rate."""
    table = RRDTable(start=0)
    slot = table.ensure(VM, "vbd_xvda_read", "DERIVE", 0.0)
    top = 2**32
    feed(table, slot, [(5, top - 1000), (10, top - 500), (15, 300), (20, 800)])
    got = rows(table, (VM, "vbd_xvda_read"), 5, 10)
    assert got[10] == 100.0 and math.isnan(got[15]) and got[20] == 100.0


def test_rate_out_of_bounds_is_unknown():
    """A DERIVE rate above max (or a GAUGE below min) is unknown."""
    table = RRDTable(start=0)
    c = table.ensure(VM, "cpu0", "DERIVE", 0.0, 1.0)
    m = table.ensure(VM, "memory", "GAUGE", 0.0)
    idx = np.array([c, m])
    for t, raw in [(5, [0.0, 1.0]), (10, [2.5, -1.0]), (15, [15.0, 2.0]), (20, [17.5, 3.0])]:
        table.update_indexed(t, idx, np.array(raw))
    cpu, mem = rows(table, (VM, "cpu0"), 5, 10), rows(table, (VM, "memory"), 5, 10)
    assert cpu[10] == 0.5 and math.isnan(cpu[15]) and cpu[20] == 0.5
    assert math.isnan(mem[10]) and mem[15] == 2.0


def test_missing_update_is_unknown_not_zero():
    """A source absent from one update is unknown for that step, not zero; the others are unaffected."""
    table = RRDTable(start=0)
    a = table.ensure(VM, "memory", "GAUGE")
    b = table.ensure(HOST, "memory_free_kib", "GAUGE")
    table.update_indexed(5, np.array([a, b]), np.array([1.0, 2.0]))
    table.update_indexed(10, np.array([b]), np.array([3.0]))
    table.update_indexed(15, np.array([a, b]), np.array([4.0, 5.0]))
    assert rows(table, (VM, "memory"), 5, 5) == pytest.approx({15: 4.0, 10: NAN, 5: 1.0}, nan_ok=True)
    assert rows(table, (HOST, "memory_free_kib"), 5, 5) == {15: 5.0, 10: 3.0, 5: 2.0}
    table.update_indexed(20, np.array([b]), np.array([np.nan]))  # a NaN raw value is unknown too
    assert math.isnan(table.last(HOST, "memory_free_kib"))


def test_gap_within_heartbeat_fills_steps_with_the_rate():
    """Several steps without updates but within the heartbeat: each step gets the next update's rate."""
    table, slot = gauge_table()
    feed(table, slot, [(5, 1.0), (25, 7.0), (30, 8.0)])
    assert rows(table, (VM, "memory"), 5, 5) == {30: 8.0, 25: 7.0, 20: 7.0, 15: 7.0, 10: 7.0, 5: 1.0}


def test_gap_beyond_heartbeat_is_unknown_rows():
    """No update for longer than the 300 s heartbeat: every step of the gap is unknown, then values resume."""
    table = RRDTable(start=0)
    g = table.ensure(VM, "memory", "GAUGE")
    d = table.ensure(VM, "cpu0", "DERIVE", 0.0, 1.0)
    idx = np.array([g, d])
    for t in (5, 10):
        table.update_indexed(t, idx, np.array([1.0, 0.5 * t]))
    gap_end = 10 + HEARTBEAT + 5
    for t in (gap_end, gap_end + 5):
        table.update_indexed(t, idx, np.array([2.0, 0.5 * t]))
    mem, cpu = rows(table, (VM, "memory"), 5, 5), rows(table, (VM, "cpu0"), 5, 5)
    assert mem[10] == 1.0 and cpu[10] == 0.5
    for t in range(15, gap_end + 5, 5):
        assert math.isnan(mem[t]) and math.isnan(cpu[t]), t
    assert mem[gap_end + 5] == 2.0 and cpu[gap_end + 5] == 0.5
    assert math.isnan(rows(table, (VM, "memory"), 60, 60)[120])  # the 1-min rows inside the gap


def test_gaps_give_the_same_archives_as_every_step_updates():
    """Updates skipping up to 60 steps fill every archive exactly as updating each step with that rate."""
    rng = np.random.default_rng(7)
    start = DAY - 2 * 3600  # crosses hour and day row boundaries
    gappy, g = gauge_table(start)
    dense, d = gauge_table(start)
    t = start
    while t < DAY + 2 * 3600:
        steps = int(rng.integers(1, 61))
        value = float(rng.integers(0, 1000))
        feed(gappy, g, [(t + steps * STEP, value)])
        feed(dense, d, [(t + i * STEP, value) for i in range(1, steps + 1)])
        t += steps * STEP
    for a, rings in enumerate(dense._rings):
        for mine, ref in zip(gappy._rings[a], rings):
            np.testing.assert_array_equal(mine.data, ref.data)
    for name in ("_acc_sum", "_acc_cnt", "_acc_min", "_acc_max"):
        np.testing.assert_array_equal(getattr(gappy, name), getattr(dense, name))


def test_unaligned_updates_are_time_weighted_into_steps():
    """Updates between step boundaries: a PDP is the time-weighted average of the rates over its step."""
    table, slot = gauge_table()
    feed(table, slot, [(2, 10.0), (7, 20.0), (12, 40.0), (13, 50.0), (21, 5.0)])
    got = rows(table, (VM, "memory"), 5, 5)
    assert got[5] == (2 * 10.0 + 3 * 20.0) / 5  # (0,2] at 10, (2,5] at 20
    assert got[10] == (2 * 20.0 + 3 * 40.0) / 5
    assert got[15] == (2 * 40.0 + 1 * 50.0 + 2 * 5.0) / 5
    assert got[20] == 5.0


def test_timestamps_must_increase():
    """An update not after the last one is refused, as rrdtool does."""
    table, slot = gauge_table()
    feed(table, slot, [(5, 1.0)])
    with pytest.raises(ValueError):
        feed(table, slot, [(5, 2.0)])


@pytest.mark.parametrize("unknown, expected", [(7, NAN), (6, 3.0), (5, 3.0), (0, 3.0)])
def test_xff_of_the_1min_average(unknown, expected):
    """1-min AVERAGE with xff 0.5: NaN when more than 6 of 12 PDPs are unknown; MIN/MAX over the known ones."""
    table, slot = gauge_table()
    for i in range(1, 13):
        t = 5 * i
        if i <= unknown:
            table.advance(t)
        else:
            feed(table, slot, [(t, 2.0 if i % 2 else 4.0)])
    known = [2.0 if i % 2 else 4.0 for i in range(unknown + 1, 13)]
    got = rows(table, (VM, "memory"), 60, 60)[60]
    assert same(got, expected if math.isnan(expected) else sum(known) / len(known))
    assert rows(table, (VM, "memory"), 60, 60, cf="MIN")[60] == min(known)
    assert rows(table, (VM, "memory"), 60, 60, cf="MAX")[60] == max(known)


def test_many_owners_in_one_update():
    """One update_indexed call records every source of every VM and the host."""
    table = RRDTable(start=0)
    keys = [(f"vm:{i:04d}", name) for i in range(50) for name in ("memory", "cpu_usage")] + [(HOST, "loadavg")]
    for owner, name in keys:
        table.ensure(owner, name, "GAUGE")
    idx = table.slots(keys)
    for step in range(1, 13):
        table.update_indexed(5 * step, idx, np.arange(len(keys), dtype=float) * step)
    export = table.fetch(keys, "AVERAGE", start=60, interval=60)
    assert export.values.tolist() == [[i * 6.5 for i in range(len(keys))]]
    assert table.owners()[:2] == ["vm:0000", "vm:0001"] and table.owners()[-1] == HOST
    assert [s.name for s in table.sources("vm:0003")] == ["memory", "cpu_usage"]


def test_update_by_dict_matches_indexed():
    """update() with a {(owner, name): value} dict records the same values as update_indexed."""
    table = RRDTable(start=0)
    table.ensure(VM, "memory", "GAUGE")
    table.ensure(HOST, "loadavg", "GAUGE")
    table.update(5, {(VM, "memory"): 10.0, (HOST, "loadavg"): 0.25})
    assert table.last(VM, "memory") == 10.0 and table.last(HOST, "loadavg") == 0.25
    with pytest.raises(KeyError):
        table.update(10, {(VM, "nope"): 1.0})


def test_ensure_forget_and_slot_reuse():
    """forget() clears a source's archives and frees its slot; a new source reuses it with empty history."""
    table = RRDTable(start=0, capacity=2)
    a = table.ensure(VM, "memory", "GAUGE", units="B", description="memory allocated")
    b = table.ensure(VM, "cpu0", "DERIVE", 0.0, 1.0)
    assert table.ensure(VM, "memory", "GAUGE", units="B") == a  # idempotent
    feed(table, a, [(5, 7.0)])
    table.forget(VM, "memory")
    assert [s.name for s in table.sources(VM)] == ["cpu0"]
    c = table.ensure("vm:other", "memory", "GAUGE")
    assert c == a
    assert all(math.isnan(v) for v in rows(table, ("vm:other", "memory"), 5, 5).values())
    d = table.ensure("vm:other", "cpu_usage", "GAUGE")  # capacity 2 → 4
    assert table.capacity == 4 and d not in (a, b)
    source = table.source(VM, "cpu0")
    assert (source.kind, source.min, source.max, source.slot) == ("DERIVE", 0.0, 1.0, b)
    table.forget_owner(VM)
    assert VM not in table.owners()
    with pytest.raises(KeyError):
        table.slot(VM, "cpu0")
    with pytest.raises(ValueError):
        table.ensure(VM, "x", "COUNTER")


# ------------------------------------------------------------------------------------- queries

def long_table(last: int):
    """A table whose last update is at *last* (aligned to a day), one GAUGE equal to its row time."""
    table, slot = gauge_table(start=last - 600)
    feed(table, slot, [(t, float(t)) for t in range(last - 595, last + 1, 5)])
    return table


@pytest.mark.parametrize("start, interval, step", [
    (-300, 0, 5),             # within 10 min: the 5-s archive
    (-600, 0, 60),            # 10 min back is not strictly inside the 5-s span: 1 min
    (-3600, 0, 60),
    (-300, 60, 60),           # interval picks the resolution
    (-300, 61, 60),           # xapi divides the interval by the 5-s step: 61 s picks 1 min
    (-300, 65, 3600),
    (-7200, 60, 3600),        # 2 h back is beyond the 1-min span
    (-86400, 3600, 3600),
    (-86400 * 7, 0, 86400),   # a week is beyond the 1-h span
    (-86400 * 400, 0, 86400),  # beyond every span: the coarsest, start clamped
])
def test_fetch_archive_choice_follows_xapi(start, interval, step):
    """fetch picks the first archive with resolution ≥ interval whose span reaches back past start."""
    last = 100 * DAY
    table = long_table(last)
    export = table.fetch([(VM, "memory")], "AVERAGE", start=start, interval=interval)
    assert export.step == step
    assert export.end == last
    times = export.timestamps.tolist()
    assert times == sorted(times, reverse=True) and times[0] == last
    assert all(b - a == -step for a, b in zip(times, times[1:]))
    assert len(times) == min(-start // step + 1, dict((p * STEP, r) for p, r in ARCHIVES)[step])
    assert export.start == times[-1]


def test_fetch_newest_first_and_bounds():
    """Rows from start to the last update, newest first, with an optional end."""
    table = long_table(DAY)
    export = table.fetch([(VM, "memory")], "AVERAGE", start=DAY - 20)
    assert export.timestamps.tolist() == [DAY, DAY - 5, DAY - 10, DAY - 15, DAY - 20]
    assert export.values[:, 0].tolist() == [DAY, DAY - 5, DAY - 10, DAY - 15, DAY - 20]
    assert table.fetch([(VM, "memory")], start=DAY - 20, end=DAY - 10).timestamps.tolist() == [
        DAY - 10, DAY - 15, DAY - 20]
    assert table.fetch([(VM, "memory")], start=DAY + 5).values.shape == (0, 1)
    # MIN and MAX are not stored at 5 s (as in xapi): the finest MIN archive is 1 min.
    assert table.fetch([(VM, "memory")], "MIN", start=DAY - 60).step == 60
    with pytest.raises(ValueError):
        table.fetch([(VM, "memory")], "LAST", start=0)


def test_average_30s_and_10min_windows():
    """average(): the "cooked" statistic over the newest rows of the finest archive covering the window."""
    table = RRDTable(start=0)
    a = table.ensure(VM, "cpu_usage", "GAUGE")
    b = table.ensure(VM, "memory", "GAUGE")
    for i in range(1, 241):  # 20 minutes; cpu_usage unknown on every third step
        idx = np.array([a, b]) if i % 3 else np.array([b])
        table.update_indexed(5 * i, idx, np.array([float(i), 1.0][: len(idx)] if i % 3 else [1.0]))
    keys = [(VM, "cpu_usage"), (VM, "memory")]
    last6 = [i for i in range(235, 241) if i % 3]
    assert table.average(keys, 30).tolist() == [sum(last6) / len(last6), 1.0]
    last120 = [i for i in range(121, 241) if i % 3]
    assert table.average(keys, 600).tolist() == [sum(last120) / len(last120), 1.0]
    assert table.average(keys, 600, "MAX").tolist() == [239.0, 1.0]  # 1-min MAX rows; 240 was unknown
    table.advance(5 * 246)  # 30 s of nothing
    assert np.isnan(table.average(keys, 30)).all()


# --------------------------------------------------------------------------------- persistence

def test_save_load_round_trip_marks_the_gap_unknown(tmp_path):
    """save/load keeps every value; the downtime until `now` is unknown rows, then updates continue."""
    table = RRDTable(start=0)
    g = table.ensure(VM, "memory", "GAUGE", units="B", description="allocated")
    d = table.ensure(VM, "cpu0", "DERIVE", 0.0, 1.0)
    idx = np.array([g, d])
    for t in range(5, 125, 5):
        table.update_indexed(t, idx, np.array([float(t), 0.5 * t]))
    path = tmp_path / "rrd.npz"
    table.save(path)
    before = table.dump(VM)

    loaded, warning = RRDTable.load(path, now=120)
    assert warning is None
    np.testing.assert_equal(loaded.dump(VM), before)
    assert loaded.source(VM, "memory").description == "allocated"

    loaded, warning = RRDTable.load(path, now=120 + 1000)
    assert warning is None
    idx2 = loaded.slots([(VM, "memory"), (VM, "cpu0")])
    for t in (1125, 1130):
        loaded.update_indexed(t, idx2, np.array([float(t), 0.5 * t]))
    mem = rows(loaded, (VM, "memory"), 60, 0)
    assert mem[60] == sum(range(5, 65, 5)) / 12 and mem[120] == sum(range(65, 125, 5)) / 12
    assert all(math.isnan(mem[t]) for t in range(180, 1081, 60))  # the downtime: unknown, not zero
    fine = rows(loaded, (VM, "memory"), 5, 1125)
    assert fine == {1130: 1130.0, 1125: 1125.0}
    cpu = rows(loaded, (VM, "cpu0"), 5, 1125)
    assert math.isnan(cpu[1125]) and cpu[1130] == 0.5  # previous counter older than the heartbeat
    assert all(math.isnan(v) for v in rows(loaded, (VM, "memory"), 5, 1120, end=1120).values())


def test_save_with_compression_and_fresh_slots_after_load(tmp_path):
    """A compressed save loads too, and new sources get slots not used by the restored ones."""
    table, slot = gauge_table()
    table.ensure(VM, "tmp", "GAUGE")
    table.forget(VM, "tmp")
    feed(table, slot, [(5, 3.0)])
    path = tmp_path / "rrd.npz"
    table.save(path, compress=True)
    loaded, warning = RRDTable.load(path)
    assert warning is None and loaded.last(VM, "memory") == 3.0
    assert loaded.ensure(HOST, "loadavg") != slot


def test_save_writes_only_the_slots_in_use_and_loads_into_full_capacity(tmp_path):
    """The file holds the columns up to the highest slot in use (not the spare capacity); a table
    loaded from it has the saved capacity, and its free slots are reused by new sources."""
    table = RRDTable(start=0, capacity=64)
    a = table.ensure(VM, "a", "GAUGE")
    b = table.ensure(VM, "b", "GAUGE")
    c = table.ensure(VM, "c", "GAUGE")
    table.forget(VM, "b")  # a hole below the highest slot in use
    for t, values in ((5, [1.0, 3.0]), (10, [2.0, 4.0])):
        table.update_indexed(t, np.array([a, c]), np.array(values))
    path = tmp_path / "rrd.npz"
    table.save(path)
    with np.load(path) as z:
        assert z["rra0_AVERAGE"].shape == (120, max(a, c) + 1) and z["last_raw"].shape == (max(a, c) + 1,)
    loaded, warning = RRDTable.load(path)
    assert warning is None
    assert [loaded.last(VM, "a"), loaded.last(VM, "c")] == [2.0, 4.0]
    assert loaded.owners() == [VM] and [s.name for s in loaded.sources(VM)] == ["a", "c"]
    assert loaded.ensure(VM, "b2", "GAUGE") == b  # the hole first
    assert math.isnan(loaded.last(VM, "b2"))
    fresh = {loaded.ensure(VM, f"n{i}", "GAUGE") for i in range(61)}
    assert len(fresh) == 61 and max(fresh) == 63  # the rest of the capacity


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip file", b"PK\x03\x04truncated"])
def test_corrupt_file_gives_empty_table_and_warning(tmp_path, content):
    """An unreadable archive file: a fresh empty table and a warning for the log, never an exception."""
    path = tmp_path / "rrd.npz"
    path.write_bytes(content)
    table, warning = RRDTable.load(path, now=1000)
    assert warning and str(path) in warning
    assert table.owners() == [] and table.last_update == 1000


def test_inconsistent_file_gives_empty_table_and_warning(tmp_path):
    """A readable file whose arrays do not match its table (e.g. edited) is refused the same way."""
    table, _ = gauge_table()
    path = tmp_path / "rrd.npz"
    table.save(path)
    with np.load(path) as z:
        arrays = dict(z)
    arrays["last_raw"] = np.zeros(3)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    loaded, warning = RRDTable.load(path)
    assert warning and "last_raw" in warning and loaded.owners() == []


def test_missing_file_gives_empty_table_and_warning(tmp_path):
    """No saved file (first start): an empty table and a warning string."""
    table, warning = RRDTable.load(tmp_path / "absent.npz", now=50)
    assert warning and table.owners() == [] and table.last_update == 50


# ---------------------------------------------------------------------------------- structure

def test_dump_shape_is_rrdtool_like_oldest_first():
    """dump(): ds entries, 10 RRAs (5 s AVERAGE; 1 min/1 h/1 day × AVERAGE/MIN/MAX), rows oldest first."""
    table, slot = gauge_table()
    table.ensure(VM, "cpu0", "DERIVE", 0.0, 1.0)
    feed(table, slot, [(5 * i, float(i)) for i in range(1, 14)])
    dump = table.dump(VM)
    assert dump["step"] == 5 and dump["lastupdate"] == 65 and dump["version"] == "0003"
    assert [(d["name"], d["type"], d["minimal_heartbeat"]) for d in dump["ds"]] == [
        ("memory", "GAUGE", 300), ("cpu0", "DERIVE", 300)]
    assert dump["ds"][0]["last_ds"] == 13.0
    assert [(r["cf"], r["pdp_per_row"], r["params"]["xff"]) for r in dump["rra"]] == [
        ("AVERAGE", 1, 0.5),
        ("AVERAGE", 12, 0.5), ("MIN", 12, 1.0), ("MAX", 12, 1.0),
        ("AVERAGE", 720, 0.5), ("MIN", 720, 1.0), ("MAX", 720, 1.0),
        ("AVERAGE", 17280, 0.5), ("MIN", 17280, 1.0), ("MAX", 17280, 1.0)]
    fine = dump["rra"][0]["database"]
    assert len(fine) == 120 and fine[-1][0] == 13.0 and fine[-2][0] == 12.0  # oldest first
    minute = dump["rra"][1]
    assert minute["database"][-1][0] == 6.5 and minute["last_row_time"] == 60
    assert minute["cdp_prep"][0]["value"] == 13.0 and minute["cdp_prep"][0]["unknown_datapoints"] == 0
    assert [len(r["database"]) for r in dump["rra"]] == [120, 120, 120, 120, 168, 168, 168, 366, 366, 366]


def test_memory_per_source_is_constant():
    """Array sizes depend only on the slot capacity, never on the number of updates or on gaps."""
    table = RRDTable(start=0, capacity=8)
    slots = np.array([table.ensure(f"vm:{i}", "cpu0", "DERIVE", 0.0, 1.0) for i in range(8)])
    size = table.nbytes()
    assert size == 8 * BYTES_PER_SOURCE
    assert BYTES_PER_SOURCE < 17 * 1024  # (120 + 3 × (120 + 168 + 366)) doubles + per-slot state
    for k in range(1, 2001):
        table.update_indexed(5 * k, slots, np.full(8, 0.5 * 5 * k))
    table.advance(5 * 2000 + 30 * DAY)  # a month-long gap is written in bounded time and space
    assert table.nbytes() == size
    assert np.isnan(table.fetch([("vm:0", "cpu0")], start=-7 * DAY).values).all()


def test_latest_and_rebase():
    """latest() is last() for many slots; rebase() makes a DERIVE slot's next update a new baseline."""
    table = RRDTable(start=0)
    a = table.ensure(VM, "cpu0", "DERIVE")
    b = table.ensure(VM, "memory", "GAUGE")
    idx = np.array([a, b])
    table.update_indexed(5, idx, np.array([10.0, 7.0]))
    table.update_indexed(10, idx, np.array([15.0, 7.0]))
    assert table.latest(idx).tolist() == [table.last(VM, "cpu0"), table.last(VM, "memory")] == [1.0, 7.0]
    table.rebase(np.array([a]))
    table.update_indexed(15, idx, np.array([100.0, 8.0]))  # a counter that restarted higher: no bogus rate
    assert math.isnan(table.last(VM, "cpu0"))
    table.update_indexed(20, idx, np.array([105.0, 8.0]))
    assert table.latest(idx).tolist() == [1.0, 8.0]
