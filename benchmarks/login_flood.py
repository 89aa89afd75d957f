"""A password-guessing flood against xapid: what it costs a legitimate user, in one run.

    python benchmarks/login_flood.py [--connections 150] [--sources 10] [--seconds 15]
                                     [--no-throttle] [--root DIR] [--auth-failure-delay S] [--scrapes N]

Starts xapid (a real subprocess on the sim backend, temporary state dir, loopback only, default
config: ``auth_failure_delay`` 2 s, the default ``[limits] login_*``) with one pool-admin user whose
password is hashed at the default bcrypt cost, as ``xapid user add`` does.  Then, in the same run:

1. **unloaded (the baseline):** a legitimate client (the official XenAPI SDK from 127.0.0.1) logs
   in and out repeatedly, and, on a session opened beforehand, calls ``VDI.create`` (1 MiB in
   ``pool.default_SR``, destroyed after each timing) repeatedly, both at once for a few seconds;
2. **under the flood:** ``tests/flood.py`` (its own process) opens *connections* keep-alive
   connections from 127.0.0.2 … 127.0.0.(1+*sources*) and sends wrong-password logins for the
   same user in a loop for *seconds*, while the same two legitimate loops run again.

Before the flood, *scrapes* GETs of ``/metrics`` with the client's session id and as many with HTTP
Basic (alternating) give the daemon's CPU per scrape each way (schedstat around each request): the
cost of checking a password on every Basic request, against the session path.

It prints one line per figure: p50 and p99 of both legitimate calls unloaded and under the
flood, as ratios (flood ÷ unloaded: 1.0 means the flood costs nothing), the attackers' answered
tries per second, and how many of them reached bcrypt (each checked failure is logged by the
daemon; throttled or refused tries are not), against what the buckets allow.

``--no-throttle`` measures "before" on this tree: a burst and per-source queue so large that no
source is ever throttled or refused, and ``login_threads`` 10 (the size of the shared worker pool
bcrypt used to run on).  ``--root DIR`` runs the daemon from another source tree instead, e.g.
the code before the login path had its own pool:

    git archive HEAD | tar -x -C /tmp/xapid-before
    python benchmarks/login_flood.py --root /tmp/xapid-before

(there the ``[limits] login_*`` keys do not exist and are not written).  Figures go to stdout,
progress to stderr.  Every process started is stopped however the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (LOOPBACK, SERVE, USER, add_user, exit_status, machine, percentile, prepare_run, progress, run_ns,
                    sdk_session, stop)
from run import Server, wait_listening

ROOT = Path(__file__).resolve().parent.parent
FLOOD = ROOT / "tests" / "flood.py"
UNLOADED_SECONDS = 5.0
FAILED_LOGIN = re.compile(rf"failed (?:HTTP )?login for '{USER}'")


def start_xapid(stack: contextlib.ExitStack, tmp: Path, password: str, root: Path, limits: str,
                auth_failure_delay: float | None) -> tuple[Server, Path, int]:
    """xapid from *root* on the sim backend, with one pool-admin user at the default bcrypt cost; its log and pid."""
    users, config, log = tmp / "users", tmp / "xapid.conf", tmp / "xapid.log"
    env = {key: value for key, value in os.environ.items() if key != "XAPID_BCRYPT_ROUNDS"}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(root))
    add_user(users, password, root, env)
    api = f"[api]\nauth_failure_delay = {auth_failure_delay}\n" if auth_failure_delay is not None else ""
    config.write_text("[server]\nbackend = sim\n" + api + (f"[limits]\n{limits}" if limits else ""))
    with log.open("wb") as out:
        proc = subprocess.Popen([*SERVE, "--config", str(config), "--state-dir", str(tmp / "state"), "--users",
                                 str(users), *LOOPBACK],
                                cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out, env=env)
    stack.callback(stop, proc)
    return wait_listening("xapid", proc, log), log, proc.pid


def scrapes(server: Server, pid: int, session_ref: str, password: str, count: int) -> dict[str, list[float]]:
    """*count* GETs of /metrics with the session id and *count* with HTTP Basic, alternating on
    one keep-alive connection each; the daemon's CPU seconds per scrape (schedstat around it)."""
    import base64
    import http.client

    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    ways = {"session id": ("/metrics?session_id=" + session_ref, {}),
            "HTTP Basic": ("/metrics", {"Authorization": f"Basic {token}"})}
    conns = {name: http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(count + 1):  # the first of each warms up (and fills the Basic cache)
            for name, (path, headers) in ways.items():
                before = run_ns(pid)
                conns[name].request("GET", path, headers=headers)
                reply = conns[name].getresponse()
                reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"/metrics with {name}: HTTP {reply.status}")
                time.sleep(0.02)  # the daemon's CPU accounting catches up
                cpu[name].append((run_ns(pid) - before) / 1e9)
    finally:
        for conn in conns.values():
            conn.close()
    return {name: values[1:] for name, values in cpu.items()}


def session(server: Server, password: str) -> Any:
    return sdk_session(server.url, password, "login-flood-bench")


class Legit:
    """The legitimate client's two loops (login+logout; VDI.create), each in a thread, timing each call."""

    def __init__(self, server: Server, password: str):
        self.server, self.password = server, password
        self.admin = session(server, password)
        x = self.admin.xenapi
        self.sr = x.pool.get_default_SR(x.pool.get_all()[0])
        self.record = {"SR": self.sr, "virtual_size": str(1 << 20), "type": "user", "sharable": False,
                       "read_only": False, "other_config": {}, "name_label": "login-flood-bench"}

    def login(self) -> float:
        t = time.perf_counter()
        s = session(self.server, self.password)
        elapsed = time.perf_counter() - t
        s.xenapi.session.logout()
        return elapsed

    def vdi_create(self) -> float:
        t = time.perf_counter()
        vdi = self.admin.xenapi.VDI.create(self.record)
        elapsed = time.perf_counter() - t
        self.admin.xenapi.VDI.destroy(vdi)
        return elapsed

    def measure(self, running: Any) -> dict[str, list[float]]:
        """Both loops while *running()* is true (each finishes the call it is in); seconds per call."""
        samples: dict[str, list[float]] = {"login": [], "VDI.create": []}
        errors: list[BaseException] = []

        def loop(name: str, call: Any) -> None:
            try:
                while running():
                    samples[name].append(call())
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=("login", self.login)),
                   threading.Thread(target=loop, args=("VDI.create", self.vdi_create))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"a legitimate call failed: {errors[0]!r}")
        return samples


def checked_failures(log: Path) -> int:
    return len(FAILED_LOGIN.findall(log.read_text(errors="replace")))


def benchmark(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve() if args.root else ROOT
    new_limits = (root / "xapid" / "login.py").exists() or (root / "xapid" / "auth" / "login.py").exists()
    if args.no_throttle and not new_limits:
        raise RuntimeError(f"--no-throttle needs a tree with xapid/auth/login.py; {root} is already 'before'")
    if args.no_throttle:
        limits = "login_threads = 10\nlogin_failures_burst = 1000000000\nlogin_queue_per_source = 1000000\n"
        mode = "before (--no-throttle: no buckets, no queue cap, 10 login threads)"
    elif new_limits:
        limits = ""
        mode = "after (default limits: login_threads 2, burst 10, interval 6 s, queue 64 per source)"
    else:
        limits = ""
        mode = f"before (the tree at {root}: bcrypt on the shared worker pool)"
    print(machine(), flush=True)
    if args.auth_failure_delay is not None:
        mode += f", auth_failure_delay {args.auth_failure_delay:g} s"
    print(f"mode: {mode}", flush=True)
    password = secrets.token_urlsafe(12)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="xapid-login-flood-") as tmp:
        progress(f"starting xapid from {root}")
        server, log, pid = start_xapid(stack, Path(tmp), password, root, limits, args.auth_failure_delay)
        legit = Legit(server, password)
        legit.login(), legit.vdi_create()  # warm up
        progress(f"unloaded: legitimate login and VDI.create loops for {UNLOADED_SECONDS:.0f} s")
        until = time.monotonic() + UNLOADED_SECONDS
        base = legit.measure(lambda: time.monotonic() < until)
        scraped: dict[str, list[float]] = {}
        if args.scrapes:
            progress(f"/metrics: {args.scrapes} scrapes with a session id and {args.scrapes} with HTTP Basic")
            scraped = scrapes(server, pid, legit.admin.handle, password, args.scrapes)

        progress(f"flood: {args.connections} connections from {args.sources} addresses for {args.seconds:.0f} s")
        checked_before = checked_failures(log)
        flood = subprocess.Popen([sys.executable, str(FLOOD), "--port", str(server.port), "--first", "2",
                                  "--sources", str(args.sources), "--connections", str(args.connections),
                                  "--seconds", str(args.seconds), "--user", USER, "--mode", "rpc"],
                                 stdout=subprocess.PIPE, text=True)
        stack.callback(stop, flood)  # type: ignore[arg-type]
        assert flood.stdout is not None
        if flood.stdout.readline().strip() != "ready":
            raise RuntimeError("the flood did not start")
        loaded = legit.measure(lambda: flood.poll() is None)
        out, _ = flood.communicate(timeout=120)
        report = json.loads(out.strip().splitlines()[-1])
        checked = checked_failures(log) - checked_before

    if scraped:
        by_session, by_basic = (statistics.median(scraped[k]) * 1000 for k in ("session id", "HTTP Basic"))
        print(f"/metrics scrape, daemon CPU (median of {args.scrapes}): session id {by_session:.2f} ms, "
              f"HTTP Basic {by_basic:.2f} ms, Basic / session {by_basic / by_session:.2f}x "
              f"(Basic max {max(scraped['HTTP Basic']) * 1000:.2f} ms)", flush=True)
    for name in ("login", "VDI.create"):
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            before, during = percentile(base[name], q) * 1000, percentile(loaded[name], q) * 1000
            print(f"legit {name} {label}: unloaded {before:.1f} ms, flood {during:.1f} ms, {during / before:.2f}x "
                  f"({len(base[name])} / {len(loaded[name])} samples)")
    seconds = report["seconds"]
    print(f"attacker tries answered: {report['answers']} in {seconds:.1f} s, {report['answers'] / seconds:.1f}/s "
          f"({json.dumps(report['counts'])})")
    line = f"attacker tries reaching bcrypt: {checked}, {checked / seconds:.1f}/s"
    if not args.no_throttle and new_limits:
        bound = args.sources * (10 + seconds / 6.0 + 1)
        line += f" (buckets allow at most {bound:.0f}: {args.sources} x (10 + {seconds:.0f} s / 6 s + 1))"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A wrong-password login flood against xapid, and its cost to "
                                                 "a legitimate client.")
    parser.add_argument("--connections", type=int, default=150, help="attacking connections (default 150)")
    parser.add_argument("--sources", type=int, default=10, help="attacking addresses 127.0.0.2… (default 10)")
    parser.add_argument("--seconds", type=float, default=15.0, help="flood duration (default 15)")
    parser.add_argument("--no-throttle", action="store_true",
                        help="'before' on this tree: no per-source limits, 10 login threads")
    parser.add_argument("--root", help="run the daemon from this source tree (e.g. the code before)")
    parser.add_argument("--auth-failure-delay", type=float, help="[api] auth_failure_delay (default: xapid's, 2 s)")
    parser.add_argument("--scrapes", type=int, default=20,
                        help="/metrics scrapes with a session id and with HTTP Basic, before the flood (default 20; "
                             "0: none)")
    parser.add_argument("--smoke", action="store_true",
                        help="1-s unloaded loops, 2 scrapes, a 1.5-s flood of 10 connections from 2 addresses")
    args = parser.parse_args(argv)
    if args.smoke:
        global UNLOADED_SECONDS
        UNLOADED_SECONDS, args.scrapes, args.seconds, args.connections, args.sources = 1.0, 2, 1.5, 10, 2
    prepare_run("login_flood.py")
    started = time.monotonic()
    if status := exit_status("login_flood.py", lambda: benchmark(args)):
        return status
    print(f"total time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
