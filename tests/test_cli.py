"""The command line as a user runs it: serve errors, signals, durability, user management."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import XenAPI

from support import PASSWORD, ROOT, RealDaemon, vm_record
from xapid.schema import SchemaError, load_schema
from xapid.auth.users import UsersFile

ENV = {**os.environ, "XAPID_BCRYPT_ROUNDS": "4"}


def xapid(*args: str, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xapid", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def assert_one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("xapid: ") and text in lines[-1], result.stderr


def serve(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    users = tmp_path / "users"
    users.touch()
    return xapid("serve", "--state-dir", str(tmp_path / "state"), "--users", str(users), *extra)


def test_bad_config_value(tmp_path):
    """A bad config value exits 2 with one line naming section and key."""
    conf = tmp_path / "x.conf"
    conf.write_text("[server]\nthreads = lots\n")
    assert_one_line_error(serve(tmp_path, "--config", str(conf)), "[server] threads: expected a whole number")


def test_unknown_config_key(tmp_path):
    """An unknown key exits 2 naming it."""
    conf = tmp_path / "x.conf"
    conf.write_text("[api]\nsesion_idle_timeout = 5\n")
    assert_one_line_error(serve(tmp_path, "--config", str(conf)), "unknown key 'sesion_idle_timeout'")


def test_unusable_state_dir(tmp_path):
    """A state dir that cannot be created exits 2 naming it."""
    (tmp_path / "file").write_text("x")
    users = tmp_path / "users"
    users.touch()
    result = xapid("serve", "--state-dir", str(tmp_path / "file" / "state"), "--users", str(users),
                   "--listen", "tcp:0:interface=127.0.0.1")
    assert_one_line_error(result, f"state dir {tmp_path / 'file' / 'state'} is unusable")


def test_port_in_use(tmp_path):
    """A listen address already in use exits 2 saying so."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve(tmp_path, "--listen", f"tcp:{port}:interface=127.0.0.1")
    assert_one_line_error(result, f"cannot listen on tcp:{port}:interface=127.0.0.1: address already in use")


def test_bad_endpoint_string(tmp_path):
    """A malformed endpoint string exits 2 naming it."""
    assert_one_line_error(serve(tmp_path, "--listen", "carrier-pigeon:42"), "bad listen address 'carrier-pigeon:42'")


def test_xen_backend_without_a_hypervisor(tmp_path):
    """--backend xen on a machine without Xen exits 2 with one line saying so (no traceback, no crash)."""
    assert_one_line_error(serve(tmp_path, "--backend", "xen", "--listen", "tcp:0:interface=127.0.0.1"),
                          "no Xen hypervisor: /dev/xen/privcmd not found")


def test_auto_backend_without_a_hypervisor(tmp_path):
    """--backend auto on a machine without Xen is refused with advice (exit 2, one line)."""
    assert_one_line_error(serve(tmp_path, "--backend", "auto", "--listen", "tcp:0:interface=127.0.0.1"),
                          "--backend auto: no Xen hypervisor here (/dev/xen/privcmd not found); run xapid in dom0 "
                          "of a Xen host, or use --backend sim for the simulated host")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(tmp_path, sig):
    """SIGTERM and SIGINT stop the daemon with status 0 after it served."""
    d = RealDaemon(tmp_path)
    s = XenAPI.Session(d.url)
    s.login_with_password("admin", PASSWORD)
    assert d.stop(sig) == 0
    assert "Traceback" not in d.log.read_text()


def test_unix_socket_listener(tmp_path):
    """A unix: endpoint serves the SDK through its UDSTransport."""
    sock = tmp_path / "xapid.sock"
    d = RealDaemon(tmp_path, ["--listen", f"unix:{sock}:mode=600"])
    try:
        deadline = time.monotonic() + 10  # RealDaemon returns once the TCP listener (the first) is up
        while f"listening on {sock} (" not in d.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        import http.client

        conn = http.client.HTTPConnection("localhost")
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(sock))
        body = ("<?xml version='1.0'?><methodCall><methodName>session.login_with_password</methodName><params>"
                f"<param><value>admin</value></param><param><value>{PASSWORD}</value></param></params></methodCall>")
        conn.request("POST", "/", body, {"Content-Type": "text/xml"})
        reply = conn.getresponse().read()
        assert b"<value>Success</value>" in reply and b"OpaqueRef:" in reply
    finally:
        d.stop()


def test_acknowledged_writes_survive_kill_9(tmp_path):
    """Every VM whose create was acknowledged exists after kill -9 and restart, with the same ref and uuid."""
    d = RealDaemon(tmp_path)
    s = XenAPI.Session(d.url)
    s.login_with_password("admin", PASSWORD)
    made = {}
    for i in range(20):
        ref = s.xenapi.VM.create(vm_record(name_label=f"vm{i}"))
        made[ref] = s.xenapi.VM.get_uuid(ref)
    d.proc.kill()
    d.proc.wait()
    d.logfile.close()
    d.start()
    try:
        s2 = XenAPI.Session(d.url)
        s2.login_with_password("admin", PASSWORD)
        for ref, uuid in made.items():
            assert s2.xenapi.VM.get_by_uuid(uuid) == ref
    finally:
        d.stop()


def test_user_commands(tmp_path):
    """user add/list/passwd/del manage a mode-600 file; the password is one stdin line without its ending."""
    users = tmp_path / "etc" / "users"
    result = xapid("user", "add", "alice", "--role", "vm-admin", "--users", str(users), stdin="pa ss\r\n")
    assert result.returncode == 0, result.stderr
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    file = UsersFile(users)
    file.load()
    assert file.verify("alice", "pa ss").role == "vm-admin"
    assert file.verify("alice", "pa ss\r") is None
    xapid("user", "add", "bob", "--role", "read-only", "--users", str(users), stdin="x\n")
    assert xapid("user", "list", "--users", str(users)).stdout == "alice vm-admin\nbob read-only\n"
    assert xapid("user", "passwd", "alice", "--users", str(users), stdin="new\n").returncode == 0
    file.load()
    assert file.verify("alice", "new") and not file.verify("alice", "pa ss")
    assert xapid("user", "del", "bob", "--users", str(users)).returncode == 0
    assert xapid("user", "list", "--users", str(users)).stdout == "alice vm-admin\n"


@pytest.mark.parametrize("args, stdin, text", [
    (["add", "carol", "--role", "root"], "pw\n", "unknown role 'root'"),
    (["add", "alice", "--role", "read-only"], "pw\n", "user alice already exists"),
    (["add", "dave", "--role", "read-only"], "\n", "empty passwords are not allowed"),
    (["del", "nobody"], "", "no user nobody"),
    (["passwd", "nobody"], "pw\n", "no user nobody"),
])
def test_user_command_errors(tmp_path, args, stdin, text):
    """Bad user commands exit 2 with one line."""
    users = tmp_path / "users"
    xapid("user", "add", "alice", "--role", "vm-admin", "--users", str(users), stdin="pw\n")
    assert_one_line_error(xapid("user", *args, "--users", str(users), stdin=stdin), text)


def test_users_added_while_running_can_log_in(daemon):
    """A user added with the command line while the daemon runs can log in without a restart."""
    assert xapid("user", "add", "latecomer", "--role", "read-only", "--users", str(daemon.users),
                 stdin="late pw\n").returncode == 0
    s = XenAPI.Session(daemon.url)
    s.login_with_password("latecomer", "late pw")
    assert s.xenapi.pool.get_all()


def test_broken_schema_names_line(tmp_path):
    """A schema that does not validate stops loading with its line and the reason."""
    broken = tmp_path / "xenapi.xml"
    from xapid.schema import DEFAULT_SCHEMA

    text = DEFAULT_SCHEMA.read_text().replace('qualifier="RW"', 'qualifier="WR"', 1)
    broken.write_text(text)
    with pytest.raises(SchemaError, match=r"xenapi\.xml:\d+: .*qualifier"):
        load_schema(broken)


def test_schema_doc(tmp_path):
    """xapid schema-doc writes Markdown listing classes and explicit messages."""
    out = tmp_path / "api.md"
    assert xapid("schema-doc", "--output", str(out)).returncode == 0
    text = out.read_text()
    assert "## VM" in text and "| `start` |" in text and "VM_BAD_POWER_STATE" in text


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway key and certificate for 127.0.0.1."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_listener(tmp_path):
    """An ssl: endpoint serves the SDK over HTTPS (ignore_ssl for the self-signed certificate)."""
    key, cert = self_signed(tmp_path)
    d = RealDaemon(tmp_path, ["--listen", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"])
    try:
        s = XenAPI.Session(f"https://127.0.0.1:{d.port}/", ignore_ssl=True)
        s.login_with_password("admin", PASSWORD)
        assert s.xenapi.pool.get_all()
    finally:
        d.stop()


def test_missing_certificate(tmp_path):
    """An ssl: endpoint whose certificate cannot be read exits 2 naming it."""
    result = serve(tmp_path, "--listen", f"ssl:0:privateKey={tmp_path}/nokey.pem:certKey={tmp_path}/nocert.pem")
    assert_one_line_error(result, "bad listen address")
    assert "nocert.pem" in result.stderr or "nokey.pem" in result.stderr


def test_serve_with_relative_paths_as_the_quick_start_runs_it(tmp_path):
    """``scripts/quickstart`` runs ``xapid serve --state-dir demo/state --users demo/users`` from the checkout:
    relative paths are taken from the working directory, and the local SR made in the state dir is usable."""
    from support import make_users, serve_and_use

    (tmp_path / "demo").mkdir()
    make_users(tmp_path / "demo" / "users")
    env = {**os.environ, "XAPID_BCRYPT_ROUNDS": "4", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}

    def use(api):
        sr = api.pool.get_default_SR(api.pool.get_all()[0])
        assert api.SR.get_PBDs(sr)
        location = api.PBD.get_device_config(api.SR.get_PBDs(sr)[0])["location"]
        assert location == str(tmp_path / "demo" / "state" / "sr")

    serve_and_use([sys.executable, "-m", "xapid", "serve", "--state-dir", "demo/state", "--users", "demo/users",
                   "--listen", "tcp:0:interface=127.0.0.1"], tmp_path, env, use)


@pytest.mark.parametrize("flag, value, text", [
    ("--vnc", "70000", "port 70000 is outside 0-65535"),
    ("--vnc", "-1", "port -1 is outside 0-65535"),
    ("--wait", "nan", "nan is not a finite, non-negative number of seconds"),
    ("--wait", "-1", "-1 is not a finite, non-negative number of seconds"),
])
def test_console_options_out_of_range(flag, value, text):
    """``vm console --vnc PORT`` / ``--wait SECONDS`` out of range: one usage line, exit 2, before any connection
    (bind() and select() would otherwise raise OverflowError / ValueError, a traceback)."""
    result = xapid("vm", "console", "some-vm", flag, value)
    assert_one_line_error(result, f"argument {flag}: {text}")
