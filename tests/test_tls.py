"""TLS listeners: the ssl: parser, the hardened context, the daemon's own certificate, ``xapid cert``.

Real daemons listen on 127.0.0.1 only; each one is stopped by its fixture or test.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import ipaddress
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
import warnings
import xmlrpc.client
from pathlib import Path

import pytest
import XenAPI
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher

from support import PASSWORD, ROOT, RealDaemon
from xapid import tls
from xapid.config import Config, ServerConfig
from xapid.server import Daemon

FINGERPRINT = r"((?:[0-9A-F]{2}:){31}[0-9A-F]{2})"
LOGIN = xmlrpc.client.dumps(("admin", PASSWORD), "session.login_with_password").encode()


def xapid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xapid", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def tls_port(d: RealDaemon) -> int:
    """The port of the daemon's ssl: listener, from its log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(ssl:", d.log.read_text())
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no ssl: listener: {d.log.read_text()}")


def client_context(*, maximum: ssl.TLSVersion | None = None, ciphers: str | None = None,
                   alpn: list[str] | None = None, cafile: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile)
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def served_fingerprint(port: int) -> str:
    with connect(port, client_context()) as conn:
        der = conn.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest().upper()


def colons(hex_digest: str) -> str:
    return ":".join(hex_digest[i:i + 2] for i in range(0, len(hex_digest), 2))


def login_over(conn: ssl.SSLSocket) -> bytes:
    """POST session.login_with_password as HTTP/1.1 on an open TLS socket; the whole reply."""
    conn.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(LOGIN), LOGIN))
    reply = b""
    while chunk := conn.recv(65536):
        reply += chunk
    return reply


def refused(port: int, context: ssl.SSLContext) -> ssl.SSLError:
    with pytest.raises(ssl.SSLError) as info:
        connect(port, context).close()
    return info.value


# -- a daemon serving its own certificate -----------------------------------------------------


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory):
    d = RealDaemon(tmp_path_factory.mktemp("tls-daemon"), ["--listen", "ssl:0:interface=127.0.0.1"])
    d.tls_port = tls_port(d)
    d.crt = d.state / "tls" / "xapid.crt"
    yield d
    d.stop()


def test_own_certificate_generated(tls_daemon):
    """Without privateKey the daemon makes a 0600 key + certificate and logs the fingerprint it serves."""
    pem = tls_daemon.state / "tls" / "xapid.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(pem.parent.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in pem.read_bytes() and b"PRIVATE KEY" not in tls_daemon.crt.read_bytes()
    logged = re.search(r"generated a self-signed TLS certificate (\S+) for CN=\S+: SHA-256 fingerprint "
                       + FINGERPRINT, tls_daemon.log.read_text())
    assert logged and logged.group(1) == str(pem), tls_daemon.log.read_text()
    shown = xapid("cert", "show", "--state-dir", str(tls_daemon.state))
    assert shown.returncode == 0, shown.stderr
    assert f"SHA-256 fingerprint: {logged.group(2)}\n" in shown.stdout
    assert "IP:127.0.0.1" in shown.stdout and "DNS:localhost" in shown.stdout and "IP:::1" in shown.stdout
    assert colons(hashlib.sha256(ssl.PEM_cert_to_DER_cert(tls_daemon.crt.read_text())).hexdigest().upper()) \
        == logged.group(2) == colons(served_fingerprint(tls_daemon.tls_port))
    certificate = x509.load_pem_x509_certificate(tls_daemon.crt.read_bytes())
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert dt.timedelta(days=3600) < lifetime < dt.timedelta(days=3700)
    assert "clear text" not in tls_daemon.log.read_text()  # the plain listener is on loopback


def test_cert_show_reads_the_config_state_dir(tls_daemon, tmp_path):
    """Without --state-dir, cert show uses [server] state_dir of --config."""
    conf = tmp_path / "x.conf"
    conf.write_text(f"[server]\nstate_dir = {tls_daemon.state}\n")
    shown = xapid("cert", "show", "--config", str(conf))
    assert shown.returncode == 0 and f"path: {tls_daemon.state / 'tls' / 'xapid.pem'}\n" in shown.stdout


def test_curl_default_alpn(tls_daemon):
    """curl (offering h2 and http/1.1) verifies the certificate by its IP SAN and gets an XML-RPC reply."""
    result = subprocess.run(
        ["curl", "-s", "-S", "--cacert", str(tls_daemon.crt), "-w", "\n%{http_version}", "-X", "POST",
         "-H", "Content-Type: text/xml", "--data-binary", "@-", f"https://127.0.0.1:{tls_daemon.tls_port}/"],
        input=LOGIN, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    body, version = result.stdout.rsplit(b"\n", 1)
    assert version == b"1.1"
    reply = xmlrpc.client.loads(body)[0][0]
    assert reply["Status"] == "Success" and reply["Value"].startswith("OpaqueRef:")


def test_sdk_over_verified_tls(tls_daemon):
    """The XenAPI SDK, verifying the daemon's certificate, logs in and lists VMs over TLS."""
    transport = xmlrpc.client.SafeTransport(context=ssl.create_default_context(cafile=str(tls_daemon.crt)))
    session = XenAPI.Session(f"https://127.0.0.1:{tls_daemon.tls_port}/", transport=transport)
    session.xenapi.login_with_password("admin", PASSWORD, "1.0", "test-tls")
    try:
        records = session.xenapi.VM.get_all_records()
        assert any(r["is_control_domain"] for r in records.values())
    finally:
        session.xenapi.session.logout()


def test_tls_1_1_refused(tls_daemon):
    """A client that speaks at most TLS 1.1 gets the server's protocol_version alert."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = client_context(maximum=ssl.TLSVersion.TLSv1_1, ciphers="ALL:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
    assert refused(tls_daemon.tls_port, context).reason == "TLSV1_ALERT_PROTOCOL_VERSION"


@pytest.mark.parametrize("ciphers", ["AES128-SHA:ECDHE-RSA-AES128-SHA", "AES128-GCM-SHA256"])
def test_weak_tls_1_2_suites_refused(tls_daemon, ciphers):
    """TLS 1.2 with only CBC-SHA1 suites, or only static-RSA key exchange, is refused by the server."""
    context = client_context(maximum=ssl.TLSVersion.TLSv1_2, ciphers=ciphers)
    assert refused(tls_daemon.tls_port, context).reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


def test_tls_1_2_uses_ecdhe_aead(tls_daemon):
    """A TLS 1.2 client offering everything gets ECDHE with an AEAD cipher; TLS 1.3 works too."""
    with connect(tls_daemon.tls_port, client_context(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ALL")) as conn:
        name, version, _ = conn.cipher()
        assert version == "TLSv1.2" and name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
    with connect(tls_daemon.tls_port, client_context()) as conn:
        assert conn.version() == "TLSv1.3"


@pytest.mark.parametrize("offer,chosen", [(["h2"], None), (["spdy/3", "acme-tls/1"], None),
                                          (["h2", "http/1.1"], "http/1.1"), (None, None)])
def test_alpn(tls_daemon, offer, chosen):
    """ALPN picks http/1.1 when offered; a client offering only other protocols still connects."""
    with connect(tls_daemon.tls_port, client_context(alpn=offer)) as conn:
        assert conn.selected_alpn_protocol() == chosen
        reply = login_over(conn)
    assert reply.startswith(b"HTTP/1.1 200 ") and b"<value>Success</value>" in reply


# -- regeneration, operator certificates, errors ----------------------------------------------


def test_regenerate_without_restart(tmp_path):
    """xapid cert regenerate: the next connection gets the new certificate; an open one keeps working."""
    d = RealDaemon(tmp_path, ["--listen", "ssl:0:interface=127.0.0.1"])
    try:
        port = tls_port(d)
        crt = d.state / "tls" / "xapid.crt"
        before = colons(served_fingerprint(port))
        kept = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=ssl.create_default_context(cafile=str(crt)))
        kept.request("POST", "/", LOGIN, {"Content-Type": "text/xml"})
        assert b"Success" in kept.getresponse().read()
        result = xapid("cert", "regenerate", "--state-dir", str(d.state))
        assert result.returncode == 0, result.stderr
        printed = re.search(r"SHA-256 fingerprint: " + FINGERPRINT, result.stdout).group(1)
        assert "new connections" in result.stdout
        assert printed != before
        assert colons(served_fingerprint(port)) == printed
        assert stat.S_IMODE((d.state / "tls" / "xapid.pem").stat().st_mode) == 0o600
        kept.request("POST", "/", LOGIN, {"Content-Type": "text/xml"})  # the open connection, old certificate
        assert b"Success" in kept.getresponse().read()
        kept.close()
        session = XenAPI.Session(f"https://127.0.0.1:{port}/", transport=xmlrpc.client.SafeTransport(
            context=ssl.create_default_context(cafile=str(crt))))  # verified against the new xapid.crt
        session.xenapi.login_with_password("admin", PASSWORD, "1.0", "test-tls")
        session.xenapi.session.logout()
        assert re.search(r"TLS certificate \S+ reloaded: SHA-256 fingerprint " + printed, d.log.read_text())
    finally:
        d.stop()


def make_pki(directory: Path) -> dict[str, Path]:
    """A root CA, an intermediate and a leaf for 127.0.0.1 (issued by the intermediate), as PEM files."""
    now = dt.datetime.now(dt.timezone.utc)
    files: dict[str, Path] = {}

    def issue(name: str, key, issuer_name: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("root", "inter", "leaf")}
    certs = {"root": issue("Test Root", keys["root"], "Test Root", keys["root"], True)}
    certs["inter"] = issue("Test Intermediate", keys["inter"], "Test Root", keys["root"], True)
    certs["leaf"] = issue("operator.test", keys["leaf"], "Test Intermediate", keys["inter"], False)
    directory.mkdir()
    for name, cert in certs.items():
        files[f"{name}.crt"] = directory / f"{name}.crt"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = directory / f"{name}.key"
        files[f"{name}.key"].write_bytes(keys[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def escape(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def test_operator_certificate_with_chain(tmp_path):
    """privateKey/certKey/extraCertChain (paths with escaped ':' and '=') are served; no own certificate."""
    pki = make_pki(tmp_path / "pki:a=b")
    description = (f"ssl:0:interface=127.0.0.1:privateKey={escape(pki['leaf.key'])}:"
                   f"certKey={escape(pki['leaf.crt'])}:extraCertChain={escape(pki['inter.crt'])}")
    d = RealDaemon(tmp_path, ["--listen", description])
    try:
        port = tls_port(d)
        with connect(port, client_context(cafile=pki["root.crt"])) as conn:  # verifies only with the chain
            assert conn.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(pki["leaf.crt"].read_text())
            assert b"<value>Success</value>" in login_over(conn)
        assert not (d.state / "tls").exists()
    finally:
        d.stop()


def bad_serve(tmp_path: Path, description: str) -> str:
    users = tmp_path / "users"
    users.touch()
    result = xapid("serve", "--state-dir", str(tmp_path / "state"), "--users", str(users), "--listen", description)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xapid: ") and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything is written
    return lines[0]


def test_bad_ssl_descriptions_exit_2(tmp_path):
    """Unknown key, sslmethod, missing file, mismatched key: exit 2, one line naming the problem."""
    pki = make_pki(tmp_path / "pki")
    line = bad_serve(tmp_path, "ssl:0:interface=127.0.0.1:colour=blue")
    assert "bad listen address 'ssl:0:interface=127.0.0.1:colour=blue'" in line and "unknown key colour" in line
    assert "sslmethod" in bad_serve(tmp_path, "ssl:0:sslmethod=TLSv1_2_METHOD")
    missing = tmp_path / "nowhere.pem"
    line = bad_serve(tmp_path, f"ssl:0:privateKey={missing}")
    assert str(missing) in line and "No such file" in line
    line = bad_serve(tmp_path, f"ssl:0:privateKey={pki['inter.key']}:certKey={pki['leaf.crt']}")
    assert "does not match" in line and str(pki["inter.key"]) in line


def test_cert_show_without_certificate(tmp_path):
    result = xapid("cert", "show", "--state-dir", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("xapid: no TLS certificate at ") and result.stderr.count("\n") == 1


# -- in-process: the parser, the context, reloading, the clear-text warning ----------------------


def test_parse_defaults_and_escapes():
    spec = tls.parse_listen("ssl:9364")
    assert (spec.port, spec.interface, spec.backlog, spec.own_certificate) == (9364, "", 50, True)
    spec = tls.parse_listen(r"ssl:port=0:interface=\:\:1:backlog=1024:privateKey=/k\:ey\=1.pem")
    assert (spec.port, spec.interface, spec.backlog) == (0, "::1", 1024)
    assert spec.private_key == spec.cert_key == "/k:ey=1.pem"  # certKey defaults to privateKey
    spec = tls.parse_listen("ssl:1:privateKey=k.pem:certKey=c.pem:extraCertChain=x=y.pem:dhParameters=dh.pem")
    assert (spec.private_key, spec.cert_key, spec.extra_cert_chain, spec.dh_parameters) == \
        ("k.pem", "c.pem", "x=y.pem", "dh.pem")  # a second '=' belongs to the value, as in Twisted
    assert tls.parse_listen("ssl:443:key.pem").private_key == "key.pem"  # positional, in Twisted's order
    assert tls.is_tls_description("ssl:0") and not tls.is_tls_description("tcp:0") \
        and not tls.is_tls_description("sslx:0")


@pytest.mark.parametrize("description,message", [
    ("ssl", "no port"),
    ("ssl:interface=127.0.0.1", "no port"),
    ("ssl:http", "port must be a whole number"),
    ("ssl:70000", "port must be a whole number"),
    ("ssl:0:backlog=-1", "backlog must be a whole number"),
    ("ssl:0:port=1", "port given twice"),
    ("ssl:0:colour=blue:flavour=x", "unknown keys colour, flavour"),
    ("ssl:0:sslmethod=TLSv1_2_METHOD", "sslmethod is not supported"),
    ("ssl:0:certKey=c.pem", "certKey needs privateKey"),
    ("ssl:0:privateKey=", "privateKey is empty"),
    ("ssl:0:a.pem:b.pem:TLSv1_METHOD", "sslmethod"),  # the fourth positional value
    ("ssl:0:a:b:c:d:e:f:g:h", "unexpected value 'h'"),
    ("ssl:0\\", "lone backslash"),
])
def test_parse_errors(description, message):
    with pytest.raises(tls.TLSError, match=re.escape(message)):
        tls.parse_listen(description)


def test_context_settings(tmp_path):
    """The context: TLS 1.2 minimum, no compression/tickets/renegotiation, server preference, ALPN fallback."""
    tls.generate_own_certificate(tmp_path)
    pem, _ = tls.own_paths(tmp_path)
    context, certificate = tls.build_context(pem, pem)
    options = context.set_options(0)  # returns the options now set
    for option in (SSL.OP_NO_COMPRESSION, SSL.OP_CIPHER_SERVER_PREFERENCE, SSL.OP_NO_TICKET,
                   SSL.OP_NO_RENEGOTIATION):
        assert options & option
    ciphers = SSL.Connection(context, None).get_cipher_list()
    tls12 = [c for c in ciphers if not c.startswith("TLS_")]
    assert tls12 and all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in tls12)
    assert tls.select_alpn(None, [b"h2", b"http/1.1"]) == b"http/1.1"
    assert tls.select_alpn(None, [b"h2"]) is SSL.NO_OVERLAPPING_PROTOCOLS
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", *tls.host_names()} <= set(names.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= \
        set(names.get_values_for_type(x509.IPAddress))
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == tls.host_names()[0]


def test_unusable_files(tmp_path):
    """Broken, encrypted or mismatched files: one-line errors naming the file."""
    pki = make_pki(tmp_path / "pki")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(tls.TLSError, match=f"{garbage} holds no PEM certificate"):
        tls.build_context(garbage, pki["leaf.key"])
    with pytest.raises(tls.TLSError, match=f"{garbage} holds no PEM private key"):
        tls.build_context(pki["leaf.crt"], garbage)
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki["leaf.key"].read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(tls.TLSError, match=f"{encrypted} is encrypted"):
        tls.build_context(pki["leaf.crt"], encrypted)
    combined = tmp_path / "combined.pem"  # key after certificate in one file, as Twisted accepts
    combined.write_bytes(pki["leaf.crt"].read_bytes() + pki["leaf.key"].read_bytes())
    assert tls.build_context(combined, combined)[1].subject.rfc4514_string() == "CN=operator.test"
    own = tmp_path / "state"
    pem, _ = tls.own_paths(own)
    pem.parent.mkdir(parents=True)
    pem.write_text("truncated")
    with pytest.raises(tls.TLSError, match=str(pem)):
        tls.server_endpoint(MemoryReactor(), "ssl:0", own, make_certificate=True)


def test_reload_keeps_the_old_context_on_a_bad_file(tmp_path):
    """A changed file is picked up by the next connection; a broken one is logged and the old one kept."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        tls.generate_own_certificate(tmp_path)
        pem, _ = tls.own_paths(tmp_path)
        creator = tls.ServerTLS(pem, pem)
        first = creator.load()
        assert creator.serverConnectionForTLS(None).get_context() is creator.serverConnectionForTLS(None) \
            .get_context()
        second = tls.generate_own_certificate(tmp_path)
        assert creator.serverConnectionForTLS(None) and creator.certificate == second != first
        good = pem.read_bytes()
        pem.write_bytes(good[: len(good) // 2])
        context = creator._context
        assert creator.serverConnectionForTLS(None).get_context() is context
        assert creator.certificate == second
        creator.serverConnectionForTLS(None)
        errors = [e for e in events if "not reloaded" in e.get("log_format", "")]
        assert len(errors) == 1 and str(pem) in errors[0]["error"]  # logged once, not per connection
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_cleartext_warning_decision():
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    def warns(description: str, address) -> bool:
        return tls.cleartext_warning(description, address) is not None

    assert warns("tcp:0:interface=0.0.0.0", IPv4Address("TCP", "0.0.0.0", 1))
    assert warns("tcp6:0:interface=\\:\\:", IPv6Address("TCP", "::", 1))
    assert warns("tcp:0:interface=192.0.2.7", IPv4Address("TCP", "192.0.2.7", 1))
    assert warns("systemd:domain=INET:index=0", IPv4Address("TCP", "10.0.0.1", 1))
    assert not warns("tcp:0:interface=127.0.0.1", IPv4Address("TCP", "127.0.0.1", 1))
    assert not warns("tcp:0:interface=127.1.2.3", IPv4Address("TCP", "127.1.2.3", 1))
    assert not warns("tcp6:0:interface=\\:\\:1", IPv6Address("TCP", "::1", 1))
    assert not warns("tcp6:0", IPv6Address("TCP", "::ffff:127.0.0.1", 1))
    assert not warns("ssl:0:interface=0.0.0.0", IPv4Address("TCP", "0.0.0.0", 1))
    assert not warns("unix:/run/xapid/sock", UNIXAddress(b"/run/xapid/sock"))
    assert "passwords included" in tls.cleartext_warning("tcp:1", IPv4Address("TCP", "0.0.0.0", 1))


def test_listen_warns_about_cleartext(tmp_path):
    """Daemon._listen logs the clear-text warning once for a tcp: listener on 0.0.0.0 (no socket bound)."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        daemon = Daemon(Config(server=ServerConfig(state_dir=str(tmp_path))), MemoryReactor())
        box: list = []
        Deferred.fromCoroutine(daemon._listen("tcp:0:interface=0.0.0.0", object())).addBoth(box.append)
        assert box == ["0.0.0.0:0"]
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings_logged = [e for e in events if "clear text" in str(e.get("warning", ""))]
    assert len(warnings_logged) == 1 and warnings_logged[0]["log_level"].name == "warn"


def test_key_written_0600_from_the_first_byte(tmp_path, monkeypatch):
    """The key file is created with mode 0600 (not chmod-ed later), whatever the umask."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            created.append((os.fspath(path), mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)
    try:
        tls.generate_own_certificate(tmp_path)
    finally:
        os.umask(old)
    pem, crt = tls.own_paths(tmp_path)
    assert [mode for path, mode in created if ".xapid.pem." in path] == [0o600]
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600 and stat.S_IMODE(crt.stat().st_mode) == 0o600
    assert not [p for p in pem.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_twisted_tls_prefixes_are_refused_for_ssl(tmp_path):
    """tls: (Twisted's own TLS parser, with its weaker defaults) is refused, pointing at ssl:."""
    from xapid.server import StartupError, _endpoint
    from twisted.internet.testing import MemoryReactor

    with pytest.raises(StartupError, match="use ssl: for TLS"):
        _endpoint(MemoryReactor(), f"tls:{tmp_path}:0")
