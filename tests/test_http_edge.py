"""The network edge against hostile clients: connection caps (in process) and, on real
sockets against a real daemon, chunk floods, deep pipelines, input behind a pending reply,
descriptor exhaustion and slow senders."""

from __future__ import annotations

import re
import resource
import socket
import threading
import time
import xmlrpc.client
from typing import Any

import pytest
import XenAPI
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from support import PASSWORD, RealDaemon
from xapid.wire.admission import Admission, descriptor_budget
from xapid.wire.http import HttpFactory, HttpResponse, HttpSettings

# -- admission, in process ---------------------------------------------------------------------


class Channel:
    """What Admission needs of a connection."""

    def __init__(self, busy: bool = False):
        self.busy = busy
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def test_idle_unauthenticated_connections_make_room_for_new_ones():
    """Past the anonymous cap, the least recently active idle unauthenticated connections are
    closed a moment later; busy ones are kept; authenticated ones do not count."""
    clock = Clock()
    admission = Admission(max_clients=10, max_anonymous=3, clock=clock)
    a, b, c = Channel(), Channel(busy=True), Channel()
    for channel in (a, b, c):
        assert admission.admit(channel) == ""
    admission.touched(a)  # a just finished a request: c is now the least recently active idle one
    d = Channel()
    assert admission.admit(d) == ""
    assert not c.evicted  # not at once: the newcomers' requests are read first
    clock.advance(0.1)
    assert c.evicted and not a.evicted and not b.evicted and not d.evicted
    admission.release(c)
    admission.authenticated(a)
    assert admission.admit(Channel()) == ""  # a no longer counts as anonymous
    clock.advance(0.1)
    assert (admission.open, admission.anonymous) == (4, 3)


def test_busy_connections_are_never_closed_and_newcomers_refused_past_the_slack():
    """Connections in a call are never closed for another; past max_clients + slack a newcomer
    is refused, and past twice the slack it gets no protocol at all."""
    clock = Clock()
    admission = Admission(max_clients=2, max_anonymous=2, clock=clock, slack=2)
    busy = [Channel(busy=True) for _ in range(4)]
    for channel in busy:
        assert admission.admit(channel) == ""
    clock.advance(1)
    assert not any(channel.evicted for channel in busy)
    assert "too many connections" in admission.admit(Channel())
    assert admission.room()
    admission.admit(Channel())
    assert not admission.room()


def test_idle_newcomer_past_the_total_cap_is_closed_not_an_authenticated_client():
    """At the total cap, authenticated connections are never closed for a newcomer."""
    clock = Clock()
    admission = Admission(max_clients=2, max_anonymous=2, clock=clock)
    first, second, third = Channel(), Channel(), Channel()
    admission.admit(first)
    admission.admit(second)
    admission.authenticated(first)
    admission.authenticated(second)
    admission.admit(third)
    clock.advance(0.1)
    assert third.evicted and not first.evicted and not second.evicted


def test_factory_answers_503_over_the_cap_and_drops_far_over_it():
    """A connection over the caps gets 503 and is closed; past the slack the socket gets no protocol."""
    clock = Clock()
    admission = Admission(max_clients=1, max_anonymous=1, clock=clock, slack=1)
    factory = HttpFactory(lambda request: HttpResponse(200, b"ok"), HttpSettings(), clock, admission)
    for _ in range(2):  # the cap and its slack, both in a call (never closed for another)
        channel = factory.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channel._pending = object()
    refused = factory.buildProtocol(None)
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.value().startswith(b"HTTP/1.1 503 Service Unavailable") and transport.disconnecting
    assert factory.buildProtocol(None) is None  # the refused one still holds its descriptor
    refused.connectionLost(None)
    assert factory.buildProtocol(None) is not None


def test_authenticated_channel_leaves_the_anonymous_count():
    """A connection whose call the API marked authenticated stops counting as anonymous."""
    clock = Clock()
    admission = Admission(max_clients=5, max_anonymous=5, clock=clock)

    def handler(request):
        request.client.authenticated = True
        return HttpResponse(200, b"ok")

    factory = HttpFactory(handler, HttpSettings(), clock, admission)
    channel = factory.buildProtocol(None)
    channel.makeConnection(StringTransport())
    assert admission.anonymous == 1
    channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert (admission.open, admission.anonymous) == (1, 0)
    channel.connectionLost(None)
    assert admission.open == 0


def test_descriptor_budget_fits_the_limit():
    """The caps leave a reserve below the open-file limit, which is raised to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))
        budget = descriptor_budget(5000, 256)
        assert budget.soft_before == min(512, hard) and budget.soft == hard
        assert budget.max_clients + 64 + 128 <= budget.soft
        assert budget.max_anonymous <= budget.max_clients
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- real sockets --------------------------------------------------------------------------------


LIST_METHODS = b"<?xml version='1.0'?><methodCall><methodName>system.listMethods</methodName><params>"


def xml_call(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method).encode()


def post(body: bytes, path: bytes = b"/") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)


def read_replies(sock: socket.socket, count: int, timeout: float) -> tuple[int, bytes]:
    """Read until *count* HTTP replies (by their status lines) arrived or *timeout* passed."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while data.count(b"HTTP/1.1 ") < count and time.monotonic() < deadline:
        try:
            part = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not part:
            break
        data += part
    return data.count(b"HTTP/1.1 "), bytes(data)


def rss(pid: int) -> int:
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) << 10


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    d = RealDaemon(tmp_path_factory.mktemp("edge"), config="header_timeout = 2\nbody_timeout = 2\n")
    yield d
    d.stop()


def sdk_login(daemon: RealDaemon) -> Any:
    session = XenAPI.Session(daemon.url)
    session.xenapi.login_with_password("admin", PASSWORD, "1.0", "test")
    return session


def test_sixty_thousand_one_byte_chunks_answered_at_once(edge):
    """A call sent as 60 000 one-byte chunks is answered in well under a second."""
    body = LIST_METHODS + b" " * (60000 - len(LIST_METHODS) - 20) + b"</params></methodCall>"
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"".join(b"1\r\n%s\r\n" % body[i:i + 1] for i in range(len(body))) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        started = time.monotonic()
        sock.sendall(data)
        count, reply = read_replies(sock, 1, 10)
        elapsed = time.monotonic() - started
    assert count == 1 and b"200 OK" in reply.split(b"\r\n", 1)[0]
    assert b"VM.get_all_records" in reply
    assert elapsed < 1.0, f"{len(body)} one-byte chunks took {elapsed:.2f} s"


def test_two_thousand_pipelined_requests_in_one_write(edge):
    """2 000 requests written at once are all answered, in order, and nothing is logged as a traceback."""
    before = edge.log.read_text()
    data = b"".join(post(xml_call("VM.get_all", f"OpaqueRef:{i}")) for i in range(2000))
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        writer = threading.Thread(target=sock.sendall, args=(data,))
        writer.start()
        count, replies = read_replies(sock, 2000, 30)
        writer.join(10)
    assert count == 2000
    refs = re.findall(rb"<value>OpaqueRef:(\d+)</value>", replies)
    assert [int(r) for r in refs] == list(range(2000))
    new_log = edge.log.read_text()[len(before):]
    assert "Traceback" not in new_log and "RecursionError" not in new_log


def test_input_behind_a_pending_reply_is_not_buffered_without_bound(edge):
    """100 MB sent behind a waiting event.from leaves the daemon's memory flat: it stops reading."""
    session = sdk_login(edge)
    ref = session._session
    start_rss = rss(edge.proc.pid)
    sent = [0]
    sock = socket.create_connection(("127.0.0.1", edge.port))
    sock.sendall(post(xml_call("event.from", ref, ["vm"], "", 20.0)))

    def flood() -> None:
        junk = b"x" * (1 << 20)
        try:
            for _ in range(100):
                sock.sendall(junk)
                sent[0] += len(junk)
        except OSError:
            pass

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    writer.join(4)
    grown = rss(edge.proc.pid) - start_rss
    sock.close()
    writer.join(10)
    assert sent[0] < 50 << 20, "the daemon kept reading while the reply was pending"
    assert grown < 24 << 20, f"RSS grew by {grown >> 20} MiB"
    assert session.xenapi.VM.get_all()  # still serving
    session.xenapi.session.logout()


def test_slow_header_sender_gets_408(edge):
    """A client trickling its headers is answered 408 and closed at the header deadline."""
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        started = time.monotonic()
        sock.settimeout(0.2)
        reply = b""
        for byte in b"POST / HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                part = sock.recv(4096)
                if not part:
                    break
                reply += part
            except TimeoutError:
                continue
            except OSError:
                break
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout")
    assert 1.5 < time.monotonic() - started < 6


def test_idle_sockets_under_a_low_descriptor_limit_do_not_lock_clients_out(tmp_path):
    """Under `ulimit -n 1024`, 1 100 idle connections leave room for a new client to log in,
    and the daemon never runs out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    daemon = RealDaemon(tmp_path, nofile=1024, listen="tcp:0:interface=127.0.0.1:backlog=1024")
    sockets: list[socket.socket] = []
    try:
        for _ in range(1100):
            sockets.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
        time.sleep(0.5)
        started = time.monotonic()
        session = sdk_login(daemon)
        assert session.xenapi.VM.get_all()
        assert time.monotonic() - started < 5
        session.xenapi.session.logout()
        log = daemon.log.read_text()
        assert re.search(r"open files: limit 1024 \(was 1024\); serving at most \d+ connections", log)
        assert "Could not accept new connection" not in log and "Too many open files" not in log
        assert daemon.proc.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop()


def test_write_now_sends_on_a_real_socket_before_the_reactor_turns():
    """write_now puts a reply on the wire at once (readable by the peer with no reactor turn),
    reports a partial send when the socket is full, and declines TLS or closing transports."""
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    from xapid.wire.http import write_now

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        transport = tcp.Connection(ours, None, MemoryReactor())
        transport.connected = 1
        assert write_now(transport, b"HTTP/1.1 200 OK\r\n\r\n") == 19
        theirs.settimeout(1)
        assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
        big = b"x" * (64 << 20)
        sent = write_now(transport, big)
        assert 0 < sent < len(big)  # what the kernel took; the caller queues the rest
        transport.TLS = True
        assert write_now(transport, b"y") == 0
        transport.TLS = False
        transport.disconnecting = True
        assert write_now(transport, b"y") == 0
    finally:
        ours.close()
        theirs.close()
