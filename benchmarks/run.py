"""Benchmarks of xapid against xend's architecture (``benchmarks/stdlib_server.py``), in one run.

    python benchmarks/run.py [--quick] [--loader auto|wrk|python]

Starts xapid (a real subprocess on the sim backend, temporary state dir, loopback only), gives it
1000 VMs, starts the stdlib baseline serving a copy of the same records, then measures each figure
on both servers alternately (A B A B …) and prints the medians, one line per figure:

    VM.get_all_records 1000 VMs: xapid 7.9 ms, stdlib 91.0 ms, 11.5x

For the last figure (d) it then gives 1000 guest VMs 2 disks (VDI + VBD) and 1 NIC (VIF) each,
restarts the baseline on a fresh copy, and times fetching all VM, VBD, VDI and VIF records.

A ratio above 1 means xapid is better.  Figures go to stdout, progress to stderr.  See
``benchmarks/README.md`` for what each figure measures.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import devices

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import vm_record  # noqa: E402 - the same valid VM.create record the tests use
import loadgen

ROOT = Path(__file__).resolve().parent.parent
from common import (BASELINE, LOOPBACK, SERVE, USER, add_user, machine, progress,  # noqa: E402 - shared (re-exported)
                    stop, wait_port)
import common  # noqa: E402
VMS = 1000
CONNECTIONS = 8
CREATORS = 16
START_TIMEOUT = 60.0
VM_RECORD: dict[str, Any] = vm_record(name_label="bench-vm")


@dataclass(frozen=True)
class Settings:
    """How long to measure: rounds of the load and SDK figures, get_all_records calls per server, and
    cold get_all_records samples (each after every VM was changed)."""

    rounds: int
    load_seconds: float
    sdk_calls: int
    record_calls: int
    cold_samples: int


FULL = Settings(rounds=5, load_seconds=5.0, sdk_calls=3000, record_calls=9, cold_samples=5)
QUICK = Settings(rounds=3, load_seconds=2.0, sdk_calls=500, record_calls=5, cold_samples=3)
SMOKE = Settings(rounds=1, load_seconds=0.5, sdk_calls=50, record_calls=2, cold_samples=1)  # with SMOKE_VMS: the test suite's
SMOKE_VMS = 20


@dataclass(frozen=True)
class Server:
    """A server under test, listening on a loopback port."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@dataclass(frozen=True)
class Figure:
    """One measured figure: every sample per server, and whether larger values are better."""

    label: str
    unit: str
    samples: dict[str, list[float]]
    higher_is_better: bool

    def median(self, server: str) -> float:
        return statistics.median(self.samples[server])

    @property
    def ratio(self) -> float:
        """xapid's advantage: > 1 means xapid is better."""
        xapid, stdlib = self.median("xapid"), self.median("stdlib")
        return xapid / stdlib if self.higher_is_better else stdlib / xapid


# -- output -----------------------------------------------------------------------------------


def devices_label() -> str:
    """Figure d's label (VMS is smaller in a smoke run)."""
    return (f"VM+VBD+VDI+VIF get_all_records, {VMS} VMs with {devices.DISKS_PER_VM} disks and "
            f"{devices.NICS_PER_VM} NIC")


def fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.0f} {unit}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def report(figure: Figure) -> None:
    """The figure's line, then its samples (indented) so the spread is visible."""
    xapid, stdlib = figure.median("xapid"), figure.median("stdlib")
    print(f"{figure.label}: xapid {fmt(xapid, figure.unit)}, stdlib {fmt(stdlib, figure.unit)}, "
          f"{fmt_ratio(figure.ratio)}")
    for name, values in figure.samples.items():
        print(f"    {name:6} samples: {', '.join(fmt(v, figure.unit) for v in values)}")
    sys.stdout.flush()


# -- processes --------------------------------------------------------------------------------


def spawn(stack: contextlib.ExitStack, args: list[str], log: Path, stdin_text: str | None = None
          ) -> subprocess.Popen[bytes]:
    """Start *args* with stderr to *log*; it is stopped when *stack* closes, whatever happens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stack.callback(stop, proc)
    if stdin_text is not None and proc.stdin is not None:
        proc.stdin.write(stdin_text.encode())
        proc.stdin.close()
    return proc


def wait_listening(name: str, proc: subprocess.Popen[bytes], log: Path) -> Server:
    """The server once its log says ``listening on 127.0.0.1:PORT``."""
    return Server(name, wait_port(name, proc, log, START_TIMEOUT))


def start_xapid(stack: contextlib.ExitStack, tmp: Path, password: str) -> Server:
    """xapid on the sim backend with a fresh state dir and one pool-admin user."""
    users, config, log = tmp / "users", tmp / "xapid.conf", tmp / "xapid.log"
    add_user(users, password)
    config.write_text("[server]\nbackend = sim\n")
    proc = spawn(stack, [*SERVE, "--config", str(config), "--state-dir", str(tmp / "state"), "--users", str(users),
                         *LOOPBACK], log)
    return wait_listening("xapid", proc, log)


def start_baseline(stack: contextlib.ExitStack, tmp: Path, source: Server, password: str,
                   log_name: str = "stdlib.log") -> tuple[Server, subprocess.Popen[bytes]]:
    """The stdlib baseline, serving a copy of *source*'s records as they are now, and its process."""
    log = tmp / log_name
    proc = spawn(stack, [sys.executable, str(BASELINE), "--copy-from", source.url, "--user", USER], log,
                 stdin_text=f"{password}\n")
    return wait_listening("stdlib", proc, log), proc


# -- calls ------------------------------------------------------------------------------------


def sdk_session(server: Server, password: str) -> Any:
    """A logged-in ``XenAPI.Session``."""
    return common.sdk_session(server.url, password)


def create_vms(server: Server, password: str, count: int) -> list[str]:
    """Create *count* halted VMs over *CREATORS* concurrent sessions (not timed); their refs."""

    def create(share: int) -> list[str]:
        session = sdk_session(server, password)
        try:
            return [session.xenapi.VM.create(VM_RECORD) for _ in range(share)]
        finally:
            session.xenapi.session.logout()

    shares = [count // CREATORS + (i < count % CREATORS) for i in range(CREATORS)]
    with ThreadPoolExecutor(CREATORS) as pool:
        return [ref for refs in pool.map(create, [s for s in shares if s]) for ref in refs]


def call_body(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


class KeepAlive:
    """One ``http.client`` keep-alive connection that times whole exchanges."""

    def __init__(self, server: Server):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port)

    def post(self, body: bytes) -> tuple[float, bytes]:
        """Seconds from sending *body* to having read the whole reply, and the reply."""
        start = time.perf_counter()
        self.conn.request("POST", "/", body, {"Content-Type": "text/xml"})
        response = self.conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"HTTP status {response.status}: {data[:300]!r}")
        return elapsed, data

    def close(self) -> None:
        self.conn.close()


# -- figures ----------------------------------------------------------------------------------


def alternate(servers: list[Server], rounds: int, measure: Callable[[Server], float]) -> dict[str, list[float]]:
    """*measure* each server in turn, *rounds* times (A B A B …)."""
    samples: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(rounds):
        for server in servers:
            samples[server.name].append(measure(server))
    return samples


def load_figure(servers: list[Server], sessions: dict[str, str], vm: str, settings: Settings,
                loader: str) -> Figure:
    """Figure a: small authenticated calls/s from CONNECTIONS concurrent keep-alive connections."""
    bodies = {s.name: call_body("VM.get_power_state", sessions[s.name], vm) for s in servers}
    for server in servers:
        loadgen.check_call(server.port, loadgen.http_request(bodies[server.name]))

    def measure(server: Server) -> float:
        body = bodies[server.name]
        if loader == "wrk":
            return loadgen.wrk_rate(server.port, body, CONNECTIONS, settings.load_seconds)
        return loadgen.python_rate(server.port, loadgen.http_request(body), CONNECTIONS, settings.load_seconds)

    where = (f"wrk -t{loadgen.wrk_threads(CONNECTIONS)}" if loader == "wrk"
             else f"{CONNECTIONS} Python client processes")
    return Figure(f"VM.get_power_state, {CONNECTIONS} keep-alive connections ({where})", "calls/s",
                  alternate(servers, settings.rounds, measure), higher_is_better=True)


def sdk_figure(servers: list[Server], password: str, vm: str, settings: Settings) -> Figure:
    """Figure b: sequential calls/s from the official SDK (XenAPI.Session, an xmlrpc.client.ServerProxy)."""

    def measure(server: Server) -> float:
        session = sdk_session(server, password)
        get_power_state = session.xenapi.VM.get_power_state
        try:
            get_power_state(vm)
            start = time.perf_counter()
            for _ in range(settings.sdk_calls):
                get_power_state(vm)
            return settings.sdk_calls / (time.perf_counter() - start)
        finally:
            session.xenapi.session.logout()

    return Figure("VM.get_power_state, sequential from the XenAPI SDK", "calls/s",
                  alternate(servers, settings.rounds, measure), higher_is_better=True)


def records_figure(servers: list[Server], sessions: dict[str, str], settings: Settings) -> Figure:
    """Figure c: time to a complete VM.get_all_records reply on a warm keep-alive connection."""
    conns = {s.name: KeepAlive(s) for s in servers}
    bodies = {s.name: call_body("VM.get_all_records", sessions[s.name]) for s in servers}
    try:
        for server in servers:  # open the connections outside the timings
            conns[server.name].post(call_body("pool.get_all", sessions[server.name]))
        samples = alternate(servers, settings.record_calls,
                            lambda server: conns[server.name].post(bodies[server.name])[0] * 1000)
    finally:
        for conn in conns.values():
            conn.close()
    return Figure(f"VM.get_all_records {VMS} VMs", "ms", samples, higher_is_better=False)


def fetch_devices(conn: KeepAlive, bodies: dict[str, bytes]) -> tuple[float, dict[str, float], dict[str, bytes]]:
    """The four get_all_records of figure d in turn on *conn*, each body read in full.

    Milliseconds from sending the first call to having read the last reply, milliseconds per call,
    and the replies.
    """
    times: dict[str, float] = {}
    replies: dict[str, bytes] = {}
    start = time.perf_counter()
    for cls, body in bodies.items():
        elapsed, replies[cls] = conn.post(body)
        times[cls] = elapsed * 1000
    return (time.perf_counter() - start) * 1000, times, replies


def device_bodies(session: str) -> dict[str, bytes]:
    return {cls: call_body(f"{cls}.get_all_records", session) for cls in devices.CLASSES}


@dataclass(frozen=True)
class DeviceFigure:
    """Figure d, and the samples of each of its four calls per server."""

    figure: Figure
    per_call: dict[str, dict[str, list[float]]]  # server -> class -> ms


def devices_figure(servers: list[Server], sessions: dict[str, str], settings: Settings) -> DeviceFigure:
    """Figure d: time to complete VM, VBD, VDI and VIF get_all_records, in turn on one keep-alive connection."""
    conns = {s.name: KeepAlive(s) for s in servers}
    bodies = {s.name: device_bodies(sessions[s.name]) for s in servers}
    per_call: dict[str, dict[str, list[float]]] = {s.name: {cls: [] for cls in devices.CLASSES} for s in servers}

    def measure(server: Server) -> float:
        total, times, _ = fetch_devices(conns[server.name], bodies[server.name])
        for cls, ms in times.items():
            per_call[server.name][cls].append(ms)
        return total

    try:
        for server in servers:  # open the connections outside the timings
            conns[server.name].post(call_body("pool.get_all", sessions[server.name]))
        samples = alternate(servers, settings.record_calls, measure)
    finally:
        for conn in conns.values():
            conn.close()
    return DeviceFigure(Figure(devices_label(), "ms", samples, higher_is_better=False), per_call)


def cold_records(server: Server, session: str) -> tuple[float, bytes]:
    """Milliseconds for the first VM.get_all_records (nothing encoded yet), and the reply."""
    conn = KeepAlive(server)
    try:
        conn.post(call_body("pool.get_all", session))
        elapsed, body = conn.post(call_body("VM.get_all_records", session))
    finally:
        conn.close()
    return elapsed * 1000, body


def change_vms(server: Server, password: str, guests: list[str], text: str) -> None:
    """Set every guest's name_description to *text* over *CREATORS* concurrent sessions (not timed):
    every VM record changed, so none is encoded any more."""

    def change(refs: list[str]) -> None:
        session = sdk_session(server, password)
        try:
            for ref in refs:
                session.xenapi.VM.set_name_description(ref, text)
        finally:
            session.xenapi.session.logout()

    with ThreadPoolExecutor(CREATORS) as pool:
        list(pool.map(change, [guests[i::CREATORS] for i in range(CREATORS)]))


def cold_again(bed: "Testbed", samples: int) -> list[float]:
    """*samples* cold VM.get_all_records on xapid, each after every VM was changed; milliseconds."""
    xapid = bed.servers[0]
    times = []
    for number in range(samples):
        change_vms(xapid, bed.password, bed.guests, f"cold sample {number}")
        times.append(cold_records(xapid, bed.sessions["xapid"])[0])
    return times


def compare_records(replies: dict[str, bytes]) -> str:
    """Check that both get_all_records replies decode to the same records; a one-line note."""
    decoded = {name: loadgen.success_value(body) for name, body in replies.items()}
    counts = {name: len(value) for name, value in decoded.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the servers return different numbers of VM records: {counts}")
    same = "identical" if decoded["xapid"] == decoded["stdlib"] else "DIFFERENT"
    sizes = ", ".join(f"{name} {len(body) / 1e6:.1f} MB" for name, body in replies.items())
    return f"both replies decode to {counts['xapid']} VM records ({same}); reply sizes: {sizes}"


# -- main -------------------------------------------------------------------------------------


def goals(load: Figure, sdk: Figure, records: Figure, device: Figure) -> list[str]:
    def line(text: str, ratio: float, goal: float | None) -> str:
        verdict = "no goal set" if goal is None else ("met" if ratio >= goal else "NOT met")
        return f"  {text}: {verdict} ({fmt_ratio(ratio)})"

    return ["goals:",
            line("small calls under concurrent load, xapid >= 1.5x stdlib", load.ratio, 1.5),
            line(f"VM.get_all_records {VMS} VMs (warm), xapid >= 5x faster than stdlib", records.ratio, 5.0),
            line("sequential SDK calls", sdk.ratio, None),
            line(f"{devices_label()} (warm)", device.ratio, None)]


def choose_loader(requested: str) -> str:
    if requested == "auto":
        return "wrk" if loadgen.wrk_available() else "python"
    if requested == "wrk" and not loadgen.wrk_available():
        raise SystemExit("run.py: --loader wrk, but wrk is not installed")
    return requested


@dataclass(frozen=True)
class Testbed:
    """Both servers up and serving the same records, with a session on each."""

    servers: list[Server]
    sessions: dict[str, str]
    password: str
    vm: str
    cold_ms: float
    note: str
    guests: list[str]  # every VM but the control domain
    baseline: subprocess.Popen[bytes]


def prepare(stack: contextlib.ExitStack, tmp: Path) -> Testbed:
    """Start xapid, give it VMS VMs, time its first get_all_records, then start the baseline."""
    password = secrets.token_urlsafe(16)
    progress("starting xapid")
    xapid = start_xapid(stack, tmp, password)
    admin = sdk_session(xapid, password)
    missing = VMS - len(admin.xenapi.VM.get_all())
    progress(f"creating {missing} VMs in xapid (not timed)")
    create_vms(xapid, password, missing)
    cold_ms, xapid_reply = cold_records(xapid, admin.handle)
    guests = [ref for ref, rec in loadgen.success_value(xapid_reply).items() if not rec["is_control_domain"]]
    progress("starting the stdlib baseline (it copies xapid's records)")
    baseline, proc = start_baseline(stack, tmp, xapid, password)
    sessions = {"xapid": admin.handle, "stdlib": sdk_session(baseline, password).handle}
    _, stdlib_reply = cold_records(baseline, sessions["stdlib"])
    note = compare_records({"xapid": xapid_reply, "stdlib": stdlib_reply})
    return Testbed([xapid, baseline], sessions, password, guests[0], cold_ms, note, guests, proc)


@dataclass(frozen=True)
class DeviceBed:
    """Both servers serving the same VMs with devices (a new baseline), and xapid's first fetch."""

    servers: list[Server]
    sessions: dict[str, str]
    cold_ms: float
    note: str


def prepare_devices(stack: contextlib.ExitStack, tmp: Path, bed: Testbed) -> DeviceBed:
    """Give VMS guest VMs their disks and NIC, time xapid's first fetch, then restart the baseline on a copy."""
    xapid = bed.servers[0]
    guests = bed.guests[:VMS]
    if len(guests) < VMS:  # figure c counts the control domain among its VMS; here VMS guests have devices
        progress(f"creating {VMS - len(guests)} more VM(s) in xapid (not timed)")
        guests += create_vms(xapid, bed.password, VMS - len(guests))
    disks, nics = len(guests) * devices.DISKS_PER_VM, len(guests) * devices.NICS_PER_VM
    progress(f"creating {disks} VDIs, {disks} VBDs and {nics} VIFs in xapid over {CREATORS} sessions (not timed)")
    started = time.monotonic()
    devices.populate(lambda: sdk_session(xapid, bed.password), guests, CREATORS)
    took = time.monotonic() - started
    progress(f"created {2 * disks + nics} objects in {took:.1f} s ({(2 * disks + nics) / took:.0f} creates/s)")
    conn = KeepAlive(xapid)
    try:
        conn.post(call_body("pool.get_all", bed.sessions["xapid"]))
        cold_ms, _, xapid_replies = fetch_devices(conn, device_bodies(bed.sessions["xapid"]))
    finally:
        conn.close()
    progress("restarting the stdlib baseline (it copies xapid's records, now with devices)")
    stop(bed.baseline)
    baseline, _ = start_baseline(stack, tmp, xapid, bed.password, "stdlib-devices.log")
    sessions = {"xapid": bed.sessions["xapid"], "stdlib": sdk_session(baseline, bed.password).handle}
    conn = KeepAlive(baseline)
    try:
        _, _, stdlib_replies = fetch_devices(conn, device_bodies(sessions["stdlib"]))
    finally:
        conn.close()
    note = devices.compare({"xapid": xapid_replies, "stdlib": stdlib_replies})
    return DeviceBed([xapid, baseline], sessions, cold_ms, note)


def run_figures(stack: contextlib.ExitStack, tmp: Path, bed: Testbed, settings: Settings, loader: str) -> None:
    """Measure and print every figure, then the goals."""
    progress(f"figure a: {CONNECTIONS} concurrent keep-alive connections, {settings.rounds} rounds "
             f"of {settings.load_seconds:g} s per server ({loader})")
    load = load_figure(bed.servers, bed.sessions, bed.vm, settings, loader)
    report(load)
    progress(f"figure b: {settings.sdk_calls} sequential SDK calls, {settings.rounds} rounds per server")
    sdk = sdk_figure(bed.servers, bed.password, bed.vm, settings)
    report(sdk)
    progress(f"figure c: VM.get_all_records, {settings.record_calls} calls per server")
    records = records_figure(bed.servers, bed.sessions, settings)
    report(records)
    stdlib_ms = records.median("stdlib")
    print(f"VM.get_all_records {VMS} VMs, xapid's first call (cold cache): xapid {fmt(bed.cold_ms, 'ms')}, "
          f"stdlib {fmt(stdlib_ms, 'ms')}, {fmt_ratio(stdlib_ms / bed.cold_ms)}")
    print(f"    {bed.note}", flush=True)
    progress(f"cold VM.get_all_records: {settings.cold_samples} samples, each after every VM was changed")
    cold = cold_again(bed, settings.cold_samples)
    print(f"VM.get_all_records {VMS} VMs, cold (every record changed since the last call), "
          f"{len(cold)} samples: xapid median {fmt(statistics.median(cold), 'ms')} "
          f"(min {fmt(min(cold), 'ms')}, max {fmt(max(cold), 'ms')}), stdlib {fmt(stdlib_ms, 'ms')}, "
          f"{fmt_ratio(stdlib_ms / statistics.median(cold))}", flush=True)
    dev_bed = prepare_devices(stack, tmp, bed)
    progress(f"figure d: VM+VBD+VDI+VIF get_all_records, {settings.record_calls} fetches per server")
    device = devices_figure(dev_bed.servers, dev_bed.sessions, settings)
    report(device.figure)
    for name, calls in device.per_call.items():
        medians = ", ".join(f"{cls} {fmt(statistics.median(ms), 'ms')}" for cls, ms in calls.items())
        print(f"    {name:6} medians per call: {medians}")
    stdlib_ms = device.figure.median("stdlib")
    print(f"{devices_label()}, xapid's first fetch (cold cache): xapid {fmt(dev_bed.cold_ms, 'ms')}, "
          f"stdlib {fmt(stdlib_ms, 'ms')}, {fmt_ratio(stdlib_ms / dev_bed.cold_ms)}")
    print(f"    {dev_bed.note}")
    print("\n".join(goals(load, sdk, records, device.figure)), flush=True)


def benchmark(settings: Settings, loader: str) -> None:
    """Everything, in a temporary directory; every process started is stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="xapid-bench-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        run_figures(stack, tmp, prepare(stack, tmp), settings, loader)
        progress("stopping the servers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark xapid against a stdlib threaded XML-RPC server.")
    parser.add_argument("--quick", action="store_true", help="short measurements (a smoke run, about a minute)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_VMS} VMs and one short round of each figure (a few seconds; the test suite's)")
    parser.add_argument("--loader", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator for the concurrent figure (auto: wrk when installed)")
    args = parser.parse_args(argv)
    common.prepare_run("run.py")
    loader = choose_loader(args.loader)
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.smoke:
        global VMS
        VMS = SMOKE_VMS
    print(machine(), flush=True)
    started = time.monotonic()
    if status := common.exit_status("run.py", lambda: benchmark(settings, loader)):
        return status
    print(f"total time {time.monotonic() - started:.0f} s ({'smoke' if args.smoke else 'quick' if args.quick else 'full'} run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
