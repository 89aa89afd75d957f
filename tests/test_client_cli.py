"""The command-line client (``python -m xapid.client``, issue 19) against a real daemon on the sim:
every verb through the real entry point in a subprocess, JSON checked, tables checked for alignment,
errors one line with exit 1, usage exit 2; profiles, password files, TLS pinning, the UNIX socket."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import PASSWORD, ROOT, RealDaemon


def run_client(daemon_url: str | None, *args: str, env: dict[str, str] | None = None, home: Path | None = None,
               user: str | None = "admin", password: str | None = PASSWORD, timeout: float = 120,
               ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("XAPID_")}
    if daemon_url:
        base["XAPID_URL"] = daemon_url
    if user is not None:
        base["XAPID_USER"] = user
    if password is not None:
        base["XAPID_PASSWORD"] = password
    if home is not None:
        base["HOME"] = str(home)
        base.pop("XDG_CONFIG_HOME", None)
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "xapid.client", *args], capture_output=True, text=True, cwd=ROOT,
                          env=base, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def xc(daemon, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")

    def call(*args: str, **kw):
        kw.setdefault("home", home)
        return run_client(daemon.url, *args, **kw)
    return call


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def js(result: subprocess.CompletedProcess[str]):
    return json.loads(ok(result))


def one_line_failure(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xapid: "), result.stderr
    return lines[0]


def assert_aligned(text: str) -> list[list[str]]:
    """The columns are the spans between runs of at least two positions blank on every line; there are as
    many as header cells, and in each column every cell starts where the column starts (left-aligned) or
    ends where it ends (right-aligned): nothing straddles a column. Returns the cells, row by row."""
    lines = text.rstrip("\n").split("\n")
    width = max(len(line) for line in lines)
    padded = [line.ljust(width) for line in lines]
    blank = [all(line[i] == " " for line in padded) for i in range(width)]
    spans, i = [], 0
    while i < width:
        if blank[i]:
            i += 1
            continue
        j = i
        while j < width and not (blank[j] and (j + 1 >= width or blank[j + 1])):
            j += 1
        spans.append((i, j))
        i = j
    headers = re.split(r" {2,}", lines[0].strip())
    assert len(spans) == len(headers), (spans, headers, text)
    rows = []
    for line in padded:
        cells = []
        for a, b in spans:
            cell = line[a:b]
            assert cell.strip() == "" or not cell.startswith(" ") or not cell.endswith(" "), (line, a, b)
            cells.append(cell.strip())
        rows.append(cells)
    return rows


# -- VM verbs -----------------------------------------------------------------------------------


def test_vm_lifecycle_every_verb_json(xc):
    """install, show, start, suspend, resume, reboot, shutdown, snapshot, revert, clone, set, destroy."""
    vm = js(xc("vm", "install", "Debian Bookworm 12", "cli-vm1", "--json"))
    assert vm["name_label"] == "cli-vm1" and vm["power_state"] == "Halted" and not vm["is_a_template"]
    assert len(vm["VBDs"]) == 1 and "disks" not in vm["other_config"]
    uuid = vm["uuid"]
    assert js(xc("vm", "show", uuid[:8], "--json"))["uuid"] == uuid  # a uuid prefix
    assert js(xc("vm", "show", "cli-vm1", "--json"))["uuid"] == uuid  # a name
    assert js(xc("vm", "start", "cli-vm1", "--json"))["power_state"] == "Running"
    assert js(xc("vm", "suspend", uuid, "--json"))["power_state"] == "Suspended"
    assert js(xc("vm", "resume", uuid, "--json"))["power_state"] == "Running"
    assert js(xc("vm", "reboot", uuid, "--force", "--json"))["power_state"] == "Running"
    assert js(xc("vm", "shutdown", uuid, "--force", "--json"))["power_state"] == "Halted"
    snap = js(xc("vm", "snapshot", "cli-vm1", "cli-snap1", "--json"))
    assert snap["is_a_snapshot"] and snap["name_label"] == "cli-snap1"
    assert js(xc("vm", "list", "--snapshots", "--json"))[0]["uuid"] == snap["uuid"]
    xc("vm", "set", "cli-vm1", "name_description=changed")
    reverted = js(xc("vm", "revert", "cli-snap1", "--json"))
    assert reverted["uuid"] == uuid and reverted["name_description"] == ""
    clone = js(xc("vm", "clone", "cli-vm1", "cli-vm2", "--json"))
    assert clone["name_label"] == "cli-vm2" and clone["uuid"] != uuid
    changed = js(xc("vm", "set", "cli-vm2", "name_description=two words", "VCPUs_max=2", "memory_static_max=3GiB",
                    "other_config:owner=ops", "--json"))
    assert changed["name_description"] == "two words" and changed["VCPUs_max"] == "2"
    assert changed["memory_static_max"] == str(3 << 30) and changed["other_config"]["owner"] == "ops"
    assert ok(xc("vm", "destroy", "cli-vm2", "--quiet")) == ""
    assert ok(xc("vm", "destroy", "cli-snap1", "--snapshot", "-q")) == ""
    listed = js(xc("vm", "list", "--json"))
    assert [r["name_label"] for r in listed if not r["is_control_domain"]] == ["cli-vm1"]
    assert all(set(r) >= {"uuid", "name_label", "power_state", "VBDs", "other_config"} for r in listed)
    assert ok(xc("vm", "list", "-q")).split() == [r["uuid"] for r in listed]  # the same order
    assert "cli-vm1" in [r["name_label"] for r in js(xc("vm", "list", "--all", "--json"))]
    templates = js(xc("vm", "list", "--templates", "--json"))
    assert templates and all(r["is_a_template"] for r in templates)


def test_vm_list_table_is_aligned(xc):
    xc("vm", "install", "Debian Bookworm 12", "a name with spaces")
    xc("vm", "install", "Other install media", "x")
    rows = assert_aligned(ok(xc("vm", "list")))
    assert rows[0] == ["UUID", "NAME", "STATE", "VCPUS", "MEMORY", "HOST"]
    names = [r[1] for r in rows[1:]]
    assert "a name with spaces" in names and "x" in names
    by_name = {r[1]: r for r in rows[1:]}
    assert by_name["x"][2] == "Halted" and by_name["x"][4] == "256.0 MiB"
    text = ok(xc("vm", "list")).splitlines()
    memory_end = len(text[0].split("  HOST")[0])  # right-aligned column: every cell ends under its header
    assert all(line[:memory_end].endswith(("MEMORY", "MiB", "GiB")) for line in text)


@pytest.mark.parametrize("noun,header", [
    ("vdi", ["UUID", "NAME", "SR", "SIZE", "USED", "TYPE", "READ-ONLY"]),
    ("vbd", ["UUID", "VM", "DEVICE", "VDI", "TYPE", "MODE", "ATTACHED"]),
    ("vif", ["UUID", "VM", "DEVICE", "NETWORK", "MAC", "ATTACHED"]),
    ("sr", ["UUID", "NAME", "TYPE", "SIZE", "USED", "SHARED"]),
    ("network", ["UUID", "NAME", "BRIDGE", "MTU"]),
    ("host", ["UUID", "NAME", "ADDRESS", "ENABLED", "API"]),
    ("task", ["UUID", "NAME", "STATUS", "PROGRESS", "CREATED"]),
])
def test_noun_list_and_show(xc, noun, header):
    """``NOUN list`` (table, --json, -q) and ``NOUN show`` by uuid and by uuid prefix."""
    if noun in ("vdi", "vbd"):
        xc("vm", "install", "Debian Bookworm 12", f"for-{noun}")
    if noun == "vif":
        net = js(xc("network", "list", "--json"))[0]
        vm = js(xc("vm", "install", "Other install media", "for-vif", "--json"))
        ok(xc("call", "VIF.create", json.dumps({
            "device": "0", "network": xc("call", "network.get_by_uuid", net["uuid"]).stdout.strip().strip('"'),
            "VM": xc("call", "VM.get_by_uuid", vm["uuid"]).stdout.strip().strip('"'), "MAC": "", "MTU": "1500",
            "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})))
    rows = assert_aligned(ok(xc(noun, "list")))
    if noun == "task":  # a session's tasks go with it: a new client process sees none of its own
        assert rows == [header] and js(xc("task", "list", "--json")) == []
        return
    assert rows[0] == header and len(rows) > 1
    records = js(xc(noun, "list", "--json"))
    assert len(records) == len(rows) - 1 and all("uuid" in r for r in records)
    assert sorted(ok(xc(noun, "list", "-q")).split()) == sorted(r["uuid"] for r in records)
    first = records[0]
    assert js(xc(noun, "show", first["uuid"], "--json")) == {**first, **{k: v for k, v in js(
        xc(noun, "show", first["uuid"], "--json")).items() if k in ("progress", "status", "physical_utilisation",
                                                                        "current_operations", "allowed_operations")}}
    shown = ok(xc(noun, "show", first["uuid"][:13]))
    assert re.search(rf"^\s*uuid: {first['uuid']}$", shown, re.MULTILINE)


# -- errors and usage ----------------------------------------------------------------------------


def test_xenapi_failure_is_one_line_exit_1(xc):
    xc("vm", "install", "Other install media", "err-vm")
    xc("vm", "start", "err-vm")
    line = one_line_failure(xc("vm", "start", "err-vm"))
    assert re.fullmatch(r"xapid: VM_BAD_POWER_STATE OpaqueRef:\S+ halted running", line), line
    line = one_line_failure(xc("call", "VM.get_record", "OpaqueRef:nope"))
    assert line == "xapid: HANDLE_INVALID VM OpaqueRef:nope"
    assert one_line_failure(xc("vm", "show", "no-such-vm")) == "xapid: no VM matches 'no-such-vm'"
    xc("vm", "install", "Other install media", "twin")
    xc("vm", "install", "Other install media", "twin")
    assert "is ambiguous" in one_line_failure(xc("vm", "show", "twin"))
    assert one_line_failure(xc("vm", "list", password="wrong")).startswith(
        "xapid: SESSION_AUTHENTICATION_FAILED admin")
    assert one_line_failure(xc("vm", "list", env={"XAPID_URL": "http://127.0.0.1:1/"})).startswith(
        "xapid: cannot reach the host")


@pytest.mark.parametrize("args", [[], ["vm"], ["vm", "frob"], ["vm", "start"], ["top", "--sort", "x"],
                                  ["vm", "set", "x", "novalue"]])
def test_usage_errors_exit_2(xc, args):
    result = xc(*args)
    assert result.returncode == 2 and result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1 or result.stderr.startswith("usage"), result.stderr


def test_help_exit_0(xc):
    out = ok(xc("--help"))
    assert "vm" in out and "top" in out and "events" in out


# -- connection -------------------------------------------------------------------------------


def test_profile_file_password_file_and_mode(daemon, tmp_path):
    home = tmp_path / "home"
    cfg = home / ".config" / "xapid"
    cfg.mkdir(parents=True)
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD + "\n")
    profile = cfg / "client.toml"
    profile.write_text(f'default = "lab"\n[profiles.lab]\nurl = "{daemon.url}"\nuser = "reader"\n'
                       f'password_file = "{pwfile}"\n[profiles.admin]\nurl = "{daemon.url}"\nuser = "admin"\n'
                       f'password = "{PASSWORD}"\n')
    profile.chmod(0o644)
    line = one_line_failure(run_client(None, "vm", "list", home=home, user=None, password=None), 2)
    assert "mode 0644" in line and "chmod 600" in line
    profile.chmod(0o600)
    assert ok(run_client(None, "host", "list", "-q", home=home, user=None, password=None)).strip()
    # the reader may read but not act: a Xen-API failure, one line
    assert "RBAC_PERMISSION_DENIED" in one_line_failure(
        run_client(None, "vm", "install", "Other install media", "nope", home=home, user=None, password=None))
    assert ok(run_client(None, "--profile", "admin", "vm", "list", "-q", home=home, user=None, password=None))
    # flags beat the profile; --password-file beats everything
    assert ok(run_client(None, "vm", "list", "--user", "admin", "--password-file", str(pwfile), home=home,
                         user=None, password=None))
    # no password anywhere and no terminal: one line, exit 2
    assert "no password" in one_line_failure(run_client(daemon.url, "vm", "list", home=tmp_path, password=None), 2)
    assert "no profile 'gone'" in one_line_failure(
        run_client(None, "--profile", "gone", "vm", "list", home=home, user=None, password=None), 2)


def _ssl_port(d: RealDaemon) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(ssl:", d.log.read_text())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(d.log.read_text())


def test_tls_fingerprint_pinning(tmp_path):
    d = RealDaemon(tmp_path / "d", ["--listen", "ssl:0:interface=127.0.0.1"])
    try:
        port = _ssl_port(d)
        url = f"https://127.0.0.1:{port}/"
        pem = ssl.get_server_certificate(("127.0.0.1", port))
        real = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
        real = ":".join(real[i:i + 2] for i in range(0, 64, 2))
        home = tmp_path / "home"
        first = run_client(url, "host", "list", "-q", home=home)
        assert first.returncode == 0 and f"remembering its certificate's SHA-256 fingerprint {real}" in first.stderr
        known = home / ".config" / "xapid" / "known_hosts"
        assert known.read_text() == f"default {url} {real}\n" and (known.stat().st_mode & 0o777) == 0o600
        again = run_client(url, "host", "list", "-q", home=home)
        assert again.returncode == 0 and again.stderr == ""
        wrong = "AA:" * 31 + "AA"
        line = one_line_failure(run_client(url, "host", "list", "--fingerprint", wrong, home=home))
        assert f"fingerprint {real} is not the expected {wrong}" in line
        # a remembered fingerprint that no longer matches (the certificate replaced): refused
        known.write_text(f"default {url} {wrong}\n")
        known.chmod(0o600)
        assert "refusing to connect" in one_line_failure(run_client(url, "host", "list", home=home))
        assert ok(run_client(url, "host", "list", "-q", "--fingerprint", real.lower(), home=home)).strip()
        assert known.read_text() == f"default {url} {real}\n"
        assert one_line_failure(run_client(url, "host", "list", "--fingerprint", "zz", home=home), 2)
    finally:
        d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the local superuser needs uid 0")
def test_unix_socket_as_root_needs_no_credentials(tmp_path):
    sock = tmp_path / "api_sock"  # an underscore: the SDK's own connection would turn it into a /
    d = RealDaemon(tmp_path / "d", ["--listen", f"unix:{sock}:mode=600"])
    try:
        assert js(run_client(str(sock), "call", "session.get_is_local_superuser", "@session", user=None,
                             password=None, home=tmp_path)) is True
        assert js(run_client(str(sock), "host", "list", "--json", user=None, password=None, home=tmp_path))
        assert ok(run_client(f"unix:{sock}", "vm", "list", "-q", user="admin", home=tmp_path)).strip()
    finally:
        d.stop()


# -- events and raw calls -------------------------------------------------------------------------


def test_events_stream_json(xc, daemon):
    proc = subprocess.Popen([sys.executable, "-m", "xapid.client", "events", "--class", "vm", "--count", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "XAPID_URL": daemon.url, "XAPID_USER": "admin",
                                 "XAPID_PASSWORD": PASSWORD})
    try:
        import time
        time.sleep(2)
        xc("vm", "install", "Other install media", "evented")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 2 and events[0]["class"] == "vm" and events[0]["operation"] == "add"
    assert {"id", "class", "operation", "ref", "snapshot"} <= set(events[0])
    assert any(e["snapshot"].get("name_label") == "evented" for e in events)


def test_call_raw_json_arguments(xc):
    refs = js(xc("call", "VM.get_by_name_label", "Debian Bookworm 12"))
    assert len(refs) == 1 and refs[0].startswith("OpaqueRef:")
    assert js(xc("call", "VM.get_is_a_template", refs[0])) is True
    assert js(xc("call", "VM.get_all_records_where", '"field \\"name_label\\" = \\"Debian Bookworm 12\\""'))
    version = js(xc("call", "session.login_with_password", "admin", PASSWORD))
    assert version.startswith("OpaqueRef:")
    assert ok(xc("call", "VM.get_uuid", refs[0], "-q")) == ""


def test_completion_scripts(xc):
    bash = ok(xc("completion", "bash", password=None, user=None))
    assert "complete -F" in bash and "xapid" in bash
    zsh = ok(xc("completion", "zsh", password=None, user=None))
    assert "#compdef xapid" in zsh


def test_client_verbs_through_the_xapid_command(tmp_path):
    """`xapid vm list --json` (the installed entry point) is the client: the same verbs, same output."""
    from xapid import client
    from xapid.cli.main import CLIENT_VERBS

    assert CLIENT_VERBS == frozenset(client.VERBS)
    d = RealDaemon(tmp_path)
    try:
        env = {**os.environ, "XAPID_URL": d.url, "XAPID_USER": "admin", "XAPID_PASSWORD": PASSWORD}
        out = subprocess.run([sys.executable, "-m", "xapid", "vm", "list", "--json"], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert isinstance(json.loads(out.stdout), list)
    finally:
        d.stop()


def test_vm_install_onto_another_sr(daemon, xc):
    """``vm install --sr``: the template is copied onto that SR, and the disks it provisions are made there, not on the
    pool's default SR."""
    sr = js(xc("call", "SR.create", js(xc("call", "host.get_all"))[0], json.dumps({"location": str(daemon.state / "second")}),
               "0", "second-sr", "", "file", "user", "false", "{}"))
    sr_uuid = js(xc("call", "SR.get_uuid", sr))
    vm = js(xc("vm", "install", "Debian Bookworm 12", "on-second", "--sr", "second-sr", "--json"))
    ref = js(xc("call", "VM.get_by_uuid", vm["uuid"]))
    assert sr_uuid
    vdis = [js(xc("call", "VBD.get_VDI", vbd)) for vbd in js(xc("call", "VM.get_VBDs", ref))]
    disks = [v for v in vdis if v != "OpaqueRef:NULL"]
    assert disks and {js(xc("call", "VDI.get_SR", v)) for v in disks} == {sr}
    assert js(xc("call", "VM.get_suspend_SR", ref)) == sr
    assert "no-such-sr" in one_line_failure(xc("vm", "install", "Debian Bookworm 12", "x", "--sr", "no-such-sr"))
