"""The metrics path at scale: sampler ticks at 1 000 VMs before/after the GC policy, and /metrics scrapes.

    python benchmarks/sampler_scale.py [--quick] [--vms 1000] [--ticks 60] [--scrape-vms 100]

1. **Ticks at N VMs** (in process, sim backend, fake clock; VMs of 2 vCPUs, 2 disks and 1 NIC), in
   two cases: *steady* loads (a running host's usual state: the figure judged against the goal) and
   every load *changed* before every tick outside the timing (the sim's worst case: every counter
   frame's rate part rebuilt).  The whole tick (``Sampler.tick``: the sim's
   ``read_counters`` included) is timed with ``time.process_time``; first with the interpreter's
   automatic collections as they come (*before*), then with :class:`xapid.gcpolicy.GcPolicy`
   installed as the daemon installs it (*after*; its collections between ticks are timed apart).
   Goals: median ≤ 20 µs per VM, no tick over 3× the median.  Same-run baseline for the sim's part:
   the counters recomputed per domain as ``read_counters`` did before its frames
   (``_Domain.info`` + ``device_counters``).
2. **Scrape CPU** (in process, 100 running VMs of 2 disks and 1 NIC, archives after a minute of
   ticks): one GET ``/metrics?session_id=…`` through the API port's route — authentication, the
   exposition, the response — after every tick (nothing cached) and repeated within a tick (cached);
   baseline, same run: the same route rendering with ``prometheus_client.generate_latest`` over the
   collector (the path before).  Goal: ≤ 5 ms of CPU per scrape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from prometheus_client import generate_latest  # noqa: E402
from stats_bench import (PERIOD, T0, BenchEnv, out, populate_inprocess, progress, set_loads,  # noqa: E402
                         sim_memory_mib, verdict)
from support import resolve  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from common import machine  # noqa: E402
from xapid.gcpolicy import GcPolicy  # noqa: E402
from xapid.stats import prometheus  # noqa: E402
from xapid.stats.http import HttpExports  # noqa: E402
from xapid.wire.http import HttpRequest  # noqa: E402

GOAL_US_PER_VM = 20.0
GOAL_SPIKE = 3.0
GOAL_SCRAPE_MS = 5.0


def cpu(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def made_env(tmp: Path, vms: int) -> tuple[BenchEnv, Clock, list[str]]:
    clock = Clock()
    clock.advance(T0)
    env = BenchEnv(tmp, clock, sim_memory_mib(vms))
    started = time.monotonic()
    uuids = populate_inprocess(env, vms)
    progress(f"  {vms} VMs created and started in process in {time.monotonic() - started:.1f} s (not timed)")
    return env, clock, uuids


def close(env: BenchEnv) -> None:
    env.api.hypervisor.driver.close()
    env.api.database.close()


# -- 1. ticks ----------------------------------------------------------------------------------


def ticks(vms: int, count: int, tmp: Path) -> None:
    env, clock, uuids = made_env(tmp, vms)
    try:
        sampler = env.api.stats
        n = [0]

        changing = [False]

        def tick() -> float:
            n[0] += 1
            if changing[0]:
                set_loads(env, uuids, n[0])
            clock.advance(PERIOD)
            return cpu(lambda: resolve(Deferred.fromCoroutine(sampler.tick()), clock))

        for case, changes in (("steady loads", False), ("loads changed before every tick (worst case)", True)):
            changing[0] = changes
            for _ in range(3):
                tick()
            before = [tick() for _ in range(count)]
            policy = GcPolicy(clock)
            policy.install(sampler)
            installed = policy.last_cpu
            between: list[float] = []
            try:
                after = []
                for _ in range(count):
                    after.append(tick())
                    for hook in list(sampler.after_tick):  # as Sampler._safe_tick does after a tick
                        hook()
                    done = policy.collections
                    clock.advance(0)  # the reactor runs the scheduled collection, between ticks
                    if policy.collections != done:
                        between.append(policy.last_cpu)
            finally:
                policy.uninstall()
            for name, figures in (("before (automatic GC)", before), ("after (GC policy)", after)):
                median = statistics.median(figures)
                worst = max(figures)
                out(f"ticks at {vms} VMs, {case}, {name}: median {median / vms * 1e6:.1f} µs CPU per VM per "
                    f"tick (goal ≤ {GOAL_US_PER_VM:g}: {verdict(median / vms * 1e6 <= GOAL_US_PER_VM)}), median "
                    f"tick {median * 1e3:.1f} ms, max {worst * 1e3:.1f} ms = {worst / median:.1f}× the median "
                    f"(goal ≤ {GOAL_SPIKE:g}×: {verdict(worst <= GOAL_SPIKE * median)}), {len(figures)} ticks")
            out(f"    GC policy: install (full collection + freeze) {installed * 1e3:.0f} ms once; {len(between)} "
                f"collections between ticks, max {max(between, default=0) * 1e3:.1f} ms, median "
                f"{statistics.median(between or [0]) * 1e3:.1f} ms")
        driver = env.api.hypervisor.driver
        state = driver._state

        def reference() -> None:  # read_counters' per-domain work as it was before the frames
            now = driver._clock()
            for dom in state.domains.values():
                dom.info(now, driver._cpus)
                dom.device_counters(now)
                dom.usage()

        clock.advance(PERIOD)
        frames = statistics.median(cpu(driver.read_counters) for _ in range(9))
        recomputed = statistics.median(cpu(reference) for _ in range(9))
        changed = []
        for k in range(9):
            set_loads(env, uuids, 1000 + k)
            clock.advance(PERIOD)
            changed.append(cpu(driver.read_counters))
        rebuilt = statistics.median(changed)
        out(f"    sim read_counters {frames / vms * 1e6:.1f} µs per VM with frames (steady loads), "
            f"{rebuilt / vms * 1e6:.1f} µs per VM after every load changed; baseline, same run: the per-domain "
            f"recomputation alone {recomputed / vms * 1e6:.1f} µs per VM ({recomputed / frames:.1f}× steady)")
    finally:
        close(env)


# -- 2. scrapes --------------------------------------------------------------------------------


def scrapes(vms: int, rounds: int, tmp: Path) -> None:
    env, clock, uuids = made_env(tmp, vms)
    try:
        for n in range(12):
            set_loads(env, uuids, n)
            clock.advance(PERIOD)
            resolve(Deferred.fromCoroutine(env.api.stats.tick()), clock)
        exports = HttpExports(env.api)
        route = exports.routes()[b"/metrics"]
        target = f"/metrics?session_id={env.login('admin').session}".encode()
        collector = exports.registry.collector  # type: ignore[attr-defined]

        def scrape() -> bytes:
            reply = resolve(route(HttpRequest(b"GET", target, b"HTTP/1.1", {}, peer="bench")), clock)
            assert reply.status == 200
            return bytes(reply.body)

        body = scrape()
        assert body == generate_latest(_PlainRegistry(collector)), "the exposition differs from prometheus_client's"
        fresh, cached, old = [], [], []
        for n in range(rounds):
            set_loads(env, uuids, 100 + n)
            clock.advance(PERIOD)
            resolve(Deferred.fromCoroutine(env.api.stats.tick()), clock)
            fresh.append(cpu(scrape))
            cached.append(cpu(scrape))
            real = prometheus.exposition
            prometheus.exposition = lambda registry: generate_latest(_PlainRegistry(collector))  # the path before
            try:
                old.append(cpu(scrape))
            finally:
                prometheus.exposition = real
        samples = body.count(b"\n") - body.count(b"\n#")
        f, c, o = (statistics.median(x) * 1e3 for x in (fresh, cached, old))
        out(f"/metrics scrape, {vms} VMs ({samples} samples, {len(body) / 1000:.0f} kB), session id: "
            f"{f:.2f} ms CPU after a tick (goal ≤ {GOAL_SCRAPE_MS:g} ms: {verdict(f <= GOAL_SCRAPE_MS)}), "
            f"{c:.2f} ms within a tick (cached)")
        out(f"    baseline, same run: the same route with prometheus_client's generate_latest {o:.2f} ms "
            f"({o / f:.1f}× the rendered, {o / c:.0f}× the cached); {rounds} rounds, medians")
    finally:
        close(env)


class _PlainRegistry(prometheus.CollectorRegistry):
    """A registry that prometheus_client renders itself (the path before the collector's own render)."""

    def __init__(self, collector: prometheus.MetricsCollector) -> None:
        super().__init__(auto_describe=False)
        self.register(collector)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the metrics sampler at scale and /metrics scrapes.")
    parser.add_argument("--quick", action="store_true", help="300 VMs, 20 ticks, 100-VM scrapes over 10 rounds")
    parser.add_argument("--vms", type=int, default=0, help="VMs for the tick figure (default 1000, quick 300)")
    parser.add_argument("--ticks", type=int, default=0, help="timed ticks per phase (default 60, quick 20)")
    parser.add_argument("--scrape-vms", type=int, default=100, help="VMs for the scrape figure (default 100)")
    parser.add_argument("--rounds", type=int, default=0, help="scrape rounds (default 30, quick 10)")
    parser.add_argument("--smoke", action="store_true", help="20 VMs, 5 ticks, 10-VM scrapes over 3 rounds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.vms, args.ticks, args.scrape_vms, args.rounds = True, 20, 5, 10, 3
    out(machine())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xapid-sampler-scale-") as tmp:
        scrapes(args.scrape_vms, args.rounds or (10 if args.quick else 30), Path(tmp) / "scrape")
    with tempfile.TemporaryDirectory(prefix="xapid-sampler-scale-") as tmp:
        ticks(args.vms or (300 if args.quick else 1000), args.ticks or (20 if args.quick else 60), Path(tmp))
    out(f"total time {time.monotonic() - started:.0f} s ({'quick' if args.quick else 'full'} run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
