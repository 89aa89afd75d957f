"""``xapid top`` and the progress bar in a real terminal: tmux runs the client (``new-session -x 160 -y 40``),
the test reads the screen (``capture-pane -p``) and presses keys (``send-keys``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from support import PASSWORD, ROOT
from test_client_cli import js, ok, run_client

@pytest.fixture(autouse=True)
def _tmux() -> None:
    """tmux runs top as a person would; without it the tests fail (never skip) saying what to install."""
    assert shutil.which("tmux"), "tmux is missing: apt-get install -y tmux (scripts/test installs it)"
GiB = 1 << 30


class Tmux:
    def __init__(self, daemon_url: str, home: str, command: list[str], password: str | None = PASSWORD):
        self.server = f"xapid-test-{os.getpid()}-{time.monotonic_ns()}"
        env = {"XAPID_URL": daemon_url, "XAPID_USER": "admin", "HOME": home,
               "TERM": "xterm-256color", "PYTHONPATH": str(ROOT)}
        if password is not None:
            env["XAPID_PASSWORD"] = password
        line = "env -u COLUMNS -u LINES -u XAPID_PASSWORD " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(
            [sys.executable, "-m", "xapid.client", *command])
        shell = f"cd {shlex.quote(str(ROOT))} && {line}; echo EXIT=$?; sleep 600"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "40", "-s", "t", shell, ";",
                  "set", "-g", "window-size", "manual", ";", "resize-window", "-t", "t", "-x", "160", "-y", "40")
        assert self.tmux("display", "-p", "-t", "t", "#{window_width}x#{window_height}").strip() == "160x40"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.server, *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "t").splitlines()

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def wait(self, predicate, timeout: float = 40) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.screen()
            if predicate(lines):
                return lines
            time.sleep(0.2)
        raise AssertionError("screen never matched:\n" + "\n".join(self.screen()))

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=30, check=False)


def vm_rows(lines: list[str]) -> list[str]:
    """The names of the VM rows, in screen order (the rows under the column headers)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
    names = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        names.append(re.split(r"\s{2,}", line.strip())[0])
    return names


def test_top_in_tmux_header_host_line_rows_and_resort(daemon, tmp_path):
    xc = lambda *a: run_client(daemon.url, *a, home=tmp_path)
    ok(xc("vm", "install", "Debian Bookworm 12", "alpha"))
    ok(xc("vm", "set", "alpha", "memory_dynamic_min=1GiB", "memory_dynamic_max=1GiB"))
    ok(xc("vm", "install", "Debian Bookworm 12", "bravo"))
    ok(xc("vm", "install", "Other install media", "halted-one"))
    ok(xc("vm", "start", "alpha"))
    ok(xc("vm", "start", "bravo"))
    running = sorted(r["name_label"] for r in js(xc("vm", "list", "--json")) if r["power_state"] == "Running")
    t = Tmux(daemon.url, str(tmp_path), ["top", "--sort", "name", "--interval", "1"])
    try:
        lines = t.wait(lambda s: s and s[0].startswith("xapid top") and any(
            line.startswith("bravo") and "2.0 GiB" in line for line in s) and any(
            line.startswith("alpha") and "1.0 GiB" in line for line in s) and re.search(r"cpu [\d.]+%", s[1]))
        assert "sorted by name" in lines[0]
        assert re.match(r"host xapid-sim: cpu [\d.]+% of 4 CPUs, mem [\d.]+ GiB used of 16\.0 GiB", lines[1]), lines[1]
        assert f"VMs {len(running)} running" in lines[1]
        assert lines[3].split()[:4] == ["NAME*", "UUID", "STATE", "VCPUS"]
        rows = vm_rows(lines)
        assert len(rows) == len(running) and "halted-one" not in rows
        assert rows == sorted(rows, key=str.lower) and rows[:2] == ["alpha", "bravo"]
        t.keys("m")
        lines = t.wait(lambda s: "sorted by mem" in s[0])
        assert "MEMORY*" in lines[3]
        assert vm_rows(lines)[0] == "bravo" and vm_rows(lines).index("alpha") > 0
        # a VM started meanwhile appears (events), without waiting for the next stats call
        ok(xc("vm", "install", "Debian Bookworm 12", "charlie"))
        ok(xc("vm", "start", "charlie"))
        lines = t.wait(lambda s: "charlie" in vm_rows(s))
        ok(xc("vm", "shutdown", "charlie", "--force"))
        t.wait(lambda s: "charlie" not in vm_rows(s))
        t.keys("q")
        t.wait(lambda s: any(line.startswith("EXIT=0") for line in s))
    finally:
        t.close()


def test_top_once_json(daemon, tmp_path):
    xc = lambda *a: run_client(daemon.url, *a, home=tmp_path)
    ok(xc("vm", "install", "Other install media", "once-vm"))
    ok(xc("vm", "start", "once-vm"))
    view = js(xc("top", "--once", "--json"))
    running = {r["uuid"] for r in js(xc("vm", "list", "--json")) if r["power_state"] == "Running"}
    assert {v["uuid"] for v in view["VMs"]} == running
    assert set(view["host"]) == {"uuid", "name_label", "cpus", "cpu_avg", "memory_total_kib", "memory_free_kib",
                                 "pif_rx", "pif_tx"}
    assert set(view["VMs"][0]) == {"uuid", "name_label", "power_state", "is_control_domain", "VCPUs_at_startup",
                                   "cpu_usage", "memory", "vbd_read", "vbd_write", "vif_rx", "vif_tx"}
    assert view["window"] == 30 and view["total_VMs"] >= len(running)
    text = ok(xc("top", "--once", "--sort", "name"))
    assert text.startswith("xapid top") and len(vm_rows(text.splitlines())) == len(running)
    assert "top needs a terminal" in xc("top").stderr


def test_clone_progress_bar_and_ctrl_c_cancels(daemon, tmp_path):
    """``vm clone`` of a VM with an 8-GiB disk (a few seconds of copying): the bar is drawn from the task's progress; Ctrl-C cancels
    the task, which undoes its copies: no new VM, no new VDI; exit 130."""
    xc = lambda *a: run_client(daemon.url, *a, home=tmp_path)
    vm = js(xc("vm", "install", "Other install media", "bigvm", "--json"))
    vm_ref = js(xc("call", "VM.get_by_uuid", vm["uuid"]))
    sr = js(xc("call", "pool.get_default_SR", js(xc("call", "pool.get_all"))[0]))
    vdi = js(xc("call", "VDI.create", json.dumps({
        "name_label": "big disk", "name_description": "", "SR": sr, "virtual_size": str(8 * GiB), "type": "user",
        "sharable": False, "read_only": False, "other_config": {}})))
    ok(xc("call", "VBD.create", json.dumps({
        "VM": vm_ref, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
        "unpluggable": True, "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})))
    vdis_before = len(js(xc("vdi", "list", "--json")))
    t = Tmux(daemon.url, str(tmp_path), ["vm", "clone", "bigvm", "bigclone"])
    try:
        bar = re.compile(r"clone bigvm \[#*-+\]\s+\d+\.\d%")
        lines = t.wait(lambda s: any(bar.search(line) for line in s))
        assert any("10.0%" in line for line in lines if bar.search(line))
        t.keys("C-c")
        lines = t.wait(lambda s: any(line.startswith("EXIT=") for line in s), timeout=120)
        text = "\n".join(lines)
        assert "cancelling the task" in text and "xapid: VM.clone: cancelled" in text and "EXIT=130" in text
    finally:
        t.close()
    assert [r for r in js(xc("vm", "list", "--json")) if r["name_label"] == "bigclone"] == []
    deadline = time.monotonic() + 30
    while len(js(xc("vdi", "list", "--json"))) != vdis_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(js(xc("vdi", "list", "--json"))) == vdis_before


def test_password_prompt_in_a_terminal(daemon, tmp_path):
    """Without XAPID_PASSWORD or a profile, the client asks for the password in the terminal (not echoed), then
    runs the verb; a wrong one is a one-line failure with exit 1."""
    for typed, expect in ((PASSWORD, "EXIT=0"), ("not-the-password", "EXIT=1")):
        t = Tmux(daemon.url, str(tmp_path), ["host", "list"], password=None)
        try:
            t.wait(lambda s: any(line.startswith("Password for admin at ") for line in s))
            t.keys("-l", typed)
            t.keys("Enter")
            lines = t.wait(lambda s: any(line.startswith("EXIT=") for line in s))
            text = "\n".join(lines)
            assert typed not in text  # never echoed
            assert expect in text, text
            if expect == "EXIT=0":
                assert any(line.startswith("NAME") or line.startswith("UUID") for line in lines), text
            else:
                assert "xapid: SESSION_AUTHENTICATION_FAILED" in text, text
        finally:
            t.close()
