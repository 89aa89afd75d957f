"""Issue 13, audit and files: the audit log (write calls, logins, failed logins, redaction, rotation,
GET /audit_log), INTERNAL_ERROR ids instead of exception text, and private file modes."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
from support import PASSWORD, ROOT, ApiEnv, RealDaemon, resolve, vm_record
from test_stats_http import basic, get
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from xapid.audit import AuditLog, parse_since
from xapid.errors import XenAPIError
from xapid.server import StartupError, _prepare_state_dir
from xapid.wire.http import Client, HttpRequest
from xapid.wire.resource import ApiHandler
from xapid.wire.values import Limits

INCIDENT = re.compile(r"^internal error, id ([0-9a-f]{8}); see the daemon log$")


def lines(env: ApiEnv) -> list[dict[str, Any]]:
    path = env.api.state_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def methods(env: ApiEnv) -> list[str]:
    return [line["method"] for line in lines(env)]


@pytest.fixture
def events():
    """Every event logged through twisted.logger while the test runs."""
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


# -- the audit log ------------------------------------------------------------------------------


def test_write_call_is_audited_with_who_where_what(env, admin):
    """A write call: time, user, role, originator, peer, method, args by name, outcome; no session ref."""
    client = Client("192.0.2.7")
    vm = resolve(env.dispatcher.call("VM.create", [admin.session, vm_record(name_label="audited")], client),
                 env.clock)
    resolve(env.dispatcher.call("VM.set_name_label", [admin.session, vm, "renamed"], client), env.clock)
    assert admin.fails("VM.set_name_label", "OpaqueRef:nonexistent", "x")[0] == "HANDLE_INVALID"
    create, rename, failed = [line for line in lines(env) if line["method"].startswith("VM.")]
    assert create["method"] == "VM.create" and create["outcome"] == "success"
    assert (create["user"], create["role"], create["peer"]) == ("admin", "pool-admin", "192.0.2.7")
    assert "originator" in create and create["args"]["args"]["name_label"] == "audited"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", create["time"])
    assert create["time"].startswith("2023-11-14T22:13:20")  # the injected clock, in UTC
    assert rename["args"] == {"self": vm, "value": "renamed"}
    assert failed["outcome"] == "HANDLE_INVALID" and failed["peer"] is None  # in-process: no peer
    text = (env.api.state_dir / "audit.log").read_text()
    assert admin.session not in text  # a session ref is a bearer token


def test_logins_and_failed_logins_are_audited_without_the_password(env):
    """Every login and failed login is a line; neither password appears anywhere in the file."""
    wrong = "wrong-horse-battery-staple"
    env.raw("session.login_with_password", ["reader", PASSWORD, "1.0", "xo-test"])
    with pytest.raises(XenAPIError) as info:
        env.raw("session.login_with_password", ["admin", wrong, "1.0", "xo-test"])
    assert info.value.code == "SESSION_AUTHENTICATION_FAILED"
    ok, failed = [line for line in lines(env) if line["method"] == "session.login_with_password"][-2:]
    assert (ok["user"], ok["role"], ok["originator"], ok["outcome"]) == ("reader", "read-only", "xo-test", "success")
    assert (failed["user"], failed["role"], failed["outcome"]) == ("admin", None, "SESSION_AUTHENTICATION_FAILED")
    assert failed["args"]["pwd"] == "(redacted)" and ok["args"]["pwd"] == "(redacted)"
    text = (env.api.state_dir / "audit.log").read_text()
    assert wrong not in text and PASSWORD not in text


def test_a_huge_login_name_or_originator_is_cut_in_the_line(env):
    """An unauthenticated caller's 100 000-character user name and originator (under the string
    bound) are cut to the argument bound in the failed-login line, not written whole."""
    huge = "u" * 100_000
    with pytest.raises(XenAPIError):
        env.raw("session.login_with_password", [huge, "wrong", "1.0", huge])
    failed = [line for line in lines(env) if line["method"] == "session.login_with_password"][-1]
    assert failed["user"].startswith("u" * 1024) and len(failed["user"]) < 1100
    assert failed["originator"].startswith("u" * 1024) and len(failed["originator"]) < 1100
    assert len((env.api.state_dir / "audit.log").read_text()) < 10_000


def test_reads_are_not_audited(env, admin):
    before = len(lines(env))
    vms = admin("VM.get_all")
    admin("VM.get_record", vms[0])
    admin("VM.get_all_records")
    admin("event.from", ["vm"], "", 0.0)
    assert len(lines(env)) == before


def test_secrets_in_maps_and_keys_are_redacted(env, admin):
    vm = admin("VM.create", vm_record(other_config={"db_password": "hunter2", "colour": "blue"}))
    admin("VM.add_to_other_config", vm, "root-secret", "swordfish")
    admin("VM.set_other_config", vm, {"Password": "opensesame", "note": "kept"})
    text = (env.api.state_dir / "audit.log").read_text()
    for secret in ("hunter2", "swordfish", "opensesame"):
        assert secret not in text
    assert "blue" in text and "kept" in text


def test_write_errors_never_fail_a_call_and_are_logged_once(env, admin, events):
    env.api.audit.close()
    env.api.audit.path = env.tmp_path / "not-a-file"
    env.api.audit.path.mkdir()
    admin("VM.create", vm_record())
    admin("VM.create", vm_record())
    errors = [e for e in events if "cannot write the audit log" in e.get("log_format", "")]
    assert len(errors) == 1


def test_rotation_by_size(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=2000, keep=3, clock=lambda: 0.0)
    for i in range(200):
        log.record(method="VM.create", user="admin", role="pool-admin", originator="", peer="::1",
                   args={"i": i}, outcome="success")
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    for p in tmp_path.iterdir():
        assert 0 < p.stat().st_size <= 2000
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    last = [json.loads(line) for line in path.read_text().splitlines()]
    assert last[-1]["args"] == {"i": 199}  # the newest lines are in the current file


def test_rotation_key_in_config():
    from xapid.config import ConfigError, parse_config

    assert parse_config("[limits]\naudit_log_bytes = 4096\n", "t").limits.audit_log_bytes == 4096
    with pytest.raises(ConfigError):
        parse_config("[limits]\naudit_log_bytes = 0\n", "t")
    assert "audit_log_bytes = 10485760" in (ROOT / "etc" / "xapid.conf").read_text()


def test_get_audit_log_is_pool_admin_only(env, admin):
    admin("VM.create", vm_record(name_label="seen-in-log"))
    reader = env.login("reader")
    ok = get(env, f"/audit_log?session_id={admin.session}")
    assert ok.status == 200 and b"seen-in-log" in ok.body
    assert dict(ok.headers)[b"Content-Type"].startswith(b"text/plain")
    assert all(json.loads(line)["method"] for line in ok.body.splitlines())
    assert get(env, "/audit_log", basic("admin", PASSWORD)).status == 200
    assert get(env, f"/audit_log?session_id={reader.session}").status == 403
    assert get(env, "/audit_log", basic("vmadmin", PASSWORD)).status == 403
    assert get(env, "/audit_log").status == 401
    assert get(env, "/audit_log?session_id=OpaqueRef:bogus").status == 401


def test_get_audit_log_since(env, admin):
    admin("VM.create", vm_record(name_label="early"))
    env.clock.advance(3600)
    admin("VM.create", vm_record(name_label="late"))
    since = "2023-11-14T23:00:00Z"  # between the two calls
    body = get(env, f"/audit_log?session_id={admin.session}&since={since}").body
    assert b"late" in body and b"early" not in body
    unix = get(env, f"/audit_log?session_id={admin.session}&since={1_700_000_000 + 1800}").body
    assert unix == body
    assert get(env, f"/audit_log?session_id={admin.session}&since=yesterday").status == 400
    assert parse_since("2023-11-14T23:00:00") == "2023-11-14T23:00:00.000Z"


def test_failed_http_basic_is_audited(env):
    wrong = "not-the-password-42"
    assert get(env, "/rrd_updates?start=0", basic("admin", wrong)).status == 401
    line = lines(env)[-1]
    assert line["method"] == "HTTP Basic GET /rrd_updates"
    assert (line["user"], line["outcome"]) == ("admin", "SESSION_AUTHENTICATION_FAILED")
    assert wrong not in (env.api.state_dir / "audit.log").read_text()


# -- INTERNAL_ERROR ids -------------------------------------------------------------------------


def _boom(*_: Any) -> Any:
    raise RuntimeError("leaky detail /etc/shadow")


def _incident(events: list[dict[str, Any]], incident: str) -> dict[str, Any]:
    found = [e for e in events if e.get("incident") == incident]
    assert len(found) == 1, "the log line repeats the id"
    return found[0]


def test_internal_error_carries_an_id_not_the_exception(env, admin, events):
    env.dispatcher.handlers["host.get_servertime"] = _boom
    description = admin.fails("host.get_servertime", env.api.host_ref)
    assert description[0] == "INTERNAL_ERROR" and len(description) == 2
    match = INCIDENT.match(description[1])
    assert match, description
    assert "leaky" not in description[1] and "RuntimeError" not in description[1]
    event = _incident(events, match.group(1))
    assert "leaky detail" in event["log_failure"].getTraceback()


def test_internal_error_from_an_async_handler_has_an_id(env, admin, events):
    async def slow_boom(*_: Any) -> Any:
        raise RuntimeError("leaky detail in a coroutine")

    env.dispatcher.handlers["VM.clean_shutdown"] = slow_boom
    vm = admin("VM.create", vm_record())
    description = admin.fails("VM.clean_shutdown", vm)
    match = INCIDENT.match(description[1])
    assert match and "leaky" not in description[1]
    _incident(events, match.group(1))
    task = admin("Async.VM.clean_shutdown", vm)  # in a task: its error_info names an id, not the text
    env.settle()
    assert admin("task.get_status", task) == "failure"
    info = admin("task.get_error_info", task)
    match = INCIDENT.match(info[1])
    assert info[0] == "INTERNAL_ERROR" and match, info
    _incident(events, match.group(1))
    assert [line["task"] for line in lines(env) if line["method"] == "Async.VM.clean_shutdown"] == [task]


def test_internal_error_at_the_wire_has_an_id(env, events):
    """A dispatcher failure that is no XenAPIError (the resource's last resort) gets an id too."""
    class Broken:
        def call(self, *_: Any) -> Deferred:
            d: Deferred = Deferred()
            d.errback(ValueError("leaky wire detail"))
            return d

    handler = ApiHandler(Broken(), Limits(1 << 20, 64, 10_000))
    body = b"<?xml version='1.0'?><methodCall><methodName>VM.get_all</methodName><params/></methodCall>"
    reply = handler(HttpRequest(b"POST", b"/", b"HTTP/1.1", {}, body))
    text = reply.body.decode()
    assert "INTERNAL_ERROR" in text and "leaky" not in text and "ValueError" not in text
    incident = re.search(r"internal error, id ([0-9a-f]{8})", text).group(1)
    _incident(events, incident)


# -- file modes ---------------------------------------------------------------------------------


def _modes(root: Path) -> list[str]:
    """Every path under *root* whose mode is not 0600 (files) or 0700 (directories)."""
    wrong = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top, name)
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            if stat.S_IMODE(mode) & ~want or stat.S_IMODE(mode) & 0o077:
                wrong.append(f"{p.relative_to(root)} {oct(stat.S_IMODE(mode))}")
    return wrong


def test_open_state_dir_is_made_private_on_start(tmp_path, clock):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    (state / "sr").mkdir()
    os.chmod(state / "sr", 0o755)
    old = state / "sr" / "disk.img"  # as an older xapid left them
    old.write_bytes(b"data")
    os.chmod(old, 0o644)
    ApiEnv(tmp_path, clock).api.database.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "sr").stat().st_mode) == 0o700
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_state_dir_that_cannot_be_made_private_is_refused(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)

    def refuse(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("xapid.server.os.chmod", refuse)
    with pytest.raises(StartupError) as info:
        _prepare_state_dir(state)
    message = str(info.value)
    assert str(state) in message and "0700" in message and "\n" not in message


def test_every_file_of_a_real_daemon_is_private(tmp_path):
    """After a start, calls that make a database, disk images, metrics and an audit log, and a
    clean stop: every file in the state dir is 0600 and every directory 0700."""
    d = RealDaemon(tmp_path)
    try:
        server = xmlrpc.client.ServerProxy(d.url, allow_none=True)
        session = server.session.login_with_password("admin", PASSWORD, "1.0", "modes-test")["Value"]
        server.session.login_with_password("admin", "wrong password", "1.0", "")
        pool = server.pool.get_all(session)["Value"][0]
        sr = server.pool.get_default_SR(session, pool)["Value"]
        vdi = server.VDI.create(session, {"SR": sr, "virtual_size": str(8 << 20), "type": "user", "sharable": False,
                                          "read_only": False, "other_config": {}, "name_label": "d",
                                          "name_description": ""})
        assert vdi["Status"] == "Success", vdi
        vm = server.VM.create(session, vm_record())["Value"]
        suspended = server.VM.start(session, vm, False, False)["Status"] == "Success" and \
            server.VM.suspend(session, vm)["Status"] == "Success"
    finally:
        assert d.stop() == 0
    audit_lines = [json.loads(line) for line in (d.state / "audit.log").read_text().splitlines()]
    assert {"session.login_with_password", "VDI.create", "VM.create"} <= {a["method"] for a in audit_lines}
    assert {a["peer"] for a in audit_lines} == {"127.0.0.1"}
    assert PASSWORD not in (d.state / "audit.log").read_text()
    assert stat.S_IMODE(d.state.stat().st_mode) == 0o700
    assert (d.state / "xapid.db").exists() and (d.state / "rrd.npz").exists() and any((d.state / "sr").iterdir())
    assert not suspended or any((d.state / "suspend").iterdir())
    assert _modes(d.state) == []


def test_quickstart_writes_the_password_private_from_the_first_byte(tmp_path):
    """Run quickstart's first-start block with stub tools under umask 022: the password file is
    0600 when created (a chmod stub records the mode it finds) and after."""
    script = (ROOT / "scripts" / "quickstart").read_text()
    block = re.search(r'^if \[ ! -s "\$dir/users" \]; then\n.*?^fi$', script, re.DOTALL | re.MULTILINE).group(0)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text("#!/bin/sh\necho generated-secret-123\n")
    (bin_dir / "xapid").write_text("#!/bin/sh\ncat > /dev/null\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    seen = tmp_path / "modes"
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "admin-password").write_text("stale\n")  # an older, world-readable file
    os.chmod(demo / "admin-password", 0o644)
    prelude = (f'umask 022\nset -euo pipefail\ndir={demo}\n'
               f'chmod() {{ stat -c %a "${{@: -1}}" >> {seen}; command chmod "$@"; }}\n')
    subprocess.run(["bash", "-c", prelude + block], cwd=tmp_path, check=True)
    password_file = demo / "admin-password"
    assert password_file.read_text() == "generated-secret-123\n"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    before_chmod = seen.read_text().split() if seen.exists() else []
    assert all(mode == "600" for mode in before_chmod), before_chmod

