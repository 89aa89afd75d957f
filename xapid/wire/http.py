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

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from xapid import fanout
from xapid.wire.channel_state import _DECIDE, _DONE, _HEAD, _NOTHING, _BODY, ChannelState, log
from xapid.wire.messages import (
    SERVER, BodySink, Client, Handler, HttpRequest, HttpResponse, HttpSettings, _is_cancel, _refusal, reason,
)
from xapid.wire.parser import RequestParser, _Refused
from xapid.wire.sockets import LARGE_REPLY, LARGE_SEND_LIMIT, LARGE_SNDBUF, _widen, peer_uid, write_now
from xapid.wire.streams import DIRECT_READ_MIN, DRAIN_MAX, HIGH_WATER, STREAM_READ, BodyWriter, StreamingChannel

__all__ = [
    "DIRECT_READ_MIN", "DRAIN_MAX", "HIGH_WATER", "LARGE_REPLY", "LARGE_SEND_LIMIT", "LARGE_SNDBUF", "SERVER",
    "STREAM_READ", "BodySink", "BodyWriter", "ChannelState", "Client", "Handler", "HttpChannel", "HttpFactory",
    "HttpRequest", "HttpResponse", "HttpSettings", "peer_uid", "reason", "write_now",
]


@implementer(IPushProducer)
class HttpChannel(StreamingChannel, RequestParser):
    """One client connection (see the module docstring)."""

    # -- connection ------------------------------------------------------------------------

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
            if isinstance(result, fanout.Wait) and result.encode is not None:
                self._parked_version, self._parked_keep = request.version, self._keep_alive(request)
                result.sender = self
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
        d.addBoth(self._settled, then, d)
        self._inline = False
        outcome, self._outcome = self._outcome, _NOTHING
        if outcome is _NOTHING:  # a deferred outcome: the loop stops until it is ready
            self._pending = d
            return
        then(outcome)

    def _settled(self, outcome: Any, then: Callable[[Any], None], d: Deferred[Any]) -> None:
        if self._inline:  # fired at once, inside _settle
            self._outcome = outcome
            return
        self._pending = None  # later, from the reactor: never from inside _process
        if self._closing and then != self._chosen:  # a sink chosen too late is aborted by _chosen
            return
        if fanout.active():  # one of many replies woken together: _reply may hold its follow-up back
            self._held = d
        then(outcome)
        self._held = None
        if self._pending is None:
            self._process()

    def _release(self, keep: bool) -> None:
        """The follow-up of a reply sent during a fan-out (:mod:`xapid.fanout`): the connection
        goes on to its deadline and its next request."""
        self._pending = None
        if not self._closing:
            self._after_reply(keep)
            self._process()

    # -- answering -------------------------------------------------------------------------

    def send_early(self, wait: Deferred[Any], reply: Any) -> bool:
        """Send *reply*, the one *wait* is about to give, ahead of its callbacks (the express lane
        of a fan-out, :class:`fanout.Wait`); :meth:`_reply` then sends nothing more.  False,
        sending nothing, unless the connection still waits on *wait* for a plain response."""
        if (self._closing or self._pending is not wait or self._expressed is not None
                or not isinstance(reply, HttpResponse) or reply.takeover is not None
                or reply.stream is not None):
            return False
        self._send(self._head_for(self._parked_version, reply, self._parked_keep), reply.body)
        self._expressed = reply
        return True

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
        if self.client.authenticated:
            self._mark_authenticated()
        expressed, self._expressed = self._expressed, None
        if expressed is not None:  # sent ahead of the callbacks: only the follow-up is left
            if outcome is not expressed:  # something changed the reply after it was sent
                log.error("the reply to {method} {path} changed after it was sent; closing the connection",
                          method=request.method, path=request.path)
                self._close()  # what was sent is a whole reply: it still leaves, nothing after it
                return
            self._followed(self._parked_keep)
            return
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
        self._send(self._head_for(request.version, outcome, keep), outcome.body)
        self._followed(keep)

    def _head_for(self, version: bytes, response: HttpResponse, keep: bool) -> bytes:
        """The head of a whole (not streamed) *response*; a response shared by many requests has its
        head encoded once per version and keep-alive."""
        heads = response.heads
        if heads is None:
            return self._head_bytes(version, response, len(response.body), keep)
        return heads.get((version, keep)) or heads.setdefault(
            (version, keep), self._head_bytes(version, response, len(response.body), keep))

    def _followed(self, keep: bool) -> None:
        """A whole reply was sent: its follow-up now, or when the fan-out sending it ends."""
        if self._held is not None and fanout.later(self._release, keep):
            self._pending = self._held  # busy (nothing read or answered) until released
            return
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
        if takeover:  # the protocol taking over says what the connection is
            pass
        elif not keep:
            head.append(b"Connection: close\r\n")
        elif version == b"HTTP/1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        return b"".join(head)

    def _write(self, version: bytes, response: HttpResponse, keep: bool) -> None:
        self._send(self._head_bytes(version, response, len(response.body), keep), response.body)

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
