"""TLS for xapid's listeners: ``ssl:`` listen strings, a hardened server context, the daemon's own certificate.

``ssl:`` descriptions are parsed here (Twisted's grammar: ``:`` between fields, the first ``=``
of a field between key and value, ``\\`` escapes the next character), not by Twisted's
``serverFromString``, so that every TLS listener gets the same context:

- TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE key exchange with AEAD ciphers
  (``ECDHE+AESGCM:ECDHE+CHACHA20``; TLS 1.3 uses OpenSSL's AEAD suites); no compression,
  no session tickets, no renegotiation, the server's cipher preference;
- ALPN: ``http/1.1`` when the client offers it, otherwise no protocol is negotiated and the
  handshake goes on (a client offering only ``h2`` still gets HTTP/1.1, not an alert);
- the key and certificate files are watched: a new connection after they changed on disk
  (``xapid cert regenerate``) gets the new certificate, without a restart.

Without ``privateKey`` a listener serves the daemon's own certificate, made at first start:
``<state_dir>/tls/xapid.pem`` holds the private key (RSA 2048) and the self-signed certificate
in one file, mode 0600, replaced as a whole by one rename, so a reader never sees a key that
does not match the certificate.  ``<state_dir>/tls/xapid.crt`` is the certificate alone, for
clients (``curl --cacert``).  Every error is a :class:`TLSError` with one line naming the file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from xapid.files import write_atomically

log = Logger()

CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
HTTP_1_1 = b"http/1.1"
OWN_DIR = "tls"
OWN_PEM = "xapid.pem"  # private key + certificate, mode 0600: what the daemon serves
OWN_CRT = "xapid.crt"  # the certificate alone, mode 0600 like everything in the state dir: what clients trust (copy it to them)
KEY_BITS = 2048
VALIDITY_DAYS = 3650  # like xapi's first-boot host certificate
DEFAULT_BACKLOG = 50  # Twisted's ssl: default
# Twisted's ssl: parameters in positional order; sslmethod is recognised only to be refused.
_POSITIONAL = ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
               "dhParameters")
KEYS = tuple(name for name in _POSITIONAL if name != "sslmethod")


class TLSError(Exception):
    """A bad ``ssl:`` description or an unusable key or certificate; the message is one line."""


# -- ssl: descriptions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSListen:
    """A parsed ``ssl:`` description.  ``private_key`` None: the daemon's own certificate."""

    port: int
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG
    private_key: str | None = None
    cert_key: str | None = None
    extra_cert_chain: str | None = None
    dh_parameters: str | None = None

    @property
    def own_certificate(self) -> bool:
        return self.private_key is None


def is_tls_description(description: str) -> bool:
    """Whether *description* is an ``ssl:`` listen string (parsed here rather than by Twisted)."""
    return description == "ssl" or description.startswith("ssl:")


def _fields(description: str) -> list[list[str]]:
    """Twisted's strports tokens: each field is [value] or [key, value]; escapes resolved."""
    fields: list[list[str]] = [[""]]
    escaped = False
    for char in description:
        if escaped:
            fields[-1][-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append([""])
        elif char == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += char
    if escaped:
        raise TLSError("ends with a lone backslash")
    return fields


def _whole(name: str, text: str, low: int, high: int) -> int:
    value = int(text) if re.fullmatch(r"[0-9]{1,8}", text) else -1
    if not low <= value <= high:
        raise TLSError(f"{name} must be a whole number from {low} to {high}, not {text!r}")
    return value


def parse_listen(description: str) -> TLSListen:
    """Parse an ``ssl:`` description; TLSError naming the offending part."""
    fields = _fields(description)
    if fields[0] != ["ssl"]:
        raise TLSError("not an ssl: description")
    values: dict[str, str] = {}
    positional = iter(_POSITIONAL)
    for field in fields[1:]:
        if len(field) == 1:
            name = next(positional, None)
            if name is None:
                raise TLSError(f"unexpected value {field[0]!r}")
        else:
            name = field[0]
        if name in values:
            raise TLSError(f"{name} given twice")
        values[name] = field[-1]
    if "sslmethod" in values:
        raise TLSError("sslmethod is not supported: xapid always offers TLS 1.2 and 1.3 only; remove sslmethod")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise TLSError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                       f"(an ssl: listener takes {', '.join(KEYS)})")
    if "port" not in values:
        raise TLSError("no port (ssl:PORT:...)")
    for name in ("privateKey", "certKey", "extraCertChain", "dhParameters"):
        if values.get(name) == "":
            raise TLSError(f"{name} is empty")
    if "certKey" in values and "privateKey" not in values:
        raise TLSError("certKey needs privateKey (without both, the daemon's own certificate is used)")
    private_key = values.get("privateKey")
    return TLSListen(
        port=_whole("port", values["port"], 0, 65535),
        interface=values.get("interface", ""),
        backlog=_whole("backlog", values["backlog"], 1, 1 << 20) if "backlog" in values else DEFAULT_BACKLOG,
        private_key=private_key,
        cert_key=values.get("certKey", private_key),  # as Twisted: one file may hold both
        extra_cert_chain=values.get("extraCertChain"),
        dh_parameters=values.get("dhParameters"),
    )


# -- keys, certificates and the server context ------------------------------------------------


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def load_certificates(path: str | Path, what: str = "certificate file") -> list[x509.Certificate]:
    """Every PEM certificate in *path*, in order (other PEM blocks, such as a key, are skipped)."""
    certificates = []
    for match in _PEM_BLOCK.finditer(_read(path, what)):
        if match.group(1) == b"CERTIFICATE":
            try:
                certificates.append(x509.load_pem_x509_certificate(match.group(0)))
            except ValueError as exc:
                raise TLSError(f"the {what} {path} holds a broken certificate: {exc}") from None
    if not certificates:
        raise TLSError(f"the {what} {path} holds no PEM certificate")
    return certificates


def load_private_key(path: str | Path) -> Any:
    """The first PEM private key in *path* (a certificate may be in the same file)."""
    for match in _PEM_BLOCK.finditer(_read(path, "private key file")):
        block = match.group(0)
        if not match.group(1).endswith(b"PRIVATE KEY"):
            continue
        if match.group(1).startswith(b"ENCRYPTED") or b"Proc-Type: 4,ENCRYPTED" in block:
            raise TLSError(f"the private key in {path} is encrypted; xapid needs it unencrypted (mode 0600)")
        try:
            return serialization.load_pem_private_key(block, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise TLSError(f"the private key file {path} holds a broken key: {exc}") from None
    raise TLSError(f"the private key file {path} holds no PEM private key")


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """ALPN: HTTP/1.1 when offered; otherwise carry on without a protocol (never an alert)."""
    return HTTP_1_1 if HTTP_1_1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def build_context(cert_path: str | Path, key_path: str | Path, chain_path: str | Path | None = None,
                  dh_path: str | Path | None = None) -> tuple[SSL.Context, x509.Certificate]:
    """The hardened server context for these files, and the certificate it serves."""
    chain = load_certificates(cert_path)
    if chain_path is not None:
        chain += load_certificates(chain_path, "extraCertChain file")
    key = load_private_key(key_path)
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise TLSError(f"the private key in {key_path} does not match the certificate in {cert_path}")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET
                        | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(CIPHERS)
    try:
        context.use_certificate(chain[0])
        for certificate in chain[1:]:
            context.add_extra_chain_cert(certificate)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error as exc:
        raise TLSError(f"OpenSSL refuses the key {key_path} with the certificate {cert_path}: {exc}") from None
    if dh_path is not None:  # accepted as Twisted does; unused, since only ECDHE key exchange is offered
        _read(dh_path, "dhParameters file")
        try:
            context.load_tmp_dh(os.fsencode(dh_path))
        except SSL.Error as exc:
            raise TLSError(f"the dhParameters file {dh_path} holds no DH parameters: {exc}") from None
    context.set_alpn_select_callback(select_alpn)
    return context, chain[0]


def validity(certificate: x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) in UTC (``*_utc`` arrived in cryptography 42)."""
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return (certificate.not_valid_before.replace(tzinfo=dt.timezone.utc),
            certificate.not_valid_after.replace(tzinfo=dt.timezone.utc))


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 fingerprint as AA:BB:…"""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes each TLS server connection; reloads the context when its files change on disk.

    Each new connection stats the files (cheap).  When the device, inode, size or mtime of
    one changed, the context is rebuilt; if that fails (a half-written pair, say), the error
    is logged once and the previous context keeps serving until the files change again.
    """

    def __init__(self, cert_path: str | Path, key_path: str | Path, chain_path: str | Path | None = None,
                 dh_path: str | Path | None = None):
        self.files = (cert_path, key_path, chain_path, dh_path)
        self._watched = tuple(dict.fromkeys(str(p) for p in self.files if p is not None))
        self._context: SSL.Context | None = None
        self._stamp: tuple[Any, ...] | None = None
        self._failed: tuple[Any, ...] | None = None
        self.certificate: x509.Certificate | None = None

    def _stamp_now(self) -> tuple[Any, ...]:
        stamps: list[Any] = []
        for path in self._watched:
            try:
                st = os.stat(path)
                stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError as exc:
                stamps.append(exc.errno)
        return tuple(stamps)

    def load(self) -> x509.Certificate:
        """(Re)build the context from the files now; TLSError when they are unusable."""
        stamp = self._stamp_now()  # before reading: a change while reading shows at the next check
        self._context, self.certificate = build_context(*self.files)
        self._stamp, self._failed = stamp, None
        return self.certificate

    def _refresh(self) -> None:
        stamp = self._stamp_now()
        if stamp == self._stamp or stamp == self._failed:
            return
        try:
            certificate = self.load()
        except TLSError as exc:
            self._failed = stamp
            log.error("TLS certificate not reloaded, the previous one is kept: {error}", error=str(exc))
            return
        log.info("TLS certificate {path} reloaded: SHA-256 fingerprint {fingerprint}", path=str(self.files[0]),
                 fingerprint=fingerprint(certificate))

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802 - Twisted's name
        if self._context is None:
            self.load()
        else:
            self._refresh()
        assert self._context is not None  # load() sets it or raises
        return SSL.Connection(self._context, None)


# -- the daemon's own certificate -----------------------------------------------------------------


def own_paths(state_dir: str | Path) -> tuple[Path, Path]:
    """(key + certificate file, certificate-only file) of the daemon's own certificate."""
    directory = Path(state_dir) / OWN_DIR
    return directory / OWN_PEM, directory / OWN_CRT


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace *path* by *data* with *mode* (:func:`xapid.files.write_atomically`; TLSError on failure)."""
    try:
        write_atomically(path, data, mode)
    except OSError as exc:
        raise TLSError(f"cannot write {path}: {exc.strerror or exc}") from None


def host_names() -> list[str]:
    """This host's name and fully qualified name, ASCII only, without duplicates."""
    names = []
    hostname = socket.gethostname()
    for name in (hostname, socket.getfqdn(hostname)):
        name = name.strip().rstrip(".").lower()
        if name and name.isascii() and name not in names and name != "localhost":
            names.append(name)
    return names


def self_signed_certificate(key: Any, names: list[str], now: dt.datetime | None = None) -> x509.Certificate:
    """A self-signed server certificate for *names* (CN = the first), localhost and loopback."""
    now = now or dt.datetime.now(dt.timezone.utc)
    common_name = (names[0] if names else "localhost")[:64]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in [*names, "localhost"]]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))  # tolerate a client whose clock lags
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def generate_own_certificate(state_dir: str | Path) -> x509.Certificate:
    """Make a new key and self-signed certificate; replace ``tls/xapid.pem`` (0600) and ``tls/xapid.crt``."""
    pem_path, crt_path = own_paths(state_dir)
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        pem_path.parent.mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TLSError(f"cannot create {pem_path.parent}: {exc.strerror or exc}") from None
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    certificate = self_signed_certificate(key, host_names())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    _write_atomically(pem_path, key_pem + cert_pem, 0o600)
    _write_atomically(crt_path, cert_pem, 0o600)
    return certificate


def ensure_own_certificate(state_dir: str | Path) -> None:
    """Make the daemon's own certificate if there is none yet, logging its fingerprint."""
    pem_path, _ = own_paths(state_dir)
    if os.path.lexists(pem_path):
        return
    certificate = generate_own_certificate(state_dir)
    log.info("generated a self-signed TLS certificate {path} for {subject}: SHA-256 fingerprint {fingerprint}",
             path=str(pem_path), subject=certificate.subject.rfc4514_string(),
             fingerprint=fingerprint(certificate))


def describe_certificate(path: str | Path) -> list[tuple[str, str]]:
    """(label, value) lines describing the first certificate in *path*."""
    certificate = load_certificates(path)[0]
    try:
        alt_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = ", ".join(f"DNS:{n.value}" if isinstance(n, x509.DNSName) else
                         f"IP:{n.value}" if isinstance(n, x509.IPAddress) else str(n.value) for n in alt_names)
    except x509.ExtensionNotFound:
        sans = "(none)"
    public = certificate.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        key = f"RSA {public.key_size} bits"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        key = f"ECDSA {public.curve.name}"
    else:
        key = type(public).__name__
    not_before, not_after = validity(certificate)
    return [
        ("path", str(path)),
        ("subject", certificate.subject.rfc4514_string()),
        ("issuer", certificate.issuer.rfc4514_string()),
        ("subject alternative names", sans),
        ("key", key),
        ("not before", not_before.strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("not after", not_after.strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("SHA-256 fingerprint", fingerprint(certificate)),
    ]


# -- endpoints -------------------------------------------------------------------------------------


class _Factory(TLSMemoryBIOFactory):
    """TLS around the API's factory, which may decline a connection (None: far over the
    connection caps), closing its socket at once rather than failing inside TLS."""

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)


class TLSServerEndpoint:
    """A TCP listener serving TLS through *creator* (an ``IOpenSSLServerConnectionCreator``)."""

    def __init__(self, reactor: Any, port: int, creator: Any, backlog: int = 50, interface: str = "") -> None:
        self.creator = creator
        self._tcp = endpoints.TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface)  # IPv6 too

    def listen(self, factory: Any) -> Any:
        return self._tcp.listen(_Factory(self.creator, False, factory))


def server_endpoint(reactor: Any, description: str, state_dir: str | Path | None, *,
                    make_certificate: bool = False) -> TLSServerEndpoint:
    """The TLS endpoint of an ``ssl:`` *description*; TLSError when it or its files are unusable.

    Without ``privateKey`` the daemon's own certificate in *state_dir* is served; it is made
    first when *make_certificate* (start-up), and otherwise only checked if it exists.
    """
    spec = parse_listen(description)
    if spec.own_certificate:
        if state_dir is None:
            raise TLSError("no privateKey, and no state dir for the daemon's own certificate")
        pem_path, _ = own_paths(state_dir)
        if make_certificate:
            ensure_own_certificate(state_dir)
        creator = ServerTLS(pem_path, pem_path)
        if not make_certificate and not os.path.lexists(pem_path):
            return TLSServerEndpoint(reactor, spec.port, creator, backlog=spec.backlog, interface=spec.interface)
    else:
        assert spec.private_key is not None and spec.cert_key is not None
        creator = ServerTLS(spec.cert_key, spec.private_key, spec.extra_cert_chain, spec.dh_parameters)
    certificate = creator.load()
    if make_certificate:
        log.info("{description}: TLS certificate {path}, SHA-256 fingerprint {fingerprint}", description=description,
                 path=str(creator.files[0]), fingerprint=fingerprint(certificate))
        expires = validity(certificate)[1]
        if expires < dt.datetime.now(dt.timezone.utc):
            log.warn("the TLS certificate {path} expired on {date}", path=str(creator.files[0]),
                     date=expires.strftime("%Y-%m-%d"))
    return TLSServerEndpoint(reactor, spec.port, creator, backlog=spec.backlog, interface=spec.interface)


def cleartext_warning(description: str, address: Any) -> str | None:
    """The warning for an API listener that is not TLS and is reachable from beyond this host."""
    host = getattr(address, "host", None)
    if is_tls_description(description) or not isinstance(host, str):
        return None  # TLS, or not an IP socket (a Unix socket)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        loopback = False
    else:
        mapped = getattr(ip, "ipv4_mapped", None)
        loopback = (mapped or ip).is_loopback
    if loopback:
        return None
    return (f"{description} listens on {host} without TLS: the API, passwords included, travels in clear "
            f"text there; use an ssl: listen address for anything but loopback")
