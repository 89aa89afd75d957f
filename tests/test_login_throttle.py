"""The login path under password guessing: per-source token buckets, fair queueing on the login
pool, the same answer for every refusal, and a real daemon that stays responsive under a flood."""

from __future__ import annotations

import base64
import http.client
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import XenAPI
from support import PASSWORD, ROOT, ApiEnv, RealDaemon, count_verify, resolve
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from xapid.errors import XenAPIError
from xapid.stats.http import HttpExports
from xapid.auth.login import BUSY, FAILED, OK, THROTTLED, PasswordChecker, source_key
from xapid.auth.users import UsersFile
from xapid.wire.http import Client, HttpRequest

BURST, INTERVAL = 10, 6.0  # the defaults of [limits] login_failures_burst / login_failure_interval
AUTH_FAILED = "SESSION_AUTHENTICATION_FAILED"


# -- helpers ----------------------------------------------------------------------------------


def settle(d: Deferred, clock: Clock) -> Any:
    """The result of *d* once zero-delay timers ran; the fake clock does not move (buckets refill on it)."""
    return resolve(d, clock, step=0, rounds=20)


def login(env: ApiEnv, address: str | None, user: str = "admin", password: str = PASSWORD) -> str | list[str]:
    """A login from a connection at *address*: the session ref, or the error's description."""
    client = Client(address) if address is not None else None
    try:
        ref = settle(env.dispatcher.call("session.login_with_password", [user, password], client), env.clock)
    except XenAPIError as error:
        return error.description
    return ref.value if hasattr(ref, "encoded") else ref


class ManualRunner:
    """A login runner the test drives: checks start when the checker asks, finish when told."""

    def __init__(self) -> None:
        self.started: list[str] = []  # user names, in the order their checks started
        self.pending: list[tuple[Any, tuple[Any, ...], Deferred]] = []

    def run(self, fn: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.started.append(args[0])
        self.pending.append((fn, args, d))
        return d

    def finish_one(self) -> None:
        fn, args, d = self.pending.pop(0)
        d.callback(fn(*args))


@pytest.fixture
def users(tmp_path: Path) -> UsersFile:
    from support import make_users

    make_users(tmp_path / "users")
    u = UsersFile(tmp_path / "users", rounds=4)
    u.load()
    return u


def checker(users: UsersFile, clock: Clock, runner: Any, **limits: Any) -> PasswordChecker:
    settings = {"threads": 1, "burst": BURST, "interval": INTERVAL, "queue_per_source": 16, **limits}
    return PasswordChecker(users, clock, runner, **settings)


@pytest.fixture
def log_events() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- source addresses -------------------------------------------------------------------------


def test_source_keys():
    """IPv4 as is, IPv6 per /64, IPv4-mapped IPv6 as IPv4, a UNIX socket as one source, in-process as "local"."""
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("unix") == "unix"
    assert source_key("") == source_key(None) == "local"


# -- token buckets, through the API ------------------------------------------------------------


def test_burst_then_throttled_without_bcrypt(env):
    """After `burst` failed logins a source gets SESSION_AUTHENTICATION_FAILED, even for the right
    password, and bcrypt does not run; other sources are not affected."""
    calls = count_verify(env.api.users)
    for i in range(BURST):
        assert login(env, "192.0.2.7", password=f"wrong {i}") == [AUTH_FAILED, "admin", "Authentication failure"]
    assert len(calls) == BURST
    for password in ("still wrong", PASSWORD):
        assert login(env, "192.0.2.7", password=password) == [AUTH_FAILED, "admin", "Authentication failure"]
    assert len(calls) == BURST  # the throttled tries were answered without a password check
    assert login(env, "192.0.2.8").startswith("OpaqueRef:")
    assert login(env, None).startswith("OpaqueRef:")  # in-process callers are one source of their own


def test_bucket_refills_on_the_clock_and_successes_are_free(env):
    """One token comes back every `interval` seconds; a successful login does not spend one."""
    calls = count_verify(env.api.users)
    for i in range(BURST):
        login(env, "192.0.2.9", password=f"wrong {i}")
    assert login(env, "192.0.2.9")[0] == AUTH_FAILED
    env.clock.advance(INTERVAL - 0.5)
    assert login(env, "192.0.2.9")[0] == AUTH_FAILED  # not yet a whole token
    env.clock.advance(0.5)
    before = len(calls)
    for _ in range(5):  # one token, many successes: each gives its token back
        assert login(env, "192.0.2.9").startswith("OpaqueRef:")
    assert len(calls) == before + 5
    assert login(env, "192.0.2.9", password="wrong again")[0] == AUTH_FAILED  # spends the token
    assert len(calls) == before + 6
    assert login(env, "192.0.2.9")[0] == AUTH_FAILED  # none left: no check
    assert len(calls) == before + 6
    env.clock.advance(BURST * INTERVAL)
    assert login(env, "192.0.2.9").startswith("OpaqueRef:")


def test_unknown_user_and_wrong_password_look_the_same(env):
    """Unknown user, wrong password and a throttled try: same code and message, each after one check
    (a dummy hash for the unknown user) or none (throttled)."""
    calls = count_verify(env.api.users)
    wrong = login(env, "198.51.100.1", "admin", "wrong")
    unknown = login(env, "198.51.100.1", "nobody", PASSWORD)
    assert wrong == [AUTH_FAILED, "admin", "Authentication failure"]
    assert unknown == [AUTH_FAILED, "nobody", "Authentication failure"]
    assert [name for name, _ in calls] == ["admin", "nobody"]
    for i in range(BURST - 2):
        login(env, "198.51.100.1", "nobody", f"x{i}")
    assert login(env, "198.51.100.1", "nobody", PASSWORD) == unknown
    assert login(env, "198.51.100.1", "admin", PASSWORD) == wrong


def test_unknown_user_costs_a_real_bcrypt_check(tmp_path):
    """Timing does not tell an unknown user from a wrong password: both run a bcrypt of the file's cost."""
    users = UsersFile(tmp_path / "users", rounds=8)
    users.add("alice", "read-only", "right")

    def best(name: str) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            assert users.verify(name, "wrong") is None
            times.append(time.perf_counter() - t)
        return min(times)

    known, unknown = best("alice"), best("nobody")
    assert 0.5 < unknown / known < 2.0


def test_ipv6_sources_share_a_bucket_per_64(env):
    """Addresses in one IPv6 /64 share a bucket; the next /64 has its own; IPv4-mapped counts as IPv4."""
    for i in range(BURST):
        login(env, f"2001:db8:1:2::{i + 1:x}", password=f"wrong {i}")
    assert login(env, "2001:db8:1:2:ffff:ffff:ffff:ffff")[0] == AUTH_FAILED
    assert login(env, "2001:db8:1:3::1").startswith("OpaqueRef:")
    for i in range(BURST):
        login(env, "203.0.113.5", password=f"wrong {i}")
    assert login(env, "::ffff:203.0.113.5")[0] == AUTH_FAILED


def test_throttling_is_logged_once_per_source(env, log_events):
    """One warning, with named fields, when a source starts being throttled; not one per try."""
    for i in range(BURST + 20):
        login(env, "192.0.2.44", password=f"wrong {i}")
    throttled = [e for e in log_events if "throttled" in e.get("log_format", "")]
    assert len(throttled) == 1
    assert throttled[0]["source"] == "192.0.2.44" and throttled[0]["burst"] == BURST
    failed = [e for e in log_events if e.get("log_format", "").startswith("failed login for")]
    assert len(failed) == BURST  # only the checked failures are logged one by one


def test_successful_login_marks_the_connection_authenticated(env):
    """A successful login marks ctx.client authenticated; a failed one does not."""
    client = Client("192.0.2.50")
    with pytest.raises(XenAPIError):
        settle(env.dispatcher.call("session.login_with_password", ["admin", "wrong"], client), env.clock)
    assert not client.authenticated
    settle(env.dispatcher.call("session.login_with_password", ["admin", PASSWORD], client), env.clock)
    assert client.authenticated


def test_http_basic_shares_the_buckets(env):
    """HTTP Basic failures spend the same source's tokens as RPC logins; throttled, even the right
    password is 401; a successful Basic request marks the connection authenticated."""
    routes = HttpExports(env.api).routes()

    def get(address: str, password: str) -> tuple[int, Client]:
        token = base64.b64encode(f"admin:{password}".encode())
        request = HttpRequest(b"GET", b"/rrd_updates?start=0", b"HTTP/1.1", {b"authorization": b"Basic " + token},
                              peer=f"{address}:1234")
        request.client = Client(address)
        return settle(routes[b"/rrd_updates"](request), env.clock).status, request.client

    status, client = get("192.0.2.60", PASSWORD)
    assert status == 200 and client.authenticated
    for i in range(BURST // 2):
        assert get("192.0.2.60", f"wrong {i}")[0] == 401
    for i in range(BURST - BURST // 2):
        assert login(env, "192.0.2.60", password=f"wrong {i}")[0] == AUTH_FAILED
    calls = count_verify(env.api.users)
    status, client = get("192.0.2.60", PASSWORD)
    assert status == 401 and not client.authenticated
    assert calls == []


# -- fair queueing and bounds, on the checker with a hand-driven pool ----------------------------


def test_fair_queueing_between_sources(users, clock):
    """With a flood queued from one source, a check from another source runs next; sources take turns."""
    runner = ManualRunner()
    check = checker(users, clock, runner, threads=1)
    results = [check.check("192.0.2.1", f"a{i}", "wrong") for i in range(6)]
    assert runner.started == ["a0"]  # one thread: the others wait
    results.append(check.check("192.0.2.2", "b0", "wrong"))
    results.append(check.check("192.0.2.2", "b1", "wrong"))
    runner.finish_one()
    assert runner.started == ["a0", "b0"]
    results.append(check.check("192.0.2.3", "c0", "wrong"))
    while runner.pending:
        runner.finish_one()
    # each round serves every waiting source once; a newcomer goes before sources already served
    assert runner.started == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]
    assert all(r.called and r.result.reason == FAILED for r in results)


def test_a_source_with_a_clean_record_goes_first(users, clock):
    """A source without recent failures has its check started before the rounds of sources that failed."""
    runner = ManualRunner()
    check = checker(users, clock, runner, threads=1)
    for source in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):  # three sources that failed before
        check.check(source, "x", "wrong")
        runner.finish_one()
    runner.started.clear()
    check.check("192.0.2.1", "a0", "wrong")
    for i in (1, 2, 3):
        check.check(f"192.0.2.{i}", f"s{i}", "wrong")
    legit = check.check("192.0.2.9", "admin", PASSWORD)  # clean: no failure yet
    runner.finish_one()
    assert runner.started == ["a0", "admin"]
    runner.finish_one()
    assert legit.result.reason == OK
    # s2 started when the legit check finished; the success left 192.0.2.9 clean again, so its
    # next check (a typo) goes before s3 and s1 (192.0.2.1 was served this round already)
    check.check("192.0.2.9", "admin", "typo")
    while runner.pending:
        runner.finish_one()
    assert runner.started == ["a0", "admin", "s2", "admin", "s3", "s1"]
    runner.started.clear()
    check.check("192.0.2.1", "a1", "wrong")
    check.check("192.0.2.2", "b1", "wrong")
    check.check("192.0.2.9", "admin", PASSWORD)  # failed once: an ordinary source now
    check.check("192.0.2.10", "clean", "wrong")
    while runner.pending:
        runner.finish_one()
    assert runner.started == ["a1", "clean", "b1", "admin"]


def test_at_most_threads_checks_run(users, clock):
    """No more than `threads` checks run at once, whatever the number of sources."""
    runner = ManualRunner()
    check = checker(users, clock, runner, threads=2)
    for i in range(8):
        check.check(f"192.0.2.{i + 1}", f"u{i}", "wrong")
    assert len(runner.pending) == 2
    runner.finish_one()
    assert len(runner.pending) == 2 and runner.started == ["u0", "u1", "u2"]


def test_per_source_queue_is_capped(users, clock):
    """Beyond `queue_per_source` waiting checks, a source's tries are refused at once, without bcrypt."""
    runner = ManualRunner()
    check = checker(users, clock, runner, threads=1, queue_per_source=3)
    waiting = [check.check("192.0.2.1", f"a{i}", "wrong") for i in range(4)]  # 1 running, 3 waiting
    refused = check.check("192.0.2.1", "admin", PASSWORD)
    assert refused.called and refused.result.reason == BUSY and refused.result.user is None
    assert not any(d.called for d in waiting)
    other = check.check("192.0.2.2", "admin", PASSWORD)
    while runner.pending:
        runner.finish_one()
    assert runner.started == ["a0", "admin", "a1", "a2", "a3"]  # the refused one never ran
    assert other.result.reason == OK


def test_queue_full_is_an_ordinary_failed_login(env):
    """Through the API, a try refused because its source's queue is full is SESSION_AUTHENTICATION_FAILED."""
    runner = ManualRunner()
    env.api.passwords = checker(env.api.users, env.clock, runner, threads=1, queue_per_source=2)
    client = Client("192.0.2.70")
    pending = [env.dispatcher.call("session.login_with_password", ["admin", PASSWORD], client) for _ in range(3)]
    assert not any(d.called for d in pending)
    with pytest.raises(XenAPIError) as info:
        settle(env.dispatcher.call("session.login_with_password", ["admin", PASSWORD], client), env.clock)
    assert info.value.description == [AUTH_FAILED, "admin", "Authentication failure"]
    while runner.pending:
        runner.finish_one()
    assert all(str(getattr(r, "value", r)).startswith("OpaqueRef:") for r in (settle(d, env.clock) for d in pending))


def test_checks_in_flight_cannot_overdraw_the_bucket(users, clock):
    """A source runs at most as many checks at once as it has tokens; once its failures use
    them up, what still waits is refused without bcrypt."""
    runner = ManualRunner()
    check = checker(users, clock, runner, threads=4, burst=3, queue_per_source=16)
    results = [check.check("192.0.2.1", f"a{i}", "wrong") for i in range(6)]
    assert runner.started == ["a0", "a1", "a2"]  # 3 tokens: 3 running, although 4 threads are free
    while runner.pending:
        runner.finish_one()
    assert [r.result.reason for r in results] == [FAILED] * 3 + [THROTTLED] * 3
    assert check.stats.checked == 3


def test_many_right_logins_at_once_from_one_source_all_succeed(users, clock):
    """A tool opening more sessions at once than the burst, from one address, is never throttled."""
    runner = ManualRunner()
    check = checker(users, clock, runner, threads=2, burst=3, queue_per_source=64)
    results = [check.check("192.0.2.1", "admin", PASSWORD) for _ in range(40)]
    while runner.pending:
        runner.finish_one()
    assert [r.result.reason for r in results] == [OK] * 40


def test_cancelled_waiting_check_never_runs(users, clock):
    """A caller that goes away while its check waits gets no bcrypt run and costs no token."""
    runner = ManualRunner()
    check = checker(users, clock, runner, threads=1, burst=2)
    first = check.check("192.0.2.1", "a0", "wrong")
    second = check.check("192.0.2.1", "a1", "wrong")
    second.addErrback(lambda f: None)
    second.cancel()
    runner.finish_one()
    assert runner.started == ["a0"] and first.result.reason == FAILED
    assert check.check("192.0.2.1", "a2", "wrong").called is False  # a token left: a check


def test_source_table_is_bounded(users, clock):
    """Full buckets are dropped; beyond max_sources the least recently seen idle source is evicted."""
    from xapid.runner import InlineRunner

    check = checker(users, clock, InlineRunner(), max_sources=3)
    for i in range(10):
        assert check.check(f"192.0.2.{i + 1}", "admin", PASSWORD).result.reason == OK
    assert check.tracked_sources == 0  # a success leaves the bucket full: forgotten
    for i in range(10):
        assert check.check(f"198.51.100.{i + 1}", "admin", "wrong").result.reason == FAILED
        assert check.tracked_sources <= 3
    # the newest sources are kept (evicted: the least recently seen), so they are still counted
    assert check.check("198.51.100.10", "admin", "wrong").result.reason == FAILED
    assert check.tracked_sources == 3
    clock.advance(BURST * INTERVAL)  # every bucket full again
    check.sweep()
    assert check.tracked_sources == 0


# -- a real daemon under a flood -----------------------------------------------------------------

ATTACK_SOURCES = 10  # 127.0.0.2 … 127.0.0.11
FLOOD_SECONDS = 3.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    """A real daemon (default login limits) whose users file also has "victim" with a bcrypt cost of
    10, as `xapid user add` makes it: each check of that user costs the CPU a real one does."""
    tmp = tmp_path_factory.mktemp("guarded")
    d = RealDaemon(tmp)
    victims = UsersFile(d.users, rounds=10)
    victims.load()
    victims.add("victim", "read-only", "the victim's password")
    yield d
    d.stop()


def checked_failures(d: RealDaemon, user: str) -> int:
    """Failed logins for *user* that reached bcrypt (each is logged; throttled tries are not)."""
    return len(re.findall(rf"failed (?:HTTP )?login for '{user}'", d.log.read_text()))


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def legit_login(d: RealDaemon) -> None:
    s = XenAPI.Session(d.url)
    s.login_with_password("admin", PASSWORD, "1.0", "legit")
    s.xenapi.session.logout()


def vdi_create(s: Any, sr: str) -> None:
    vdi = s.xenapi.VDI.create({"SR": sr, "virtual_size": str(1 << 20), "type": "user", "sharable": False,
                               "read_only": False, "other_config": {}, "name_label": "flood-disk"})
    s.xenapi.VDI.destroy(vdi)


def start_flood(d: RealDaemon, first: int, mode: str = "rpc", connections: int = 150,
                sources: int = ATTACK_SOURCES) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "flood.py"), "--port", str(d.port), "--first",
                             str(first), "--sources", str(sources), "--connections", str(connections),
                             "--seconds", str(FLOOD_SECONDS), "--user", "victim", "--mode", mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_flood_leaves_legit_login_and_vdi_create_responsive(guarded):
    """150 concurrent wrong logins from 10 other addresses: a legitimate SDK login and VDI.create take
    at most 1 s more than unloaded, and the tries reaching bcrypt stay within the buckets."""
    d = guarded
    s = XenAPI.Session(d.url)
    s.login_with_password("admin", PASSWORD, "1.0", "legit")
    sr = s.xenapi.pool.get_default_SR(s.xenapi.pool.get_all()[0])
    legit_login(d), vdi_create(s, sr)  # warm up
    base_login = statistics.median(timed(lambda: legit_login(d)) for _ in range(3))
    base_vdi = statistics.median(timed(lambda: vdi_create(s, sr)) for _ in range(3))
    checked_before = checked_failures(d, "victim")

    flood = start_flood(d, first=2)
    time.sleep(0.3)  # the flood at full force
    loaded_login, loaded_vdi = [], []
    while flood.poll() is None and len(loaded_login) < 5:
        loaded_login.append(timed(lambda: legit_login(d)))
        loaded_vdi.append(timed(lambda: vdi_create(s, sr)))
    out, _ = flood.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    checked = checked_failures(d, "victim") - checked_before

    print(f"login {base_login * 1000:.0f} ms -> max {max(loaded_login) * 1000:.0f} ms, VDI.create "
          f"{base_vdi * 1000:.0f} ms -> max {max(loaded_vdi) * 1000:.0f} ms; attackers: {report['answers']} answers "
          f"in {report['seconds']:.1f} s, {checked} reached bcrypt; {report['counts']}")
    assert len(loaded_login) >= 3
    assert max(loaded_login) <= base_login + 1.0
    assert max(loaded_vdi) <= base_vdi + 1.0
    assert report["counts"].get("success", 0) == 0 and report["answers"] >= 150
    # each source: its burst, plus one per interval of the flood (and of the time to start it)
    bound = ATTACK_SOURCES * (BURST + (report["seconds"] + 2) / INTERVAL + 1)
    assert checked <= bound
    assert report["answers"] > checked  # the rest were answered without bcrypt


def test_http_basic_flood_is_throttled_by_the_same_buckets(guarded):
    """HTTP Basic tries spend the RPC buckets: after a Basic flood, the sources' RPC logins with the right
    password fail too, while 127.0.0.1 logs in; the tries reaching bcrypt stay within the buckets."""
    d = guarded
    checked_before = checked_failures(d, "victim")
    flood = start_flood(d, first=20, mode="basic", connections=30, sources=3)  # 127.0.0.20 … 22
    out, _ = flood.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    checked = checked_failures(d, "victim") - checked_before
    assert set(report["counts"]) == {"failed"}  # all 401
    assert checked <= 3 * (BURST + (report["seconds"] + 2) / INTERVAL + 1)
    assert report["answers"] > checked  # the rest were answered without bcrypt

    def basic(source: str, user: str, password: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10, source_address=(source, 0))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        conn.request("GET", "/rrd_updates?start=0", headers={"Authorization": f"Basic {token}"})
        status = conn.getresponse().status
        conn.close()
        return status

    assert basic("127.0.0.20", "admin", PASSWORD) == 401  # throttled: right password, no check
    assert basic("127.0.0.1", "admin", PASSWORD) == 200
    transport = _SourceTransport("127.0.0.21")
    s = XenAPI.Session(d.url, transport=transport)
    with pytest.raises(XenAPI.Failure) as info:
        s.login_with_password("admin", PASSWORD)
    assert info.value.details == [AUTH_FAILED, "admin", "Authentication failure"]
    legit_login(d)


class _SourceTransport(XenAPI.xmlrpclib.Transport):
    """An XML-RPC transport whose connections leave from *source* (a 127.0.0.x address)."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def make_connection(self, host: Any) -> Any:
        conn = super().make_connection(host)
        conn.source_address = (self.source, 0)
        return conn

