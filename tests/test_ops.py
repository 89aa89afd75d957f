"""Operating xapid: check-config, db backup/restore, state dir format migration, SIGHUP reload,
SIGTERM draining running tasks."""

from __future__ import annotations

import http.client
import os
import signal
import sqlite3
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest
import XenAPI

from support import PASSWORD, ROOT, RealDaemon, vm_record
from xapid import statedir

ENV = {**os.environ, "XAPID_BCRYPT_ROUNDS": "4"}
MiB = 1 << 20


def xapid(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xapid", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=ENV)


def session(d: RealDaemon) -> XenAPI.Session:
    s = XenAPI.Session(d.url)
    s.login_with_password("admin", PASSWORD)
    return s


def names(d: RealDaemon) -> set[str]:
    s = session(d)
    try:
        return {r["name_label"] for r in s.xenapi.VM.get_all_records().values()
                if not r["is_control_domain"] and not r["is_a_template"]}
    finally:
        s.xenapi.session.logout()


def wait_log(d: RealDaemon, text: str, count: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while d.log.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged: {d.log.read_text()}"
        time.sleep(0.05)


# -- check-config ---------------------------------------------------------------------------------


def test_check_config(tmp_path):
    """check-config exits 0 on a good file (the shipped one), 2 with one line on a bad one; starts nothing."""
    ok = xapid("check-config", "--config", str(ROOT / "etc" / "xapid.conf"))
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok
    bad = tmp_path / "bad.conf"
    bad.write_text("[limits]\nmax_depth = deep\n")
    result = xapid("check-config", "--config", str(bad))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result
    assert "[limits] max_depth" in result.stderr
    endpoint = tmp_path / "endpoint.conf"
    endpoint.write_text("[server]\nlisten = nonsense:1\n")
    result = xapid("check-config", "--config", str(endpoint))
    assert result.returncode == 2 and "bad listen address" in result.stderr, result
    passed = tmp_path / "passed.conf"  # a socket systemd passes exists only in the service
    passed.write_text(f"[server]\nlisten = systemd:domain=INET:name=api\nstate_dir = {tmp_path / 'state'}\n")
    assert xapid("check-config", "--config", str(passed)).returncode == 0
    assert not (tmp_path / "state").exists()


# -- backup and restore ---------------------------------------------------------------------------


def test_db_backup_online_and_restore(tmp_path):
    """A backup taken while the daemon runs and writes holds every acknowledged write; restore is
    refused while the daemon runs, and afterwards brings back exactly the backed-up objects."""
    d = RealDaemon(tmp_path)
    backup = tmp_path / "backup.db"
    try:
        s = session(d)
        s.xenapi.VM.create(vm_record(name_label="before-backup"))
        result = xapid("db", "backup", str(backup), "--state-dir", str(d.state))
        assert result.returncode == 0, result
        s.xenapi.VM.create(vm_record(name_label="after-backup"))
        refused = xapid("db", "restore", str(backup), "--state-dir", str(d.state))
        assert refused.returncode == 2 and "is running" in refused.stderr, refused
        assert names(d) == {"before-backup", "after-backup"}
    finally:
        assert d.stop() == 0
    assert oct(backup.stat().st_mode & 0o777) == "0o600"
    result = xapid("db", "restore", str(backup), "--state-dir", str(d.state))
    assert result.returncode == 0, result
    d.start()
    try:
        assert names(d) == {"before-backup"}
    finally:
        d.stop()


def test_db_restore_refuses_what_is_not_a_database(tmp_path):
    junk = tmp_path / "junk"
    junk.write_text("not sqlite at all" * 100)
    result = xapid("db", "restore", str(junk), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2 and "xapid: " in result.stderr, result
    assert not (tmp_path / "state" / "xapid.db").exists()


def test_second_daemon_on_same_state_dir_refused(tmp_path):
    d = RealDaemon(tmp_path)
    try:
        result = xapid("serve", "--state-dir", str(d.state), "--users", str(d.users), "--listen",
                       "tcp:0:interface=127.0.0.1")
        assert result.returncode == 2 and "another xapid" in result.stderr, result
    finally:
        d.stop()


# -- state dir format -----------------------------------------------------------------------------


def _set_format(state: Path, version: int) -> None:
    conn = sqlite3.connect(str(state / "xapid.db"))
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()


def _format(state: Path) -> int:
    conn = sqlite3.connect(str(state / "xapid.db"))
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_todays_state_dir_is_stamped(tmp_path):
    d = RealDaemon(tmp_path)
    d.stop()
    assert _format(d.state) == statedir.FORMAT


def test_older_format_migrates_with_a_backup_first(tmp_path):
    """The fixture: a state dir written by today's code, marked as format 1 (what every xapid before the
    format was recorded wrote: user_version 0).  It is migrated at start (a backup copy first) and
    serves the same objects, with the same refs and uuids."""
    d = RealDaemon(tmp_path)
    try:
        s = session(d)
        s.xenapi.VM.create(vm_record(name_label="kept"))
        before = {ref: rec["uuid"] for ref, rec in s.xenapi.VM.get_all_records().items()}
    finally:
        d.stop()
    _set_format(d.state, 0)
    d.start()
    try:
        s = session(d)
        assert {ref: rec["uuid"] for ref, rec in s.xenapi.VM.get_all_records().items()} == before
    finally:
        d.stop()
    assert _format(d.state) == statedir.FORMAT
    backups = list((d.state / statedir.BACKUP_DIR).iterdir())
    assert len(backups) == 1 and backups[0].name.startswith("xapid.db.format1."), backups
    conn = sqlite3.connect(str(backups[0]))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0  # the copy is of the old file
    assert conn.execute("SELECT count(*) FROM objects").fetchone()[0] > 0
    conn.close()
    assert "migrated from format 1 to" in d.log.read_text()
    assert not list(d.state.glob("*.migrating"))


def test_newer_format_refused(tmp_path):
    d = RealDaemon(tmp_path)
    d.stop()
    _set_format(d.state, statedir.FORMAT + 1)
    result = xapid("serve", "--state-dir", str(d.state), "--users", str(d.users), "--listen",
                   "tcp:0:interface=127.0.0.1")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("xapid: ") and f"format {statedir.FORMAT + 1}, newer" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert _format(d.state) == statedir.FORMAT + 1  # untouched


# -- SIGHUP ---------------------------------------------------------------------------------------


def _call(conn: http.client.HTTPConnection, method: str, *params) -> dict:
    body = xmlrpc.client.dumps(params, method)
    conn.request("POST", "/", body, {"Content-Type": "text/xml"})
    response = conn.getresponse()
    return xmlrpc.client.loads(response.read())[0][0]


def test_sighup_changes_log_level_and_a_limit_without_dropping_connections(tmp_path):
    d = RealDaemon(tmp_path, config="[limits]\nmax_string_bytes = 1000\n")
    config = Path(d.args[d.args.index("--config") + 1])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        ref = _call(conn, "session.login_with_password", "admin", PASSWORD)["Value"]
        sock = conn.sock
        assert _call(conn, "VM.get_all_records_where", ref, "true")["Status"] == "Success"
        label = "x" * 500
        assert _call(conn, "VM.create", ref, vm_record(name_label=label))["Status"] == "Success"
        config.write_text(config.read_text().replace("max_string_bytes = 1000", "max_string_bytes = 100")
                          .replace("threads = 4", "threads = 4\nlog_level = debug\nmax_clients = 4000"))
        d.proc.send_signal(signal.SIGHUP)
        wait_log(d, "reload: done")
        reply = _call(conn, "VM.create", ref, vm_record(name_label=label))
        assert reply["Status"] == "Failure" and reply["ErrorDescription"][0] == "INVALID_VALUE", reply
        assert conn.sock is sock  # the same connection, kept open through the reload
        text = d.log.read_text()
        assert "reload: [limits] max_string_bytes = 100" in text and "reload: [server] log_level = debug" in text
        assert "[server] max_clients changed" in text and "next restart" in text
        assert _call(conn, "VM.get_all", ref)["Status"] == "Success"
        conn.close()
    finally:
        assert d.stop() == 0


def test_sighup_with_a_broken_config_keeps_running(tmp_path):
    d = RealDaemon(tmp_path)
    config = Path(d.args[d.args.index("--config") + 1])
    try:
        config.write_text(config.read_text() + "[limits]\nmax_depth = deep\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_log(d, "the running configuration is kept")
        assert names(d) == set()
    finally:
        assert d.stop() == 0


# -- SIGTERM drains -------------------------------------------------------------------------------


def _vm_with_disks(s: XenAPI.Session, count: int, size: int) -> str:
    x = s.xenapi
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vm = x.VM.create(vm_record(name_label="source"))
    for _ in range(count):
        vdi = x.VDI.create({"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False,
                            "read_only": False, "other_config": {}, "name_label": "disk"})
        x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "autodetect", "bootable": False, "mode": "RW",
                      "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                      "qos_algorithm_params": {}})
    return vm


def _check_nothing_half_done(d: RealDaemon, disks: int, strays: bool = False) -> set[str]:
    """After a restart: no VM in an operation; the clone, if there, has all its disks; no stray VDI
    of the clone (unless *strays*); returns the VM names."""
    s = session(d)
    x = s.xenapi
    vms = {ref: r for ref, r in x.VM.get_all_records().items()
           if not r["is_control_domain"] and not r["is_a_template"]}
    assert all(not r["current_operations"] for r in vms.values())
    clones = [ref for ref, r in vms.items() if r["name_label"] == "clone"]
    in_vms = {x.VBD.get_VDI(v) for r in vms.values() for v in r["VBDs"]}
    user_vdis = {ref for ref, r in x.VDI.get_all_records().items() if r["type"] == "user"}
    if clones:
        assert len(vms[clones[0]]["VBDs"]) == disks
    if not strays:
        assert user_vdis == in_vms, "a VDI copied by an unfinished clone was left behind"
    s.xenapi.session.logout()
    return {r["name_label"] for r in vms.values()}


def test_sigterm_lets_a_running_clone_finish(tmp_path):
    """SIGTERM during Async.VM.clone: no new connection is accepted, the clone finishes (within
    [api] shutdown_timeout), exit 0; after a restart the clone is there, whole."""
    d = RealDaemon(tmp_path)
    try:
        s = session(d)
        vm = _vm_with_disks(s, 3, 512 * MiB)
        task = s.xenapi.Async.VM.clone(vm, "clone")
        time.sleep(0.05)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
        text = d.log.read_text()
    finally:
        d.stop()
    assert task.startswith("OpaqueRef:")
    if "waiting up to" in text:  # the clone was still running at SIGTERM
        assert "cancelling" not in text
    d.start()
    try:
        assert _check_nothing_half_done(d, 3) == {"source", "clone"}
    finally:
        d.stop()


def test_sigterm_cancels_what_outlasts_shutdown_timeout(tmp_path):
    """With a short [api] shutdown_timeout the clone is cancelled instead: exit 0, and after a restart
    no VM is stuck in an operation, the clone is whole or absent, and no disk it copied (or was
    copying) is left behind."""
    _cancelled_clone(tmp_path, strays=False)


def _cancelled_clone(tmp_path: Path, strays: bool) -> None:
    d = RealDaemon(tmp_path)
    config = Path(d.args[d.args.index("--config") + 1])
    d.stop()
    config.write_text(config.read_text().replace("[api]\n", "[api]\nshutdown_timeout = 0.2\n"))
    d.start()
    try:
        s = session(d)
        vm = _vm_with_disks(s, 4, 1024 * MiB)
        s.xenapi.Async.VM.clone(vm, "clone")
        time.sleep(0.3)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
    finally:
        d.stop()
    text = d.log.read_text()
    d.start()
    try:
        _check_nothing_half_done(d, 4, strays)
    finally:
        d.stop()
    assert "Traceback" not in text, text


def test_task_cancel_of_a_clone_undoes_its_copies(tmp_path):
    """task.cancel during Async.VM.clone: the task ends cancelled (it used to end in success), and
    the disks it had copied, or was copying, are gone."""
    d = RealDaemon(tmp_path)
    try:
        s = session(d)
        vm = _vm_with_disks(s, 4, 1024 * MiB)
        task = s.xenapi.Async.VM.clone(vm, "clone")
        time.sleep(0.1)
        s.xenapi.task.cancel(task)
        deadline = time.monotonic() + 60
        while s.xenapi.task.get_status(task) in ("pending", "cancelling") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.xenapi.task.get_status(task) == "cancelled"
        time.sleep(0.5)  # a copy still running in its thread is deleted once it ends
        assert _check_nothing_half_done(d, 4) == {"source"}
        s.xenapi.session.logout()
    finally:
        d.stop()
