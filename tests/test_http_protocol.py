"""The HTTP/1.1 server protocol on an in-memory transport."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from xapid.wire.http import HttpChannel, HttpRequest, HttpResponse


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


def connect(handler, max_body=1000):
    channel = HttpChannel(handler, max_body, idle_timeout=60)
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
    channel, transport = connect(handler)
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    channel.timeoutConnection()
    assert not transport.disconnecting
    channel, transport = connect(Recorder())
    channel.timeoutConnection()
    assert transport.disconnecting
