"""xapid under systemd: sd_notify readiness, status, stopping and watchdog messages (checked on a
datagram socket of the test's own, set as NOTIFY_SOCKET), socket activation through
systemd-socket-activate, and `systemd-analyze verify` of the unit files.  No running systemd is needed.

The reactor is blocked on purpose through the daemon's test hook: with XAPID_DEBUG_BLOCK_SECONDS in
its environment, SIGUSR2 makes the reactor sleep that long (xapid/systemd.py install_block_hook).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import XenAPI

from support import PASSWORD, ROOT, RealDaemon
from xapid import systemd

ENV = {**os.environ, "XAPID_BCRYPT_ROUNDS": "4"}


class NotifyReceiver:
    """A datagram socket in the abstract namespace, as systemd's NOTIFY_SOCKET is."""

    def __init__(self) -> None:
        self.name = f"@xapid-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self, seconds: float = 0.0) -> list[dict[str, str]]:
        """Read what arrives for *seconds* (at least what is queued now)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, BlockingIOError):
                if time.monotonic() >= deadline:
                    return [m for _, m in self.messages]
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain(0.1)
            for _, message in self.messages:
                if key in message and (value is None or message[key] == value):
                    return message
        raise AssertionError(f"no {key}={value} in {[m for _, m in self.messages]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver():
    r = NotifyReceiver()
    yield r
    r.close()


def daemon_env(receiver: NotifyReceiver, **extra: str) -> dict[str, str]:
    return {**ENV, "NOTIFY_SOCKET": receiver.name, **extra}


def login(url: str) -> XenAPI.Session:
    session = XenAPI.Session(url)
    session.xenapi.login_with_password("admin", PASSWORD)
    return session


def test_ready_status_stopping_and_watchdog(tmp_path, receiver):
    """STATUS= lines while starting, READY=1 once it accepts, WATCHDOG=1 every WATCHDOG_USEC/2,
    STOPPING=1 at SIGTERM; exit 0; the variables are not left for children."""
    daemon = RealDaemon(tmp_path, env=daemon_env(receiver, WATCHDOG_USEC="400000"))
    try:
        ready = receiver.wait_for("READY", "1")
        assert ready["STATUS"].startswith("serving on 127.0.0.1:")
        order = [m for _, m in receiver.messages]
        first_ready = next(i for i, m in enumerate(order) if m.get("READY") == "1")
        statuses = [m["STATUS"] for m in order[:first_ready] if "STATUS" in m]
        assert any("database" in s for s in statuses) and "listening" in statuses, statuses
        login(daemon.url).xenapi.session.logout()  # READY=1 means it accepts: a login works
        start = len(receiver.messages)
        receiver.drain(1.5)
        pings = [t for t, m in receiver.messages[start:] if m.get("WATCHDOG") == "1"]
        assert 4 <= len(pings) <= 12, pings  # every 0.2 s
    finally:
        assert daemon.stop() == 0
    receiver.drain(0.2)
    assert any(m.get("STOPPING") == "1" for _, m in receiver.messages)


def test_no_watchdog_pings_without_watchdog_usec(tmp_path, receiver):
    """Without WATCHDOG_USEC (or with another process's WATCHDOG_PID) there is no WATCHDOG=1."""
    daemon = RealDaemon(tmp_path, env=daemon_env(receiver, WATCHDOG_USEC="200000", WATCHDOG_PID="1"))
    try:
        receiver.wait_for("READY", "1")
        assert not any("WATCHDOG" in m for m in receiver.drain(0.8))
    finally:
        daemon.stop()


def test_blocked_reactor_stops_watchdog_pings(tmp_path, receiver):
    """A reactor blocked on purpose (SIGUSR2 with XAPID_DEBUG_BLOCK_SECONDS) sends no ping while
    blocked; the pings come back after."""
    daemon = RealDaemon(tmp_path, env=daemon_env(receiver, WATCHDOG_USEC="200000", XAPID_DEBUG_BLOCK_SECONDS="2"))
    try:
        receiver.wait_for("READY", "1")
        receiver.drain(0.5)
        daemon.proc.send_signal(signal.SIGUSR2)
        sent = time.monotonic()
        receiver.drain(3.5)
        pings = [t for t, m in receiver.messages if m.get("WATCHDOG") == "1" and t > sent]
        gaps = [b - a for a, b in zip([sent] + pings, pings)]
        assert max(gaps) >= 1.7, gaps  # 2 s without a ping (systemd would have killed it at 0.2 s)
        assert pings and pings[-1] > sent + 2.2  # and they resume
    finally:
        daemon.stop()


def test_environment_taken_for_children(monkeypatch):
    """NOTIFY_SOCKET and WATCHDOG_* are read once and removed, so children never inherit them."""
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = systemd.take_environment(env)
    assert env == {"PATH": "/bin"}
    assert notifier.address == b"\0x" and notifier.watchdog_interval == 0.5
    assert systemd.take_environment({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000",
                                     "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert not systemd.take_environment({}).notify(READY=1)  # not under systemd: nothing sent


def test_listen_fdnames_quirk():
    """Without LISTEN_FDNAMES, Twisted sees no passed fd: xapid names them 'unknown' (only for its own pid)."""
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
    assert systemd.prepare_listen_fds(env) == 2 and env["LISTEN_FDNAMES"] == "unknown:unknown"
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api"}
    systemd.prepare_listen_fds(env)
    assert env["LISTEN_FDNAMES"] == "api"
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.prepare_listen_fds(env) == 0 and "LISTEN_FDNAMES" not in env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fdname", [None, "api"])
def test_socket_activation(tmp_path, receiver, fdname):
    """systemd-socket-activate passes a listening socket; xapid serves on it (systemd:index=0, or
    name=api with --fdname=api), and the first client, queued before xapid ran, is served."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (scripts/test installs the systemd package)")
    from support import make_users

    make_users(tmp_path / "users")
    port = _free_port()
    listen = "systemd:domain=INET:name=api" if fdname else "systemd:domain=INET:index=0"
    cmd = [activate, "-l", f"127.0.0.1:{port}", *([f"--fdname={fdname}"] if fdname else []),
           "-E", f"NOTIFY_SOCKET={receiver.name}", "-E", "XAPID_BCRYPT_ROUNDS=4", "-E", "PYTHONUNBUFFERED=1",
           sys.executable, "-m", "xapid", "serve", "--state-dir", str(tmp_path / "state"),
           "--users", str(tmp_path / "users"), "--listen", listen]
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    try:
        deadline = time.monotonic() + 10
        while True:  # the socket exists before xapid runs: the connection waits in its queue
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
                time.sleep(0.05)
        session = login(f"http://127.0.0.1:{port}/")
        assert session.xenapi.host.get_all()
        session.xenapi.session.logout()
        assert receiver.wait_for("READY", "1")["STATUS"] == f"serving on 127.0.0.1:{port}"
        assert f"listening on 127.0.0.1:{port} ({listen})" in (tmp_path / "daemon.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "daemon.log").read_text()
        log.close()


def test_units_verify(tmp_path):
    """systemd-analyze verify accepts the unit files (ExecStart pointed at this venv's xapid)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (scripts/test installs the systemd package)")
    xapid = Path(sys.executable).with_name("xapid")
    assert xapid.exists(), xapid
    for name in ("xapid.service", "xapid.socket"):
        text = (ROOT / "etc" / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/bin/xapid", str(xapid)))
    result = subprocess.run([analyze, "verify", str(tmp_path / "xapid.service"), str(tmp_path / "xapid.socket")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "xapid.service" not in result.stderr and "xapid.socket" not in result.stderr, result.stderr


def test_service_unit_settings():
    """The service unit is what the README says: notify, watchdog, restart, reload, directories."""
    text = (ROOT / "etc" / "systemd" / "xapid.service").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if line and line[0].isalpha() and "=" in line)
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID" and int(settings["WatchdogSec"]) > 0
    for key in ("StateDirectory", "LogsDirectory", "RuntimeDirectory"):
        assert settings[key] == "xapid"
    assert settings["KillMode"] == "process"  # guests' device models outlive a toolstack restart
