"""The HTTP parser against arbitrary byte streams split at arbitrary points (hypothesis)."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from xapid.wire.http import HttpChannel, HttpResponse, HttpSettings


def run(stream: bytes, cuts: list[int]) -> tuple[bytes, list[tuple[bytes, bytes, bytes]], bool, HttpChannel]:
    """Feed *stream* cut at *cuts*; the output, the requests seen, whether the connection closed."""
    seen: list[tuple[bytes, bytes, bytes]] = []

    def handler(request):
        seen.append((request.method, request.target, request.body))
        return HttpResponse(200, b"ok")

    channel = HttpChannel(handler, HttpSettings(max_body=4096, max_header=2048), Clock())
    transport = StringTransport()
    channel.makeConnection(transport)
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        if cut > start:
            channel.dataReceived(stream[start:cut])  # must never raise
            start = cut
    return transport.value(), seen, transport.disconnecting, channel


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = [], 0
    for size in sizes:
        if i >= len(body):
            break
        piece = body[i:i + max(size, 1)]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        i += len(piece)
    if i < len(body):
        out.append(b"%x\r\n%s\r\n" % (len(body) - i, body[i:]))
    return b"".join(out) + b"0\r\n\r\n"


body_st = st.binary(max_size=300)
valid_request = st.one_of(
    st.builds(lambda b, path: b"POST /%s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (path, len(b), b),
              body_st, st.sampled_from([b"", b"RPC2", b"jsonrpc"])),
    st.builds(lambda b, sizes: b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b, sizes),
              body_st, st.lists(st.integers(1, 50), max_size=20)),
    st.just(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    st.just(b"\r\nGET /after-blank HTTP/1.1\r\n\r\n"),
)
piece = st.one_of(valid_request, st.binary(max_size=64),
                  st.sampled_from([b"\r\n", b"\r\n\r\n", b"0\r\n", b"Transfer-Encoding: chunked\r\n", b":", b" "]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(piece, max_size=12), st.lists(st.integers(0, 5000), max_size=30))
def test_any_stream_split_anywhere_gives_the_same_answers(pieces, cuts):
    """However a byte stream is split, the protocol never raises and answers exactly as it
    does to the stream in one piece; a closed connection keeps nothing buffered."""
    stream = b"".join(pieces)
    whole = run(stream, [])
    split = run(stream, [c % (len(stream) + 1) for c in cuts])
    assert split[:3] == whole[:3]
    output, seen, closed, channel = split
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", output)
    answers = [s for s in statuses if s != b"100"]
    assert answers[:len(seen)] == [b"200"] * len(seen)  # one answer per request handled, in order
    refusals = answers[len(seen):]
    assert len(refusals) <= 1 and (closed or not refusals)  # then at most one refusal, which closes
    if closed:
        assert not channel._buf and not channel._body


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_request, min_size=1, max_size=10), st.lists(st.integers(0, 5000), max_size=30))
def test_valid_requests_split_anywhere_are_all_answered(requests, cuts):
    """A pipeline of valid requests split anywhere is answered in full, leaving nothing half-parsed."""
    stream = b"".join(requests)
    output, seen, closed, channel = run(stream, [c % (len(stream) + 1) for c in cuts])
    assert not closed
    assert len(seen) == len(requests)
    assert output.count(b"HTTP/1.1 200 OK\r\n") == len(requests)
    assert not channel.receiving  # nothing left over: the next byte starts a new request
