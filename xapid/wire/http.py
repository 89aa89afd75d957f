"""A small HTTP/1.1 server protocol for the API: exactly what Xen-API clients use, and fast.

It parses the request line, headers and body (``Content-Length`` or chunked), answers
``Expect: 100-continue``, keeps connections alive (HTTP/1.1 by default, 1.0 on request),
handles pipelined requests one at a time in order, and writes each response in a single
``write``.  Oversized headers or bodies are refused (431/413) and the connection closed;
a malformed request gets 400.  An idle connection is closed after a timeout; a request
in progress when the client goes away has its pending reply cancelled.

Twisted's ``twisted.web`` costs several times more per request (header objects, form
parsing, request machinery); the small calls the API lives on are dominated by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from xapid import __version__

log = Logger()

MAX_HEADER_BYTES = 64 << 10
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 505: "HTTP Version Not Supported"}
SERVER = f"xapid/{__version__}".encode()


@dataclass
class HttpRequest:
    method: bytes
    target: bytes  # as sent: path and query
    version: bytes  # b"HTTP/1.1"
    headers: dict[bytes, bytes]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    peer: str = ""

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


Handler = Callable[[HttpRequest], "HttpResponse | Deferred"]


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class HttpChannel(Protocol, TimeoutMixin):
    """One client connection."""

    def __init__(self, handler: Handler, max_body: int, idle_timeout: float):
        self.handler = handler
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self._buffer = b""
        self._request: HttpRequest | None = None  # headers parsed, body pending
        self._remaining = 0
        self._chunks: list[bytes] | None = None  # chunked body so far
        self._busy: Deferred | None = None  # a reply being computed
        self._closing = False
        self._direct = True  # nothing of ours is queued in the transport: replies may go straight out

    def connectionMade(self) -> None:
        self.setTimeout(self.idle_timeout)
        peer = self.transport.getPeer()
        self._peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._buffer += data
        try:
            self._parse()
        except _Refused as refusal:
            self._refuse(refusal.status, refusal.reason)

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        self._closing = True
        if self._busy is not None and not self._busy.called:
            self._busy.cancel()

    def timeoutConnection(self) -> None:
        if self._busy is None:  # a long poll in progress is not idleness
            self.transport.loseConnection()
        else:
            self.resetTimeout()

    # -- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        while self._busy is None and not self._closing:
            if self._request is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEADER_BYTES:
                        first = self._buffer[:self._buffer.find(b"\r\n") if b"\r\n" in self._buffer else 256]
                        if b" HTTP/1." not in first:
                            raise _Refused(400, "not an HTTP request")
                        raise _Refused(431, "request headers too large")
                    return
                if end > MAX_HEADER_BYTES:
                    raise _Refused(431, "request headers too large")
                head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
                self._start(head)
                continue
            if self._chunks is not None:
                if not self._read_chunks():
                    return
            elif len(self._buffer) >= self._remaining:
                self._request.body = self._buffer[:self._remaining]
                self._buffer = self._buffer[self._remaining:]
            else:
                return
            request, self._request = self._request, None
            self._dispatch(request)

    def _start(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        while lines and not lines[0]:  # tolerate blank lines before a request (RFC 9112 §2.2)
            lines.pop(0)
        parts = lines[0].split(b" ") if lines else []
        if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith(b"HTTP/"):
            raise _Refused(400, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _Refused(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or b" " in name:
                raise _Refused(400, "malformed header line")
            key = name.lower()
            value = value.strip()
            headers[key] = headers[key] + b", " + value if key in headers else value
        request = HttpRequest(method, target, version, headers, peer=self._peer)
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._chunks = []
            self._remaining = 0
        else:
            length = headers.get(b"content-length", b"0")
            if not length.isdigit():
                raise _Refused(400, "bad Content-Length")
            self._remaining = int(length)
            if self._remaining > self.max_body:
                raise _Refused(413, "request body is too large")
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self._send(version + b" 100 Continue\r\n\r\n")
        self._request = request

    def _read_chunks(self) -> bool:
        """Consume chunked body data; True once the last chunk (and trailers) arrived."""
        assert self._chunks is not None and self._request is not None
        while True:
            if self._remaining == 0:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 1024:
                        raise _Refused(400, "bad chunk size line")
                    return False
                size_text = self._buffer[:end].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _Refused(400, "bad chunk size") from None
                if size == 0:
                    trailer_end = self._buffer.find(b"\r\n\r\n", end)  # after optional trailers
                    if trailer_end < 0:
                        return False
                    self._buffer = self._buffer[trailer_end + 4:]
                    self._request.body = b"".join(self._chunks)
                    self._chunks = None
                    return True
                if sum(map(len, self._chunks)) + size > self.max_body:
                    raise _Refused(413, "request body is too large")
                self._buffer = self._buffer[end + 2:]
                self._remaining = size + 2  # the data and its CRLF
            if len(self._buffer) < self._remaining:
                return False
            chunk = self._buffer[:self._remaining]
            if chunk[-2:] != b"\r\n":
                raise _Refused(400, "chunk without CRLF")
            self._chunks.append(chunk[:-2])
            self._buffer = self._buffer[self._remaining:]
            self._remaining = 0

    # -- answering -----------------------------------------------------------------------

    def _keep_alive(self, request: HttpRequest) -> bool:
        connection = request.headers.get(b"connection", b"").lower()
        if request.version == b"HTTP/1.1":
            return b"close" not in connection
        return b"keep-alive" in connection

    def _dispatch(self, request: HttpRequest) -> None:
        try:
            result = self.handler(request)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the connection silently
            log.failure("handling {method} {path} failed", method=request.method, path=request.path)
            result = HttpResponse(500, b"internal error\n", [(b"Content-Type", b"text/plain")])
        if isinstance(result, Deferred):
            self._busy = result
            result.addCallbacks(lambda response: self._reply(request, response), self._failed, errbackArgs=(request,))
        else:
            self._reply(request, result)

    def _failed(self, failure: Any, request: HttpRequest) -> None:
        if self._closing:
            return
        log.failure("handling {method} {path} failed", failure, method=request.method, path=request.path)
        self._reply(request, HttpResponse(500, b"internal error\n", [(b"Content-Type", b"text/plain")]))

    def _reply(self, request: HttpRequest, response: HttpResponse) -> None:
        self._busy = None
        if self._closing:
            return
        keep = self._keep_alive(request)
        self._write(request.version, response, keep)
        if not keep:
            self._close()
            return
        if self._buffer:
            try:
                self._parse()
            except _Refused as refusal:
                self._refuse(refusal.status, refusal.reason)

    def _write(self, version: bytes, response: HttpResponse, keep: bool) -> None:
        head = [b"%s %d %s\r\nServer: %s\r\nContent-Length: %d\r\n"
                % (version, response.status, REASONS.get(response.status, "Unknown").encode(), SERVER,
                   len(response.body))]
        for name, value in response.headers:
            head.append(name + b": " + value + b"\r\n")
        if not keep:
            head.append(b"Connection: close\r\n")
        elif version == b"HTTP/1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        self._send(b"".join(head) + response.body)

    def _send(self, data: bytes) -> None:
        """Write *data*: straight to the socket while nothing is queued in the transport (so when
        many deferred replies are answered at once — event.from watchers woken together — they all
        reach the wire before the reactor goes back to reading requests, without registering each
        socket for writing); through the transport's queue otherwise, and from then on, so that
        nothing overtakes queued data.  Only plain sockets (TCP, UNIX) write this way; TLS
        connections (whose socket carries ciphertext) queue and send on the reactor's turn."""
        transport = self.transport
        if not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False):
            transport.write(data)  # a wrapper (TLS, tests), or a socket carrying ciphertext
            return
        if self._direct:
            if transport.connected and not transport.disconnecting:
                sent = transport.writeSomeData(data)
                if isinstance(sent, int) and sent == len(data):
                    return
                if isinstance(sent, int) and sent > 0:
                    data = data[sent:]
            self._direct = False
        transport.write(data)
        if transport.connected and not transport.disconnecting:
            # still send what the socket takes now; a failed send leaves the data queued, and the
            # reactor's own doWrite then reports the lost connection
            transport.doWrite()

    def _refuse(self, status: int, reason: str) -> None:
        log.info("refused a request from {peer}: {status} {reason}", peer=self._peer, status=status, reason=reason)
        body = f"{reason}\n".encode()
        self._write(b"HTTP/1.1", HttpResponse(status, body, [(b"Content-Type", b"text/plain")]), keep=False)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._buffer = b""
        self.transport.loseConnection()


class HttpFactory(Factory):
    """Builds an :class:`HttpChannel` per connection, all sharing one handler."""

    noisy = False

    def __init__(self, handler: Handler, max_body: int, idle_timeout: float = 3700.0):
        self.handler = handler
        self.max_body = max_body
        self.idle_timeout = idle_timeout

    def buildProtocol(self, addr: Any) -> HttpChannel:
        channel = HttpChannel(self.handler, self.max_body, self.idle_timeout)
        channel.factory = self
        return channel
