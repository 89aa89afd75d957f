"""A small HTTP/1.1 server protocol for the API: exactly what Xen-API clients use, fast, and
safe to expose to hostile clients.

One connection is one :class:`HttpChannel`.  It parses the request line, headers and body
(``Content-Length`` or chunked), answers ``Expect: 100-continue``, keeps connections alive
(HTTP/1.1 by default, 1.0 on request) and answers pipelined requests one at a time, in order,
each in a single write.  What it guarantees against a hostile peer:

* **Linear cost.**  Input is kept in one ``bytearray`` consumed from the front; searches resume
  where the previous one stopped; chunked bodies are decoded by a state machine that touches
  each byte once.  Parsing is one loop, never re-entered from a reply, so any number of
  pipelined requests costs no stack.
* **Bounded memory.**  The line and headers are bounded (431), the body too (413).  While a
  reply is pending (a failed login's delay, an ``event.from`` wait), input beyond
  ``pending_input`` stops the reading of the socket until the reply is written; while the
  client does not read its replies (the transport's buffer is full), requests are not
  processed and reading stops too.
* **Deadlines.**  A client has ``header_timeout`` seconds from the connection (or from the first
  byte of a later request) to send the line and headers, and ``body_timeout`` for the body;
  then it gets 408 and is closed.  A kept-alive connection waiting for its next request is
  closed after ``idle_timeout``.  A call in progress (a long poll) is never a timeout.
* **Admission.**  Each connection asks the factory's :class:`~xapid.wire.admission.Admission`
  for a place when it is made (503 when there is none) and tells it when the layers above
  mark it authenticated.

Twisted's ``twisted.web`` costs several times more per request (header objects, form
parsing, request machinery); the small calls the API lives on are dominated by it.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable
from typing import Protocol as Protocol_
from typing import runtime_checkable

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.python.failure import Failure
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from xapid import __version__

log = Logger()

SERVER = f"xapid/{__version__}".encode()
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_CHUNK_LINE_MAX = 1024  # a chunk-size line, extensions included
_TRAILERS_MAX = 8192


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


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(transport: Any) -> int | None:
    """The user id of the process at the other end of *transport* when it is a UNIX socket
    (``SO_PEERCRED``: the credentials the kernel recorded at connect, which the peer cannot
    forge); None for any other transport or when the kernel does not say."""
    try:
        sock = transport.getHandle()
        if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX:
            return None
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (AttributeError, OSError, struct.error):
        return None
    return int(uid)


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
    the head is written without a length and the connection is handed to the protocol it builds."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: Callable[[BodyWriter], Deferred[None] | None] | None = None
    length: int | None = None
    takeover: Callable[[], IProtocol] | None = None


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


class BodyWriter:
    """Writes a streamed response body to one connection.

    ``write(data)`` returns a Deferred that fires when the connection wants more (at once,
    unless the transport's buffer is over its high-water mark: then when it drains), or fails
    with :class:`~twisted.internet.error.ConnectionLost` once the client is gone or the body
    overran its announced length; the producer must then stop.  ``closed`` is then True."""

    def __init__(self, channel: HttpChannel, length: int | None) -> None:
        self._channel = channel
        self.length = length
        self.sent = 0
        self.closed = False
        self._waiting: list[Deferred[None]] = []

    def write(self, data: bytes) -> Deferred[None]:
        if self.closed:
            return fail(ConnectionLost("the connection is closed"))
        if not data:
            return succeed(None)
        if self.length is not None and self.sent + len(data) > self.length:
            self._channel._abort_stream(f"the body overran its Content-Length of {self.length}")
            return fail(ConnectionLost("the body overran its Content-Length"))
        self.sent += len(data)
        self._channel._send(bytes(data))
        if not self._channel._write_paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        self._channel._stalled()
        return d

    def direct(self) -> int | None:
        """A duplicate of the connection's socket descriptor, for a producer that sends the body
        itself from a thread (``sendfile``, zero buffers: no copy through the reactor), when the
        transport is a plain TCP or UNIX socket with nothing queued; None otherwise (TLS, queued
        bytes: use :meth:`write`).  The producer then never calls :meth:`write`, counts what it
        sent with :meth:`account`, stops when :attr:`closed` turns True, and closes the descriptor.
        A duplicate, so that the connection closing never lets its number be reused under it."""
        transport = self._channel.transport
        if (self.closed or not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False)
                or not transport.connected or transport.disconnecting):
            return None
        queued = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
        if queued > 0 or getattr(transport, "_tempDataLen", 0):
            return None
        try:
            return os.dup(transport.fileno())
        except (OSError, AttributeError):
            return None

    def account(self, count: int) -> None:
        """*count* bytes were sent directly (see :meth:`direct`)."""
        self.sent += count

    def _resume(self) -> None:
        if self._channel._timer_kind == "send":
            self._channel._cancel_timer()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _lost(self, why: str) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(ConnectionLost(why))


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


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def write_now(transport: Any, data: bytes, more: bytes = b"") -> int:
    """Write as much of *data* (then *more*) as the socket takes right now, bypassing the
    reactor's queue; returns how many bytes went out (0 when this transport cannot write directly).

    The reactor normally queues a write and sends it on its next turn, after it has read
    more input.  When many deferred replies are answered at once (1 000 ``event.from``
    watchers woken by one change) that makes each watcher wait for every other socket's
    input to be read first.  Sending at once fixes that.  This is only valid on a plain
    socket transport (TCP, UNIX) that is connected and has nothing queued: the caller must
    queue the rest (and everything after it) through ``transport.write`` so that nothing
    overtakes queued data (:meth:`HttpChannel._send` does).  TLS transports carry ciphertext on their socket and are never
    written this way.  *data* and *more* go out in one ``sendmsg`` (a reply's head and body,
    never concatenated), uncapped (Twisted's own writes send 128 KiB per reactor turn).
    This is the one place that reaches below Twisted's transport API.
    """
    if not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False):
        return 0
    if not transport.connected or transport.disconnecting:
        return 0
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket):
        sent = transport.writeSomeData(data)
        return sent if isinstance(sent, int) and sent > 0 else 0
    try:
        return sock.sendmsg([data, more]) if more else sock.send(data)
    except OSError:  # EAGAIN: all is queued; a broken socket: Twisted's write finds out and closes
        return 0


def _widen(transport: Any) -> None:
    """Ready a plain socket transport for large replies: a send buffer of :data:`LARGE_SNDBUF`
    (so a reply of several MB leaves in one ``sendmsg`` while the client reads) and
    Twisted's per-turn send limit raised to :data:`LARGE_SEND_LIMIT` for whatever is queued."""
    if getattr(transport, "_xapid_wide", False) or getattr(transport, "TLS", False):
        return
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket):
        return
    try:
        transport._xapid_wide = True
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * LARGE_SNDBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LARGE_SNDBUF)
        transport.SEND_LIMIT = max(getattr(transport, "SEND_LIMIT", 0), LARGE_SEND_LIMIT)
    except (OSError, AttributeError):
        pass


_NOTHING = object()
_STREAM_PIECE = 1 << 20  # decoded chunk data given to a sink in one write at most
HIGH_WATER = 256 << 10  # bytes a streamed reply may queue in a socket transport before its writer waits
DRAIN_MAX = 16 << 20  # after an early reply's body ended (complete or failed): input read and discarded at most
STREAM_READ = 1 << 20  # bytes per recv while a body streams to a sink (Twisted's default is 64 KiB)
DIRECT_READ_MIN = 1 << 20  # a streamed body from this size on may be read by its sink directly (read_direct)
LARGE_REPLY = 256 << 10  # a reply body from this size on widens its connection's socket buffer (_widen)
LARGE_SNDBUF = 4 << 20  # SO_SNDBUF asked for then (the kernel doubles it, capped by net.core.wmem_max)
LARGE_SEND_LIMIT = 1 << 20  # bytes Twisted sends per reactor turn on such a connection (its default 128 KiB)

# parser states
_HEAD, _DECIDE, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DONE = range(8)


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


@implementer(IPushProducer)
class HttpChannel(Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, handler: Handler, settings: HttpSettings, clock: Any, admission: Any = None):
        self.handler = handler
        self.settings = settings
        self.clock = clock
        self.admission = admission
        self.client = Client("")
        self.peer = ""
        self._sink_for: Callable[[HttpRequest], Any] | None = getattr(handler, "sink_for", None)
        self._buf = bytearray()
        self._scan = 0  # where the search for the end of the headers resumes
        self._blank = 0  # blank lines skipped before the current request
        self._state = _HEAD
        self._framing = _DONE  # the body's first state (_BODY, _CHUNK_SIZE, or _DONE: no body)
        self._request: HttpRequest | None = None  # headers parsed, body pending
        self._body = bytearray()
        self._remaining = 0  # body or chunk bytes still to come
        self._pending: Deferred[Any] | None = None  # a reply (or a sink_for decision) being computed
        self._sink: BodySink | None = None  # where the current request's body is streamed
        self._sink_wait: Deferred[Any] | None = None  # the sink's write that reading waits on
        self._writer: BodyWriter | None = None  # a streamed reply in progress
        self._stream_keep = False
        self._takeover: IProtocol | None = None  # the protocol the connection was handed to
        self._early = False  # an early reply head was sent: nothing else is ever answered here
        self._ended = False  # an early reply's request is over: the input is only drained
        self._drain_left = 0  # bytes still discarded before closing, while _ended
        self._processing = False
        self._closing = False
        self._write_paused = False  # the transport's buffer is full: the client is not reading
        self._read_paused = False
        self._direct = True  # nothing of ours is queued in the transport: replies may go straight out
        self._direct_ok = False  # the current body may still go to its sink's read_direct (once some arrived)
        self._timer: Any = None
        self._timer_kind = ""
        self._authenticated = False
        self._inline = False
        self._outcome: Any = _NOTHING
        self._producing = False
        self.connected_at = 0.0

    # -- connection ------------------------------------------------------------------------

    @property
    def _io(self) -> Any:
        """The connection's transport, set from connectionMade on: TCP, TLS or UNIX, with the producer
        and abortConnection methods that Protocol's ``ITransport | None`` does not declare."""
        return self.transport

    def connectionMade(self) -> None:
        peer = self._io.getPeer()
        host = getattr(peer, "host", None)
        self.client = Client(str(host) if host is not None else "unix",
                             uid=peer_uid(self.transport) if host is None else None)
        self.peer = f"{host}:{getattr(peer, 'port', '')}" if host is not None else "unix"
        self.connected_at = self.clock.seconds()
        self._io.registerProducer(self, True)
        self._producing = True
        if self.admission is not None:
            refusal = self.admission.admit(self)
            if refusal:
                self._refuse(503, refusal)
                return
        self._deadline("header", self.settings.header_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        takeover = self._takeover
        self._closing = True
        self._cancel_timer()
        self._buf = bytearray()
        self._body = bytearray()
        if self.admission is not None:
            self.admission.release(self)
        self._abort_sink("the connection was lost")
        if self._writer is not None:
            self._writer._lost("the client went away")
        if self._pending is not None and not self._pending.called:
            self._pending.cancel()
        if takeover is not None:
            takeover.connectionLost(reason if reason is not None else Failure(ConnectionDone()))

    def dataReceived(self, data: bytes) -> None:
        if self._takeover is not None:
            self._takeover.dataReceived(data)
            return
        if self._closing:
            return
        if self._ended:
            self._drain(len(data))
            return
        if self._timer_kind == "idle":  # the first byte of the next request
            self._deadline("header", self.settings.header_timeout)
        elif self._sink is not None and self._timer_kind == "body":  # a streamed body: an inactivity deadline
            self._timer.reset(self.settings.body_timeout)
        if (self._direct_ok and self._state == _BODY and self._sink is not None and self._sink_wait is None
                and not self._processing and self._pending is None):
            self._buf += data  # the first body bytes: the sink may read the rest itself (read_direct)
            self._read_direct()
        elif (self._state == _BODY and self._sink is not None and not self._buf and self._sink_wait is None
                and not self._processing and self._pending is None):
            # a Content-Length body streaming to a sink: the piece goes to it as received, uncopied
            taken = min(len(data), self._remaining)
            if taken < len(data):
                self._buf += memoryview(data)[taken:]
                data = data[:taken]
            self._remaining -= taken
            if not self._remaining:
                self._state = _DONE
            self._processing = True
            try:
                self._feed(data)
            finally:
                self._processing = False
        else:
            self._buf += data
        self._process()

    @property
    def busy(self) -> bool:
        """A request is being answered, streamed, or the connection was handed over (so it is not idle)."""
        return (self._pending is not None or self._sink is not None or self._writer is not None
                or self._takeover is not None)

    @property
    def receiving(self) -> bool:
        """Part of a request has arrived."""
        return bool(self._buf) or self._state != _HEAD

    def evict(self) -> None:
        """Close at once (the admission needs the place)."""
        self._closing = True
        self._io.abortConnection()

    # -- IPushProducer: the transport tells us when the client stops reading its replies ------

    def pauseProducing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resumeProducing(self) -> None:
        self._write_paused = False
        if self._writer is not None:
            self._writer._resume()
        if not self._closing:
            self._process()

    def stopProducing(self) -> None:
        self._closing = True

    def _pause_reading(self) -> None:
        if not self._read_paused and not self._closing:
            self._read_paused = True
            self._io.pauseProducing()

    def _flow(self) -> None:
        """Read from the socket only while the input buffered here is small enough, or nothing
        waits on a reply, the client reads what it is sent, and no streamed body's sink is behind."""
        if self._closing or self._takeover is not None:
            return
        replying = self._pending is not None or self._writer is not None
        blocked = (self._write_paused or self._sink_wait is not None
                   or (replying and len(self._buf) > self.settings.pending_input))
        if blocked:
            self._pause_reading()
        elif self._read_paused:
            self._read_paused = False
            self._io.resumeProducing()

    # -- deadlines -------------------------------------------------------------------------

    def _deadline(self, kind: str, seconds: float) -> None:
        self._cancel_timer()
        self._timer_kind = kind
        self._timer = self.clock.callLater(seconds, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_kind = ""

    def _expired(self) -> None:
        kind, self._timer, self._timer_kind = self._timer_kind, None, ""
        if self._ended:  # draining after an early reply: the client went quiet
            if not self._closing:
                self._close()
            return
        if kind == "send" and not self._closing:
            self._abort_stream("the client read nothing of a streamed reply for idle_timeout seconds")
            if self._writer is not None:
                self._writer._lost("the client stopped reading")
            return
        if (self._closing or self._pending is not None or self._sink_wait is not None or self._writer is not None
                or self._takeover is not None):
            return
        if kind == "idle" or (kind == "header" and not self.receiving):
            self._close()  # nothing of a request arrived: just hang up
            return
        self._refuse(408, f"the request's {'headers' if kind == 'header' else 'body'} took too long to arrive")

    # -- the parse loop --------------------------------------------------------------------

    def _process(self) -> None:
        """Advance the buffered requests, in order, until one needs to wait."""
        if self._processing:
            return
        self._processing = True
        try:
            while (not self._closing and self._pending is None and not self._write_paused and self._sink_wait is None
                   and self._writer is None and self._takeover is None and not self._ended):
                if not self._step():
                    break
        except _Refused as refusal:
            self._refuse(refusal.status, refusal.reason)
        finally:
            self._processing = False
        self._flow()

    def _step(self) -> bool:
        """Advance the current request by one stage; False when more input is needed."""
        state = self._state
        if state == _HEAD:
            return self._head(self._buf)
        if state == _DECIDE:
            self._decide()
            return True
        if state == _BODY:
            return self._fixed(self._buf)
        if state != _DONE:
            return self._chunked(self._buf)
        self._complete()
        return True

    def _head(self, buf: bytearray) -> bool:
        """Parse the request line and headers once they have all arrived."""
        while self._blank < 2 and buf[:2] == b"\r\n":  # a blank line or two before a request (RFC 9112 §2.2)
            del buf[:2]
            self._blank += 1
        end = buf.find(b"\r\n\r\n", max(0, self._scan - 3))
        limit = self.settings.max_header
        if end < 0:
            self._scan = len(buf)
            if len(buf) > limit:
                line_end = buf.find(b"\r\n")
                first = bytes(buf[:line_end if 0 <= line_end < 256 else 256])
                if b" HTTP/1." not in first:
                    raise _Refused(400, "not an HTTP request")
                raise _Refused(431, "request headers too large")
            return False
        if end > limit:
            raise _Refused(431, "request headers too large")
        head = bytes(buf[:end])
        del buf[:end + 4]
        self._scan = 0
        self._blank = 0
        self._start(head)
        self._cancel_timer()
        return True

    def _start(self, head: bytes) -> None:
        bare = head.replace(b"\r\n", b"")
        if b"\n" in bare or b"\r" in bare:
            raise _Refused(400, "bare CR or LF in the request head")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1] or not parts[2].startswith(b"HTTP/"):
            raise _Refused(400, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _Refused(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        headers: dict[bytes, bytes] = {}
        repeated: dict[bytes, list[bytes]] = {}  # joined once at the end: linear however many repeats
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise _Refused(400, "malformed header line")
            key = name.lower()
            value = value.strip(b" \t")
            first = headers.get(key)
            if first is None:
                headers[key] = value
            elif key == b"content-length":
                if first != value:
                    raise _Refused(400, "conflicting Content-Length headers")
            else:
                repeated.setdefault(key, [first]).append(value)
        for key, values in repeated.items():
            headers[key] = b", ".join(values)
        self._request = HttpRequest(method, target, version, headers, peer=self.peer, client=self.client)
        coding = headers.get(b"transfer-encoding")
        if coding is not None:
            if coding.lower() != b"chunked":
                raise _Refused(501, "only the chunked transfer coding is supported")
            if b"content-length" in headers:
                raise _Refused(400, "both Content-Length and Transfer-Encoding")
            self._framing = _CHUNK_SIZE
        else:
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or len(length) > 18:
                raise _Refused(400, "bad Content-Length")
            self._remaining = int(length)
            self._framing = _BODY if self._remaining else _DONE
        self._state = _DECIDE

    # -- where the body goes ---------------------------------------------------------------

    def _decide(self) -> None:
        """Ask the handler's ``sink_for`` (if it has one) where the body goes, before reading any of it."""
        if self._sink_for is None:
            self._chosen(None)
            return
        request = self._request
        assert request is not None
        try:
            choice = self._sink_for(request)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the connection silently
            choice = Failure()
        if isinstance(choice, Deferred):
            self._settle(choice, self._chosen)
        else:
            self._chosen(choice)

    def _chosen(self, choice: Any) -> None:
        request = self._request
        if request is None or self._closing:
            if isinstance(choice, BodySink) and not isinstance(choice, HttpResponse):
                try:
                    choice.abort("the connection was lost")
                except Exception:  # noqa: BLE001
                    log.failure("aborting a body sink failed")
            return
        announced = self._framing != _DONE
        if choice is None:  # the ordinary buffered body
            if self._framing == _BODY and self._remaining > self.settings.max_body:
                self._refuse(413, "request body is too large")
                return
        elif isinstance(choice, (HttpResponse, Failure)) or not isinstance(choice, BodySink):
            # answered before the body: an unread body ends the connection
            self._request, self._state = None, _HEAD
            self._reply(request, choice, close=announced)
            return
        else:
            self._sink = choice
            self._stream_reads()
        self._state = self._framing
        if announced and request.headers.get(b"expect", b"").lower() == b"100-continue":
            self._send(request.version + b" 100 Continue\r\n\r\n")
        early = getattr(choice, "early", None) if self._sink is not None else None
        if isinstance(early, HttpResponse):
            self._send_early(early)
        if announced:
            self._deadline("body", self.settings.body_timeout)
            self._direct_ok = self._sink is not None
            self._read_direct()

    def _read_direct(self) -> None:
        """Let the sink read a Content-Length body itself (its optional ``read_direct``), from the
        thread pool on a ``dup`` of a plain TCP/UNIX socket, while the reactor's reading is paused;
        the bytes already buffered go first.  Its Deferred fires with the bytes it consumed: the
        rest of the body (if any) is then read here as usual, or drained once it is ``complete``."""
        sink = self._sink
        if not self._direct_ok or not self._buf or self._state != _BODY:
            return  # not before some of the body arrived: a client hanging up at once is seen here, at once
        self._direct_ok = False
        reader = getattr(sink, "read_direct", None)
        transport = self.transport
        if (sink is None or not callable(reader) or self._framing != _BODY or self._remaining < DIRECT_READ_MIN
                or not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False)
                or not isinstance(getattr(transport, "socket", None), socket.socket)
                or not transport.connected or transport.disconnecting):
            return
        try:
            sock_fd = os.dup(transport.fileno())
        except OSError:
            return
        count = self._remaining
        taken = min(len(self._buf), count)
        first = bytes(self._buf[:taken])
        del self._buf[:taken]
        self._cancel_timer()  # the reader applies body_timeout itself
        try:
            d = reader(sock_fd, first, count, self.settings.body_timeout)
        except Exception:  # noqa: BLE001 - the sink refused: the request ends
            os.close(sock_fd)
            d = fail()
        if not isinstance(d, Deferred):
            d = fail(TypeError("read_direct must return a Deferred"))
        box: list[Any] = [True]
        d.addBoth(self._direct_read, box, count, taken)
        box[0] = False
        if len(box) > 1:  # fired at once
            self._direct_read(box[1], box, count, taken)
            return
        self._sink_wait = d
        self._pause_reading()

    def _direct_read(self, outcome: Any, box: list[Any], count: int, taken: int) -> None:
        if box[0]:
            box.append(outcome)
            return
        self._sink_wait = None
        if self._closing or self._sink is None:
            return
        if isinstance(outcome, Failure):
            self._sink_failed(outcome)
            return
        consumed = outcome if isinstance(outcome, int) and outcome >= 0 else 0
        self._remaining = max(0, count - max(consumed, taken))  # what it left of the buffered bytes is dropped
        if not self._remaining:
            self._state = _DONE
        elif not self._sink_completed():
            self._deadline("body", self.settings.body_timeout)
        self._process()

    def _stream_reads(self) -> None:
        """Read up to :data:`STREAM_READ` bytes per recv from now on (this connection streams a body)."""
        transport = self.transport
        if isinstance(transport, FileDescriptor) and transport.bufferSize < STREAM_READ:
            transport.bufferSize = STREAM_READ  # also the transport's write high-water mark: fine at 1 MiB

    def _send_early(self, response: HttpResponse) -> None:
        """xapi's import reply: the head now (200, ``Connection: close``, no length), before the body."""
        self._early = True
        if self.client.authenticated and not self._authenticated:
            self._authenticated = True
            if self.admission is not None:
                self.admission.authenticated(self)
        self._send(self._head_bytes(b"HTTP/1.1", response, None, False))

    def _sink_completed(self) -> bool:
        """After a write: has the sink declared the body over (before its announced end)?"""
        sink = self._sink
        if sink is None or self._state == _DONE or not getattr(sink, "complete", False):
            return False
        self._state = _DONE
        self._body = bytearray()
        # what is left of the announced body is discarded (what is buffered counts)
        rest = self._remaining if self._framing == _BODY else DRAIN_MAX
        self._drain_left = min(DRAIN_MAX, rest)
        return True

    def _drain(self, count: int) -> None:
        """Discard *count* bytes of input after an early reply's body ended; close once enough went."""
        self._drain_left -= count
        if self._drain_left <= 0:
            self._close()
        elif self._timer_kind != "body":
            self._deadline("body", self.settings.body_timeout)
        else:
            self._timer.reset(self.settings.body_timeout)

    def _end_early(self) -> None:
        """The request of an early reply is over (finished, completed or failed): drain, then close."""
        self._ended = True
        self._request, self._sink = None, None
        self._cancel_timer()
        if self._drain_left <= 0:
            self._close()
            return
        left, self._buf = len(self._buf), bytearray()
        if self._read_paused:
            self._read_paused = False
            self._io.resumeProducing()
        self._drain(left)

    def _fixed(self, buf: bytearray) -> bool:
        """Take Content-Length body bytes from *buf*: buffered, or fed to the sink as they come."""
        if self._sink is not None:
            if not buf:
                return False
            taken = min(len(buf), self._remaining)
            if taken == len(buf):
                piece = bytes(buf)
                self._buf = bytearray()
            else:
                piece = bytes(buf[:taken])
                del buf[:taken]
            self._remaining -= taken
            if not self._remaining:
                self._state = _DONE
            self._feed(piece)
            return True
        if len(buf) < self._remaining:
            self._body += buf
            self._remaining -= len(buf)
            del buf[:]
            return False
        if self._body:
            self._body += buf[:self._remaining]
            body = bytes(self._body)
            self._body = bytearray()
        else:
            body = bytes(buf[:self._remaining])
        del buf[:self._remaining]
        self._remaining = 0
        self._state = _DONE
        assert self._request is not None
        self._request.body = body
        return True

    def _chunked(self, buf: bytearray) -> bool:
        """Decode chunked body data from *buf*; True once the last chunk and trailers arrived.
        With a sink, the data decoded from what has arrived goes to it in one write (however
        small the chunks); False also when the sink asked to wait."""
        done = self._dechunk(buf)
        if self._sink is not None and self._body and not self._closing:
            self._flush_chunks()
            if self._sink_wait is not None:
                return done  # True: the loop waits on the sink before finishing
        return done or self._state == _DONE

    def _flush_chunks(self) -> None:
        piece = bytes(self._body)
        self._body = bytearray()
        self._feed(piece)

    def _dechunk(self, buf: bytearray) -> bool:
        while True:
            if self._state == _DONE:  # the sink declared the body complete
                return True
            if self._state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", 0, _CHUNK_LINE_MAX + 2)
                if end < 0:
                    if len(buf) > _CHUNK_LINE_MAX:
                        raise _Refused(400, "bad chunk size line")
                    return False
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip(b" \t")
                if not _HEX.match(size_text):
                    raise _Refused(400, "bad chunk size")
                size = int(size_text, 16)
                del buf[:end + 2]
                if size == 0:
                    self._state = _TRAILERS
                    continue
                if self._sink is None and len(self._body) + size > self.settings.max_body:
                    raise _Refused(413, "request body is too large")
                self._remaining = size
                self._state = _CHUNK_DATA
            elif self._state == _CHUNK_DATA:
                if not buf:
                    return False
                taken = min(len(buf), self._remaining)
                if self._sink is not None:
                    self._body += buf[:taken]
                    del buf[:taken]
                    self._remaining -= taken
                    if not self._remaining:
                        self._state = _CHUNK_END
                    if len(self._body) >= _STREAM_PIECE:
                        self._flush_chunks()
                        if self._sink_wait is not None or self._closing:
                            return False
                    continue
                self._body += buf[:taken]
                del buf[:taken]
                self._remaining -= taken
                if self._remaining:
                    return False
                self._state = _CHUNK_END
            elif self._state == _CHUNK_END:
                if len(buf) < 2:
                    if bytes(buf[:1]) not in (b"", b"\r"):
                        raise _Refused(400, "chunk without CRLF")
                    return False
                if buf[:2] != b"\r\n":
                    raise _Refused(400, "chunk without CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            else:  # _TRAILERS: header lines up to an empty line, ignored
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    assert self._request is not None
                    if self._sink is None:
                        self._request.body = bytes(self._body)
                        self._body = bytearray()
                    self._state = _DONE
                    return True
                end = buf.find(b"\r\n\r\n", 0, _TRAILERS_MAX)
                if end < 0:
                    if len(buf) > _TRAILERS_MAX:
                        raise _Refused(431, "trailers too large")
                    return False
                del buf[:end + 2]  # the trailer lines; the blank line ends the body next turn

    def _feed(self, piece: bytes) -> None:
        """Give *piece* to the sink; if it returns an unfired Deferred, stop reading until it fires."""
        sink = self._sink
        assert sink is not None
        try:
            written = sink.write(piece)
        except Exception:  # noqa: BLE001 - the sink refused: the request ends
            self._sink_failed(Failure())
            return
        if not isinstance(written, Deferred):
            self._sink_completed()
            return
        box: list[Any] = [True]
        written.addBoth(self._written, box)
        box[0] = False
        if len(box) > 1:  # fired at once
            if isinstance(box[1], Failure):
                self._sink_failed(box[1])
            else:
                self._sink_completed()
            return
        self._sink_wait = written
        if self._timer_kind == "body":
            self._cancel_timer()  # the disk is behind, not the client
        self._pause_reading()

    def _written(self, outcome: Any, box: list[Any]) -> None:
        if box[0]:
            box.append(outcome)
            return
        self._sink_wait = None
        if self._closing:
            return
        if isinstance(outcome, Failure):
            self._sink_failed(outcome)
            return
        self._sink_completed()
        if self._sink is not None and self._state != _DONE:
            self._deadline("body", self.settings.body_timeout)
        self._process()
        return

    def _sink_failed(self, failure: Failure) -> None:
        """The sink refused or broke: abort it, answer its status (or 500) and close."""
        request = self._request
        refusal = _refusal(failure)
        if refusal is None:
            log.failure("streaming the body of {method} {path} failed", failure,
                        method=request.method if request else b"", path=request.path if request else b"")
            refusal = (500, "internal error", ())
        self._abort_sink(refusal[1])
        if self._early and self._state != _DONE:  # the client may still be sending: read some of it first
            self._drain_left = min(DRAIN_MAX, self._remaining if self._framing == _BODY else DRAIN_MAX)
        self._refuse(*refusal)

    def _abort_sink(self, why: str) -> None:
        sink, self._sink = self._sink, None
        if sink is None:
            return
        try:
            sink.abort(why)
        except Exception:  # noqa: BLE001 - cleaning up must not kill the connection
            log.failure("aborting a body sink failed")

    def _complete(self) -> None:
        """The whole request arrived: answer it (the handler, or the sink's finish)."""
        request, self._request = self._request, None
        assert request is not None
        self._state = _HEAD
        self._direct_ok = False
        self._cancel_timer()
        sink, self._sink = self._sink, None  # finish() is never followed by abort()
        result: Any
        try:
            result = sink.finish() if sink is not None else self.handler(request)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the connection silently
            result = Failure()
        if self._early:  # the reply went out already: the outcome is the sink's (its task), never cancelled
            if isinstance(result, Deferred):
                result.addBoth(self._early_outcome, request)
            else:
                self._early_outcome(result, request)
            self._end_early()
            return
        if isinstance(result, Deferred):
            self._settle(result, lambda outcome: self._reply(request, outcome))
        else:
            self._reply(request, result)

    def _early_outcome(self, outcome: Any, request: HttpRequest) -> None:
        if isinstance(outcome, Failure) and _refusal(outcome) is None and not _is_cancel(outcome):
            log.failure("finishing the body of {method} {path} failed", outcome, method=request.method,
                        path=request.path)

    def _settle(self, d: Deferred[Any], then: Callable[[Any], None]) -> None:
        """Call *then* with *d*'s outcome: now if it has fired, else later (the loop waits on ``_pending``)."""
        self._inline = True
        d.addBoth(self._settled, then)
        self._inline = False
        outcome, self._outcome = self._outcome, _NOTHING
        if outcome is _NOTHING:  # a deferred outcome: the loop stops until it is ready
            self._pending = d
            return
        then(outcome)

    def _settled(self, outcome: Any, then: Callable[[Any], None]) -> None:
        if self._inline:  # fired at once, inside _settle
            self._outcome = outcome
            return
        self._pending = None  # later, from the reactor: never from inside _process
        if self._closing and then != self._chosen:  # a sink chosen too late is aborted by _chosen
            return
        then(outcome)
        self._process()

    # -- answering -------------------------------------------------------------------------

    def _keep_alive(self, request: HttpRequest) -> bool:
        connection = request.headers.get(b"connection", b"").lower()
        if request.version == b"HTTP/1.1":
            return b"close" not in connection
        return b"keep-alive" in connection

    def _reply(self, request: HttpRequest, outcome: Any, close: bool = False) -> None:
        if not isinstance(outcome, HttpResponse):
            refusal = _refusal(outcome) if isinstance(outcome, Failure) else None
            if refusal is not None:
                outcome = HttpResponse(refusal[0], f"{refusal[1]}\n".encode(),
                                       [(b"Content-Type", b"text/plain"), *refusal[2]])
            else:
                if not self._closing and not _is_cancel(outcome):
                    log.failure("handling {method} {path} failed", outcome if isinstance(outcome, Failure) else None,
                                method=request.method, path=request.path)
                outcome = HttpResponse(500, b"internal error\n", [(b"Content-Type", b"text/plain")])
        if self._closing:
            return
        if self.client.authenticated and not self._authenticated:
            self._authenticated = True
            if self.admission is not None:
                self.admission.authenticated(self)
        keep = not close and self._keep_alive(request)
        if outcome.takeover is not None:
            self._take_over(request, outcome)
            return
        if outcome.stream is not None:
            length = outcome.length
            keep = keep and length is not None
            self._send(self._head_bytes(request.version, outcome, length, keep))
            if request.method == b"HEAD":
                self._after_reply(keep)
            else:
                self._start_stream(outcome, keep)
            return
        self._send(self._head_bytes(request.version, outcome, len(outcome.body), keep), outcome.body)
        self._after_reply(keep)

    def _after_reply(self, keep: bool) -> None:
        """A reply is written: close, or wait for the next request."""
        if not keep:
            self._close()
            return
        if self.admission is not None:
            self.admission.touched(self)
        if self._buf:
            self._deadline("header", self.settings.header_timeout)
        else:
            self._deadline("idle", self.settings.idle_timeout)

    def _head_bytes(self, version: bytes, response: HttpResponse, length: int | None, keep: bool,
                    takeover: bool = False) -> bytes:
        head = [b"%s %d %s\r\nServer: %s\r\n" % (version, response.status, reason(response.status), SERVER)]
        if length is not None:
            head.append(b"Content-Length: %d\r\n" % length)
        for name, value in response.headers:
            head.append(name + b": " + value + b"\r\n")
        if takeover:
            pass
        elif not keep:
            head.append(b"Connection: close\r\n")
        elif version == b"HTTP/1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        return b"".join(head)

    def _write(self, version: bytes, response: HttpResponse, keep: bool) -> None:
        self._send(self._head_bytes(version, response, len(response.body), keep), response.body)

    def _start_stream(self, response: HttpResponse, keep: bool) -> None:
        """Run the response's producer with a :class:`BodyWriter`; requests wait until it is done."""
        assert response.stream is not None
        writer = BodyWriter(self, response.length)
        self._writer = writer
        self._stream_keep = keep
        self._cancel_timer()
        transport = self.transport
        if isinstance(transport, FileDescriptor) and transport.bufferSize < HIGH_WATER:
            transport.bufferSize = HIGH_WATER  # the transport pauses us (and the writer waits) past this
        try:
            d = response.stream(writer)
        except Exception:  # noqa: BLE001 - a producer bug ends this reply, not the daemon
            d = fail()
        (d if isinstance(d, Deferred) else succeed(None)).addBoth(self._streamed, writer)

    def _streamed(self, outcome: Any, writer: BodyWriter) -> None:
        if self._writer is writer:
            self._writer = None
        writer.closed = True
        if self._closing:
            return
        if isinstance(outcome, Failure):
            if not _gone(outcome):
                log.failure("streaming a reply to {peer} failed", outcome, peer=self.peer)
            self._abort_connection()
            return
        if writer.length is not None and writer.sent != writer.length:
            log.warn("a streamed reply to {peer} ended after {sent} of its {length} bytes", peer=self.peer,
                     sent=writer.sent, length=writer.length)
            self._abort_connection()
            return
        self._after_reply(self._stream_keep)
        self._process()
        return

    def _stalled(self) -> None:
        """A streamed reply waits on the client: it has ``idle_timeout`` seconds to read more."""
        if self._timer_kind != "send":
            self._deadline("send", self.settings.idle_timeout)

    def _abort_stream(self, why: str) -> None:
        log.warn("closing the connection to {peer}: {why}", peer=self.peer, why=why)
        if self._writer is not None:
            self._writer.closed = True
        self._abort_connection()

    def _take_over(self, request: HttpRequest, response: HttpResponse) -> None:
        """Write the head, then hand the connection (and any bytes already buffered) to the protocol."""
        assert response.takeover is not None
        # HTTP/1.1 whatever the request said, as xapi answers Xen Orchestra's `CONNECT … HTTP/1.0`
        self._send(self._head_bytes(b"HTTP/1.1", response, None, True, takeover=True))
        try:
            proto = response.takeover()
        except Exception:  # noqa: BLE001
            log.failure("taking over the connection from {peer} failed", peer=self.peer)
            self._abort_connection()
            return
        self._cancel_timer()
        self._takeover = proto
        self._request, self._state = None, _HEAD
        if not self._authenticated:
            self._authenticated = True
            if self.admission is not None:
                self.admission.authenticated(self)
        if self._producing:  # the new protocol may register its own producer
            self._producing = False
            self._io.unregisterProducer()
        self._write_paused = False
        if self._read_paused:
            self._read_paused = False
            self._io.resumeProducing()
        leftover, self._buf = bytes(self._buf), bytearray()
        proto.makeConnection(self._io)
        if leftover and self._takeover is proto and not self._closing:
            proto.dataReceived(leftover)

    def _send(self, data: bytes, body: bytes = b"") -> None:
        """Write *data* (a head) then *body*: straight to the socket while nothing of ours is
        queued (:func:`write_now`, head and body in one ``sendmsg``, never concatenated), through
        the transport's queue otherwise, and from then on.  A large *body* first widens the
        connection's send buffer (:func:`_widen`)."""
        if len(body) >= LARGE_REPLY:
            _widen(self.transport)
        if self._direct:
            sent = write_now(self.transport, data, body)
            if sent == len(data) + len(body):
                return
            self._direct = False
            if sent >= len(data):
                data, body = body[sent - len(data):], b""
            elif sent:
                data = data[sent:]
        self._io.write(data)
        if body:
            self._io.write(body)

    def _refuse(self, status: int, reason_text: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        log.info("refused a request from {peer}: {status} {reason}", peer=self.peer, status=status,
                 reason=reason_text)
        self._abort_sink(reason_text)
        if self._early:  # the reply was sent: the task says what happened; drain what was set, then close
            if not self._ended:
                self._end_early()
            else:
                self._close()
            return
        if self._writer is not None or self._takeover is not None:  # something else is on the wire already
            self._abort_connection()
            return
        body = f"{reason_text}\n".encode()
        self._write(b"HTTP/1.1", HttpResponse(status, body, [(b"Content-Type", b"text/plain"), *headers]), keep=False)
        self._close()

    def _abort_connection(self) -> None:
        """Close at once, dropping what is queued (a broken stream: the client sees a short body)."""
        self._closing = True
        self._cancel_timer()
        self._abort_sink("the connection was closed")
        self._io.abortConnection()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        self._abort_sink("the connection was closed")
        self._buf = bytearray()
        self._body = bytearray()
        if self._producing:  # a paused producer would hold the close back forever
            self._producing = False
            self._io.unregisterProducer()
        self._io.loseConnection()


def _is_cancel(outcome: Any) -> bool:
    return hasattr(outcome, "check") and bool(outcome.check(CancelledError))


class HttpFactory(Factory):
    """Builds an :class:`HttpChannel` per connection, all sharing one handler, settings, clock and
    admission (shared by every listener, so the connection caps are global)."""

    noisy = False

    def __init__(self, handler: Handler, settings: HttpSettings, clock: Any, admission: Any = None):
        self.handler = handler
        self.settings = settings
        self.clock = clock
        self.admission = admission

    def buildProtocol(self, addr: Any) -> HttpChannel | None:
        if self.admission is not None and not self.admission.room():
            return None  # far over the cap: the socket is closed at once, keeping descriptors free
        channel = HttpChannel(self.handler, self.settings, self.clock, self.admission)
        channel.factory = self
        return channel
