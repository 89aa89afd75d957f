"""``xapid top``'s cost on the host: the daemon's CPU while the client's top model (one
``host.query_stats`` per refresh, plus a waiting ``event.from`` on VMs) watches 100 running VMs every 5 s,
against the same view built by polling each VM's metrics every 5 s (``VM_metrics``, 2 × ``VBD_metrics``,
``VIF_metrics``: 400 calls per refresh), in the same run.

    python benchmarks/top_bench.py [--seconds 60] [--settle 30]

A real daemon (``python -m xapid serve``, sim backend, loopback, ``[stats] period = 5``) with 100 VMs of
2 disks and 1 NIC each (set up as in stats_bench.py). The daemon's CPU (utime + stime of all its threads,
``/proc/<pid>/stat``) is measured over three phases of the same length: idle (sampling only), top, polling.
The cost of a phase is its CPU minus idle's. Goals: top ≥ 20× cheaper than polling and ≤ 0.5 % of a core.
Figures go to stdout, progress to stderr; every process started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import stats_bench
from common import exit_status, machine, prepare_run
from stats_bench import GOAL_CORE_PCT, GOAL_RATIO, PERIOD, out, progress, verdict

from xapid.client.connection import Client
from xapid.client.top import TopModel

RUN_NS: list[float] = []  # the same phases from /proc/<pid>/task/*/schedstat (ns; a finer cross-check)


def phase(daemon: stats_bench.Daemon, seconds: float, tick: Callable[[], None]) -> tuple[float, int]:
    """The daemon's CPU seconds over *seconds*, calling *tick* every PERIOD s from the start."""
    before, before_ns = daemon.cpu_seconds(), daemon.run_ns()
    start = time.monotonic()
    ticks = 0
    while time.monotonic() - start < seconds:
        due = start + ticks * PERIOD
        time.sleep(max(0.0, min(due, start + seconds) - time.monotonic()))
        if time.monotonic() - start >= seconds:
            break
        tick()
        ticks += 1
    time.sleep(max(0.0, start + seconds - time.monotonic()))
    RUN_NS.append((daemon.run_ns() - before_ns) / 1e9)
    return daemon.cpu_seconds() - before, ticks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase (default 60)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds between set-up and the first phase")
    parser.add_argument("--smoke", action="store_true", help="5 VMs, no settling, 1.5-s phases (the test suite's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.settle = 1.5, 0.0
        stats_bench.DASHBOARD_VMS = 5
    prepare_run("top_bench.py")
    out(machine())
    return exit_status("top_bench.py", lambda: benchmark(args))


def benchmark(args: argparse.Namespace) -> None:
    """The three phases against one daemon, then the figures; the daemon is stopped however it ends."""
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="top-bench-") as tmp:
        progress(f"starting the daemon and {stats_bench.DASHBOARD_VMS} VMs")
        daemon = stats_bench.start_daemon(stack, Path(tmp))
        dash = stats_bench.prepare_dashboard(daemon)
        time.sleep(args.settle)
        client = Client(lambda: xmlrpc.client.ServerProxy(daemon.url, allow_none=True))
        client.login(stats_bench.USER, daemon.password)

        progress(f"idle phase ({args.seconds:.0f} s)")
        idle, _ = phase(daemon, args.seconds, lambda: None)

        progress(f"top phase ({args.seconds:.0f} s): one host.query_stats per {PERIOD} s, event.from waiting")
        model = TopModel(client, 30.0)
        model.watch(30.0)
        rows: list[int] = []

        per_refresh: list[float] = []  # daemon CPU (schedstat, s) around each refresh call

        def top_tick() -> None:
            before_ns = daemon.run_ns()
            model.refresh()
            per_refresh.append((daemon.run_ns() - before_ns) / 1e9)
            rows.append(len(model.view("cpu").vms))

        top, top_ticks = phase(daemon, args.seconds, top_tick)
        model.stop()

        progress(f"polling phase ({args.seconds:.0f} s): every VM's metrics every {PERIOD} s")
        poller = client.fork()
        vms = poller.call("VM.get_all_records")
        vbds = poller.call("VBD.get_all_records")
        vifs = poller.call("VIF.get_all_records")
        running = [rec for rec in vms.values() if rec["uuid"] in set(dash.vm_uuids)]
        polled: list[int] = []

        def poll_tick() -> None:
            calls = 0
            for rec in running:
                poller.call("VM_metrics.get_record", rec["metrics"])
                calls += 1
                for vbd in rec["VBDs"]:
                    poller.call("VBD_metrics.get_record", vbds[vbd]["metrics"])
                    calls += 1
                for vif in rec["VIFs"]:
                    poller.call("VIF_metrics.get_record", vifs[vif]["metrics"])
                    calls += 1
            polled.append(calls)

        poll, poll_ticks = phase(daemon, args.seconds, poll_tick)
        client.logout()

        top_net, poll_net = max(top - idle, 0.0), max(poll - idle, 0.0)
        floor = 0.01  # the clock tick of /proc/<pid>/stat: a difference below it is noise
        ratio = poll_net / max(top_net, floor)
        top_pct = top_net / args.seconds * 100
        out(f"xapid top, {len(dash.vm_uuids)} running VMs, {args.seconds:.0f} s per phase, refresh every {PERIOD} s")
        out(f"  idle (sampling only):     {idle:7.3f} CPU s  ({idle / args.seconds * 100:.2f} % of a core)")
        out(f"  top:                      {top:7.3f} CPU s  {top_ticks} refreshes, {rows[-1] if rows else 0} rows; "
            f"net {top_net:.3f} s = {top_pct:.3f} % of a core")
        out(f"  polling:                  {poll:7.3f} CPU s  {poll_ticks} rounds of {polled[-1] if polled else 0} "
            f"calls; net {poll_net:.3f} s = {poll_net / args.seconds * 100:.3f} % of a core")
        bound = "≥ " if top_net < floor else ""
        out(f"  polling / top (net):      {bound}{ratio:.1f}×  (goal ≥ {GOAL_RATIO:.0f}×: {verdict(ratio >= GOAL_RATIO)})")
        out(f"  top, % of a core (net):   {top_pct:.3f} %  (goal ≤ {GOAL_CORE_PCT} %: {verdict(top_pct <= GOAL_CORE_PCT)})")
        if per_refresh:
            direct = sum(per_refresh)
            out(f"  one refresh (schedstat):  median {statistics.median(per_refresh) * 1e3:.2f} ms of daemon CPU, "
                f"max {max(per_refresh) * 1e3:.2f} ms; {len(model.stats)} values")
            out(f"  polling / refreshes:      {poll_net / max(direct, 1e-6):.1f}×  (polling's net CPU against the "
                f"refreshes' own {direct * 1e3:.0f} ms: the phase difference is within the idle floor's noise)")
        idle_ns, top_ns, poll_ns = RUN_NS[:3]
        t_net, p_net = max(top_ns - idle_ns, 0.0), max(poll_ns - idle_ns, 0.0)
        out(f"  schedstat cross-check:    idle {idle_ns:.3f} s, top {top_ns:.3f} s (net {t_net:.3f} s = "
            f"{t_net / args.seconds * 100:.3f} % of a core), polling {poll_ns:.3f} s (net {p_net:.3f} s); "
            f"ratio {p_net / max(t_net, 1e-3):.1f}×")


if __name__ == "__main__":
    sys.exit(main())
