"""Authentication of the HTTP handlers beside the RPC endpoint, as xapi does it.

A caller names a live API session (``session_id`` query parameter, else a ``session_id``
cookie) or sends HTTP Basic ``user:password``, checked by the API's
:class:`~xapid.auth.login.PasswordChecker` with the same per-source limits as
``session.login*``.  A failed Basic login is written to the audit log and waits
``auth_failure_delay`` like a failed RPC login.  Anything else is 401 with
``WWW-Authenticate: Basic realm="xapid"``.  The handler then checks the role it needs
(:func:`xapid.auth.roles.role_at_least`) and refuses with 403.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from twisted.logger import Logger

from xapid.audit import redact
from xapid.errors import internal_error_with_id
from xapid.wire.http import HttpRequest, HttpResponse

log = Logger()

TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
CHALLENGE = ((b"WWW-Authenticate", b'Basic realm="xapid"'),)


class HttpError(Exception):
    """An HTTP refusal: *status*, a one-line reason for the body, and extra headers."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers

    def response(self) -> HttpResponse:
        """The plain-text reply carrying this refusal."""
        return HttpResponse(self.status, f"{self}\n".encode(), [TEXT, *self.headers])


@dataclass(frozen=True)
class HttpCaller:
    """Who made an HTTP request: a role, a user name, and the session used (None for Basic)."""

    role: str
    user: str
    session_ref: str | None = None


def parse_query(request: HttpRequest) -> dict[str, list[str]]:
    """The query parameters (repeatable, blanks kept); HttpError 400 when the query is not UTF-8."""
    try:
        return parse_qs(request.query.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "the query string is not valid UTF-8") from None


def one(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    """The last value of query parameter *name*, or *default*."""
    values = params.get(name)
    return values[-1] if values else default


def internal_error(request: HttpRequest, what: str = "") -> HttpResponse:
    """The 500 answer to *request* when its handler failed unexpectedly (call it from the ``except``
    block: the traceback is logged with a fresh incident id, which the reply names; never the
    exception's text).  *what* names the work in the log line (default: the method and path)."""
    incident, _ = internal_error_with_id()
    log.failure("{what} failed (internal error id {incident})", incident=incident,
                what=what or f"{request.method.decode('latin-1')} {request.path.decode('latin-1')[:256]}")
    return HttpError(500, f"internal error, id {incident}; see the daemon log").response()


def named_object(store: Any, params: dict[str, list[str]], classes: tuple[str, ...],
                 required: HttpError) -> tuple[Any, str]:
    """The object of one of *classes* named by the ``ref`` (else ``uuid``) query parameter, or None
    when there is none, with the name given; *required* is raised when neither parameter is."""
    ref, uuid = one(params, "ref"), one(params, "uuid")
    if not ref and not uuid:
        raise required
    obj = store.find(ref) if ref else store.by_uuid(uuid or "")
    return (obj if obj is not None and obj.cls in classes else None), ref or uuid or ""


def cookie_session(request: HttpRequest) -> str | None:
    """The ``session_id`` cookie's value, or None (also for a malformed Cookie header)."""
    header = request.headers.get(b"cookie")
    if not header:
        return None
    try:
        cookie = SimpleCookie(header.decode("latin-1"))
    except CookieError:
        return None
    morsel = cookie.get("session_id")
    return morsel.value if morsel else None


async def authenticate(api: Any, request: HttpRequest, params: dict[str, list[str]]) -> HttpCaller:
    """The caller of *request*, from a session (query, else cookie) or HTTP Basic; raises
    :class:`HttpError` 401 (with a Basic challenge) when there is none or it is not valid.
    A successful Basic login marks the connection authenticated (for admission)."""
    session_ref = one(params, "session_id") or cookie_session(request)
    if session_ref:
        session = api.sessions.touch(session_ref)
        if session is None:
            raise HttpError(401, "invalid or expired session_id", CHALLENGE)
        return HttpCaller(session.role, session.user, session.ref)
    header = request.headers.get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"basic":
        raise HttpError(401, "authentication required: session_id or HTTP Basic", CHALLENGE)
    try:
        name, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise HttpError(401, "malformed Basic credentials", CHALLENGE) from None
    client = getattr(request, "client", None)
    user = None
    if sep:
        outcome = await api.passwords.check(client.address if client is not None else "", name, password,
                                            remembered=True)  # a right password skips bcrypt for a while
        user = outcome.user
        if user is None and outcome.checked:  # throttled and refused tries are not logged one by one
            log.warn("failed HTTP login for {user!r} from {peer} (source {source})", user=name,
                     peer=request.peer, source=outcome.source)
    if user is None:
        _audit_failure(api, request, name if sep else None)
        await api.sleep(api.auth_failure_delay)
        raise HttpError(401, "authentication failed", CHALLENGE)
    if client is not None:
        client.authenticated = True
    return HttpCaller(user.role, getattr(user, "name", name), None)


def _audit_failure(api: Any, request: HttpRequest, name: str | None) -> None:
    """A failed HTTP Basic login, in the audit log like a failed session.login_with_password."""
    audit = getattr(api, "audit", None)
    if audit is None:
        return
    try:
        client = getattr(request, "client", None)
        method = request.method.decode("latin-1")[:16]
        # bounded as RPC arguments are (record cuts the user the same way): the name is an
        # unauthenticated client's, up to the header limit
        args = redact(["uname", "pwd"], [name, None])
        audit.record(method=f"HTTP Basic {method} {request.path.decode('latin-1')[:256]}", user=name,
                     role=None, originator=None, peer=client.address if client is not None else None,
                     args=args, outcome="SESSION_AUTHENTICATION_FAILED")
    except Exception:  # noqa: BLE001 - the audit never changes the answer
        log.failure("writing an audit line failed")
