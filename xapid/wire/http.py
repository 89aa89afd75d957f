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

import re
import socket
import struct
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
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
    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


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


def write_now(transport: Any, data: bytes) -> int:
    """Write as much of *data* as the socket takes right now, bypassing the reactor's queue;
    returns how many bytes went out (0 when this transport cannot write directly).

    The reactor normally queues a write and sends it on its next turn, after it has read
    more input.  When many deferred replies are answered at once (1 000 ``event.from``
    watchers woken by one change) that makes each watcher wait for every other socket's
    input to be read first.  Sending at once fixes that.  This is only valid on a plain
    socket transport (TCP, UNIX) that is connected and has nothing queued: the caller must
    queue the rest (and everything after it) through ``transport.write`` so that nothing
    overtakes queued data (:meth:`HttpChannel._send` does).  TLS transports carry ciphertext on their socket and are never
    written this way.  This is the one place that reaches below Twisted's transport API.
    """
    if not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False):
        return 0
    if not transport.connected or transport.disconnecting:
        return 0
    sent = transport.writeSomeData(data)
    return sent if isinstance(sent, int) and sent > 0 else 0


_NOTHING = object()

# parser states
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DONE = range(7)


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
        self._buf = bytearray()
        self._scan = 0  # where the search for the end of the headers resumes
        self._blank = 0  # blank lines skipped before the current request
        self._state = _HEAD
        self._request: HttpRequest | None = None  # headers parsed, body pending
        self._body = bytearray()
        self._remaining = 0  # body or chunk bytes still to come
        self._pending: Deferred[Any] | None = None  # a reply being computed
        self._processing = False
        self._closing = False
        self._write_paused = False  # the transport's buffer is full: the client is not reading
        self._read_paused = False
        self._direct = True  # nothing of ours is queued in the transport: replies may go straight out
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
        self._closing = True
        self._cancel_timer()
        self._buf = bytearray()
        self._body = bytearray()
        if self.admission is not None:
            self.admission.release(self)
        if self._pending is not None and not self._pending.called:
            self._pending.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._timer_kind == "idle":  # the first byte of the next request
            self._deadline("header", self.settings.header_timeout)
        self._buf += data
        self._process()

    @property
    def busy(self) -> bool:
        """A request is being answered (so the connection is not idle)."""
        return self._pending is not None

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
        waits on a reply, and the client reads what it is sent."""
        if self._closing:
            return
        blocked = self._write_paused or (self._pending is not None and len(self._buf) > self.settings.pending_input)
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
        if self._closing or self._pending is not None:
            return
        if kind == "idle" or (kind == "header" and not self.receiving):
            self._close()  # nothing of a request arrived: just hang up
            return
        self._refuse(408, f"the request's {'headers' if kind == 'header' else 'body'} took too long to arrive")

    # -- the parse loop --------------------------------------------------------------------

    def _process(self) -> None:
        """Answer every complete request buffered, in order, until one needs to wait."""
        if self._processing:
            return
        self._processing = True
        try:
            while not self._closing and self._pending is None and not self._write_paused:
                request = self._parse()
                if request is None:
                    break
                self._cancel_timer()
                self._answer(request)
        except _Refused as refusal:
            self._refuse(refusal.status, refusal.reason)
        finally:
            self._processing = False
        self._flow()

    def _parse(self) -> HttpRequest | None:
        """The next complete request, consuming its bytes; None if more input is needed."""
        buf = self._buf
        if self._state == _HEAD:
            if not self._head(buf):
                return None
        if self._state == _BODY:
            if len(buf) < self._remaining:
                self._body += buf
                self._remaining -= len(buf)
                del buf[:]
                return None
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
        elif self._state != _DONE and not self._chunked(buf):
            return None
        request, self._request = self._request, None
        self._state = _HEAD
        return request

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
            self._state = _CHUNK_SIZE
        else:
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or len(length) > 18:
                raise _Refused(400, "bad Content-Length")
            self._remaining = int(length)
            if self._remaining > self.settings.max_body:
                raise _Refused(413, "request body is too large")
            self._state = _BODY if self._remaining else _DONE
        if self._state != _DONE:
            if headers.get(b"expect", b"").lower() == b"100-continue":
                self._send(version + b" 100 Continue\r\n\r\n")
            self._deadline("body", self.settings.body_timeout)

    def _chunked(self, buf: bytearray) -> bool:
        """Decode chunked body data from *buf*; True once the last chunk and trailers arrived."""
        while True:
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
                if len(self._body) + size > self.settings.max_body:
                    raise _Refused(413, "request body is too large")
                self._remaining = size
                self._state = _CHUNK_DATA
            elif self._state == _CHUNK_DATA:
                if not buf:
                    return False
                taken = min(len(buf), self._remaining)
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

    # -- answering -------------------------------------------------------------------------

    def _keep_alive(self, request: HttpRequest) -> bool:
        connection = request.headers.get(b"connection", b"").lower()
        if request.version == b"HTTP/1.1":
            return b"close" not in connection
        return b"keep-alive" in connection

    def _answer(self, request: HttpRequest) -> None:
        try:
            result = self.handler(request)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the connection silently
            log.failure("handling {method} {path} failed", method=request.method, path=request.path)
            result = HttpResponse(500, b"internal error\n", [(b"Content-Type", b"text/plain")])
        if isinstance(result, Deferred):
            self._inline = True
            result.addBoth(self._settled, request)
            self._inline = False
            outcome, self._outcome = self._outcome, _NOTHING
            if outcome is _NOTHING:  # a deferred reply: the loop stops until it is ready
                self._pending = result
                return
            result = outcome
        self._reply(request, result)

    def _settled(self, outcome: Any, request: HttpRequest) -> None:
        if self._inline:  # answered at once, inside _answer
            self._outcome = outcome
            return
        self._pending = None  # later, from the reactor: never from inside _process
        if self._closing:
            return
        self._reply(request, outcome)
        self._process()

    def _reply(self, request: HttpRequest, outcome: Any) -> None:
        if not isinstance(outcome, HttpResponse):
            if not self._closing and not _is_cancel(outcome):
                log.failure("handling {method} {path} failed", outcome, method=request.method, path=request.path)
            outcome = HttpResponse(500, b"internal error\n", [(b"Content-Type", b"text/plain")])
        if self._closing:
            return
        if self.client.authenticated and not self._authenticated:
            self._authenticated = True
            if self.admission is not None:
                self.admission.authenticated(self)
        keep = self._keep_alive(request)
        self._write(request.version, outcome, keep)
        if not keep:
            self._close()
            return
        if self.admission is not None:
            self.admission.touched(self)
        if self._buf:
            self._deadline("header", self.settings.header_timeout)
        else:
            self._deadline("idle", self.settings.idle_timeout)

    def _write(self, version: bytes, response: HttpResponse, keep: bool) -> None:
        head = [b"%s %d %s\r\nServer: %s\r\nContent-Length: %d\r\n"
                % (version, response.status, reason(response.status), SERVER, len(response.body))]
        for name, value in response.headers:
            head.append(name + b": " + value + b"\r\n")
        if not keep:
            head.append(b"Connection: close\r\n")
        elif version == b"HTTP/1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        self._send(b"".join(head) + response.body)

    def _send(self, data: bytes) -> None:
        """Write *data*: straight to the socket while nothing of ours is queued (:func:`write_now`),
        through the transport's queue otherwise, and from then on."""
        if self._direct:
            sent = write_now(self.transport, data)
            if sent == len(data):
                return
            data = data[sent:]
            self._direct = False
        self._io.write(data)

    def _refuse(self, status: int, reason_text: str) -> None:
        log.info("refused a request from {peer}: {status} {reason}", peer=self.peer, status=status,
                 reason=reason_text)
        body = f"{reason_text}\n".encode()
        self._write(b"HTTP/1.1", HttpResponse(status, body, [(b"Content-Type", b"text/plain")]), keep=False)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
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
