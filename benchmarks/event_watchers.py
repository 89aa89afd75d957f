"""Event fan-out: N concurrent ``event.from`` watchers on one daemon, woken by one ``VM.set_name_label``.

    python benchmarks/event_watchers.py [--watchers N] [--rounds R] [--clients K] [--sessions MODE] [--pin]

Each watcher is a client on its own keep-alive TCP connection, doing what a real client does: an
``event.from(session, ["vm"], "", 30.0)`` for the starting token, then ``event.from`` with the token of
every reply, sent again at once.  The watchers live in K load processes (asyncio, raw HTTP/1.1), never in
a server's process.  Per round, the benchmark records ``t0`` just before sending ``VM.set_name_label`` on
a connection of its own (``time.monotonic()``).  A reply's latency is from ``t0`` to the kernel's receive
timestamp of its last segment at the watcher's socket (``SO_TIMESTAMPNS``, converted to the monotonic
clock): when the server's reply reached its client.  The time the load process read it is reported
too, with that process's CPU per round: one Python process reading 1 000 replies and re-arming 1 000
calls is busy for the whole fan-out, so its reading time measures itself as much as the server (in
reality each watcher is a client of its own).  Figures: latency p50/p99/max over all watchers and
rounds, and the server's RSS growth per blocked watcher (``VmRSS`` before the watchers connect and once all of
them are parked in the server).  Every round checks that every watcher got exactly the one ``mod`` event
carrying the new name.

Servers, measured in the same run with their rounds interleaved (A B C A B C ...):

* ``xapid shared``: a real xapid (sim backend), every watcher on one session;
* ``xapid per-watcher``: another xapid, one session per watcher (so each re-armed call also touches
  its own session);
* ``stdlib``: the peer, xend's architecture (``SimpleXMLRPCServer`` + ``ThreadingMixIn``): a thread
  per connection, each blocked watcher a thread waiting on one ``threading.Condition``.

Also reported: the time to connect and arm every watcher, with the kernel's listen-queue overflow count
meanwhile (xapid listens with Twisted's default backlog of 50 unless the endpoint says ``backlog=``;
``--backlog`` sets it), RSS per session, the change call's own reply time and the server's CPU per round.

The floor: after each round, one Python loop with no server sends a reply of the same size to as many
loopback connections, read by a process that spends as much CPU per reply as the watchers' load processes
did in the warm-up round and answers each with a request of a watcher's size (a busy reader makes loopback
sends slower).  Its median, and each round's last reply over the floor round after it, are reported.

Only 127.0.0.1 is used; everything started is stopped in ``finally``; ``--time-limit`` bounds the run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import re
import resource
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import vm_record  # noqa: E402 - the same valid VM.create record the tests use
import common  # noqa: E402
from common import (HOST, ROOT, SERVE, cpu_seconds, handle_signals, http_post, split_reply, stop,  # noqa: E402
                    success_value, wait_port)

USER, PASSWORD = "bench", "bench password"
CLASSES = ["vm"]
EVENT_TIMEOUT = 30.0
GOAL_P99_MS = 20.0  # issue 20: 1 000 watchers woken by one change
GOAL_WATCHERS = 1000
GOAL_RSS_KB = 20.0  # issue 20: also at 10 000 watchers
_START_TIMEOUT = 30.0
_SETTLE = 1.0  # seconds of quiet once every watcher is parked, before reading RSS
_TOKEN = re.compile(rb"<name>token</name>\s*<value>(?:<string>)?([^<]*)<")
_NO_EVENTS = re.compile(rb"<name>events</name>\s*<value>\s*<array>\s*<data>\s*</data>")
_TOKEN_MARK = "@@TOKEN@@"
#: the kernel's receive timestamps (Linux ``SO_TIMESTAMPNS``: a ``struct timespec`` of CLOCK_REALTIME per read)
KERNEL_STAMPS = sys.platform.startswith("linux")
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
_STAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
#: --pin: (the servers' CPUs, the load processes' CPUs), as if the clients were other machines
PINNED: tuple[set[int], set[int]] | None = None


def pin(pid: int, server: bool) -> None:
    """Keep *pid* on the servers' (or the load processes') CPUs when ``--pin`` asked for it."""
    if PINNED is not None:
        os.sched_setaffinity(pid, PINNED[0] if server else PINNED[1])


class BenchmarkError(Exception):
    """The benchmark cannot go on (a server failed, a watcher lost an event, time ran out)."""


class Deadline:
    """The run's overall time limit; every wait is bounded by it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise BenchmarkError(f"gave up: the run exceeded its time limit of {self.seconds:.0f} s (--time-limit)")
        return remaining if cap is None else min(cap, remaining)


# -- machine ---------------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> str:
    """One line naming the machine (common's), with the listen-queue cap."""
    return common.machine(f"somaxconn {_read_int('/proc/sys/net/core/somaxconn')}")


def _read_int(path: str) -> int | str:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return "?"


def rss_kb(pid: int) -> int:
    """The process's resident set size (VmRSS) in KiB."""
    return common.rss_kib(pid, BenchmarkError)


def server_sockets(port: int) -> tuple[int, int]:
    """Established server-side connections on *port*, and how many hold unread request bytes."""
    established = unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != "01" or int(fields[1].rsplit(":", 1)[1], 16) != port:
            continue
        established += 1
        unread += int(fields[4].split(":")[1], 16) > 0
    return established, unread


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt ListenOverflows)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split())).get("ListenOverflows", 0))
    return 0


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of *values*."""
    return common.percentile(values, pct / 100)


# -- the wire --------------------------------------------------------------------------------------


def take_reply(buffer: bytearray) -> bytes | None:
    """Remove one complete HTTP reply from *buffer* and return its body, or None while incomplete."""
    reply = split_reply(buffer)
    if reply is None:
        return None
    status, body = reply
    if status != 200:
        raise ConnectionError(f"HTTP {status}: {body[:200]!r}")
    return body


def kernel_stamp(ancillary: list[tuple[int, int, bytes]], offset: float, fallback: float) -> float:
    """The monotonic time the kernel stamped on a read's last segment (*offset*: CLOCK_REALTIME minus
    CLOCK_MONOTONIC, sampled by the caller); *fallback* when the read carried no stamp."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            return seconds + nanoseconds / 1e9 - offset
    return fallback


def api_value(body: bytes) -> Any:
    """The ``Value`` of a Xen-API success reply; BenchmarkError for a failure."""
    return success_value(body, BenchmarkError)


class EventFromRequest:
    """The bytes of ``event.from(session, classes, token, timeout)``, as xmlrpc.client encodes them."""

    def __init__(self, session: str):
        body = xmlrpc.client.dumps((session, CLASSES, _TOKEN_MARK, EVENT_TIMEOUT), "event.from")
        self.before, self.after = body.split(_TOKEN_MARK)

    def __call__(self, token: str) -> bytes:
        return http_post((self.before + token + self.after).encode())


class Rpc:
    """A blocking keep-alive XML-RPC connection for set-up and for the changes that start each round."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port), timeout=_START_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def call(self, method: str, *params: Any) -> Any:
        return api_value(self.exchange(http_post(xmlrpc.client.dumps(params, method, allow_none=True).encode())))

    def exchange(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        while (body := take_reply(self.buffer)) is None:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise BenchmarkError("the server closed the set-up connection")
            self.buffer += chunk
        return body

    def close(self) -> None:
        self.sock.close()


# -- servers ---------------------------------------------------------------------------------------


class ServerProcess:
    """A server subprocess that logs ``listening on 127.0.0.1:PORT`` on stderr once it accepts calls."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name = name
        self.log = log
        self._logfile = open(log, "a")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._logfile, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid
        pin(self.pid, server=True)
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        return wait_port(self.name, self.proc, self.log, _START_TIMEOUT, BenchmarkError)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchmarkError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        stop(self.proc, 20)
        self._logfile.close()


def start_xapid(workdir: Path, name: str, listen: str, max_sessions: int) -> ServerProcess:
    """A real daemon on the sim backend with its own state dir and a users file holding one pool-admin."""
    from xapid.auth.users import UsersFile  # the daemon's own code, for the users file only

    workdir.mkdir()
    users = UsersFile(workdir / "users", rounds=4)
    users.load()
    users.add(USER, "pool-admin", PASSWORD)
    config = workdir / "xapid.conf"
    # every watcher connects before its first call: they are all anonymous at once for a moment
    clients = max(5000, max_sessions + 256)
    config.write_text(f"[server]\nmax_clients = {clients}\nmax_anonymous_clients = {clients}\n"
                      f"[api]\nauth_failure_delay = 0.0\nmax_sessions_per_user = {max_sessions}\n")
    args = [*SERVE, "--config", str(config), "--backend", "sim",
            "--state-dir", str(workdir / "state"), "--users", str(workdir / "users"), "--listen", listen]
    return ServerProcess(name, args, workdir / "daemon.log")


def start_peer(workdir: Path, name: str, record: dict[str, Any], ref: str) -> ServerProcess:
    """The stdlib threaded peer (this file with ``--serve-peer``), serving a copy of xapid's VM record."""
    workdir.mkdir()
    data = workdir / "vm.xml"  # XML-RPC, which keeps the record's dateTime values
    data.write_text(xmlrpc.client.dumps(({"ref": ref, "record": record},), allow_none=True))
    args = [sys.executable, str(Path(__file__).resolve()), "--serve-peer", str(data)]
    return ServerProcess(name, args, workdir / "peer.log")


# -- the peer: xend's architecture, a thread per connection ----------------------------------------


class PeerApi:
    """Sessions, one VM and ``event.from`` over a Condition: each blocked watcher is a waiting thread."""

    def __init__(self, ref: str, record: dict[str, Any]):
        self.ref, self.record = ref, record
        self.changed = threading.Condition()
        self.seq = self.modified = 1
        self.sessions: set[str] = set()

    def login(self, user: str, password: str, *_: Any) -> str:
        if (user, password) != (USER, PASSWORD):
            raise PeerFailure("SESSION_AUTHENTICATION_FAILED", user, "bad credentials")
        session = f"OpaqueRef:peer-session-{len(self.sessions)}"
        self.sessions.add(session)
        return session

    def check(self, session: str) -> None:
        if session not in self.sessions:
            raise PeerFailure("SESSION_INVALID", session)

    def set_name_label(self, session: str, ref: str, label: str) -> str:
        self.check(session)
        with self.changed:
            self.record["name_label"] = label
            self.seq += 1
            self.modified = self.seq
            self.changed.notify_all()
        return ""

    def event_from(self, session: str, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
        self.check(session)
        since = int(token.split(",")[0]) if token else -1
        end = time.monotonic() + timeout
        with self.changed:
            while self.modified <= since and (left := end - time.monotonic()) > 0:
                self.changed.wait(left)
            events = [] if self.modified <= since else [{
                "id": str(self.modified), "timestamp": f"{time.time():.6f}", "class": "vm",
                "operation": "add" if since < 0 else "mod", "ref": self.ref, "snapshot": dict(self.record)}]
            token = f"{self.seq:020d},{0:020d}"
        return {"events": events, "valid_ref_counts": {"vm": 1}, "token": token}


class PeerFailure(Exception):
    def __init__(self, *description: str):
        super().__init__(*description)
        self.description = list(description)


class _KeepAliveHandler(SimpleXMLRPCRequestHandler):
    protocol_version = "HTTP/1.1"
    rpc_paths = ()  # any path, as xapi


class PeerServer(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's default of 5 cannot take a burst of connects

    def __init__(self, api: PeerApi):
        super().__init__((HOST, 0), _KeepAliveHandler, logRequests=False, allow_none=True)
        self.methods: dict[str, Callable[..., Any]] = {
            "session.login_with_password": api.login, "event.from": api.event_from,
            "VM.set_name_label": api.set_name_label}

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        try:
            handler = self.methods.get(method)
            if handler is None:
                raise PeerFailure("MESSAGE_METHOD_UNKNOWN", method)
            return {"Status": "Success", "Value": handler(*params)}
        except PeerFailure as failure:
            return {"Status": "Failure", "ErrorDescription": failure.description}


def serve_peer(data_path: str) -> None:
    """Entry point of the peer subprocess."""
    (data,), _ = xmlrpc.client.loads(Path(data_path).read_text())
    server = PeerServer(PeerApi(data["ref"], data["record"]))
    print(f"listening on {HOST}:{server.server_address[1]}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


# -- load processes: the watchers ------------------------------------------------------------------


class Watcher:
    """One watcher: a keep-alive connection looping on ``event.from``.

    Its socket asks the kernel for receive timestamps (``SO_TIMESTAMPNS``): each read carries the
    time its last segment reached the socket.  That is when the server's reply arrived, whatever
    this process was busy with (handling the replies of other watchers, which in reality are other
    clients).  The time this process read it is kept beside it."""

    def __init__(self, group: "WatcherGroup", index: int, session: str):
        self.group, self.index = group, index
        self.request = EventFromRequest(session)
        self.buffer = bytearray()
        self.out = b""
        self.token: str | None = None
        self.sock: socket.socket | None = None

    async def connect(self, port: int) -> None:
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if KERNEL_STAMPS:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        await self.group.loop.sock_connect(sock, (HOST, port))
        self.group.loop.add_reader(sock.fileno(), self.readable)
        self.send("")

    def send(self, token: str) -> None:
        self.out += self.request(token)
        self.flush()

    def flush(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.lost(exc)
            return
        self.out = self.out[sent:]
        if self.out:
            self.group.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        assert self.sock is not None
        self.group.loop.remove_writer(self.sock.fileno())
        self.flush()

    def readable(self) -> None:
        assert self.sock is not None
        try:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 18, _STAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lost(exc)
            return
        if not data:
            self.lost(None)
            return
        received = time.monotonic()
        arrived = kernel_stamp(ancillary, self.group.clock_offset, received)
        self.buffer += data
        try:
            while (body := take_reply(self.buffer)) is not None:
                # Handling the reply (and re-arming) waits until the event loop has read every
                # reply that is ready, so that the times read here do not include the work this
                # process does for the watchers read before (the kernel's stamps never do).
                self.group.loop.call_soon(self.handle, arrived, received, body)
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which stops
            self.group.fail(f"watcher {self.index}: {exc}")

    def handle(self, arrived: float, received: float, body: bytes) -> None:
        try:
            self.group.on_reply(self, arrived, received, body)
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which stops
            self.group.fail(f"watcher {self.index}: {exc}")

    def lost(self, exc: Exception | None) -> None:
        self.close()
        if not self.group.closing:
            self.group.fail(f"watcher {self.index}: connection lost ({exc or 'closed by the server'})")

    def close(self) -> None:
        if self.sock is not None:
            self.group.loop.remove_reader(self.sock.fileno())
            self.group.loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None


@dataclass
class RoundState:
    label: bytes = b""
    hits: dict[int, tuple[float, float, bytes]] = field(default_factory=dict)  # arrived, read, body
    cpu: float = 0.0  # this process's CPU time when the round was announced
    duplicates: int = 0
    unexpected: list[str] = field(default_factory=list)


class WatcherGroup:
    """The watchers of one load process, and its side of the pipe to the benchmark.

    Messages to the benchmark: ``("armed", seconds)`` once every watcher has sent its blocking call;
    ``("ready", label)`` when told a round's label; ``("done", label, times, timeouts)`` once every
    watcher has received that label and sent its next call; ``("verified", errors)`` when told to check
    the round's replies (parsed only then, so that parsing takes no CPU while replies are being timed);
    ``("failed", text)``.
    """

    def __init__(self, pipe: Connection, port: int, sessions: list[str], vm_ref: str):
        self.pipe, self.port, self.sessions, self.vm_ref = pipe, port, sessions, vm_ref
        self.watchers: list[Watcher] = []
        self.armed = 0
        self.timeouts = 0
        self.round = RoundState()
        self.closing = False
        self.started = time.monotonic()
        self.loop = asyncio.get_running_loop()
        self.clock_offset = time.time() - time.monotonic()  # CLOCK_REALTIME (the kernel's stamps) - monotonic
        self.stopped = self.loop.create_future()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self.on_command)
        self.watchers = [Watcher(self, i, s) for i, s in enumerate(self.sessions)]
        for result in await asyncio.gather(*(w.connect(self.port) for w in self.watchers), return_exceptions=True):
            if isinstance(result, BaseException):
                self.fail(f"connect failed: {result!r}")
                break
        await self.stopped
        self.closing = True
        for watcher in self.watchers:
            watcher.close()

    def on_command(self, *_: Any) -> None:
        command = self.pipe.recv()
        if command[0] == "round":
            self.round = RoundState(label=command[1].encode(), cpu=time.process_time())
            self.clock_offset = time.time() - time.monotonic()
            self.pipe.send(("ready", command[1]))
        elif command[0] == "verify":
            self.pipe.send(("verified", self.problems()))
        elif not self.stopped.done():
            self.stopped.set_result(None)

    def fail(self, text: str) -> None:
        if not self.closing:
            self.closing = True
            self.pipe.send(("failed", text))
            if not self.stopped.done():
                self.stopped.set_result(None)

    def on_reply(self, watcher: Watcher, arrived: float, received: float, body: bytes) -> None:
        """Re-arm at once with the reply's token, then account for the reply."""
        token = _TOKEN.search(body)
        if token is None:
            api_value(body)  # raises with the Xen-API failure, if that is what it is
            raise BenchmarkError(f"an event.from reply without a token: {body[:300]!r}")
        first, watcher.token = watcher.token is None, token.group(1).decode()
        watcher.send(watcher.token)
        if first:
            self.armed += 1
            if self.armed == len(self.sessions):
                self.pipe.send(("armed", time.monotonic() - self.started))
        elif self.round.label and self.round.label in body:
            self._hit(watcher, arrived, received, body)
        elif _NO_EVENTS.search(body):
            self.timeouts += 1
        else:
            self.round.unexpected.append(f"watcher {watcher.index}: {body[:300]!r}")

    def _hit(self, watcher: Watcher, arrived: float, received: float, body: bytes) -> None:
        state = self.round
        if watcher.index in state.hits:
            state.duplicates += 1
            return
        state.hits[watcher.index] = (arrived, received, body)
        if len(state.hits) == len(self.sessions):
            hits = state.hits.values()
            self.pipe.send(("done", state.label.decode(), [a for a, _, _ in hits], self.timeouts,
                            [r for _, r, _ in hits], time.process_time() - state.cpu))

    def problems(self) -> list[str]:
        """What was wrong with the round's replies: each watcher must have got exactly its one event."""
        state = self.round
        errors = [e for _, _, b in state.hits.values() if (e := self.verify(b, state.label.decode()))]
        errors += state.unexpected
        if state.duplicates:
            errors.append(f"{state.duplicates} duplicate replies")
        return errors

    def verify(self, body: bytes, label: str) -> str:
        """'' when *body* is exactly the one mod event of the VM with its new name, else the problem."""
        try:
            events = api_value(body)["events"]
        except Exception as exc:  # noqa: BLE001
            return f"unreadable reply: {exc}"
        if len(events) != 1:
            return f"{len(events)} events instead of 1: {[(e.get('class'), e.get('operation')) for e in events]}"
        event = events[0]
        name = event.get("snapshot", {}).get("name_label")
        got = (event.get("class"), event.get("operation"), event.get("ref"), name)
        want = ("vm", "mod", self.vm_ref, label)
        return "" if got == want else f"event {got} instead of {want}"


def load_process(pipe: Connection, port: int, sessions: list[str], vm_ref: str) -> None:
    """Entry point of a load process: run its watchers until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us

    async def main() -> None:
        await WatcherGroup(pipe, port, sessions, vm_ref).run()

    asyncio.run(main())


class LoadClients:
    """The load processes watching one server."""

    def __init__(self, port: int, sessions: list[str], vm_ref: str, processes: int):
        context = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        share = math.ceil(len(sessions) / processes)
        for start in range(0, len(sessions), share):
            mine, theirs = context.Pipe()
            proc = context.Process(target=load_process, args=(theirs, port, sessions[start:start + share], vm_ref),
                                   daemon=True)
            proc.start()
            pin(proc.pid or 0, server=False)
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)

    def collect(self, kind: str, deadline: Deadline, cap: float, why: str = "") -> list[tuple[Any, ...]]:
        """One message of *kind* from every process, within *cap* seconds (*why* explains a timeout)."""
        messages: dict[Connection, tuple[Any, ...]] = {}
        end = time.monotonic() + deadline.left(cap)
        while len(messages) < len(self.pipes):
            pending = [p for p in self.pipes if p not in messages]
            ready = wait(pending, timeout=max(0.0, end - time.monotonic()))
            if not ready:
                deadline.left()
                raise BenchmarkError(f"gave up: {len(pending)} load processes sent no {kind!r} within {cap:.0f} s"
                                     + (f" ({why})" if why else ""))
            for pipe in ready:
                message = pipe.recv()  # type: ignore[union-attr]
                if message[0] == "failed":
                    raise BenchmarkError(f"a load process failed: {message[1]}")
                if message[0] != kind:
                    raise BenchmarkError(f"expected {kind!r} from a load process, got {message!r:.300}")
                messages[pipe] = message  # type: ignore[index]
        return list(messages.values())

    def broadcast(self, *command: Any) -> None:
        for pipe in self.pipes:
            pipe.send(command)

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- a server under test -----------------------------------------------------------------------------


@dataclass
class Target:
    """One server with its watchers, and what was measured on it."""

    name: str
    server: ServerProcess
    rpc: Rpc
    session: str
    vm_ref: str
    watchers: int
    rss_empty: int = 0
    rss_sessions: int = 0
    rss_armed: int = 0
    connect_seconds: float = 0.0
    overflows: int = 0
    clients: LoadClients | None = None
    latencies: list[float] = field(default_factory=list)  # t0 to each reply's arrival at its socket (kernel stamp)
    read_latencies: list[float] = field(default_factory=list)  # t0 to each reply read by its load process
    client_cpu: list[float] = field(default_factory=list)  # the load processes' CPU per round (the busiest one)
    round_max: list[float] = field(default_factory=list)
    change_replies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    timeouts: int = 0
    token: str = ""  # the event token just before the last round's change (xapid only)

    def stop(self) -> None:
        if self.clients is not None:
            self.clients.stop()
        self.rpc.close()
        self.server.stop()


def login_sessions(target: Target, per_watcher: bool) -> list[str]:
    """The session of each watcher: the shared one, or a fresh login each."""
    if not per_watcher:
        return [target.session] * target.watchers
    return [target.rpc.call("session.login_with_password", USER, PASSWORD, "1.0", "event-watcher")
            for _ in range(target.watchers)]


def wait_parked(target: Target, deadline: Deadline, cap: float = 30.0) -> None:
    """Wait until the server holds every watcher's connection with its request read (nothing unread)."""
    end = time.monotonic() + deadline.left(cap)
    quiet = 0
    while quiet < 3:
        target.server.check_alive()
        established, unread = server_sockets(target.server.port)
        quiet = quiet + 1 if established >= target.watchers + 1 and unread == 0 else 0
        if time.monotonic() > end:
            raise BenchmarkError(f"gave up: {target.name} has {established} connections, {unread} with unread "
                                 f"requests, {cap:.0f} s after every watcher sent its call")
        time.sleep(0.05)


def connect_watchers(target: Target, per_watcher: bool, processes: int, deadline: Deadline) -> None:
    """Log the sessions in, connect and arm every watcher, and read the server's RSS on the way."""
    target.rss_empty = rss_kb(target.server.pid)
    sessions = login_sessions(target, per_watcher)
    time.sleep(0.2)
    target.rss_sessions = rss_kb(target.server.pid)
    overflows = listen_overflows()
    target.clients = LoadClients(target.server.port, sessions, target.vm_ref, processes)
    armed = target.clients.collect("armed", deadline, cap=90.0)
    target.connect_seconds = max(message[1] for message in armed)
    target.overflows = listen_overflows() - overflows
    wait_parked(target, deadline)
    time.sleep(_SETTLE)
    wait_parked(target, deadline)
    target.rss_armed = rss_kb(target.server.pid)


def run_round(target: Target, label: str, deadline: Deadline, record: bool = True) -> float:
    """Rename the VM and wait for every watcher's reply; records the latencies unless a warm-up.  Returns the
    load processes' CPU per reply in this round (reading it, parsing it, re-arming)."""
    assert target.clients is not None
    wait_parked(target, deadline)
    target.clients.broadcast("round", label)
    target.clients.collect("ready", deadline, cap=10.0)
    request = http_post(xmlrpc.client.dumps((target.session, target.vm_ref, label), "VM.set_name_label").encode())
    if target.name != "stdlib":  # where this round's reply starts (to measure its size afterwards)
        target.token = target.rpc.call("event.from", target.session, CLASSES, "", 0.0)["token"]
    cpu_before = cpu_seconds(target.server.pid)
    t0 = time.monotonic()
    api_value(target.rpc.exchange(request))
    replied = time.monotonic() - t0
    reports = target.clients.collect("done", deadline, cap=60.0, why="some watchers never got the event")
    wait_parked(target, deadline)  # the server has read every watcher's next call
    cpu = cpu_seconds(target.server.pid) - cpu_before
    target.clients.broadcast("verify")
    problems = [error for report in target.clients.collect("verified", deadline, cap=60.0) for error in report[1]]
    if problems:
        raise BenchmarkError(f"{target.name}, round {label}: {len(problems)} problems with the replies "
                             f"(lost, duplicate or wrong events), e.g. {problems[:3]}")
    latencies = [t - t0 for report in reports for t in report[2]]
    if len(latencies) != target.watchers:
        raise BenchmarkError(f"{target.name}: {len(latencies)} replies for {target.watchers} watchers")
    target.timeouts = sum(report[3] for report in reports)
    if record:
        target.latencies += latencies
        target.read_latencies += [t - t0 for report in reports for t in report[4]]
        target.client_cpu.append(max(report[5] for report in reports))
        target.round_max.append(max(latencies))
        target.change_replies.append(replied)
        target.cpu.append(cpu)
    return sum(report[5] for report in reports) / target.watchers


# -- the floor: the same fan-out with no server at all ---------------------------------------------


def _floor_reader(port: int, count: int, work: float, answer: bytes) -> None:
    """*count* connections to *port*, read until the sender closes them (epoll, no parsing); after each read,
    *work* seconds of CPU and *answer* sent back, as a watcher's load process parses a reply and re-arms."""
    if PINNED:
        os.sched_setaffinity(0, PINNED[1])
    import select
    socks = [socket.create_connection((HOST, port)) for _ in range(count)]
    poller = select.epoll()
    by_fd = {}
    for sock in socks:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        poller.register(sock.fileno(), select.EPOLLIN)
        by_fd[sock.fileno()] = sock
    while by_fd:
        for fd, _ in poller.poll(5.0):
            sock = by_fd.get(fd)
            if sock is None:
                continue
            try:
                data = sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError:  # reset: the sender closed with our last answer unread
                data = b""
            if not data:
                poller.unregister(fd)
                sock.close()
                del by_fd[fd]
                continue
            busy = time.perf_counter() + work
            while time.perf_counter() < busy:
                pass
            if answer:
                try:
                    sock.send(answer)
                except OSError:
                    pass  # closing; the next read says so


def _floor_sender(pipe: Connection, count: int, size: int) -> None:
    """Accept *count* connections, then on each ``"round"`` from *pipe* send one reply with a *size*-byte body to
    each from one loop and answer the seconds it took (first send to last), until ``"stop"``."""
    if PINNED:
        os.sched_setaffinity(0, PINNED[0])
    listener = socket.create_server((HOST, 0), backlog=min(count, 4096))
    pipe.send(listener.getsockname()[1])
    conns = []
    while len(conns) < count:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(conn)
    pipe.send("ready")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n"
    body = b"x" * size
    head %= size
    while pipe.recv() == "round":
        for conn in conns:  # what the reader answered last round
            try:
                while conn.recv(1 << 16, socket.MSG_DONTWAIT):
                    pass
            except BlockingIOError:
                pass
        t0 = time.perf_counter()
        for conn in conns:
            conn.sendmsg([head, body])
        pipe.send(time.perf_counter() - t0)
    for conn in conns:
        conn.close()


class LoopbackFloor:
    """The bare fan-out on this machine: one Python loop sending a reply of a *size*-byte body to each of *count*
    loopback connections, pinned as the servers and load processes are.  Its reader behaves as the watchers'
    load process does (*work* seconds of CPU per reply, then *answer* sent back): a busy receiver makes the
    sender's loopback sends slower, and this is the kernel's cost, not the server's.  Its rounds run between
    the servers' rounds, so that a moment when the machine is slow shows in the floor too."""

    def __init__(self, count: int, size: int, work: float = 0.0, answer: bytes = b"") -> None:
        self.size, self.work, self.answer = size, work, answer
        self.times: list[float] = []  # seconds per round
        self.pipe, there = multiprocessing.Pipe()
        self.sender = multiprocessing.Process(target=_floor_sender, args=(there, count, size), daemon=True)
        self.sender.start()
        self.reader: multiprocessing.Process | None = None
        try:
            if not self.pipe.poll(30):
                raise BenchmarkError("the floor's sender did not start")
            self.reader = multiprocessing.Process(target=_floor_reader, args=(self.pipe.recv(), count, work, answer),
                                                  daemon=True)
            self.reader.start()
            if not self.pipe.poll(60) or self.pipe.recv() != "ready":
                raise BenchmarkError("the floor's connections were not made")
        except BaseException:
            self.stop()
            raise

    def round(self) -> float:
        time.sleep(0.3)  # the server's round is over (its load processes re-armed)
        self.pipe.send("round")
        if not self.pipe.poll(30):
            raise BenchmarkError("a round of the floor did not finish")
        self.times.append(float(self.pipe.recv()))
        return self.times[-1]

    def stop(self) -> None:
        try:
            self.pipe.send("stop")
        except OSError:
            pass
        for proc in (self.sender, self.reader):
            if proc is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()


def reply_size(target: Target) -> int:
    """The body size of the reply every watcher got in the last round: ``event.from`` from just before it."""
    request = http_post(xmlrpc.client.dumps((target.session, CLASSES, target.token, 0.0), "event.from").encode())
    return len(target.rpc.exchange(request))


# -- the run ----------------------------------------------------------------------------------------


def start_targets(args: argparse.Namespace, workdir: Path, deadline: Deadline) -> list[Target]:
    """Start the servers (each with one VM), connect their watchers; returns them in measuring order."""
    targets: list[Target] = []
    modes = {"shared": [False], "per-watcher": [True], "both": [False, True]}[args.sessions]
    listen = f"tcp:0:interface={HOST}" + (f":backlog={args.backlog}" if args.backlog else "")
    try:
        for per_watcher in modes:
            name = f"xapid {'per-watcher' if per_watcher else 'shared'}"
            server = start_xapid(workdir / name.replace(" ", "-"), name, listen, args.watchers + 16)
            targets.append(xapid_target(name, server, args.watchers))
            print(f"{name}: daemon pid {server.pid} on port {server.port}, connecting {args.watchers} watchers…",
                  flush=True)
            connect_watchers(targets[-1], per_watcher, args.clients, deadline)
        if args.peer:
            record = targets[0].rpc.call("VM.get_record", targets[0].session, targets[0].vm_ref)
            server = start_peer(workdir / "stdlib", "stdlib", record, targets[0].vm_ref)
            targets.append(peer_target(server, targets[0].vm_ref, args.watchers))
            print(f"stdlib: peer pid {server.pid} on port {server.port}, connecting {args.watchers} watchers…",
                  flush=True)
            connect_watchers(targets[-1], False, args.clients, deadline)
    except BaseException:
        for target in targets:
            target.stop()
        raise
    return targets


def xapid_target(name: str, server: ServerProcess, watchers: int) -> Target:
    try:
        rpc = Rpc(server.port)
        session = rpc.call("session.login_with_password", USER, PASSWORD, "1.0", "event-watchers-bench")
        vm_ref = rpc.call("VM.create", session, vm_record(name_label="bench-vm"))
    except BaseException:
        server.stop()
        raise
    return Target(name, server, rpc, session, vm_ref, watchers)


def peer_target(server: ServerProcess, vm_ref: str, watchers: int) -> Target:
    try:
        rpc = Rpc(server.port)
        session = rpc.call("session.login_with_password", USER, PASSWORD)
    except BaseException:
        server.stop()
        raise
    return Target("stdlib", server, rpc, session, vm_ref, watchers)


def measure(targets: list[Target], rounds: int, deadline: Deadline) -> LoopbackFloor:
    """A warm-up round each, then *rounds* rounds interleaved across the servers, each followed by a round of
    the bare fan-out (:class:`LoopbackFloor`: replies the size of the first server's, its reader as busy as that
    server's load processes were in the warm-up round); returns the floor with its rounds."""
    work = [run_round(target, f"bench-warmup-{target.name.replace(' ', '-')}", deadline, record=False)
            for target in targets]
    first = targets[0]
    floor = LoopbackFloor(first.watchers, reply_size(first), work[0], EventFromRequest(first.session)(first.token))
    try:
        for number in range(rounds):
            for target in targets:
                run_round(target, f"bench-round-{number:04d}-{target.name.replace(' ', '-')}", deadline)
            bare = floor.round()
            print(f"round {number + 1}/{rounds}: " + ", ".join(
                f"{t.name} last reply {t.round_max[-1] * 1000:.1f} ms" for t in targets)
                + f"; floor {bare * 1000:.1f} ms", flush=True)
    finally:
        floor.stop()
    return floor


def median(values: list[float]) -> float:
    return percentile(values, 50)


def latencies_ms(target: Target, read: bool = False) -> list[float]:
    """Reply latencies in ms: at the watchers' sockets, or (*read*) as their load processes read them."""
    return [v * 1000 for v in (target.read_latencies if read else target.latencies)]


def rss_per_watcher(target: Target) -> float:
    """The server's RSS growth from the watchers alone (sessions were logged in before), KiB each."""
    return (target.rss_armed - target.rss_sessions) / target.watchers


def detail(target: Target) -> str:
    """Everything measured on one server, on one line."""
    ms, read, n = latencies_ms(target), latencies_ms(target, read=True), target.watchers
    return (f"{target.name}: connect+arm {n} watchers {target.connect_seconds:.2f} s ({target.overflows} listen-queue "
            f"overflows); RSS {target.rss_empty} KiB idle, +{(target.rss_sessions - target.rss_empty) / n:.1f} KiB "
            f"per session, +{rss_per_watcher(target):.1f} KiB per blocked watcher; set_name_label reply "
            f"{median(target.change_replies) * 1000:.1f} ms; server CPU per round (wake, replies, re-armed calls) "
            f"{median(target.cpu) * 1000:.0f} ms; latency at the sockets min {min(ms):.1f}, p50 "
            f"{percentile(ms, 50):.1f}, p99 {percentile(ms, 99):.1f}, max {max(ms):.1f} ms ({len(ms)} replies, "
            f"{target.timeouts} event.from timeouts); as the load processes read them p50 "
            f"{percentile(read, 50):.1f}, p99 {percentile(read, 99):.1f} ms, those processes busy "
            f"{median(target.client_cpu) * 1000:.0f} ms of CPU per round")


def goals(target: Target) -> list[str]:
    """The issue's two figures for one xapid, each against its goal."""
    ms = latencies_ms(target)
    p99, rss = percentile(ms, 99), rss_per_watcher(target)
    return [f"event.from fan-out {target.watchers} watchers ({target.name}): p50 {percentile(ms, 50):.1f} ms, "
            f"p99 {p99:.1f} ms, max {max(ms):.1f} ms (" + (
                f"goal p99 ≤ {GOAL_P99_MS:.0f} ms: {'met' if p99 <= GOAL_P99_MS else 'MISSED'})"
                if target.watchers == GOAL_WATCHERS else f"the p99 goal is set for {GOAL_WATCHERS} watchers)"),
            f"daemon RSS per blocked watcher ({target.name}): {rss:.1f} KiB (goal ≤ {GOAL_RSS_KB:.0f} KB: "
            f"{'met' if rss <= GOAL_RSS_KB else 'MISSED'})"]


def versus(target: Target, peer: Target) -> list[str]:
    """xapid's figures beside the peer's, with the ratio (peer / xapid: how many times better xapid is)."""
    def line(what: str, mine: float, theirs: float, unit: str) -> str:
        ratio = f"{theirs / mine:.1f}x" if mine > 0 else "n/a"
        return f"{what} ({target.name}): xapid {mine:.1f} {unit}, stdlib {theirs:.1f} {unit}, {ratio}"

    n = target.watchers
    return [line(f"event.from fan-out {n} watchers p{pct}", percentile(latencies_ms(target), pct),
                 percentile(latencies_ms(peer), pct), "ms") for pct in (50, 99)] + [
            line("RSS per blocked watcher", rss_per_watcher(target), rss_per_watcher(peer), "KiB")]


def floor_line(target: Target, floor: LoopbackFloor) -> str:
    """xapid's fan-out beside the bare one (the kernel's loopback sends from one Python loop), overall and
    round by round (each xapid round's last reply over the floor round that followed it)."""
    p99 = percentile(latencies_ms(target), 99)
    bare = median(floor.times) * 1000
    ratios = [mine / theirs for mine, theirs in zip(target.round_max, floor.times) if theirs > 0]
    return (f"fan-out floor, same run ({target.name}): one loop sending {target.watchers} replies of "
            f"{floor.size} bytes over loopback, no server, its reader spending {floor.work * 1e6:.0f} us of "
            f"CPU per reply and answering {len(floor.answer)} bytes, a round after each of xapid's: median "
            f"{bare:.1f} ms, max {max(floor.times) * 1000:.1f} ms; xapid p99 = "
            f"{p99 / bare if bare > 0 else math.inf:.2f}x the floor's median; last reply over the floor, round by "
            f"round: median {median(ratios):.2f}x, max {max(ratios):.2f}x")


def report(targets: list[Target], floor: LoopbackFloor) -> None:
    """One line per figure: details, the peer comparison, the floor, the goals."""
    peer = next((t for t in targets if t.name == "stdlib"), None)
    mine = [t for t in targets if t is not peer]
    print()
    for target in targets:
        print(detail(target))
    print()
    for target in mine:
        for line in (versus(target, peer) if peer else []) + [floor_line(target, floor)] + goals(target):
            print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=1000, help="concurrent event.from watchers per server")
    parser.add_argument("--rounds", type=int, default=10, help="measured VM.set_name_label rounds per server")
    parser.add_argument("--clients", type=int, default=max(1, min(4, (os.cpu_count() or 1) - 1)),
                        help="load processes per server, 1-4 (default: one core per process, one left for "
                             "the server)")
    parser.add_argument("--sessions", choices=("shared", "per-watcher", "both"), default="both",
                        help="xapid watchers on one shared session, a session each, or both (two daemons)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip the stdlib threaded peer")
    parser.add_argument("--backlog", type=int, default=0,
                        help="listen backlog for xapid (the endpoint's backlog=; default Twisted's 50)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--pin", action="store_true",
                        help="run the servers on the first CPU and the load processes on the others (as if the "
                             "clients were other machines: a reply's wake-up of its client then does not "
                             "preempt the server); needs 2 CPUs or more")
    parser.add_argument("--serve-peer", metavar="DATA", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="20 watchers on a shared session, 2 rounds, one load process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.watchers, args.rounds, args.clients, args.time_limit, args.sessions = 20, 2, 1, 60.0, "shared"
    if args.watchers < 1 or args.rounds < 1 or not 1 <= args.clients <= 4:
        parser.error("--watchers and --rounds must be positive, --clients 1-4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_peer:
        serve_peer(args.serve_peer)
        return 0
    handle_signals("event_watchers.py")
    raise_fd_limit()
    global PINNED
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("event_watchers: --pin needs 2 CPUs or more", file=sys.stderr)
            return 2
        PINNED = ({cpus[0]}, set(cpus[1:]))
        os.sched_setaffinity(0, PINNED[1])
    print(machine() + (f", servers pinned to CPU {cpus[0]}" if args.pin else ""), flush=True)
    started = time.monotonic()
    deadline = Deadline(args.time_limit)
    with tempfile.TemporaryDirectory(prefix="xapid-event-bench-") as tmp:
        targets: list[Target] = []
        try:
            targets = start_targets(args, Path(tmp), deadline)
            report(targets, measure(targets, args.rounds, deadline))
        except BenchmarkError as exc:
            print(f"event_watchers: {exc}", file=sys.stderr)
            return 1
        finally:
            for target in targets:
                target.stop()
    print(f"(took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
