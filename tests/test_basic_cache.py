"""HTTP Basic without bcrypt on every request: right credentials are remembered for a short while under
a keyed hash, dropped when the users file changes; failures are never remembered; the RPC login always
checks; throttled sources are refused all the same."""

from __future__ import annotations

import base64
import http.client
import json
import time
from pathlib import Path
from typing import Any

from support import PASSWORD, ApiEnv, RealDaemon, count_verify, resolve
from twisted.internet.task import Clock

from xapid.audit import MAX_TEXT, REDACTED
from xapid.auth.login import OK, REMEMBER_TTL, PasswordChecker
from xapid.auth.users import UsersFile
from xapid.errors import XenAPIError
from xapid.runner import InlineRunner
from xapid.stats.http import HttpExports
from xapid.wire.http import Client, HttpRequest

BURST = 10


def basic(env: ApiEnv, user: str, password: str, address: str = "192.0.2.50") -> int:
    """The status of an HTTP Basic GET of /rrd_updates, handled in process."""
    routes = HttpExports(env.api).routes()
    token = base64.b64encode(f"{user}:{password}".encode())
    request = HttpRequest(b"GET", b"/rrd_updates?start=0", b"HTTP/1.1", {b"authorization": b"Basic " + token},
                          peer=f"{address}:1234")
    request.client = Client(address)
    return resolve(routes[b"/rrd_updates"](request), env.clock, step=0, rounds=20).status


def rpc_login(env: ApiEnv, password: str, address: str = "192.0.2.50") -> str | list[str]:
    try:
        ref = resolve(env.dispatcher.call("session.login_with_password", ["admin", password], Client(address)),
                      env.clock, step=0, rounds=20)
    except XenAPIError as error:
        return error.description
    return ref.value if hasattr(ref, "encoded") else ref


def bump_mtime(path: Path) -> None:
    """Make sure a rewrite of *path* is seen as a change even on a coarse-mtime file system."""
    st = path.stat()
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_right_password_checked_once_then_remembered(env):
    calls = count_verify(env.api.users)
    assert basic(env, "admin", PASSWORD) == 200
    assert basic(env, "admin", PASSWORD) == 200
    assert basic(env, "admin", PASSWORD, address="192.0.2.51") == 200  # any source
    assert calls == [("admin", PASSWORD)]
    assert env.api.passwords.stats.remembered == 2
    assert env.api.passwords.stats.checked == 1


def test_failures_are_never_remembered(env):
    calls = count_verify(env.api.users)
    for _ in range(3):
        assert basic(env, "admin", "wrong") == 401
        assert basic(env, "nobody", PASSWORD) == 401
    assert len(calls) == 6
    assert env.api.passwords.remembered_count == 0


def test_another_password_is_checked_and_fails(env):
    assert basic(env, "admin", PASSWORD) == 200
    calls = count_verify(env.api.users)
    assert basic(env, "admin", PASSWORD + "x") == 401
    assert basic(env, "reader", PASSWORD) == 200  # another user: its own check
    assert calls == [("admin", PASSWORD + "x"), ("reader", PASSWORD)]


def test_entries_expire(env):
    assert basic(env, "admin", PASSWORD) == 200
    calls = count_verify(env.api.users)
    env.clock.advance(REMEMBER_TTL - 1)
    assert basic(env, "admin", PASSWORD) == 200
    assert calls == []
    env.clock.advance(1)
    assert basic(env, "admin", PASSWORD) == 200
    assert calls == [("admin", PASSWORD)]


def test_password_change_drops_everything(env):
    assert basic(env, "admin", PASSWORD) == 200
    assert basic(env, "reader", PASSWORD) == 200
    env.api.users.set_password("admin", "new password")
    bump_mtime(env.api.users.path)
    calls = count_verify(env.api.users)
    assert basic(env, "admin", PASSWORD) == 401
    assert basic(env, "admin", "new password") == 200
    assert basic(env, "reader", PASSWORD) == 200  # other users' entries went too: checked again
    assert [name for name, _ in calls] == ["admin", "admin", "reader"]


def test_role_change_and_deletion_are_seen_at_once(env):
    path: Path = env.api.users.path
    assert basic(env, "reader", PASSWORD) == 200
    text = path.read_text()
    path.write_text(text.replace("reader:read-only:", "reader:vm-admin:"))
    bump_mtime(path)
    assert basic(env, "reader", PASSWORD) == 200
    user = resolve(env.api.passwords.check("192.0.2.9", "reader", PASSWORD, remembered=True), env.clock, step=0)
    assert user.reason == OK and user.user.role == "vm-admin"
    env.api.users.delete("reader")
    bump_mtime(path)
    assert basic(env, "reader", PASSWORD) == 401


def test_change_racing_the_check_is_never_served(env):
    """The users file changing while a right password is being checked: the remembered entry carries
    the file's state from before the check, so the next request is checked against the new file."""
    path: Path = env.api.users.path
    calls = count_verify(env.api.users)
    checking = env.api.users.verify

    def verify_then_change(name: str, password: str) -> Any:
        user = checking(name, password)
        other = UsersFile(path, rounds=4)
        other.load()
        other.set_password("admin", "changed pass")
        bump_mtime(path)
        return user

    env.api.users.verify = verify_then_change
    assert basic(env, "admin", PASSWORD) == 200  # checked against the table of before the change
    env.api.users.verify = checking
    assert basic(env, "admin", PASSWORD) == 401
    assert basic(env, "admin", "changed pass") == 200
    assert [password for _, password in calls] == [PASSWORD, PASSWORD, "changed pass"]


def test_failed_basic_audit_line_is_bounded(env):
    """An unauthenticated client's Basic user name (up to the header limit) is cut in the audit line as an
    RPC argument is: it cannot make each failed try write tens of KB and rotate the audit trail away."""
    assert basic(env, "u" * 40_000, "wrong") == 401
    assert basic(env, "admin", "wrong") == 401
    text = (env.api.state_dir / "audit.log").read_text().splitlines()
    long, short = json.loads(text[-2]), json.loads(text[-1])
    assert len(text[-2]) < 4 * MAX_TEXT and long["user"].startswith("u" * MAX_TEXT)
    assert long["args"] == {"uname": long["user"], "pwd": REDACTED}
    assert (short["user"], short["args"]) == ("admin", {"uname": "admin", "pwd": REDACTED})


def test_rpc_login_always_runs_bcrypt(env):
    assert basic(env, "admin", PASSWORD) == 200
    calls = count_verify(env.api.users)
    for _ in range(3):
        assert rpc_login(env, PASSWORD).startswith("OpaqueRef:")
    assert len(calls) == 3


def test_throttled_source_refused_even_when_remembered(env):
    assert basic(env, "admin", PASSWORD, address="192.0.2.60") == 200
    for i in range(BURST):
        assert basic(env, "admin", f"wrong {i}", address="192.0.2.60") == 401
    calls = count_verify(env.api.users)
    assert basic(env, "admin", PASSWORD, address="192.0.2.60") == 401
    assert calls == []
    assert basic(env, "admin", PASSWORD, address="192.0.2.61") == 200  # another source: remembered


def test_bounded_and_keyed(tmp_path: Path):
    from support import make_users

    make_users(tmp_path / "users")
    users = UsersFile(tmp_path / "users", rounds=4)
    users.load()
    clock = Clock()
    checker = PasswordChecker(users, clock, InlineRunner(), remember_max=2)
    for name in ("admin", "reader", "operator"):
        assert resolve(checker.check("", name, PASSWORD, remembered=True), clock, step=0).reason == OK
    assert checker.remembered_count == 2
    for digest in checker._remembered:
        assert len(digest) == 32 and PASSWORD.encode() not in digest
    calls = count_verify(users)
    resolve(checker.check("", "admin", PASSWORD, remembered=True), clock, step=0)  # the oldest went
    resolve(checker.check("", "operator", PASSWORD, remembered=True), clock, step=0)
    assert calls == [("admin", PASSWORD)]
    other = PasswordChecker(users, clock, InlineRunner())
    assert other._digest("admin", PASSWORD) != checker._digest("admin", PASSWORD)  # a key per checker
    assert checker._digest("ab", "c") != checker._digest("a", "bc")
    clock.advance(REMEMBER_TTL)
    checker.sweep()
    assert checker.remembered_count == 0


def test_real_daemon_basic_scrapes(tmp_path: Path):
    """Over a real socket: repeated Basic scrapes succeed, a changed password is refused at once."""
    d = RealDaemon(tmp_path)
    try:
        def get(password: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
            token = base64.b64encode(f"admin:{password}".encode()).decode()
            conn.request("GET", "/rrd_updates?start=0", headers={"Authorization": f"Basic {token}"})
            status = conn.getresponse().status
            conn.close()
            return status

        started = time.monotonic()
        assert [get(PASSWORD) for _ in range(5)] == [200] * 5
        assert time.monotonic() - started < 30
        users = UsersFile(d.users, rounds=4)
        users.load()
        users.set_password("admin", "changed pass")
        bump_mtime(d.users)
        assert get(PASSWORD) == 401
        assert get("changed pass") == 200
    finally:
        d.stop()
