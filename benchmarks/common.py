"""What the benchmarks share: the machine description, output lines, starting and stopping a server
process, the pool-admin user and SDK session, HTTP framing of an XML-RPC call, a process's CPU time and
RSS, percentiles.

Scripts run as ``python benchmarks/<name>.py`` import it as ``common`` (their directory is on
``sys.path``).  ``run.py`` re-exports these names, so the benchmarks importing them from ``run``
keep working.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = HERE / "stdlib_server.py"  # the one stdlib baseline server (xend's architecture)
HOST = "127.0.0.1"
USER = "bench"
CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
SERVE = [sys.executable, "-m", "xapid", "serve"]
LOOPBACK = ["--listen", "tcp:0:interface=127.0.0.1"]


def machine(extra: str = "") -> str:
    """One line naming the machine: CPUs (and model), Python, platform, open-file limit (and *extra*)."""
    cpu = ""
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = f" ({found.group(1).strip()})" if found else ""
    return (f"machine: nproc {os.cpu_count()}{cpu}, {platform.python_implementation()} "
            f"{platform.python_version()}, {platform.platform()}, "
            f"fd limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}" + (f", {extra}" if extra else ""))


def out(line: str = "") -> None:
    """A figure line on stdout, flushed at once."""
    print(line, flush=True)


def progress(message: str) -> None:
    """A progress line on stderr."""
    print(f"... {message}", file=sys.stderr, flush=True)


def stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after *grace* seconds; a process already gone is left alone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prepare_run(script: str, *signums: int) -> None:
    """Before anything starts: the XenAPI SDK is there, and the signals are handled (:func:`handle_signals`)."""
    try:
        import XenAPI  # noqa: F401
    except ImportError:
        raise SystemExit(f"{script}: the XenAPI SDK is missing (pip install -e '.[test]')") from None
    handle_signals(script, *signums)


def handle_signals(script: str, *signums: int) -> None:
    """SIGTERM (and *signums*) end the run through SystemExit, so that every ``finally`` and ExitStack
    stops what it started; SIGINT raises KeyboardInterrupt even when the script was started with it ignored."""

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(f"{script}: stopped by signal {signum}")

    for signum in (signal.SIGTERM, *signums):
        signal.signal(signum, terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_status(script: str, body: Callable[[], None]) -> int:
    """Run *body*: 0, or 130 when interrupted, or 1 with the message of a RuntimeError on stderr."""
    try:
        body()
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"{script}: {exc}", file=sys.stderr)
        return 1
    return 0


def wait_port(name: str, proc: subprocess.Popen[bytes], log: Path, timeout: float,
              error: type[Exception] = RuntimeError) -> int:
    """The port once *log* says ``listening on 127.0.0.1:PORT``; *error* if *proc* exits or *timeout* passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = LISTENING.search(text)
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise error(f"{name} exited with status {proc.returncode}:\n{text[-2000:]}")
        time.sleep(0.05)
    raise error(f"{name} did not start within {timeout:.0f} s:\n{log.read_text(errors='replace')[-2000:]}")


def add_user(users: Path, password: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
             role: str = "pool-admin") -> None:
    """``xapid user add USER`` into *users* (bcrypt cost 4 unless *env* is given); RuntimeError if it fails."""
    added = subprocess.run([sys.executable, "-m", "xapid", "user", "add", USER, "--role", role, "--users",
                            str(users)], input=f"{password}\n", text=True, capture_output=True, cwd=cwd,
                           env=env if env is not None else {**os.environ, "XAPID_BCRYPT_ROUNDS": "4"},
                           timeout=120, check=False)
    if added.returncode != 0:
        raise RuntimeError(f"xapid user add failed: {added.stderr.strip()}")


def sdk_session(url: str, password: str, originator: str = "xapid-bench") -> Any:
    """A ``XenAPI.Session`` on *url*, logged in as USER."""
    import XenAPI

    session = XenAPI.Session(url)
    session.login_with_password(USER, password, "1.0", originator)
    return session


def http_post(body: bytes, path: str = "/") -> bytes:
    """A complete HTTP/1.1 keep-alive POST of an XML-RPC *body*."""
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: text/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def split_reply(buffer: bytearray) -> tuple[int, bytes] | None:
    """Remove one complete HTTP reply (framed by Content-Length) from *buffer*: its status and body,
    or None while it is incomplete; ConnectionError for a reply without Content-Length."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    found = CONTENT_LENGTH.search(buffer, 0, end)
    if found is None:
        raise ConnectionError(f"a reply without Content-Length: {bytes(buffer[:200])!r}")
    stop = end + 4 + int(found.group(1))
    if len(buffer) < stop:
        return None
    status, body = int(buffer[9:12]), bytes(buffer[end + 4:stop])
    del buffer[:stop]
    return status, body


def success_value(body: bytes, error: type[Exception] = ValueError) -> Any:
    """The ``Value`` of a Xen-API XML-RPC success reply; *error* for anything else."""
    (reply,), _ = xmlrpc.client.loads(body)
    if not isinstance(reply, dict) or reply.get("Status") != "Success":
        raise error(f"not a Xen-API success: {reply!r:.300}")
    return reply["Value"]


def rss_kib(pid: int, error: type[Exception] = RuntimeError) -> int:
    """The resident set size (``VmRSS`` of /proc/<pid>/status) of *pid* in KiB; *error* if it has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise error(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank *q*-quantile (0 < q ≤ 1) of *values*."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads) so far, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_ns(pid: int) -> int:
    """Nanoseconds on CPU of every current thread of *pid* (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total
