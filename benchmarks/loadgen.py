"""Concurrent keep-alive load: every connection POSTs the same pre-encoded XML-RPC call in a loop.

Two generators give the same figure, completed calls per second:

* ``wrk`` (when installed): C, so the clients cost the servers little CPU;
* Python: one process per connection (no GIL shared with the servers or with each other), each on
  one raw keep-alive socket, counting replies with status 200.

Both check first that a reply to the call parses as a Xen-API success.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from multiprocessing.synchronize import Barrier
from typing import Any

from common import HOST, split_reply, success_value
from common import http_post as http_request  # noqa: F401 - the name run.py and stats_bench.py use

_START_TIMEOUT = 30.0


class Connection:
    """One keep-alive HTTP/1.1 connection; replies are framed by Content-Length (both servers send it)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send *request* and return the reply's status and body."""
        self.sock.sendall(request)
        while (reply := split_reply(self.buffer)) is None:
            self._fill()
        return reply

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def check_call(port: int, request: bytes) -> Any:
    """Send *request* once on a fresh connection; the reply's Value (raises unless a 200 success)."""
    conn = Connection(port)
    try:
        status, body = conn.exchange(request)
    finally:
        conn.close()
    if status != 200:
        raise ValueError(f"HTTP status {status}")
    return success_value(body)


# -- the Python generator -------------------------------------------------------------------


def _client(port: int, request: bytes, seconds: float, barrier: Barrier, results: Any) -> None:
    """One client process: connect, check one reply, then count replies for *seconds*."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the parent stops the clients
    try:
        conn = Connection(port)
        status, body = conn.exchange(request)
        if status != 200:
            raise ValueError(f"HTTP status {status}")
        success_value(body)
        barrier.wait(_START_TIMEOUT)
        ok = failed = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status, _ = conn.exchange(request)
            if status == 200:
                ok += 1
            else:
                failed += 1
        conn.close()
        results.put((ok, failed, None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        barrier.abort()
        results.put((0, 0, f"{type(exc).__name__}: {exc}"))


def python_rate(port: int, request: bytes, connections: int, seconds: float) -> float:
    """Calls/s from *connections* client processes, each on one keep-alive connection."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(connections), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(port, request, seconds, barrier, results), daemon=True)
             for _ in range(connections)]
    deadline = time.monotonic() + seconds + _START_TIMEOUT + 30
    try:
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=max(0.0, deadline - time.monotonic())) for _ in procs]
    except queue.Empty:
        raise RuntimeError("load clients did not finish in time") from None
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
    errors = [error for _, _, error in outcomes if error]
    if errors:
        raise RuntimeError(f"load client failed: {errors[0]}")
    failed = sum(f for _, f, _ in outcomes)
    if failed:
        raise RuntimeError(f"{failed} replies were not HTTP 200")
    return sum(ok for ok, _, _ in outcomes) / seconds


# -- wrk ------------------------------------------------------------------------------------


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_threads(connections: int) -> int:
    """wrk threads: one per CPU, at most two, never more than connections (leave CPU to the server)."""
    return max(1, min(2, os.cpu_count() or 1, connections))


def wrk_rate(port: int, body: bytes, connections: int, seconds: float) -> float:
    """Calls/s from ``wrk`` POSTing *body* on *connections* keep-alive connections."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body cannot be quoted for wrk's Lua script")
    script = ('wrk.method = "POST"\nwrk.headers["Content-Type"] = "text/xml"\n'
              f"wrk.body = [==[{text}]==]\n")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="xapid-bench-") as lua:
        lua.write(script)
        lua.flush()
        duration = max(1, round(seconds))
        out = subprocess.run(
            ["wrk", f"-t{wrk_threads(connections)}", f"-c{connections}", f"-d{duration}s", "-s", lua.name,
             f"http://{HOST}:{port}/"],
            capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if rate is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if bad:
        raise RuntimeError(f"{bad.group(1)} replies were not HTTP 2xx")
    errors = re.search(r"Socket errors:.*", out)
    if errors:
        raise RuntimeError(f"wrk: {errors.group(0)}")
    return float(rate.group(1))
