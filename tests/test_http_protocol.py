"""The HTTP/1.1 server protocol on an in-memory transport."""

from __future__ import annotations

import re

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from xapid.wire.http import HttpChannel, HttpRequest, HttpResponse, HttpSettings


class Recorder:
    """A handler answering each request with its method, path and body (or a held Deferred)."""

    def __init__(self, hold: bool = False):
        self.requests: list[HttpRequest] = []
        self.hold = hold
        self.pending: list[Deferred] = []
        self.cancelled = 0

    def __call__(self, request: HttpRequest):
        self.requests.append(request)
        response = HttpResponse(200, request.method + b" " + request.target + b" " + request.body)
        if self.hold:
            d: Deferred = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
            d.addCallback(lambda _: response)
            self.pending.append(d)
            return d
        return response


def connect(handler, max_body=1000, clock=None, admission=None, **settings):
    channel = HttpChannel(handler, HttpSettings(max_body=max_body, **settings), clock or Clock(), admission)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_keep_alive_and_pipelining():
    """Two pipelined HTTP/1.1 requests are answered in order on one connection."""
    handler = Recorder()
    channel, transport = connect(handler)
    channel.dataReceived(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nxy")
    out = transport.value()
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert out.index(b"POST /a abc") < out.index(b"POST /b xy")
    assert not transport.disconnecting


def test_body_split_across_packets():
    """A body arriving in pieces is assembled before the handler runs."""
    handler = Recorder()
    channel, transport = connect(handler)
    for piece in (b"POST / HTTP/1.1\r\nConte", b"nt-Length: 5\r\n\r\nhe", b"llo"):
        channel.dataReceived(piece)
    assert [r.body for r in handler.requests] == [b"hello"]


def test_chunked_body_and_expect_continue():
    """Chunked bodies are decoded and Expect: 100-continue is answered first."""
    handler = Recorder()
    channel, transport = connect(handler)
    channel.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n")
    assert handler.requests[0].body == b"abcde"


def test_http10_closes_unless_keep_alive():
    """HTTP/1.0 closes after the reply unless it asked for keep-alive."""
    channel, transport = connect(Recorder())
    channel.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    assert b"Connection: close" in transport.value() and transport.disconnecting
    channel, transport = connect(Recorder())
    channel.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert b"Connection: keep-alive" in transport.value() and not transport.disconnecting


def test_connection_close_honoured():
    """Connection: close on HTTP/1.1 closes after the reply."""
    channel, transport = connect(Recorder())
    channel.dataReceived(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert transport.disconnecting


def test_refusals():
    """Too large bodies get 413, malformed requests 400, other versions 505, all closing."""
    for data, status in [(b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", b"413"),
                         (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n", b"413"),
                         (b"NONSENSE\r\n\r\n", b"400"),
                         (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
                         (b"POST / HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
                         (b"GET / HTTP/2.0\r\n\r\n", b"505"),
                         (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000, b"431")]:
        channel, transport = connect(Recorder())
        channel.dataReceived(data)
        assert transport.value().startswith(b"HTTP/1.1 " + status), (data[:40], transport.value()[:60])
        assert transport.disconnecting


def test_deferred_reply_holds_the_next_request():
    """A pending reply holds later pipelined requests until it is written."""
    handler = Recorder(hold=True)
    channel, transport = connect(handler)
    channel.dataReceived(b"POST /1 HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert len(handler.requests) == 1 and transport.value() == b""
    handler.pending[0].callback(None)
    assert len(handler.requests) == 2
    handler.pending[1].callback(None)
    assert transport.value().index(b"POST /1") < transport.value().index(b"POST /2")


def test_disconnect_cancels_pending_reply():
    """When the client goes away, its pending reply is cancelled."""
    handler = Recorder(hold=True)
    channel, transport = connect(handler)
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    channel.connectionLost(None)
    assert handler.cancelled == 1
    assert transport.value() == b""


def test_idle_timeout_spares_long_polls():
    """An idle connection is closed on timeout, but not while a reply is pending."""
    handler = Recorder(hold=True)
    clock = Clock()
    channel, transport = connect(handler, clock=clock, idle_timeout=60, header_timeout=10)
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    clock.advance(1000)
    assert not transport.disconnecting
    handler.pending[0].callback(None)
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


# -- hostile clients: linear cost, no recursion, backpressure, deadlines ------------------------


def chunked(body: bytes, size: int = 1) -> bytes:
    """*body* in chunks of *size* bytes, with the final chunk."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_many_one_byte_chunks_decode_in_one_pass():
    """60 000 one-byte chunks, whole or trickled in pieces of 7 bytes, give the body exactly."""
    body = bytes(range(256)) * 234 + b"x" * 96
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body)
    for piece in (len(data), 7):
        handler = Recorder()
        channel, transport = connect(handler, max_body=1 << 20)
        for i in range(0, len(data), piece):
            channel.dataReceived(data[i:i + piece])
        assert [r.body for r in handler.requests] == [body]
        assert transport.value().startswith(b"HTTP/1.1 200 OK")


def test_chunk_sizes_count_towards_the_body_limit():
    """Chunks adding up past max_body get 413, however small each one is."""
    channel, transport = connect(Recorder(), max_body=100)
    channel.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 100 + b"1\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 Content Too Large") and transport.disconnecting


def test_thousands_of_pipelined_requests_in_one_read():
    """2 000 pipelined requests arriving in one read are all answered in order, without recursion."""
    handler = Recorder()
    channel, transport = connect(handler)
    channel.dataReceived(b"".join(b"POST /%d HTTP/1.1\r\nContent-Length: 0\r\n\r\n" % i for i in range(2000)))
    out = transport.value()
    assert out.count(b"HTTP/1.1 200 OK") == 2000
    assert [r.target for r in handler.requests] == [b"/%d" % i for i in range(2000)]
    assert not transport.disconnecting


def test_pipelined_deferred_replies_answered_at_once_or_later():
    """Requests whose Deferreds fire immediately and ones that fire later mix in order."""
    pending: list[Deferred] = []

    def handler(request):
        d: Deferred = Deferred()
        if request.target.endswith(b"later"):
            pending.append(d)
            return d.addCallback(lambda _: HttpResponse(200, request.target))
        d.callback(HttpResponse(200, request.target))
        return d

    channel, transport = connect(handler)
    channel.dataReceived(b"".join(b"GET /%d%s HTTP/1.1\r\n\r\n" % (i, b"later" if i % 100 == 0 else b"")
                                  for i in range(1000)))
    while pending:
        pending.pop().callback(None)
    bodies = re.findall(rb"\r\n\r\n(/\d+(?:later)?)", transport.value())
    assert [int(b.strip(b"/later")) for b in bodies] == list(range(1000))


def test_input_behind_a_pending_reply_pauses_reading():
    """Past pending_input bytes queued behind a pending reply, the socket stops being read; it
    is read again once the reply is written."""
    handler = Recorder(hold=True)
    channel, transport = connect(handler, pending_input=1000)
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 500\r\n\r\n" + b"x" * 500)
    assert transport.producerState == "producing"
    channel.dataReceived(b"y" * 1000)
    assert transport.producerState == "paused"
    handler.pending[0].callback(None)
    assert transport.producerState == "producing"


def test_a_client_that_does_not_read_stops_being_served():
    """When the transport's buffer is full (the client reads no replies), requests already
    buffered wait and reading stops, until the transport asks for more."""
    handler = Recorder()
    channel, transport = connect(handler)
    channel.pauseProducing()  # what the transport does when its write buffer is full
    channel.dataReceived(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    assert handler.requests == [] and transport.producerState == "paused"
    channel.resumeProducing()
    assert len(handler.requests) == 2 and transport.producerState == "producing"


def test_header_deadline_is_not_reset_by_trickled_bytes():
    """A client sending its headers a byte at a time (slowloris) gets 408 at the header deadline."""
    clock = Clock()
    channel, transport = connect(Recorder(), clock=clock, header_timeout=10)
    for byte in b"POST / HTTP/1.1\r\nX-Slow: ":
        channel.dataReceived(bytes([byte]))
        clock.advance(0.3)
    assert not transport.disconnecting
    clock.advance(10)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout") and transport.disconnecting


def test_body_deadline():
    """A body that does not arrive within body_timeout gets 408."""
    clock = Clock()
    channel, transport = connect(Recorder(), clock=clock, body_timeout=5, header_timeout=100)
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408") and transport.disconnecting


def test_silent_connection_closed_after_header_timeout_without_a_reply():
    """A connection that never sends anything is closed at the header deadline, answered nothing."""
    clock = Clock()
    channel, transport = connect(Recorder(), clock=clock, header_timeout=3, idle_timeout=1000)
    clock.advance(3)
    assert transport.disconnecting and transport.value() == b""


def test_keep_alive_idle_then_header_deadline():
    """Between requests the idle timeout applies; the next request's first byte starts the header deadline."""
    clock = Clock()
    channel, transport = connect(Recorder(), clock=clock, header_timeout=5, idle_timeout=50)
    channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    clock.advance(49)
    assert not transport.disconnecting
    channel.dataReceived(b"G")
    clock.advance(5)
    assert transport.disconnecting and transport.value().count(b"HTTP/1.1 408") == 1


@pytest.mark.parametrize("data, status", [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", b"501"),
    (b"POST / HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"1\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+1\r\na\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\na\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab", b"400"),
    (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", b"400"),
    (b"GET  HTTP/1.1\r\n\r\n", b"400"),
])
def test_ambiguous_or_malformed_framing_is_refused(data, status):
    """Framing a proxy could read differently (smuggling) or that is malformed is refused and closed."""
    channel, transport = connect(Recorder())
    channel.dataReceived(data)
    assert transport.value().startswith(b"HTTP/1.1 " + status), transport.value()[:80]
    assert transport.disconnecting


def test_reason_phrases_are_the_standard_ones():
    """Replies carry RFC 9110's reason phrases (401 is Unauthorized, not Unknown)."""
    for status, phrase in [(401, b"Unauthorized"), (403, b"Forbidden"), (503, b"Service Unavailable"),
                           (408, b"Request Timeout"), (413, b"Content Too Large")]:
        channel, transport = connect(lambda request, s=status: HttpResponse(s, b""))
        channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase))


def test_blank_lines_before_a_request():
    """One or two blank lines before a request are tolerated; a stream of them is refused at once."""
    handler = Recorder()
    channel, transport = connect(handler)
    channel.dataReceived(b"\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
    assert [r.target for r in handler.requests] == [b"/x"]
    channel, transport = connect(Recorder())
    channel.dataReceived(b"\r\n" * 100000)
    assert transport.value().startswith(b"HTTP/1.1 400") and transport.disconnecting
