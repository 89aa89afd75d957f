"""``[server] log_file``: the daemon logs to a file of its own, rotated by size, instead of stderr."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import XenAPI

from support import PASSWORD, ROOT, make_users

ENV = {**os.environ, "XAPID_BCRYPT_ROUNDS": "4", "PYTHONUNBUFFERED": "1"}


def _serve(tmp_path: Path, config: str) -> subprocess.Popen:
    if not (tmp_path / "users").exists():
        make_users(tmp_path / "users")
    (tmp_path / "xapid.conf").write_text(config)
    return subprocess.Popen([sys.executable, "-m", "xapid", "serve", "--config", str(tmp_path / "xapid.conf"),
                             "--state-dir", str(tmp_path / "state"), "--users", str(tmp_path / "users"),
                             "--listen", "tcp:0:interface=127.0.0.1"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_log_file_receives_the_log_and_rotates(tmp_path):
    log = tmp_path / "logs" / "xapid.log"
    log.parent.mkdir()
    proc = _serve(tmp_path, f"[server]\nlog_level = debug\nlog_file = {log}\nlog_file_bytes = 1024\n"
                 "[api]\nauth_failure_delay = 0\n")
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and (found := re.findall(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        assert oct(log.stat().st_mode & 0o777) == oct(0o600)
        url = f"http://127.0.0.1:{found[0]}/"
        for _ in range(30):  # each failed login writes a warning line: enough to rotate at 1 KiB
            session = XenAPI.Session(url)
            try:
                session.xenapi.login_with_password("nobody-" + "x" * 40, "wrong")
            except XenAPI.Failure:
                pass
        deadline = time.monotonic() + 20
        while not (tmp_path / "logs" / "xapid.log.1").exists():
            assert time.monotonic() < deadline, sorted(p.name for p in log.parent.iterdir())
            time.sleep(0.05)
        assert len(list(log.parent.glob("xapid.log.*"))) <= 5
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    stderr = proc.stderr.read()
    assert stderr == f"xapid: logging to {log}\n"  # nothing else on stderr: the log went to the file
    everything = "".join(p.read_text() for p in log.parent.iterdir())
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", everything, re.M)  # timestamped lines


def test_log_file_errors_are_one_line(tmp_path):
    relative = _serve(tmp_path, "[server]\nlog_file = xapid.log\n")
    assert relative.wait(30) == 2
    assert relative.stderr.read().strip().count("\n") == 0
    proc = _serve(tmp_path, f"[server]\nlog_file = {tmp_path}/missing/dir/xapid.log\n")
    assert proc.wait(30) == 2
    err = proc.stderr.read()
    assert err.startswith("xapid: cannot open [server] log_file") and err.count("\n") == 1, err
