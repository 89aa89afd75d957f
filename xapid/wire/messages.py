"""HTTP messages as the channel (:mod:`xapid.wire.http`) and the routes see them: the request,
the reply, the connection's :class:`Client`, the connection bounds, the streamed-body protocol
(:class:`BodySink`), reason phrases, and how a failure maps to a refusal."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable
from typing import Protocol as Protocol_
from typing import runtime_checkable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure

from xapid import __version__

if TYPE_CHECKING:
    from xapid.wire.streams import BodyWriter

SERVER = f"xapid/{__version__}".encode()

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_REASONS.update({413: b"Content Too Large", 422: b"Unprocessable Content"})  # RFC 9110's newer names


def reason(status: int) -> bytes:
    """The standard reason phrase of *status* (RFC 9110)."""
    return _REASONS.get(status) or b"Status %d" % status


@dataclass(eq=False)
class Client:
    """What the layers above know of a connection: where it comes from, and whether it has
    authenticated (made a call with a valid session, or logged in), which they mark."""

    address: str  # the source address ("127.0.0.1", "::1"), or "unix" for a local socket
    authenticated: bool = False
    uid: int | None = None  # a UNIX-socket peer's user id (SO_PEERCRED), None for any other transport


@dataclass
class HttpRequest:
    method: bytes
    target: bytes  # as sent: path and query
    version: bytes  # b"HTTP/1.1"
    headers: dict[bytes, bytes]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    peer: str = ""
    client: Client = field(default_factory=lambda: Client(""))

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def query(self) -> bytes:
        parts = self.target.split(b"?", 1)
        return parts[1] if len(parts) > 1 else b""


@dataclass
class HttpResponse:
    """A reply.  With *stream*, *body* is ignored: the head carries ``Content-Length: length``
    when *length* is set (else the body is close-delimited) and ``stream(writer)`` produces the
    body through a :class:`BodyWriter`, the connection closing abruptly if its Deferred fails or
    the byte count differs from *length*.  With *takeover* (a 101 upgrade or a CONNECT's 200),
    the head is written without a length and the connection is handed to the protocol it builds.
    A response answered to many requests (``event.from`` watchers woken together) has *heads*, a
    dict in which the channels keep its encoded head per (HTTP version, keep-alive): it is never
    changed once made (:func:`~xapid.wire.resource._with_headers` copies)."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: Callable[[BodyWriter], Deferred[None] | None] | None = None
    length: int | None = None
    takeover: Callable[[], IProtocol] | None = None
    heads: dict[tuple[bytes, bool], bytes] | None = field(default=None, repr=False, compare=False)


@runtime_checkable
class BodySink(Protocol_):
    """Where a streamed request body goes (returned by a handler's ``sink_for``).

    ``write`` is called with each piece as it arrives (de-chunked); an unfired Deferred pauses
    the reading of the socket until it fires; raising or failing ends the request (an exception
    with an integer ``status`` attribute, such as :class:`xapid.auth.http.HttpError`, is sent as
    that status, anything else as 500) and ``abort`` is called.  ``finish`` is called once the
    whole body has arrived and gives the reply.  ``abort(reason)`` is called at most once, never
    after ``finish``, when the connection breaks, the framing is invalid, the body stalls or
    a write failed: the sink cleans up.

    Optional attributes (read with ``getattr``), for xapi's import handlers:

    * ``early: HttpResponse | None`` — a reply head sent as soon as the sink is accepted, before
      any of the body is read (``Connection: close``, no Content-Length, its body ignored).  The
      body still streams to the sink; whatever happens later, the client gets no other reply: a
      failure only fails the sink's task and the connection is closed.
    * ``complete: bool`` — once True after a write, the body is over for the sink even if more
      was announced (an XVA's tar end, a raw disk's size reached): ``finish`` is called, and the
      rest is read and discarded (at most :data:`DRAIN_MAX` bytes) until the client closes or the
      announced end, then the connection is closed.
    * ``read_direct(sock_fd, first, count, idle) -> Deferred[int]`` — for a Content-Length body
      of at least :data:`DIRECT_READ_MIN` bytes on a plain TCP/UNIX socket: the sink reads the
      next *count* body bytes itself (*first*: those already received) from *sock_fd*, a
      non-blocking ``dup`` of the socket that it closes, typically in the thread pool, giving up
      after *idle* seconds of silence; the channel does not read the socket meanwhile.  The
      Deferred fires with the bytes consumed (fewer only when the sink is then ``complete``),
      or fails as ``write`` does."""

    def write(self, data: bytes) -> Deferred[None] | None: ...

    def finish(self) -> HttpResponse | Deferred[HttpResponse]: ...

    def abort(self, reason: str) -> None: ...


Handler = Callable[[HttpRequest], "HttpResponse | Deferred[Any]"]


@dataclass(frozen=True)
class HttpSettings:
    """The bounds of one connection (``[server]`` and ``[limits]`` of the config)."""

    max_body: int = 8 << 20
    max_header: int = 64 << 10
    pending_input: int = 1 << 20
    idle_timeout: float = 600.0
    header_timeout: float = 30.0
    body_timeout: float = 120.0


def _refusal(failure: Failure) -> tuple[int, str, tuple[tuple[bytes, bytes], ...]] | None:
    """The HTTP refusal a failure stands for when its exception carries an integer ``status``
    (4xx/5xx) — e.g. :class:`xapid.auth.http.HttpError` — with its text and ``headers``; else None."""
    status = getattr(failure.value, "status", None)
    if not isinstance(status, int) or not 400 <= status <= 599:
        return None
    headers = getattr(failure.value, "headers", ())
    return status, str(failure.value) or reason(status).decode(), tuple(headers) if isinstance(headers, (tuple, list)) else ()


def _gone(failure: Failure) -> bool:
    return bool(failure.check(ConnectionLost, ConnectionDone, CancelledError))


def _is_cancel(outcome: Any) -> bool:
    return hasattr(outcome, "check") and bool(outcome.check(CancelledError))
