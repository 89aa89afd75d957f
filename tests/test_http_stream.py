"""The streaming seam of the HTTP layer: streamed request bodies (sinks), streamed replies
(BodyWriter), connection takeover (CONNECT, upgrades), and xapid.auth.http — on in-memory
transports, plus real sockets against a daemon-like listener in a subprocess."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from support import PASSWORD, ApiEnv, resolve
from xapid.auth.http import HttpCaller, HttpError, authenticate, parse_query
from xapid.wire.http import BodySink, BodyWriter, HttpChannel, HttpRequest, HttpResponse, HttpSettings
from xapid.wire.resource import ApiHandler
from xapid.wire.values import Limits


class Sink:
    """A BodySink recording what it gets; *hold* makes each write wait for a Deferred."""

    def __init__(self, hold: bool = False, reply: Any = None):
        self.pieces: list[bytes] = []
        self.hold = hold
        self.waiting: list[Deferred[None]] = []
        self.finished = 0
        self.aborted: list[str] = []
        self.reply = reply

    def write(self, data: bytes) -> Deferred[None] | None:
        self.pieces.append(data)
        if self.hold:
            d: Deferred[None] = Deferred()
            self.waiting.append(d)
            return d
        return None

    def finish(self) -> Any:
        self.finished += 1
        if self.reply is not None:
            return self.reply
        return HttpResponse(200, b"got %d" % len(b"".join(self.pieces)))

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


class Handler:
    """A handler with sink_for: PUT /up streams to *sink* (or *choice*), the rest is echoed."""

    def __init__(self, sink: Any = None, choice: Any = None):
        self.sink = sink if sink is not None else Sink()
        self.choice = choice
        self.requests: list[HttpRequest] = []
        self.asked: list[bytes] = []
        self.stream: Any = None
        self.length: int | None = None

    def sink_for(self, request: HttpRequest) -> Any:
        self.asked.append(request.target)
        if request.path != b"/up":
            return None
        return self.choice if self.choice is not None else self.sink

    def __call__(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        if request.path == b"/down":
            return HttpResponse(200, b"ignored", [(b"Content-Type", b"application/octet-stream")],
                                stream=self.stream, length=self.length)
        return HttpResponse(200, request.method + b" " + request.target + b" " + request.body)


def connect(handler: Any, clock: Clock | None = None, **settings: Any) -> tuple[HttpChannel, StringTransport, Clock]:
    clock = clock or Clock()
    settings.setdefault("max_body", 10)
    channel = HttpChannel(handler, HttpSettings(**settings), clock)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


# -- streamed request bodies -----------------------------------------------------------------


def test_content_length_body_streams_past_max_body_and_keeps_alive():
    """A Content-Length body goes to the sink piece by piece (max_body does not apply), the
    sink's finish() is the reply, and a pipelined request after it is answered."""
    handler = Handler()
    channel, transport, _ = connect(handler, max_body=10)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"a" * 40)
    assert handler.sink.data == b"a" * 40 and handler.sink.finished == 0
    channel.dataReceived(b"b" * 60 + b"GET /next HTTP/1.1\r\n\r\n")
    assert handler.sink.data == b"a" * 40 + b"b" * 60
    out = transport.value()
    assert out.index(b"got 100") < out.index(b"GET /next")
    assert handler.sink.aborted == [] and not transport.disconnecting
    assert handler.requests[0].body == b""


def test_chunked_body_streams_dechunked_and_keeps_alive():
    """A chunked body arrives de-chunked at the sink; the next request on the connection works."""
    handler = Handler()
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    channel.dataReceived(b"10;x=y\r\n" + b"z" * 16 + b"\r\n0\r\nX-Trailer: 1\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
    assert handler.sink.data == b"hello" + b"z" * 16
    assert b"got 21" in transport.value() and b"GET /after" in transport.value()
    assert not transport.disconnecting


def test_tiny_chunks_reach_the_sink_in_one_write():
    """Many one-byte chunks arriving together are one write to the sink (linear, few calls)."""
    handler = Handler()
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 5000)
    assert handler.sink.pieces == [b"x" * 5000]
    channel.dataReceived(b"1\r\ny\r\n0\r\n\r\n")
    assert handler.sink.pieces == [b"x" * 5000, b"y"] and b"got 5001" in transport.value()


def test_buffered_path_unchanged_when_sink_for_returns_none():
    """Without a sink the body is buffered and bounded by max_body as before."""
    handler = Handler()
    channel, transport, _ = connect(handler, max_body=10)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert b"POST /x hello" in transport.value()
    channel.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
    assert b"413" in transport.value() and b"100 Continue" not in transport.value()
    assert transport.disconnecting


def test_expect_continue_only_once_the_sink_is_accepted():
    """100 Continue is sent only after sink_for's Deferred gives a sink."""
    decision: Deferred[Any] = Deferred()
    handler = Handler(choice=decision)
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    sink = Sink()
    decision.callback(sink)
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"abc")
    assert sink.data == b"abc" and b"got 3" in transport.value()


def test_early_response_is_sent_without_reading_the_body_then_closes():
    """A sink_for that answers (401) is sent at once: no 100 Continue, no byte of the body read,
    and the connection closed since a body was announced."""
    handler = Handler(choice=HttpResponse(401, b"who are you\n"))
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 999999999\r\nExpect: 100-continue\r\n\r\n")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in out and b"who are you" in out
    assert b"Connection: close" in out and transport.disconnecting
    channel.dataReceived(b"x" * 1000)  # ignored
    assert handler.sink.pieces == []


def test_early_response_without_body_keeps_alive():
    """An early answer to a request without a body keeps the connection."""
    handler = Handler(choice=HttpResponse(404, b"no\n"))
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 ") == 2 and not transport.disconnecting


def test_failing_sink_for_is_500_and_closes():
    """A sink_for that raises is a 500, the body unread, the connection closed."""
    class Broken(Handler):
        def sink_for(self, request: HttpRequest) -> Any:
            raise RuntimeError("bug")

    channel, transport, _ = connect(Broken())
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 500 ") and transport.disconnecting


def test_backpressure_pauses_the_socket_until_the_write_fires():
    """While the sink's write Deferred is unfired the transport is paused and nothing more is
    delivered; when it fires, reading resumes and the buffered rest is delivered."""
    sink = Sink(hold=True)
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc")
    assert sink.pieces == [b"abc"] and transport.producerState == "paused"
    channel.dataReceived(b"def")  # arrived before the pause took effect
    assert sink.pieces == [b"abc"]
    sink.waiting[0].callback(None)
    assert sink.pieces == [b"abc", b"def"] and transport.producerState == "paused"
    sink.waiting[1].callback(None)
    assert transport.producerState == "producing" and b"got 6" in transport.value()


def test_inactivity_deadline_not_total_time():
    """A streamed body may take longer than body_timeout in total, as long as bytes keep
    coming; time waiting on the sink never counts; silence past body_timeout is 408 + abort."""
    sink = Sink()
    channel, transport, clock = connect(Handler(sink), body_timeout=10)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
    for _ in range(5):
        clock.advance(8)
        channel.dataReceived(b"x")
    assert not transport.disconnecting
    sink.hold = True
    channel.dataReceived(b"y")
    clock.advance(100)  # the disk is behind: not the client's fault
    assert not transport.disconnecting
    sink.hold = False
    sink.waiting[0].callback(None)
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting
    assert len(sink.aborted) == 1 and sink.finished == 0


def test_no_abort_after_finish():
    """Once finish() returned, losing the connection does not abort the sink."""
    sink = Sink(reply=Deferred())
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert sink.finished == 1
    channel.connectionLost(None)
    assert sink.aborted == []


def test_bad_chunk_framing_aborts_and_refuses():
    """Invalid chunk framing mid-body aborts the sink, answers 400 and closes."""
    sink = Sink()
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    assert sink.aborted == ["bad chunk size"] and sink.finished == 0
    assert transport.value().startswith(b"HTTP/1.1 400 ") and transport.disconnecting


@pytest.mark.parametrize("how", ["raise", "errback"])
def test_sink_refusing_mid_body_sends_its_status(how):
    """A sink's write raising (or failing with) an HttpError sends that status, aborts, closes."""
    class Picky(Sink):
        def write(self, data: bytes) -> Any:
            super().write(data)
            if len(self.data) > 4:
                if how == "raise":
                    raise HttpError(413, "too much for this disk")
                d: Deferred[None] = Deferred()
                self.waiting.append(d)
                return d
            return None

    sink = Picky()
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    channel.dataReceived(b"defg")
    if how == "errback":
        sink.waiting[0].errback(HttpError(413, "too much for this disk"))
    assert transport.value().startswith(b"HTTP/1.1 413 ") and b"too much for this disk" in transport.value()
    assert sink.aborted == ["too much for this disk"] and transport.disconnecting


def test_sink_bug_is_500():
    """A sink write failing with an ordinary exception is a 500 and an abort."""
    class Buggy(Sink):
        def write(self, data: bytes) -> Any:
            raise ValueError("oops")

    sink = Buggy()
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert transport.value().startswith(b"HTTP/1.1 500 ") and sink.aborted == ["internal error"]


def test_deferred_finish_then_pipelined():
    """finish() may return a Deferred; the next pipelined request waits for it."""
    reply: Deferred[HttpResponse] = Deferred()
    sink = Sink(reply=reply)
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET /two HTTP/1.1\r\n\r\n")
    assert transport.value() == b""
    reply.callback(HttpResponse(201, b"created"))
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 201 ") and out.index(b"created") < out.index(b"GET /two")


# -- streamed replies ------------------------------------------------------------------------


def test_streamed_reply_with_length_and_backpressure_then_keep_alive():
    """A reply streamed with a length carries Content-Length; a write waits while the transport
    is paused; after the stream, the next pipelined request is answered on the same connection."""
    writers: list[BodyWriter] = []
    done: Deferred[None] = Deferred()

    def stream(writer: BodyWriter) -> Deferred[None]:
        writers.append(writer)
        return done

    handler = Handler()
    handler.stream, handler.length = stream, 6
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /down HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
    writer = writers[0]
    assert b"Content-Length: 6\r\n" in transport.value() and b"ignored" not in transport.value()
    first = writer.write(b"abc")
    assert first.called
    channel.pauseProducing()  # the transport's buffer is over its mark
    second = writer.write(b"def")
    assert not second.called
    channel.resumeProducing()
    assert second.called and writer.sent == 6
    assert b"GET /next" not in transport.value()
    done.callback(None)
    out = transport.value()
    assert out.index(b"abcdef") < out.index(b"GET /next") and not transport.disconnecting


def test_close_delimited_stream_closes_at_the_end():
    """Without a length, the reply says Connection: close and the connection closes when done."""
    def stream(writer: BodyWriter) -> Deferred[None]:
        writer.write(b"all of it")
        return succeed(None)

    handler = Handler()
    handler.stream = stream
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /down HTTP/1.1\r\n\r\n")
    out = transport.value()
    assert b"Content-Length" not in out and b"Connection: close" in out and out.endswith(b"all of it")
    assert transport.disconnecting and not transport.disconnected  # a clean close, not an abort


def test_short_stream_aborts_the_connection():
    """A stream ending before its announced length aborts the connection (a short body)."""
    handler = Handler()
    handler.stream, handler.length = (lambda writer: writer.write(b"abc")), 10
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /down HTTP/1.1\r\n\r\n")
    assert transport.disconnected


def test_overrunning_stream_fails_the_write_and_aborts():
    """Writing past the announced length fails the write and aborts the connection."""
    results: list[Any] = []

    def stream(writer: BodyWriter) -> Deferred[None]:
        writer.write(b"abc")
        d = writer.write(b"defg")
        d.addErrback(lambda f: results.append(f.check(ConnectionLost)))
        return succeed(None)

    handler = Handler()
    handler.stream, handler.length = stream, 5
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /down HTTP/1.1\r\n\r\n")
    assert results == [ConnectionLost] and transport.disconnected
    assert b"defg" not in transport.value()


def test_client_disconnect_errbacks_the_pending_write():
    """A client going away errbacks the producer's pending write and closes the writer."""
    writers: list[BodyWriter] = []
    failures: list[Any] = []

    def stream(writer: BodyWriter) -> Deferred[None]:
        writers.append(writer)
        return Deferred()

    handler = Handler()
    handler.stream = stream
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /down HTTP/1.1\r\n\r\n")
    channel.pauseProducing()
    writers[0].write(b"x").addErrback(failures.append)
    channel.connectionLost(None)
    assert len(failures) == 1 and failures[0].check(ConnectionLost) and writers[0].closed
    assert writers[0].write(b"more").called  # fails at once


def test_failing_stream_aborts():
    """A stream whose Deferred fails aborts the connection."""
    handler = Handler()
    handler.stream = lambda writer: Deferred.fromCoroutine(_boom(writer))
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /down HTTP/1.1\r\n\r\n")
    assert transport.disconnected and transport.value().endswith(b"partial")


async def _boom(writer: BodyWriter) -> None:
    await writer.write(b"partial")
    raise OSError("disk gone")


def test_head_does_not_run_the_stream():
    """HEAD of a streamed route sends the head only."""
    calls: list[int] = []
    handler = Handler()
    handler.stream, handler.length = (lambda writer: calls.append(1)), 42
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"HEAD /down HTTP/1.1\r\n\r\n")
    assert calls == [] and b"Content-Length: 42\r\n" in transport.value() and not transport.disconnecting


# -- takeover ----------------------------------------------------------------------------------


class Echo(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: list[Any] = []

    def connectionMade(self) -> None:
        self.transport.write(b"hello from the console\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


class Nope:
    """A dispatcher that must never be called."""

    def call(self, *args: Any) -> Any:
        raise AssertionError("CONNECT reached the dispatcher")


def test_connect_takeover_passes_leftover_and_later_bytes_and_stops_timeouts():
    """CONNECT /console: 200 without a length, then the protocol gets the bytes sent after the
    head (in the same packet and later); HTTP timeouts stop; connectionLost is forwarded."""
    protos: list[Echo] = []

    def console(request: HttpRequest) -> HttpResponse:
        assert request.query == b"ref=OpaqueRef:vm"
        proto = Echo()
        protos.append(proto)
        return HttpResponse(200, takeover=lambda: proto)

    handler = ApiHandler(Nope(), Limits(1 << 20, 64, 1000), connect_routes={b"/console": console})
    channel, transport, clock = connect(handler, idle_timeout=5)
    channel.dataReceived(b"CONNECT /console?ref=OpaqueRef:vm HTTP/1.0\r\n\r\nearly bytes")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length" not in out and b"Connection" not in out
    assert out.endswith(b"\r\n\r\nhello from the console\r\n")
    proto = protos[0]
    assert proto.received == b"early bytes" and transport.producer is None
    channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert proto.received == b"early bytesGET / HTTP/1.1\r\n\r\n"
    clock.advance(1000)
    assert not transport.disconnecting
    channel.connectionLost(None)
    assert len(proto.lost) == 1


def test_connect_to_unknown_path_is_404_and_never_a_call():
    """CONNECT to an unknown path or an authority target is 404; without connect routes, 405."""
    handler = ApiHandler(Nope(), Limits(1 << 20, 64, 1000), connect_routes={b"/console": lambda r: HttpResponse()})
    for target in (b"/other", b"example.com:443", b"/"):
        channel, transport, _ = connect(handler)
        channel.dataReceived(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 404 "), target
    channel, transport, _ = connect(ApiHandler(Nope(), Limits(1 << 20, 64, 1000)))
    channel.dataReceived(b"CONNECT /console HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 405 ")


def test_upgrade_101_takeover_from_a_get_route():
    """A GET route may answer 101 with a takeover (a WebSocket upgrade)."""
    proto = Echo()
    response = HttpResponse(101, headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
                            takeover=lambda: proto)
    handler = ApiHandler(Nope(), Limits(1 << 20, 64, 1000), routes={b"/console": lambda r: response})
    channel, transport, _ = connect(handler)
    channel.dataReceived(b"GET /console HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and b"Content-Length" not in out
    assert b"Connection: close" not in out and proto.received == b"\x81\x00"


# -- ApiHandler stream routes ------------------------------------------------------------------


def test_api_handler_stream_routes_by_method_and_path_with_cors():
    """stream_routes dispatch on (method, path); other methods and paths are the ordinary ones;
    CORS headers reach a streamed reply."""
    sinks: list[Sink] = []

    def importer(request: HttpRequest) -> Sink:
        sinks.append(Sink())
        return sinks[-1]

    handler = ApiHandler(Nope(), Limits(1 << 20, 64, 1000), stream_routes={(b"PUT", b"/import"): importer},
                         cors_origins=("https://xo.example",))
    channel, transport, _ = connect(handler, max_body=4)
    channel.dataReceived(b"PUT /import/?sr_id=x HTTP/1.1\r\nOrigin: https://xo.example\r\nContent-Length: 8\r\n\r\n"
                         b"12345678")
    assert sinks[0].data == b"12345678"
    assert b"Access-Control-Allow-Origin: https://xo.example" in transport.value()
    assert b"got 8" in transport.value()
    assert handler.sink_for(HttpRequest(b"GET", b"/import", b"HTTP/1.1", {})) is None
    assert handler.sink_for(HttpRequest(b"PUT", b"/elsewhere", b"HTTP/1.1", {})) is None


def test_cors_and_console_read_the_configured_origins_alike():
    """An origin configured as ``https://XO.Example`` is the browser's ``https://xo.example`` for CORS
    replies as for console WebSockets (one reading of [server] cors_origins); others are refused."""
    from xapid.wire.origins import AllowedOrigins

    allowed = AllowedOrigins(("https://XO.Example",))
    assert allowed and allowed.allows(b"https://xo.example") and not allowed.allows(b"https://xo.example.evil")
    assert AllowedOrigins(("*",)).allows(b"https://anyone") and not AllowedOrigins(())
    handler = ApiHandler(Nope(), Limits(1 << 20, 64, 1000), cors_origins=("https://XO.Example",))
    channel, transport, _ = connect(handler, max_body=4)
    channel.dataReceived(b"OPTIONS / HTTP/1.1\r\nOrigin: https://xo.example\r\n\r\n")
    assert b"Access-Control-Allow-Origin: https://xo.example\r\n" in transport.value()
    channel, transport, _ = connect(handler, max_body=4)
    channel.dataReceived(b"OPTIONS / HTTP/1.1\r\nOrigin: https://other.example\r\n\r\n")
    assert b"Access-Control-Allow-Origin" not in transport.value()


def test_sink_isinstance():
    """BodySink is a runtime-checkable protocol."""
    assert isinstance(Sink(), BodySink) and not isinstance(HttpResponse(), BodySink)


# -- xapid.auth.http -------------------------------------------------------------------------


def _request(target: str, headers: dict[bytes, bytes] | None = None, method: bytes = b"GET") -> HttpRequest:
    return HttpRequest(method, target.encode(), b"HTTP/1.1", headers or {}, peer="test")


def _auth(env: ApiEnv, request: HttpRequest) -> HttpCaller:
    return resolve(Deferred.fromCoroutine(authenticate(env.api, request, parse_query(request))), env.clock)


def test_authenticate_by_session_cookie_and_basic(env, admin):
    """session_id query, then cookie, then HTTP Basic; each gives the caller's role and user."""
    caller = _auth(env, _request(f"/x?session_id={admin.session}"))
    assert caller == HttpCaller("pool-admin", "admin", admin.session)
    assert _auth(env, _request("/x", {b"cookie": f"session_id={admin.session}".encode()})).session_ref == admin.session
    basic = base64.b64encode(f"reader:{PASSWORD}".encode())
    request = _request("/x", {b"authorization": b"Basic " + basic}, b"PUT")
    assert _auth(env, request) == HttpCaller("read-only", "reader", None)


@pytest.mark.parametrize("headers,target", [
    ({}, "/x"),
    ({}, "/x?session_id=OpaqueRef:nope"),
    ({b"cookie": b"session_id=OpaqueRef:nope"}, "/x"),
    ({b"authorization": b"Basic !!!"}, "/x"),
    ({b"authorization": b"Basic " + base64.b64encode(b"admin:wrong")}, "/x"),
    ({b"authorization": b"Bearer abc"}, "/x"),
])
def test_authenticate_refusals_are_401_with_a_challenge(env, headers, target):
    """No, bad or malformed credentials: HttpError 401 with a Basic challenge."""
    with pytest.raises(HttpError) as info:
        _auth(env, _request(target, headers))
    assert info.value.status == 401
    response = info.value.response()
    assert (b"WWW-Authenticate", b'Basic realm="xapid"') in response.headers and response.status == 401


def test_parse_query_rejects_non_utf8():
    """A query that is not UTF-8 is a 400."""
    with pytest.raises(HttpError) as info:
        parse_query(HttpRequest(b"GET", b"/x?a=%ff\xff", b"HTTP/1.1", {}))
    assert info.value.status == 400


# -- real sockets --------------------------------------------------------------------------------

SERVER = textwrap.dedent('''
    import hashlib, sys
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred
    from xapid.wire.http import HttpResponse, HttpSettings
    from xapid.wire.resource import ApiHandler, make_factory
    from xapid.wire.values import Limits

    class HashSink:
        """Hashes what it gets; every write waits a reactor turn (a slow disk), bounding memory."""
        def __init__(self):
            self.hash, self.size, self.writes = hashlib.sha256(), 0, 0
        def write(self, data):
            self.hash.update(data); self.size += len(data); self.writes += 1
            return task.deferLater(reactor, 0, lambda: None)
        def finish(self):
            return HttpResponse(200, b"%d %s %d" % (self.size, self.hash.hexdigest().encode(), self.writes))
        def abort(self, reason):
            pass

    BLOCK = bytes(range(256)) * 256
    def download(request):
        size = int(request.query.split(b"&")[0].split(b"=")[1])
        async def produce(writer):
            sent = 0
            while sent < size:
                piece = BLOCK[:min(len(BLOCK), size - sent)]
                await writer.write(piece)
                sent += len(piece)
        length = None if b"close" in request.target else size
        return HttpResponse(200, headers=[(b"Content-Type", b"application/octet-stream")],
                            stream=lambda w: Deferred.fromCoroutine(produce(w)), length=length)

    import os, select
    from twisted.internet import threads

    class DirectSink(HashSink):
        """Reads a large Content-Length body itself, in a thread, from a dup of the socket."""
        def read_direct(self, fd, first, count, idle):
            self.hash.update(first); self.size += len(first)
            def read():
                left = count - len(first)
                try:
                    while left:
                        try:
                            data = os.read(fd, min(left, 1 << 20))
                        except BlockingIOError:
                            select.select([fd], [], [], idle)
                            continue
                        if not data:
                            raise ConnectionError("the client went away")
                        self.hash.update(data); self.size += len(data); left -= len(data)
                finally:
                    os.close(fd)
                return count
            self.writes = -1  # marks the direct path in the reply
            return threads.deferToThread(read)

    def big(request):
        size = int(request.query.split(b"=")[1])
        return HttpResponse(200, (BLOCK * (size // len(BLOCK) + 1))[:size])

    handler = ApiHandler(None, Limits(1 << 20, 64, 1000), routes={b"/down": download, b"/big": big},
                         stream_routes={(b"PUT", b"/up"): lambda request: HashSink(),
                                        (b"PUT", b"/direct"): lambda request: DirectSink()})
    port = reactor.listenTCP(0, make_factory(handler, HttpSettings(max_body=1 << 16), reactor),
                             interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
''')


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory):
    script = tmp_path_factory.mktemp("stream") / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


def test_real_socket_streamed_put_of_several_mib(listener):
    """A 12 MiB PUT (Content-Length, with Expect: 100-continue, then chunked) is streamed to a
    sink over a real socket (far past max_body), byte-exact; the connection is kept alive."""
    data = os.urandom(12 << 20)
    digest = hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", listener, timeout=30)
    conn.request("PUT", "/up", body=data, headers={"Content-Length": str(len(data))})
    reply = conn.getresponse()
    size, got, writes = reply.read().split()
    assert reply.status == 200 and int(size) == len(data) and got.decode() == digest and int(writes) > 1
    pieces = (data[i:i + 100_000] for i in range(0, len(data), 100_000))
    conn.request("PUT", "/up", body=pieces, encode_chunked=True)  # same connection
    reply = conn.getresponse()
    assert reply.status == 200 and reply.read().split()[1].decode() == digest
    conn.close()
    with socket.create_connection(("127.0.0.1", listener), timeout=30) as sock:
        sock.sendall(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abcd")
        assert b"200 OK" in sock.recv(1000)


def test_real_socket_streamed_get(listener):
    """A 20 MiB streamed GET read by urllib (Content-Length) and by a plain socket
    (close-delimited) arrives whole."""
    size = 20 << 20
    block = bytes(range(256)) * 256
    with urllib.request.urlopen(f"http://127.0.0.1:{listener}/down?size={size}", timeout=30) as reply:
        assert int(reply.headers["Content-Length"]) == size
        body = reply.read()
    assert len(body) == size and body[:len(block)] == block and body[-len(block):] == block
    with socket.create_connection(("127.0.0.1", listener), timeout=30) as sock:
        sock.sendall(b"GET /down?size=3000000&close HTTP/1.1\r\nHost: x\r\n\r\n")
        received = bytearray()
        while chunk := sock.recv(1 << 16):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert b"Connection: close" in head and b"Content-Length" not in head and len(body) == 3000000


def _read_replies(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """*count* Content-Length replies read from *sock*: (head, body) each."""
    data = bytearray()
    replies = []
    while len(replies) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(data[:end])
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(data) >= end + 4 + length:
                replies.append((head, bytes(data[end + 4:end + 4 + length])))
                del data[:end + 4 + length]
                continue
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed after {len(replies)} replies"
        data += chunk
    return replies


def test_real_socket_large_replies_pipelined_to_a_slow_reader_arrive_whole_and_in_order(listener):
    """Large buffered replies (head and body sent without concatenation, straight to the socket
    while it takes them, the rest queued) reach a client that reads late, byte-exact and in order
    with the small replies pipelined between them."""
    block = bytes(range(256)) * 256
    sizes = [9_000_000, 10, 3_000_001, 0, 700_000]
    with socket.create_connection(("127.0.0.1", listener), timeout=30) as sock:
        sock.sendall(b"".join(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in sizes))
        time.sleep(0.5)  # the socket's buffers fill: part of the replies waits in the daemon's queue
        replies = _read_replies(sock, len(sizes))
    for (head, body), size in zip(replies, sizes):
        assert head.startswith(b"HTTP/1.1 200 OK") and len(body) == size
        assert body == (block * (size // len(block) + 1))[:size]


def test_real_socket_sink_reading_the_body_directly_then_keep_alive(listener):
    """A sink with read_direct gets a large Content-Length body from a dup of the socket (the
    bytes sent with the head first), then the connection serves the next requests: a small body
    (below the direct threshold: written to the sink as usual) and a GET."""
    data = os.urandom(5 << 20)
    with socket.create_connection(("127.0.0.1", listener), timeout=30) as sock:
        sock.sendall(b"PUT /direct HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data) + data[:70000])
        sock.sendall(data[70000:])
        small = b"small body"
        sock.sendall(b"PUT /direct HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(small) + small
                     + b"GET /big?size=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        (_, first), (_, second), (_, third) = _read_replies(sock, 3)
    assert first.split() == [str(len(data)).encode(), hashlib.sha256(data).hexdigest().encode(), b"-1"]
    assert second.split()[:2] == [b"10", hashlib.sha256(small).hexdigest().encode()] and second.split()[2] != b"-1"
    assert third == bytes(range(5))


def test_client_that_stops_reading_a_stream_is_cut_after_idle_timeout():
    """A streamed reply whose client reads nothing for idle_timeout is aborted and the writer
    fails; a client that reads now and then is not."""
    writers: list[BodyWriter] = []
    failures: list[Any] = []
    handler = Handler()
    handler.stream = lambda writer: writers.append(writer) or Deferred()
    channel, transport, clock = connect(handler, idle_timeout=50)
    channel.dataReceived(b"GET /down HTTP/1.1\r\n\r\n")
    writer = writers[0]
    for _ in range(3):
        channel.pauseProducing()
        d = writer.write(b"x")
        clock.advance(40)
        channel.resumeProducing()
        assert d.called and not transport.disconnected
    channel.pauseProducing()
    writer.write(b"y").addErrback(failures.append)
    clock.advance(51)
    assert transport.disconnected and len(failures) == 1 and writer.closed


# -- early replies (xapi's /import and /import_raw_vdi) ----------------------------------------


class EarlySink(Sink):
    """A sink with xapi's early 200 head that is complete after *enough* bytes."""

    def __init__(self, enough: int | None = None, fail_at: int | None = None, hold: bool = False):
        super().__init__(hold=hold)
        self.early = HttpResponse(200, b"never sent", [(b"task-id", b"OpaqueRef:t")])
        self.enough = enough
        self.fail_at = fail_at

    @property
    def complete(self) -> bool:
        return self.enough is not None and len(self.data) >= self.enough

    def write(self, data: bytes) -> Deferred[None] | None:
        if self.fail_at is not None and len(self.data) + len(data) >= self.fail_at:
            raise HttpError(400, "bad body")
        return super().write(data)


def test_early_head_goes_before_the_body_and_close_ends_it():
    """The head (200, task-id, Connection: close, no Content-Length) is written before a byte of
    the body is read; once the announced body arrived, finish() is called and the connection closes
    without any other reply."""
    sink = EarlySink()
    channel, transport, _ = connect(Handler(sink), max_body=10)
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 1125899906842624\r\n\r\n")
    head = transport.value()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"task-id: OpaqueRef:t\r\n" in head
    assert b"Connection: close\r\n" in head and b"Content-Length" not in head and head.endswith(b"\r\n\r\n")
    channel.dataReceived(b"x" * 1000)
    assert sink.data == b"x" * 1000 and sink.finished == 0 and not transport.disconnecting
    sink.enough = 1500  # e.g. the XVA's tar end: the rest is not needed
    channel.dataReceived(b"y" * 600 + b"z" * 100)  # one write: the sink is complete after it
    assert sink.finished == 1 and sink.aborted == [] and len(sink.data) == 1700
    assert not transport.disconnecting  # draining what the client still sends
    channel.dataReceived(b"z" * 1000)
    assert len(sink.data) == 1700  # discarded
    channel.connectionLost(None)  # the client hangs up once it sent everything (Xen Orchestra)
    assert sink.aborted == [] and transport.value() == head


def test_early_reply_exact_length_closes_after_finish_and_expect_continue():
    """With Expect: 100-continue the 100 goes first, then the early head; the body ends at its
    Content-Length, finish() runs, the connection closes; a pipelined request is never answered."""
    sink = EarlySink()
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    channel.dataReceived(b"hello" + b"GET /x HTTP/1.1\r\n\r\n")
    assert sink.data == b"hello" and sink.finished == 1 and transport.disconnecting
    assert transport.value() == out


def test_failure_after_the_early_head_aborts_the_sink_and_closes_without_a_second_reply():
    """A sink failing after the early head: abort(reason) is called, nothing else is written, and
    the connection closes after draining a bounded part of the body (at most its announced end)."""
    sink = EarlySink(fail_at=50)
    channel, transport, clock = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 200\r\n\r\n" + b"a" * 40)
    head = transport.value()
    channel.dataReceived(b"b" * 20)
    assert sink.aborted == ["bad body"] and sink.finished == 0
    assert not transport.disconnecting  # still reading the rest of the announced body, to discard it
    channel.dataReceived(b"c" * 140)
    assert transport.disconnecting and transport.value() == head
    # a client that stops sending is closed after body_timeout
    sink2 = EarlySink(fail_at=1)
    channel2, transport2, clock2 = connect(Handler(sink2), body_timeout=5.0)
    channel2.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 1000000\r\n\r\nxx")
    assert sink2.aborted and not transport2.disconnecting
    clock2.advance(6)
    assert transport2.disconnecting and b"408" not in transport2.value()


def test_early_reply_complete_while_chunked_and_while_held():
    """complete is honoured after a held write fires (backpressure) and with chunked framing."""
    sink = EarlySink(enough=4, hold=True)
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
    channel.dataReceived(b"4\r\nefgh\r\n")  # buffered: the sink is behind
    assert sink.data == b"abcd" and sink.finished == 0
    sink.waiting[0].callback(None)
    assert sink.finished == 1 and sink.data == b"abcd" and sink.aborted == []
    channel.dataReceived(b"0\r\n\r\n")
    channel.connectionLost(None)
    assert sink.aborted == []


@pytest.mark.parametrize("kind", [Sink, EarlySink])
def test_connection_lost_mid_body_aborts_once(kind):
    """The client going away mid-body aborts the sink (an early reply's too) once; finish is never called."""
    sink = kind()
    channel, transport, _ = connect(Handler(sink))
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
    channel.connectionLost(None)
    channel.connectionLost(None)
    assert sink.aborted == ["the connection was lost"] and sink.finished == 0
