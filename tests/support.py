"""Test support: an in-process API on the sim driver with a fake clock, a real daemon, record builders."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from xapid.config import ApiConfig, Config, ServerConfig
from xapid.dispatch import Dispatcher
from xapid.errors import XenAPIError
from xapid.objects import collect_handlers
from xapid.runner import InlineRunner
from xapid.server import build_api
from xapid.auth.users import UsersFile

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret pass"
USERS = {"admin": "pool-admin", "reader": "read-only", "operator": "vm-operator", "vmadmin": "vm-admin"}


def make_users(path: Path) -> None:
    users = UsersFile(path, rounds=4)
    users.load()
    for name, role in USERS.items():
        users.add(name, role, PASSWORD)


def count_verify(users: UsersFile) -> list[tuple[str, str]]:
    """Record every bcrypt check *users* makes (UsersFile.verify runs exactly one)."""
    calls: list[tuple[str, str]] = []
    original = users.verify

    def verify(name: str, password: str) -> Any:
        calls.append((name, password))
        return original(name, password)

    users.verify = verify  # type: ignore[method-assign]
    return calls


def resolve(d: Deferred, clock: Clock, step: float = 1, rounds: int = 1000) -> Any:
    """The result of an already (or soon, on the fake clock) fired Deferred; raises its failure.
    The clock moves *step* seconds a round (0: only zero-delay timers run)."""
    box: list[Any] = []
    d.addBoth(box.append)
    for _ in range(rounds):
        if box:
            break
        clock.advance(step)
    assert box, "the call never finished"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class LocalClient:
    """Calls the dispatcher in-process the way a wire client would (session first)."""

    def __init__(self, env: ApiEnv, session: str):
        self.env = env
        self.session = session

    def __call__(self, method: str, *args: Any) -> Any:
        return self.env.raw(method, [self.session, *args])

    def fails(self, method: str, *args: Any) -> list[str]:
        with pytest.raises(XenAPIError) as info:
            self(method, *args)
        return info.value.description


class ApiEnv:
    def __init__(self, tmp_path: Path, clock: Clock, driver: Callable[[], Any] | None = None, **api_config: Any):
        """The API on *tmp_path* with the sim driver, or the unopened driver *driver()* makes."""
        self.tmp_path = tmp_path
        self.clock = clock
        self.driver = driver
        users = tmp_path / "users"
        if not users.exists():
            make_users(users)
        self.config = Config(
            server=ServerConfig(state_dir=str(tmp_path / "state"), users=str(users)),
            api=replace(ApiConfig(auth_failure_delay=0.0), **api_config),
        )
        self.start()

    def start(self) -> None:
        runner = InlineRunner()
        driver = self.driver() if self.driver else None
        self.api = resolve(Deferred.fromCoroutine(build_api(self.config, self.clock, runner, runner, driver=driver)),
                           self.clock)
        self.dispatcher = Dispatcher(self.api, collect_handlers())

    def restart(self) -> None:
        """Close and reopen on the same state dir, as a daemon restart does."""
        self.api.hypervisor.driver.close()
        self.api.database.close()
        self.start()

    def raw(self, method: str, params: list[Any]) -> Any:
        value = resolve(self.dispatcher.call(method, params), self.clock)
        return value.value if hasattr(value, "value") and hasattr(value, "encoded") else _plain(value)

    def settle(self) -> None:
        """Let background work scheduled on the fake clock (not advanced in time) finish."""
        for _ in range(10):
            self.clock.advance(0)

    def login(self, user: str = "admin", password: str = PASSWORD) -> LocalClient:
        return LocalClient(self, self.raw("session.login_with_password", [user, password]))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (v.value if hasattr(v, "encoded") else _plain(v)) for k, v in value.items()}
    return value


def vm_record(**overrides: Any) -> dict[str, Any]:
    """A VM.create record with every field xapi requires (a small PV guest)."""
    record: dict[str, Any] = {
        "name_label": "test-vm", "name_description": "", "user_version": "1", "is_a_template": False,
        "affinity": "OpaqueRef:NULL", "memory_static_max": str(512 << 20), "memory_dynamic_max": str(512 << 20),
        "memory_dynamic_min": str(256 << 20), "memory_static_min": str(128 << 20), "VCPUs_params": {},
        "VCPUs_max": "2", "VCPUs_at_startup": "1", "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart", "actions_after_crash": "restart", "PV_bootloader": "",
        "PV_kernel": "/var/lib/xcp/guest/vmlinuz-guest", "PV_ramdisk": "", "PV_args": "console=hvc0",
        "PV_bootloader_args": "", "PV_legacy_args": "", "HVM_boot_policy": "", "HVM_boot_params": {},
        "platform": {}, "PCI_bus": "", "other_config": {}, "recommendations": "",
    }
    record.update(overrides)
    return record


def stored(env: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """What is committed in the env's state database right now (read through a second connection)."""
    from xapid.store import Database

    db = Database(env.api.database.path)
    try:
        return {ref: (cls, data) for cls, ref, data in db.read_all()}
    finally:
        db.close()


def disk_full(monkeypatch: pytest.MonkeyPatch, env: Any) -> None:
    """Make every commit of the env's database fail as SQLite does on a full disk."""
    import sqlite3

    def write(batch: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(env.api.database, "write", write)


# -- a real daemon, started as a user would ----------------------------------------------------


class RealDaemon:
    def __init__(self, tmp: Path, extra: list[str] | None = None, config: str = "", nofile: int | None = None,
                 listen: str = "tcp:0:interface=127.0.0.1", env: dict[str, str] | None = None):
        self.tmp = tmp
        self.env = env  # the daemon's environment (default: the tests' own)
        self.nofile = nofile  # the daemon's open-file limit (soft and hard), as `ulimit -n` sets it
        self.users = tmp / "users"
        make_users(self.users)
        self.state = tmp / "state"
        self.log = tmp / "daemon.log"
        config_text, config = config, tmp / "xapid.conf"  # *config*: more INI text for the config file
        config.write_text("[api]\nauth_failure_delay = 0.2\n[server]\nthreads = 4\n" + config_text)
        self.args = [sys.executable, "-m", "xapid", "serve", "--config", str(config), "--state-dir", str(self.state),
                     "--users", str(self.users), "--listen", listen, *(extra or [])]
        self.start()

    def start(self) -> None:
        self.starts = getattr(self, "starts", 0) + 1
        self.logfile = open(self.log, "a")
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.logfile, cwd=ROOT,
                                     env={**(self.env or os.environ), "PYTHONUNBUFFERED": "1"}, preexec_fn=limit)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_text()
            found = re.findall(r"listening on 127\.0\.0\.1:(\d+)", text)
            if len(found) >= self.starts:
                self.port = int(found[-1])
                self.url = f"http://127.0.0.1:{self.port}/"
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {text}")
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"daemon did not start: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        return self.proc.returncode

    def raw_request(self, request: bytes, timeout: float = 30) -> tuple[socket.socket, bytes]:
        """*request* sent as is on a new connection: the open socket, and what arrived until the end
        of the reply's head (or until the daemon closed)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(4096)
            if not piece:
                break
            head += piece
        return sock, head


def serve_and_use(command: list[str], cwd: Path, env: dict[str, str], use: Callable[[Any], None]) -> None:
    """Run the ``xapid serve`` *command* in *cwd* (stderr to cwd/daemon.log); once it listens on 127.0.0.1,
    call *use* with the ``xenapi`` of an SDK session logged in as admin, log out, then stop the daemon with
    SIGTERM: it must exit 0."""
    import XenAPI

    log = cwd / "daemon.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.findall(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        session = XenAPI.Session(f"http://127.0.0.1:{found[0]}/")
        session.xenapi.login_with_password("admin", PASSWORD)
        use(session.xenapi)
        session.xenapi.session.logout()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


# -- Xen Orchestra's npm connector ------------------------------------------------------------


def npm_xen_api(tmp_path_factory: pytest.TempPathFactory, name: str, *scripts: str) -> Path:
    """A temp dir holding ``tests/npm``'s package.json and *scripts*, with ``xen-api@4.7``
    installed by npm (no node or npm: a failure, not a skip)."""
    import shutil

    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail("node and npm are required for the xen-api connector test")
    prefix = tmp_path_factory.mktemp(name)
    npm_dir = Path(__file__).resolve().parent / "npm"
    for script in ("package.json", *scripts):
        shutil.copy(npm_dir / script, prefix)
    proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), "xen-api@4.7"],
                          cwd=prefix, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return prefix
