"""Connecting to a xapid (or xapi) host: URL, credentials, profile file, TLS fingerprint pinning.

Everything here talks XML-RPC through the standard library (and the official SDK's ``UDSTransport``
for UNIX sockets); nothing needs root on the host.
"""

from __future__ import annotations

import getpass
import hashlib
import http.client
import os
import socket
import ssl
import stat
import tomllib
import urllib.parse
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NULL = "OpaqueRef:NULL"


class ClientError(Exception):
    """A failure reported as one line, with an exit code (1: failure, 2: usage or configuration)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class XenAPIFailure(ClientError):
    """A Xen-API failure: the error code and its parameters."""

    def __init__(self, details: list[Any]):
        self.details = [str(d) for d in details] or ["UNKNOWN"]
        super().__init__(" ".join([self.details[0], *(_quote(p) for p in self.details[1:])]), 1)


def _quote(text: str) -> str:
    return text if text and not any(c.isspace() or c in "\"'" for c in text) else repr(text)


# -- the profile file -------------------------------------------------------------------------


def config_dir(environ: dict[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "xapid"


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ClientError(f"{path}: mode {mode:04o} is open to other users; run chmod 600 {path}", 2)


def load_profile(path: Path, name: str | None) -> dict[str, Any]:
    """The table *name* (default: the file's ``default`` key, else ``[default]``) of the profile file;
    {} when there is no file. The file must be mode 0600 (no access for group or others)."""
    if not path.exists():
        if name:
            raise ClientError(f"{path}: no such file, so no profile {name!r}", 2)
        return {}
    _check_private(path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ClientError(f"{path}: {exc}", 2) from None
    chosen = name or data.get("default") or "default"
    profiles = data.get("profiles", {})
    profile = profiles.get(chosen) if isinstance(profiles, dict) else None
    if profile is None:
        if name:
            raise ClientError(f"{path}: no profile {name!r} (a [profiles.{name}] table)", 2)
        return {}
    if not isinstance(profile, dict):
        raise ClientError(f"{path}: profiles.{chosen} is not a table", 2)
    known = {"url", "user", "password", "password_file", "fingerprint"}
    for key, value in profile.items():
        if key not in known or not isinstance(value, str):
            raise ClientError(f"{path}: profiles.{chosen}.{key}: unknown key or not a string", 2)
    return {**profile, "name": chosen}


# -- remembered fingerprints (ssh's known_hosts) ------------------------------------------------


class KnownHosts:
    """``known_hosts`` beside the profile file: ``PROFILE URL FINGERPRINT`` lines, mode 0600."""

    def __init__(self, path: Path):
        self.path = path

    def _lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        _check_private(self.path)
        return [line.split() for line in self.path.read_text().splitlines() if len(line.split()) == 3]

    def get(self, profile: str, url: str) -> str | None:
        for p, u, fp in self._lines():
            if p == profile and u == url:
                return fp
        return None

    def remember(self, profile: str, url: str, fingerprint: str) -> None:
        lines = [entry for entry in self._lines() if entry[:2] != [profile, url]] + [[profile, url, fingerprint]]
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(" ".join(entry) + "\n" for entry in lines))
        os.replace(tmp, self.path)


def normalise_fingerprint(text: str) -> str:
    hexdigits = text.strip().upper().removeprefix("SHA256:").replace(":", "")
    if len(hexdigits) != 64 or any(c not in "0123456789ABCDEF" for c in hexdigits):
        raise ClientError(f"bad fingerprint {text!r}: expected 32 hex bytes (AA:BB:…), as `xapid cert show` prints",
                          2)
    return ":".join(hexdigits[i:i + 2] for i in range(0, 64, 2))


# -- transports ---------------------------------------------------------------------------------


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, check: Callable[[str], None], **kwargs: Any):
        super().__init__(host, **kwargs)
        self._check = check

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)  # HTTPSConnection.connect wraps the socket
        der = self.sock.getpeercert(binary_form=True) or b""
        try:
            self._check(hashlib.sha256(der).hexdigest().upper())
        except BaseException:
            self.sock.close()
            self.sock = None
            raise


def pinned_context() -> ssl.SSLContext:
    """A TLS client context whose trust is the caller's fingerprint check, not a CA (self-signed host
    certificates): no hostname or chain check, TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the pin replaces the CA check
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class PinnedTransport(xmlrpc.client.SafeTransport):
    """HTTPS whose trust is the certificate's SHA-256 fingerprint, checked on every new connection."""

    def __init__(self, check: Callable[[str], None]):
        context = pinned_context()
        super().__init__(context=context)
        self._check = check
        self._pinned_context = context

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        cached = self._connection
        if cached and host == cached[0] and isinstance(cached[1], http.client.HTTPSConnection):
            return cached[1]
        chost, self._extra_headers, _ = self.get_host_info(host)
        connection = _PinnedHTTPSConnection(chost, self._check, context=self._pinned_context)
        self._connection = host, connection
        return connection


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.path_ = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path_)


def unix_transport(path: str) -> xmlrpc.client.Transport:
    """The SDK's UDSTransport (its tracing and originator headers), on *path* as given: the SDK's own
    connection decodes the path from the host name with ``_`` as ``/``, which breaks on paths with ``_``."""
    try:
        from XenAPI import UDSTransport
    except ImportError:  # the SDK is optional: the standard transport does the same HTTP
        UDSTransport = xmlrpc.client.Transport

    class Transport(UDSTransport):
        def make_connection(self, host: Any) -> http.client.HTTPConnection:
            if hasattr(UDSTransport, "with_originator"):
                self._extra_headers: list[tuple[str, str]] = []
                self.with_tracecontext()
                self.with_originator()
            cached: tuple[Any, http.client.HTTPConnection | None] | None = getattr(self, "_connection", None)
            if cached and cached[0] == path and cached[1] is not None:
                return cached[1]
            connection = _UnixConnection(path)
            self._connection = path, connection
            return connection

    return Transport()


# -- the connection ---------------------------------------------------------------------------


@dataclass
class Target:
    url: str
    user: str | None
    password: str | None
    unix_path: str | None
    fingerprint: str | None  # pinned (flag or remembered), normalised
    profile: str
    known_hosts: KnownHosts | None


class Client:
    """One logged-in session; :meth:`call` makes a Xen-API call and returns its value or raises
    :class:`XenAPIFailure`. :meth:`fork` gives another connection on the same session (for a thread)."""

    def __init__(self, make_proxy: Callable[[], xmlrpc.client.ServerProxy], session: str | None = None):
        self._make_proxy = make_proxy
        self.proxy = make_proxy()
        self.session = session

    def fork(self) -> Client:
        return Client(self._make_proxy, self.session)

    def raw(self, method: str, *params: Any) -> Any:
        try:
            reply = getattr(self.proxy, method)(*params)
        except xmlrpc.client.Fault as exc:
            raise ClientError(f"XML-RPC fault {exc.faultCode}: {exc.faultString}") from None
        except xmlrpc.client.ProtocolError as exc:
            raise ClientError(f"HTTP {exc.errcode} {exc.errmsg} from {exc.url}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"cannot reach the host: {exc}") from None
        if not isinstance(reply, dict) or "Status" not in reply:
            raise ClientError(f"not a Xen-API reply: {str(reply)[:200]}")
        if reply["Status"] == "Success":
            return reply.get("Value")
        raise XenAPIFailure(reply.get("ErrorDescription") or ["UNKNOWN"])

    def call(self, method: str, *args: Any) -> Any:
        return self.raw(method, self.session, *args)

    def login(self, user: str, password: str) -> None:
        self.session = self.raw("session.login_with_password", user, password, "2.21", "xapid-client")

    def logout(self) -> None:
        if self.session:
            try:
                self.raw("session.logout", self.session)
            except ClientError:
                pass
            self.session = None
        self.close()

    def close(self) -> None:
        try:
            self.proxy("close")()
        except Exception:  # noqa: BLE001, S110 - best effort
            pass


def resolve_target(opts: Any, environ: dict[str, str]) -> Target:
    """The URL, user, password and pin from flags, then the environment, then the profile file."""
    cfg = Path(environ["XAPID_CLIENT_CONFIG"]) if environ.get("XAPID_CLIENT_CONFIG") else config_dir(environ) / "client.toml"
    profile = load_profile(cfg, opts.profile or environ.get("XAPID_PROFILE"))
    url = opts.url or environ.get("XAPID_URL") or profile.get("url")
    if not url:
        raise ClientError("no host: give --url, set XAPID_URL, or add a url to a profile in " + str(cfg), 2)
    unix_path = None
    if url.startswith("unix:"):
        unix_path = url[len("unix:"):]
    elif url.startswith("/"):
        unix_path = url
    else:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ClientError(f"bad URL {url!r}: expected http://, https:// or a UNIX socket path", 2)
    user = opts.user or environ.get("XAPID_USER") or profile.get("user")
    password = None
    password_file = opts.password_file or (None if environ.get("XAPID_PASSWORD") is not None else profile.get("password_file"))
    if password_file:
        try:
            text = Path(os.path.expanduser(password_file)).read_text()
            password = text.splitlines()[0] if text else ""
        except OSError as exc:
            raise ClientError(f"cannot read the password file: {exc}", 2) from None
    elif environ.get("XAPID_PASSWORD") is not None:
        password = environ["XAPID_PASSWORD"]
    elif "password" in profile:
        password = profile["password"]
    pin = opts.fingerprint or profile.get("fingerprint")
    fingerprint = normalise_fingerprint(pin) if pin else None
    return Target(url=url, user=user, password=password, unix_path=unix_path, fingerprint=fingerprint,
                  profile=profile.get("name", opts.profile or environ.get("XAPID_PROFILE") or "default"),
                  known_hosts=KnownHosts(cfg.with_name("known_hosts")))


def connect(target: Target, stdin: Any, stderr: Any, *, login: bool = True) -> Client:
    """A logged-in :class:`Client` for *target*; prompts for a missing password when stdin is a terminal."""
    if target.unix_path is not None:
        path = target.unix_path

        def make_proxy() -> xmlrpc.client.ServerProxy:
            return xmlrpc.client.ServerProxy("http://localhost/", transport=unix_transport(path), allow_none=True)
    elif target.url.startswith("https:"):
        check = _pin_checker(target, stderr)

        def make_proxy() -> xmlrpc.client.ServerProxy:
            return xmlrpc.client.ServerProxy(target.url, transport=PinnedTransport(check), allow_none=True)
    else:
        def make_proxy() -> xmlrpc.client.ServerProxy:
            return xmlrpc.client.ServerProxy(target.url, allow_none=True)
    client = Client(make_proxy)
    if not login:
        return client
    user, password = target.user, target.password
    if target.unix_path is not None and user is None and password is None and os.geteuid() == 0:
        user, password = "", ""  # root on the UNIX socket: the local superuser, as xapi_local() scripts do
    if user is None:
        raise ClientError("no user: give --user, set XAPID_USER, or add a user to the profile", 2)
    if password is None:
        if not (hasattr(stdin, "isatty") and stdin.isatty()):
            raise ClientError("no password: set XAPID_PASSWORD, give --password-file, or run in a terminal", 2)
        try:
            password = getpass.getpass(f"Password for {user} at {target.url}: ")
        except (EOFError, KeyboardInterrupt):
            raise ClientError("no password given", 2) from None
    client.login(user, password)
    return client


def _pin_checker(target: Target, stderr: Any) -> Callable[[str], None]:
    url = target.url
    known = target.known_hosts
    remembered = known.get(target.profile, url) if known else None

    def check(hex_upper: str) -> None:
        nonlocal remembered
        seen = ":".join(hex_upper[i:i + 2] for i in range(0, 64, 2))
        expected = target.fingerprint or remembered
        if expected is None:
            stderr.write(f"xapid: first connection to {url} (profile {target.profile}): remembering its certificate's "
                         f"SHA-256 fingerprint {seen}\n")
        elif seen != expected:
            raise ClientError(f"{url}: the certificate's SHA-256 fingerprint {seen} is not the expected {expected}; "
                              "refusing to connect (if the certificate was replaced, check it and pass --fingerprint)")
        if known is not None and seen != remembered:
            known.remember(target.profile, url, seen)
            remembered = seen

    return check
