"""Sampler cost of the round-robin archives (``xapid.stats.rrd``): CPU per VM per 5-s tick.

    python benchmarks/rrd_bench.py [--ticks 2000] [--vms 100,1000]

For each VM count, one :class:`RRDTable` holds 13 sources per VM (cpu0..cpu3, cpu_usage, memory,
memory_target, vbd_xvda/xvdb read/write, vif_0 rx/tx) plus 17 host sources.  Every tick is one
``update_indexed`` call for all of them, at a fake time advancing 5 s per tick and not aligned to
the step (the general, time-weighted path).  The run starts 1 000 ticks before a day boundary, so
it crosses 1-min rows (every 12 ticks), 1-h rows (every 720) and a 1-day row.  The CPU time of each
call (``time.thread_time_ns``) is recorded; the median over the ticks is printed per VM against the
goal of at most 20 µs, with the mean and the slowest tick (a rollover).

The same ticks are then computed by a naive per-source Python loop (same semantics: rates,
heartbeat, bounds, time-weighted PDPs, xff, the same archives) on fewer ticks, and its median is
compared.  Before timing, both implementations are run side by side on a small table and their
archives checked equal, so the comparison is between equivalent computations.

Figures go to stdout, one line each; the machine line first.  Absolute figures vary between
machines; the ratio is the meaningful part.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from xapid.stats.rrd import ARCHIVES, HEARTBEAT, STEP, XFF, RRDTable  # noqa: E402

NAN = float("nan")
DAY = 86400
GOAL_US = 20.0

# (name, kind, min, max, rate or level): DERIVE sources grow by "rate" per second.
VM_SOURCES = (
    [(f"cpu{i}", "DERIVE", 0.0, 1.0, 0.3) for i in range(4)]
    + [
        ("cpu_usage", "GAUGE", 0.0, 1.0, 0.3),
        ("memory", "GAUGE", 0.0, NAN, 2.0**31),
        ("memory_target", "GAUGE", 0.0, NAN, 2.0**31),
        ("vbd_xvda_read", "DERIVE", 0.0, NAN, 4.0e6),
        ("vbd_xvda_write", "DERIVE", 0.0, NAN, 1.0e6),
        ("vbd_xvdb_read", "DERIVE", 0.0, NAN, 2.0e5),
        ("vbd_xvdb_write", "DERIVE", 0.0, NAN, 1.0e5),
        ("vif_0_rx", "DERIVE", 0.0, NAN, 1.25e6),
        ("vif_0_tx", "DERIVE", 0.0, NAN, 2.5e5),
    ]
)
HOST_SOURCES = (
    [(f"cpu{i}", "GAUGE", 0.0, 1.0, 0.2) for i in range(8)]
    + [
        ("cpu_avg", "GAUGE", 0.0, 1.0, 0.2),
        ("loadavg", "GAUGE", 0.0, NAN, 0.5),
        ("memory_total_kib", "GAUGE", 0.0, NAN, 6.7e7),
        ("memory_free_kib", "GAUGE", 0.0, NAN, 3.1e7),
        ("pif_eth0_rx", "DERIVE", 0.0, NAN, 1.0e7),
        ("pif_eth0_tx", "DERIVE", 0.0, NAN, 5.0e6),
        ("pif_aggr_rx", "DERIVE", 0.0, NAN, 1.0e7),
        ("pif_aggr_tx", "DERIVE", 0.0, NAN, 5.0e6),
        ("running_vcpus", "GAUGE", 0.0, NAN, 4.0),
    ]
)


class Workload:
    """The sources of *vms* VMs and the host, and their raw values at any fake time."""

    def __init__(self, vms: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.specs = [("host:bench", n, k, lo, hi, level) for n, k, lo, hi, level in HOST_SOURCES]
        for v in range(vms):
            self.specs += [(f"vm:{v:08d}", n, k, lo, hi, level) for n, k, lo, hi, level in VM_SOURCES]
        levels = np.array([s[5] for s in self.specs])
        self.derive = np.array([s[2] == "DERIVE" for s in self.specs])
        # Per-source rates / levels with noise; counters start at arbitrary values.
        self.level = levels * rng.uniform(0.5, 1.0, len(levels))
        self.base = np.where(self.derive, rng.uniform(0, 1e9, len(levels)), 0.0)
        self.noise = rng.uniform(0.9, 1.0, (64, len(levels)))

    def raw(self, t: float, tick: int) -> np.ndarray:
        gauge = self.level * self.noise[tick % 64]
        return np.where(self.derive, self.base + self.level * t, gauge)

    def table(self, start: float) -> tuple[RRDTable, np.ndarray]:
        table = RRDTable(start=start)
        for owner, name, kind, lo, hi, _ in self.specs:
            table.ensure(owner, name, kind, lo, hi)
        return table, table.slots((s[0], s[1]) for s in self.specs)


# --------------------------------------------------------------------------- the naive baseline

class NaiveSource:
    """One data source as plain Python objects, updated one at a time (the per-source loop)."""

    __slots__ = ("derive", "lo", "hi", "last_raw", "last_time", "pdp_sum", "pdp_known", "ring0", "acc",
                 "rings")

    def __init__(self, kind: str, lo: float, hi: float):
        self.derive = kind == "DERIVE"
        self.lo = -math.inf if math.isnan(lo) else lo
        self.hi = math.inf if math.isnan(hi) else hi
        self.last_raw = NAN
        self.last_time = NAN
        self.pdp_sum = 0.0
        self.pdp_known = 0.0
        self.ring0 = [NAN] * ARCHIVES[0][1]
        self.acc = [[0.0, 0, NAN, NAN] for _ in ARCHIVES[1:]]  # sum, known count, min, max
        self.rings = [[[NAN] * rows for _ in range(3)] for _, rows in ARCHIVES[1:]]

    def update(self, T: float, t: float, raw: float, k0: int, k1: int) -> None:
        rate = NAN
        if raw == raw:
            if self.derive:
                delta, dt = raw - self.last_raw, t - self.last_time
                if delta >= 0 and dt <= HEARTBEAT:
                    rate = delta / dt
            else:
                rate = raw
            if not (self.lo <= rate <= self.hi) or t - T > HEARTBEAT:
                rate = NAN
            self.last_raw, self.last_time = raw, t
        known = rate == rate
        if k1 == k0:
            if known:
                self.pdp_sum += rate * (t - T)
                self.pdp_known += t - T
            return
        d1 = (k0 + 1) * STEP - T
        if self.pdp_known == 0:
            pdp = rate
        elif known:
            pdp = (self.pdp_sum + rate * d1) / (self.pdp_known + d1)
        else:
            pdp = self.pdp_sum / self.pdp_known
        d2 = t - k1 * STEP
        self.pdp_sum, self.pdp_known = (rate * d2, d2) if known and d2 else (0.0, 0.0)
        for k in range(k0 + 1, k1 + 1):
            self.pdp(k, pdp if k == k0 + 1 else rate)

    def pdp(self, k: int, value: float) -> None:
        self.ring0[k % len(self.ring0)] = value
        for a, (ppr, rows) in enumerate(ARCHIVES[1:]):
            acc = self.acc[a]
            if value == value:
                acc[0] += value
                acc[1] += 1
                acc[2] = value if not acc[2] <= value else acc[2]
                acc[3] = value if not acc[3] >= value else acc[3]
            if k % ppr == 0:
                pos = (k // ppr) % rows
                avg = acc[0] / acc[1] if acc[1] and ppr - acc[1] <= XFF["AVERAGE"] * ppr else NAN
                ring = self.rings[a]
                ring[0][pos], ring[1][pos], ring[2][pos] = avg, acc[2], acc[3]
                self.acc[a] = [0.0, 0, NAN, NAN]


class NaiveTable:
    def __init__(self, workload: Workload, start: float):
        self.sources = [NaiveSource(k, lo, hi) for _, _, k, lo, hi, _ in workload.specs]
        self.last_update = float(start)

    def update(self, t: float, raw: list[float]) -> None:
        T = self.last_update
        k0, k1 = math.floor(T / STEP), math.floor(t / STEP)
        for source, value in zip(self.sources, raw):
            source.update(T, t, value, k0, k1)
        self.last_update = t


# ---------------------------------------------------------------------------------- measuring

def tick_times(start: float, ticks: int) -> list[float]:
    return [start + STEP * (i + 1) for i in range(ticks)]


def start_time() -> float:
    """1 000 ticks before a day boundary (so the run crosses minute, hour and day rows), unaligned."""
    return 20_000 * DAY - 1000 * STEP + 1.3


def cross_check(vms: int = 5, ticks: int = 1500) -> None:
    """Both implementations give the same archives on the same ticks (including an unknown gap)."""
    workload = Workload(vms)
    start = start_time()
    table, idx = workload.table(start)
    naive = NaiveTable(workload, start)
    times = tick_times(start, ticks)
    for i, t in enumerate(times):
        if 300 <= i < 310:  # a missing sample for the first VM's sources
            continue
        raw = workload.raw(t, i)
        if i == 500:
            raw[len(HOST_SOURCES):len(HOST_SOURCES) + 13] = NAN
        table.update_indexed(t, idx, raw)
        naive.update(t, raw.tolist())
    for col, source in zip(idx, naive.sources):
        np.testing.assert_array_equal(table._rings[0][0].data[:, col], source.ring0)
        for a in range(len(ARCHIVES) - 1):
            for c in range(3):
                # Equal to rounding: the table adds a gap's equal PDPs as one rate × count.
                np.testing.assert_allclose(table._rings[a + 1][c].data[:, col], source.rings[a][c],
                                           rtol=1e-12, equal_nan=True)


def measure_numpy(vms: int, ticks: int) -> list[int]:
    workload = Workload(vms)
    start = start_time()
    table, idx = workload.table(start)
    samples = []
    for i, t in enumerate(tick_times(start, ticks)):
        raw = workload.raw(t, i)
        begin = time.thread_time_ns()
        table.update_indexed(t, idx, raw)
        samples.append(time.thread_time_ns() - begin)
    return samples


def measure_naive(vms: int, ticks: int) -> list[int]:
    workload = Workload(vms)
    start = start_time()
    naive = NaiveTable(workload, start)
    samples = []
    for i, t in enumerate(tick_times(start, ticks)):
        raw = workload.raw(t, i).tolist()
        begin = time.thread_time_ns()
        naive.update(t, raw)
        samples.append(time.thread_time_ns() - begin)
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=2000, help="ticks per VM count (default 2000)")
    parser.add_argument("--naive-ticks", type=int, default=0,
                        help="ticks of the per-source loop (default: ~1/4 of --ticks at 100 VMs, fewer at 1000)")
    parser.add_argument("--vms", default="100,1000", help="comma-separated VM counts")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 10 and 50 VMs, 40 ticks (the test suite's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.ticks, args.vms = 40, "10,50"

    print(machine(f"numpy {np.__version__}"))
    cross_check(ticks=300 if args.smoke else 1500)
    print("check: numpy table and per-source loop give the same archives")
    per_source = len(VM_SOURCES)
    for vms in (int(v) for v in args.vms.split(",")):
        samples = measure_numpy(vms, args.ticks)
        median = statistics.median(samples) / 1000 / vms
        mean = statistics.fmean(samples) / 1000 / vms
        worst = max(samples) / 1000
        verdict = "ok" if median <= GOAL_US else "OVER GOAL"
        print(f"RRD update {vms} VMs x {per_source} sources (+{len(HOST_SOURCES)} host): "
              f"{median:.2f} µs per VM per tick (goal ≤ {GOAL_US:g} µs, {verdict}); "
              f"mean {mean:.2f} µs, slowest tick {worst:.0f} µs over {len(samples)} ticks")
        naive_ticks = args.naive_ticks or max(50, (args.ticks // 4) * 100 // vms)
        base = measure_naive(vms, naive_ticks)
        base_median = statistics.median(base) / 1000 / vms
        print(f"  per-source Python loop: {base_median:.2f} µs per VM per tick over {len(base)} ticks; "
              f"numpy is {base_median / median:.1f}x faster than a per-source Python loop")


if __name__ == "__main__":
    main()
