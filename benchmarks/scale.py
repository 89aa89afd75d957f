"""Inventory scale: does a write cost the same on a host with 10 000 disks as on one with 10?

    python benchmarks/scale.py [--quick] [--levels 10,1000,10000] [--reps N]

1. **Growth** (in process: tests/support.py's ``ApiEnv``, the sim backend, a real SQLite state
   database on disk, every call flushed before it is answered as on the wire): the inventory is
   grown through the dispatcher in units of one ``VM.create``, ten ``VDI.create`` (1 MiB sparse
   files in the default SR), two ``VBD.create`` (the VM's first two disks) and one ``VIF.create``
   (a generated MAC, on the pool's first network).  The throughput of
   each thousand VDIs is printed (calls/s over the unit's 14 calls), so a slowdown with size shows.
2. **Per-operation costs** at each level (10, 1 000 and 10 000 VDIs; a tenth as many VMs):
   ``VDI.create``, ``VDI.set_name_label``, ``VM.create``, ``VBD.create``, ``VIF.create`` (MAC
   generated), ``VM.set_name_label``, ``VBD.destroy``, ``VIF.destroy``, ``VDI.destroy`` and
   ``VM.destroy``, each ``--reps`` times on objects made for
   the purpose (removed again, so the level holds).  Median wall time per call (SQLite's fsync
   included) and median CPU time, side by side, with the ratio to the smallest level: the baseline
   of the same run.  Each level is measured twice: with the daemon's garbage-collection policy
   (:class:`xapid.gcpolicy.GcPolicy` installed on the in-process sampler, as ``xapid serve`` does:
   the inventory grown so far collected once and frozen, as the daemon does at start and again a
   minute later), and with CPython's automatic collector alone (every full collection walks the
   whole inventory; the same-run comparison).  Goal: every ratio at 10 000 ≤ 1.5 (daemon policy).
3. **Watchers**: at the largest level, *--watchers* (default 1 000) ``event.from`` calls are parked
   through the dispatcher on one session, in step (one token), on ``message`` (a class none of these
   calls writes: what a change costs with watchers it does not concern), and every operation is
   measured again (daemon GC policy).  Same-run baseline: the same level without watchers.  Goal:
   every ratio ≤ 1.5.  (A change that concerns every watcher costs a reply each: that fan-out is
   ``event_watchers.py``'s figure.)
4. **Start-up and memory**: the state dir is closed and a real daemon (``python -m xapid serve``,
   sim backend) is started on it: time until it listens, and its VmRSS then.  The same daemon on an
   empty state dir is the same-run baseline.  Goals: start ≤ 5 s, RSS ≤ 1 GB.

``--quick`` (levels 10, 100, 300; few repetitions) runs in well under 20 s: the smoke test's size.
Figures go to stdout, progress to stderr; the daemons are stopped however the run ends.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from common import (LOOPBACK, SERVE, exit_status, handle_signals, machine, out, progress, rss_kib,  # noqa: E402
                    stop)
from run import wait_listening  # noqa: E402 - shared with the core benchmark
from support import ApiEnv, LocalClient, vm_record  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from xapid.gcpolicy import GcPolicy  # noqa: E402

T0 = 1_700_000_000
DISK_SIZE = 1 << 20
VDIS_PER_VM = 10
VBDS_PER_VM = 2
GOAL_RATIO = 1.5
GOAL_START_S = 5.0
GOAL_RSS_MB = 1024.0
OPS = ("VDI.create", "VDI.set_name_label", "VM.create", "VBD.create", "VIF.create", "VM.set_name_label",
       "VBD.destroy", "VIF.destroy", "VDI.destroy", "VM.destroy")
VM_RECORD = vm_record(name_label="scale-vm")


def vdi_record(sr: str, n: int) -> dict[str, Any]:
    return {"SR": sr, "virtual_size": str(DISK_SIZE), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": f"scale-disk-{n}", "name_description": ""}


def vif_record(vm: str, network: str) -> dict[str, Any]:
    return {"VM": vm, "network": network, "device": "0", "MAC": "", "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def vbd_record(vm: str, vdi: str, disk: int) -> dict[str, Any]:
    return {"VM": vm, "VDI": vdi, "userdevice": str(disk), "bootable": disk == 0, "mode": "RW", "type": "Disk",
            "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}


@dataclass
class Cost:
    """Per-call samples of one operation at one level: wall and CPU seconds."""

    wall: list[float]
    cpu: list[float]

    @property
    def wall_us(self) -> float:
        return statistics.median(self.wall) * 1e6

    @property
    def cpu_us(self) -> float:
        return statistics.median(self.cpu) * 1e6


class Inventory:
    """The in-process API and the objects grown so far."""

    def __init__(self, tmp: Path):
        self.env = ApiEnv(tmp, Clock())
        self.env.clock.advance(T0)
        self.api: LocalClient = self.env.login()
        self.sr = self.api("pool.get_default_SR", self.api("pool.get_all")[0])
        self.network = self.api("network.get_all")[0]
        self.vdis = 0
        self.vms = 0
        self.calls = 0

    def grow_unit(self) -> None:
        """One VM, ten disks, two of them attached, one NIC (14 calls)."""
        api = self.api
        vm = api("VM.create", VM_RECORD)
        disks = [api("VDI.create", vdi_record(self.sr, self.vdis + i)) for i in range(VDIS_PER_VM)]
        for disk in range(VBDS_PER_VM):
            api("VBD.create", vbd_record(vm, disks[disk], disk))
        api("VIF.create", vif_record(vm, self.network))
        self.vms += 1
        self.vdis += VDIS_PER_VM
        self.calls += 2 + VDIS_PER_VM + VBDS_PER_VM

    def grow_to(self, vdis: int, report: Callable[[int, float], None]) -> None:
        """Grow until *vdis* VDIs exist; *report(vdis, calls/s)* after each thousand (or the end)."""
        chunk_start, calls_start = time.perf_counter(), self.calls
        while self.vdis < vdis:
            self.grow_unit()
            if self.vdis % 1000 == 0 or self.vdis >= vdis:
                elapsed = time.perf_counter() - chunk_start
                report(self.vdis, (self.calls - calls_start) / elapsed if elapsed else 0.0)
                chunk_start, calls_start = time.perf_counter(), self.calls

    def measure(self, reps: int) -> dict[str, Cost]:
        """Each operation *reps* times on objects made for it, removed again afterwards."""
        api = self.api
        costs = {op: Cost([], []) for op in OPS}

        def timed(op: str, *args: Any) -> Any:
            cpu, wall = time.process_time(), time.perf_counter()
            value = api(op, *args)
            costs[op].wall.append(time.perf_counter() - wall)
            costs[op].cpu.append(time.process_time() - cpu)
            return value

        vdis = [timed("VDI.create", vdi_record(self.sr, -1 - i)) for i in range(reps)]
        for i, vdi in enumerate(vdis):
            timed("VDI.set_name_label", vdi, f"renamed-{i}")
        vms = [timed("VM.create", VM_RECORD) for _ in range(reps)]
        vbds = [timed("VBD.create", vbd_record(vm, vdi, 0)) for vm, vdi in zip(vms, vdis)]
        vifs = [timed("VIF.create", vif_record(vm, self.network)) for vm in vms]
        for i, vm in enumerate(vms):
            timed("VM.set_name_label", vm, f"renamed-{i}")
        for vbd in vbds:
            timed("VBD.destroy", vbd)
        for vif in vifs:
            timed("VIF.destroy", vif)
        for vdi in vdis:
            timed("VDI.destroy", vdi)
        for vm in vms:
            timed("VM.destroy", vm)
        return costs

    def park_watchers(self, count: int) -> list[Any]:
        """*count* ``event.from`` calls on ``message`` from one token, parked (their Deferreds)."""
        session = self.api.session
        token = self.env.raw("event.from", [session, ["message"], "", 0.0])["token"]
        parked = [self.env.dispatcher.call("event.from", [session, ["message"], token, 3600.0])
                  for _ in range(count)]
        if self.env.api.events.watchers != count:
            raise RuntimeError(f"{self.env.api.events.watchers} watchers parked of {count}")
        return parked

    def close(self) -> None:
        self.env.api.hypervisor.driver.close()
        self.env.api.database.close()


def start_daemon(tmp: Path, name: str) -> tuple[float, float]:
    """Start ``xapid serve`` on ``tmp/state`` (users ``tmp/users``), then stop it: seconds until it listened,
    and its RSS (MB) then."""
    config, log = tmp / "scale.conf", tmp / f"{name}.log"
    config.write_text("[server]\nbackend = sim\n")
    started = time.perf_counter()
    with log.open("wb") as errors:
        proc = subprocess.Popen([*SERVE, "--config", str(config), "--state-dir", str(tmp / "state"),
                                 "--users", str(tmp / "users"), *LOOPBACK],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_listening(name, proc, log)
        elapsed = time.perf_counter() - started
        return elapsed, rss_kib(proc.pid) / 1024
    finally:
        stop(proc)


def print_costs(levels: list[int], costs: dict[int, dict[str, Cost]], title: str) -> list[float]:
    """The side-by-side table; returns the wall ratios of the largest level to the smallest."""
    base, top = levels[0], levels[-1]
    out(f"per-call cost, {title}, median µs wall / CPU (ratio to {base} VDIs, wall / CPU):")
    out("  " + f"{'operation':20}" + "".join(f"{f'{n} VDIs':>20}" for n in levels) + f"{'ratio':>16}")
    ratios = []
    for op in OPS:
        cells = "".join(f"{f'{costs[n][op].wall_us:.0f} / {costs[n][op].cpu_us:.0f}':>20}" for n in levels)
        wall = costs[top][op].wall_us / costs[base][op].wall_us
        cpu = costs[top][op].cpu_us / costs[base][op].cpu_us
        ratios.append(wall)
        out(f"  {op:20}{cells}{f'{wall:.2f} / {cpu:.2f}':>16}")
    return ratios


def print_watcher_costs(level: int, watchers: int, without: dict[str, Cost], with_: dict[str, Cost]) -> list[float]:
    """Each operation at *level* with *watchers* parked beside the same without; the wall ratios."""
    out(f"per-call cost at {level} VDIs with {watchers} event.from watchers parked (on a class these calls do not "
        "write), median µs wall / CPU (ratio to no watchers, wall / CPU):")
    out("  " + f"{'operation':20}{'no watchers':>20}{f'{watchers} watchers':>20}{'ratio':>16}")
    ratios = []
    for op in OPS:
        base, loaded = without[op], with_[op]
        wall, cpu = loaded.wall_us / base.wall_us, loaded.cpu_us / base.cpu_us
        ratios.append(wall)
        out(f"  {op:20}{f'{base.wall_us:.0f} / {base.cpu_us:.0f}':>20}{f'{loaded.wall_us:.0f} / {loaded.cpu_us:.0f}':>20}"
            f"{f'{wall:.2f} / {cpu:.2f}':>16}")
    return ratios


def benchmark(levels: list[int], reps: int, watchers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="xapid-scale-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "empty").mkdir()
        inventory = Inventory(tmp / "grown")
        shutil.copy(tmp / "grown" / "users", tmp / "empty" / "users")
        costs: dict[int, dict[str, Cost]] = {}
        auto_costs: dict[int, dict[str, Cost]] = {}
        out(f"growth through the API (units of 1 VM.create, {VDIS_PER_VM} VDI.create, {VBDS_PER_VM} VBD.create, "
            "1 VIF.create):")
        for level in levels:
            progress(f"growing to {level} VDIs")
            inventory.grow_to(level, lambda vdis, rate: out(f"  up to {vdis:6} VDIs: {rate:7.0f} calls/s"))
            progress(f"measuring at {level} VDIs ({inventory.vms} VMs)")
            if not costs:
                inventory.measure(reps)  # warm-up (first calls, caches, the file system), not counted
            auto_costs[level] = inventory.measure(reps)
            policy = GcPolicy(inventory.env.clock)
            policy.install(inventory.env.api.stats)  # as xapid serve: collect, freeze what lives
            try:
                costs[level] = inventory.measure(reps)
                if level == levels[-1]:
                    progress(f"parking {watchers} event.from watchers, measuring again")
                    parked = inventory.park_watchers(watchers)
                    watched = inventory.measure(reps)
                    if any(d.called for d in parked):
                        raise RuntimeError("a watcher was answered by a change it does not subscribe to")
            finally:
                policy.uninstall()
        out()
        ratios = print_costs(levels, costs, "the daemon's GC policy")
        out()
        print_costs(levels, auto_costs, "automatic GC only")
        top = levels[-1]
        out()
        watcher_ratios = print_watcher_costs(top, watchers, costs[top], watched)
        inventory.close()
        progress("starting daemons")
        empty_start, empty_rss = start_daemon(tmp / "empty", "empty")
        full_start, full_rss = start_daemon(tmp / "grown", "grown")
        out()
        out(f"daemon start-up: empty state dir {empty_start:.2f} s, {empty_rss:.0f} MB RSS; "
            f"{inventory.vms} VMs + {inventory.vdis} VDIs {full_start:.2f} s, {full_rss:.0f} MB RSS "
            f"({full_start / empty_start:.1f}x / {full_rss / empty_rss:.1f}x)")
        worst = max(ratios)
        out("goals:")
        out(f"  costs at {top} VDIs within {GOAL_RATIO}x of {levels[0]}: worst {worst:.2f}x "
            f"({OPS[ratios.index(worst)]}) — {'met' if worst <= GOAL_RATIO else 'NOT met'}")
        worst_watched = max(watcher_ratios)
        out(f"  costs at {top} VDIs with {watchers} watchers parked within {GOAL_RATIO}x of none: worst "
            f"{worst_watched:.2f}x ({OPS[watcher_ratios.index(worst_watched)]}) — "
            f"{'met' if worst_watched <= GOAL_RATIO else 'NOT met'}")
        out(f"  start ≤ {GOAL_START_S:.0f} s: {full_start:.2f} s — {'met' if full_start <= GOAL_START_S else 'NOT met'}")
        out(f"  RSS ≤ {GOAL_RSS_MB:.0f} MB: {full_rss:.0f} MB — {'met' if full_rss <= GOAL_RSS_MB else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="xapid's per-operation costs as the inventory grows.")
    parser.add_argument("--quick", action="store_true", help="levels 10, 100, 300 and few repetitions (a smoke run)")
    parser.add_argument("--levels", help="comma-separated VDI counts (default 10,1000,10000)")
    parser.add_argument("--reps", type=int, help="calls of each operation per level (default 50; quick 10)")
    parser.add_argument("--watchers", type=int, help="event.from watchers parked at the largest level "
                                                     "(default 1000; quick 100)")
    args = parser.parse_args(argv)
    levels = [int(n) for n in (args.levels or ("10,100,300" if args.quick else "10,1000,10000")).split(",")]
    if levels != sorted(levels) or levels[0] < VDIS_PER_VM or any(n % VDIS_PER_VM for n in levels):
        parser.error(f"--levels: increasing multiples of {VDIS_PER_VM}")
    reps = args.reps or (10 if args.quick else 50)
    watchers = args.watchers or (100 if args.quick else 1000)
    handle_signals("scale.py")
    print(machine(), flush=True)
    started = time.monotonic()
    if status := exit_status("scale.py", lambda: benchmark(levels, reps, watchers)):
        return status
    print(f"total time {time.monotonic() - started:.0f} s ({'quick' if args.quick else 'full'} run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
