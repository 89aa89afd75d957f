"""The streaming paths of the HTTP channel (:mod:`xapid.wire.http`): a request
body streamed to a handler's :class:`~xapid.wire.messages.BodySink` (with backpressure, an early
reply, a sink reading the socket itself, draining after the sink is complete), a reply body
produced through a :class:`BodyWriter`, and handing the connection over to another protocol."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from xapid.wire.channel_state import _BODY, _DONE, _HEAD, ChannelState, log
from xapid.wire.messages import BodySink, HttpRequest, HttpResponse, _gone, _refusal
from xapid.wire.sockets import open_plain, plain_socket

HIGH_WATER = 256 << 10  # bytes a streamed reply may queue in a socket transport before its writer waits
DRAIN_MAX = 16 << 20  # after an early reply's body ended (complete or failed): input read and discarded at most
STREAM_READ = 1 << 20  # bytes per recv while a body streams to a sink (Twisted's default is 64 KiB)
DIRECT_READ_MIN = 1 << 20  # a streamed body from this size on may be read by its sink directly (read_direct)


class BodyWriter:
    """Writes a streamed response body to one connection.

    ``write(data)`` returns a Deferred that fires when the connection wants more (at once,
    unless the transport's buffer is over its high-water mark: then when it drains), or fails
    with :class:`~twisted.internet.error.ConnectionLost` once the client is gone or the body
    overran its announced length; the producer must then stop.  ``closed`` is then True."""

    def __init__(self, channel: StreamingChannel, length: int | None) -> None:
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
        if self.closed or not open_plain(transport):
            return None
        if len(transport.dataBuffer) > transport.offset or transport._tempDataLen:  # bytes queued
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


class StreamingChannel(ChannelState):
    """The streaming part of :class:`~xapid.wire.http.HttpChannel`."""

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
        sock = plain_socket(self.transport)
        if sink is None or not callable(reader) or self._framing != _BODY or self._remaining < DIRECT_READ_MIN \
                or sock is None:
            return
        try:
            sock_fd = os.dup(sock.fileno())
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
        if self.client.authenticated:
            self._mark_authenticated()
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
        self._mark_authenticated()
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
