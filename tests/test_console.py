"""Consoles (issue 17): /console by CONNECT and WebSocket, the sim's serial and RFB consoles.

Protocol pieces are tested on bytes; the whole path with a real daemon and real clients:
a raw socket that does what Xen Orchestra's proxy does, the ``websockets`` library, and the
``vncdotool`` VNC client.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from support import PASSWORD, RealDaemon, vm_record
from xapid.backend.interface import ConsoleEndpoint, HeldPty, NoConsole, NoSuchDomain
from xapid.console import websocket as ws
from xapid.console.relay import ConsoleLimits, ConsoleSession
from xapid.console.rfb import RfbError, RfbServer
from xapid.console.serial import LINE_MAX, SerialConsole

# ------------------------------------------------------------------ WebSocket framing


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04",
                 size: int | None = None) -> bytes:
    """A client frame (masked unless *mask* is empty); *size* overrides the announced length."""
    n = len(payload) if size is None else size
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    return head + mask + (ws.unmask(payload, mask) if mask else payload)


def test_handshake_accept_key_and_refusals() -> None:
    headers = {b"upgrade": b"websocket", b"connection": b"keep-alive, Upgrade", b"sec-websocket-version": b"13",
               b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==", b"sec-websocket-protocol": b"base64, binary"}
    reply = dict(ws.accept(b"GET", b"HTTP/1.1", headers))
    assert reply[b"Sec-WebSocket-Accept"] == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3's example
    assert reply[b"Sec-WebSocket-Protocol"] == b"binary"
    with pytest.raises(ws.HandshakeError) as caught:
        ws.accept(b"GET", b"HTTP/1.1", {**headers, b"sec-websocket-version": b"8"})
    assert caught.value.status == 426 and (b"Sec-WebSocket-Version", b"13") in caught.value.headers
    for bad in ({b"sec-websocket-key": b"short"}, {b"connection": b"close"}, {b"upgrade": b"h2c"}):
        with pytest.raises(ws.HandshakeError) as caught:
            ws.accept(b"GET", b"HTTP/1.1", {**headers, **bad})
        assert caught.value.status == 400


def test_frames_are_unmasked_reassembled_and_bounded() -> None:
    parser = ws.FrameParser(max_frame=1000, max_message=1500)
    data = client_frame(ws.BINARY, b"hel", fin=False) + client_frame(ws.PING, b"p") + \
        client_frame(ws.CONTINUATION, b"lo")
    out: list[ws.Message] = []
    for i in range(len(data)):  # byte by byte: any split is fine
        out += parser.feed(data[i:i + 1])
    assert out == [ws.Message(ws.PING, b"p"), ws.Message(ws.BINARY, b"hello")]
    assert ws.FrameParser().feed(client_frame(ws.TEXT, "é".encode())) == [ws.Message(ws.TEXT, "é".encode())]
    cases = [
        (client_frame(ws.BINARY, b"x", mask=b""), ws.PROTOCOL_ERROR),  # unmasked
        (client_frame(ws.BINARY, b"", size=1 << 40)[:14], ws.TOO_BIG),  # refused from the header alone
        (client_frame(ws.BINARY, b"a" * 800, fin=False) + client_frame(ws.CONTINUATION, b"b" * 800), ws.TOO_BIG),
        (client_frame(ws.PING, b"p", fin=False), ws.PROTOCOL_ERROR),
        (client_frame(ws.PING, b"p" * 126), ws.PROTOCOL_ERROR),
        (client_frame(ws.CONTINUATION, b"x"), ws.PROTOCOL_ERROR),
        (client_frame(ws.BINARY, b"x", fin=False) + client_frame(ws.BINARY, b"y"), ws.PROTOCOL_ERROR),
        (client_frame(ws.TEXT, b"\xff"), ws.BAD_DATA),
        (client_frame(0x3, b""), ws.PROTOCOL_ERROR),
        (bytes([0xC2, 0x80]) + b"\0\0\0\0", ws.PROTOCOL_ERROR),  # RSV1 without an extension
    ]
    for data, code in cases:
        with pytest.raises(ws.ProtocolError) as caught:
            ws.FrameParser(max_frame=1000, max_message=1500).feed(data)
        assert caught.value.code == code, data[:4]
    assert ws.frame(ws.BINARY, b"x" * 70000)[:4] == b"\x82\x7f\x00\x00"
    assert ws.close_code(struct.pack("!H", 1000)) == 1000 and ws.close_code(struct.pack("!H", 1005)) == 1002


# ------------------------------------------------------------------ the simulated serial console


def test_serial_console_banner_echo_and_line_discipline() -> None:
    tty = SerialConsole("web server 1")
    first = tty.start()
    assert b'VM "web server 1"' in first and first.endswith(b"web-server-1 login: ")
    assert tty.feed(b"roox\x7ft") == b"roox\b \bt"
    assert tty.feed(b"\r\n") == b"\r\nPassword: "  # CR LF ends one line, not two
    assert tty.feed(b"secret") == b""  # not echoed
    assert tty.feed(b"\r") == b"\r\n\r\nLogin incorrect\r\nweb-server-1 login: "
    assert tty.feed(b"\x1b[A\x1bOBab\x15") == b"ab\b \b\b \b"  # arrow keys dropped; Ctrl-U kills the line
    assert tty.feed(b"x" * (LINE_MAX + 5)).count(b"\a") == 5
    assert tty.feed(b"\x03") == b"^C\r\nweb-server-1 login: "


# ------------------------------------------------------------------ the simulated RFB server


def rfb_handshake(server: RfbServer, version: bytes) -> bytes:
    assert server.start() == b"RFB 003.008\n"
    out = server.feed(version)
    if version != b"RFB 003.003\n":
        assert out == b"\x01\x01"
        out = server.feed(b"\x01")
    return out + server.feed(b"\x01")  # ClientInit


@pytest.mark.parametrize("version,security", [(b"RFB 003.003\n", b"\0\0\0\1"), (b"RFB 003.007\n", b""),
                                              (b"RFB 003.008\n", b"\0\0\0\0"), (b"RFB 003.889\n", b"\0\0\0\0")])
def test_rfb_handshakes_and_server_init(version: bytes, security: bytes) -> None:
    out = rfb_handshake(RfbServer("win10"), version)
    assert out[:len(security)] == security
    init = out[len(security):]
    width, height = struct.unpack("!HH", init[:4])
    assert (width, height) == (640, 400) and init[4] == 32 and init[7] == 1  # 32 bpp, true colour
    assert init[20:24] == struct.pack("!I", 5) and init[24:] == b"win10"


def test_rfb_framebuffer_updates_and_ignored_input() -> None:
    server = RfbServer("vm")
    rfb_handshake(server, b"RFB 003.008\n")
    assert server.feed(struct.pack("!BxHi", 2, 1, 0)) == b""  # SetEncodings [Raw]
    update = server.feed(struct.pack("!BBHHHH", 3, 0, 0, 0, 10, 2))
    assert update[:4] == b"\0\0\0\1" and struct.unpack("!HHHHi", update[4:16]) == (0, 0, 10, 2, 0)
    assert len(update) == 16 + 10 * 2 * 4
    assert server.feed(struct.pack("!BBHHHH", 3, 1, 0, 0, 10, 2)) == b""  # incremental: nothing changed
    clipped = server.feed(struct.pack("!BBHHHH", 3, 0, 630, 390, 60000, 60000))
    assert struct.unpack("!HHHH", clipped[4:12]) == (630, 390, 10, 10) and len(clipped) == 16 + 100 * 4
    events = struct.pack("!BBxxI", 4, 1, 0x61) + struct.pack("!BBHH", 5, 1, 10, 10)
    cut = struct.pack("!BxxxI", 6, 5000) + b"z" * 5000
    assert server.feed(events + cut[:100]) == b"" and server.feed(cut[100:]) == b""
    server.feed(struct.pack("!Bxxx", 0) + struct.pack("!BBBBHHHBBB3x", 16, 16, 1, 1, 31, 63, 31, 11, 5, 0))
    assert len(server.feed(struct.pack("!BBHHHH", 3, 0, 0, 0, 4, 1))) == 16 + 4 * 2  # 16 bpp now


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"RFB 004.000\n"])
def test_rfb_refuses_a_bad_version(garbage: bytes) -> None:
    server = RfbServer("vm")
    server.start()
    with pytest.raises(RfbError):
        server.feed(garbage)


@pytest.mark.parametrize("message", [b"\x07\0\0\0", b"\xff" * 8, struct.pack("!BxH", 2, 60000),
                                     struct.pack("!BxxxI", 6, 1 << 30),
                                     struct.pack("!Bxxx", 0) + bytes([8, 8, 0, 0]) + bytes(12)])
def test_rfb_refuses_garbage_messages(message: bytes) -> None:
    server = RfbServer("vm")
    rfb_handshake(server, b"RFB 003.008\n")
    with pytest.raises(RfbError):
        server.feed(message)


def test_rfb_refuses_another_security_type() -> None:
    server = RfbServer("vm")
    server.start()
    server.feed(b"RFB 003.008\n")
    with pytest.raises(RfbError):
        server.feed(b"\x02")


# ------------------------------------------------------------------ the relay session


def session(clock: Clock, limits: ConsoleLimits, websocket: bool = False,
            protocol: str = "vt100") -> tuple[ConsoleSession, StringTransport]:
    proto = ConsoleSession(ConsoleEndpoint(protocol, "sim", name="vm1"), clock, limits, "OpaqueRef:vm",
                           websocket=websocket, label="test")
    transport = StringTransport()
    proto.makeConnection(transport)
    clock.advance(0)
    return proto, transport


def test_relay_sessions_are_counted_and_time_out_when_idle() -> None:
    clock = Clock()
    limits = ConsoleLimits(total=3, per_vm=2, idle_timeout=60)
    first, t1 = session(clock, limits)
    assert b"vm1 login: " in t1.value()
    second, t2 = session(clock, limits)
    assert limits.full("OpaqueRef:vm") and not limits.full("OpaqueRef:other")
    third, t3 = session(clock, limits)  # over the cap (a race past the handler's check): closed at once
    assert t3.disconnecting and t3.value() == b""
    third.connectionLost()
    assert limits.open == {"OpaqueRef:vm": 2}
    clock.advance(50)
    first.dataReceived(b"a")
    clock.advance(50)
    assert not t1.disconnecting and t2.disconnecting  # 100 s quiet
    second.connectionLost()
    clock.advance(61)
    assert t1.disconnecting
    first.connectionLost()
    assert limits.open == {}


def test_relay_sessions_are_counted_per_user() -> None:
    """One user's sessions over several VMs are capped; another user (and callers without a name,
    who share one count) are not held back by them."""
    clock = Clock()
    limits = ConsoleLimits(total=10, per_vm=2, per_user=3)
    for vm in ("a", "a", "b"):
        assert limits.take(f"OpaqueRef:{vm}", "eve")
    assert limits.full("OpaqueRef:c", "eve") == "too many console sessions of this user (3 at most)"
    assert not limits.full("OpaqueRef:c", "bob") and not limits.full("OpaqueRef:c")
    proto = ConsoleSession(ConsoleEndpoint("vt100", "sim", name="vm1"), clock, limits, "OpaqueRef:c",
                           label="test", user="eve")
    transport = StringTransport()
    proto.makeConnection(transport)  # over the cap (a race past the handler's check): closed at once
    assert transport.disconnecting and transport.value() == b""
    proto.connectionLost()
    assert limits.by_user == {"eve": 3}
    for _ in range(3):
        assert limits.take("OpaqueRef:c") or limits.take("OpaqueRef:d")
    assert limits.full("OpaqueRef:e") == "too many console sessions of this user (3 at most)"
    limits.release("OpaqueRef:a", "eve")
    assert not limits.full("OpaqueRef:e", "eve") and limits.by_user == {"eve": 2, "": 3}
    for n in range(4):  # a pool-admin (Xen Orchestra's connection) is not counted per user
        assert limits.take(f"OpaqueRef:admin{n}", None)
    assert limits.by_user == {"eve": 2, "": 3}
    limits.release("OpaqueRef:admin0", None)
    assert limits.by_user == {"eve": 2, "": 3} and "OpaqueRef:admin0" not in limits.open


def test_websocket_relay_pings_closes_and_refuses_unmasked() -> None:
    clock = Clock()
    limits = ConsoleLimits()
    proto, transport = session(clock, limits, websocket=True)
    parser_out = transport.value()
    assert parser_out[0] == 0x82  # the banner in a binary frame
    transport.clear()
    proto.dataReceived(client_frame(ws.PING, b"hi") + client_frame(ws.BINARY, b"r"))
    assert transport.value() == ws.frame(ws.PONG, b"hi") + ws.frame(ws.BINARY, b"r")
    transport.clear()
    proto.dataReceived(client_frame(ws.BINARY, b"x", mask=b""))
    assert transport.value() == ws.close_frame(ws.PROTOCOL_ERROR, "client frames must be masked")
    assert transport.disconnecting
    proto.connectionLost()
    assert limits.open == {}


def test_rfb_garbage_through_the_relay_ends_the_session() -> None:
    clock = Clock()
    proto, transport = session(clock, ConsoleLimits(), protocol="rfb")
    assert transport.value() == b"RFB 003.008\n"
    proto.dataReceived(b"\x00" * 64)
    assert transport.disconnecting


def test_pings_from_a_client_that_reads_nothing_are_not_queued() -> None:
    """A device model's VNC server (TCP) behind the relay: while the client's transport is full the
    server is paused, and of the pings received meanwhile only the latest is answered, once it drains."""
    reactor = MemoryReactorClock()
    proto = ConsoleSession(ConsoleEndpoint("rfb", "tcp", host="127.0.0.1", port=5900), reactor, ConsoleLimits(),
                           "OpaqueRef:vm", websocket=True, label="test")
    client = StringTransport()
    proto.makeConnection(client)
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 5900)
    server = StringTransport()
    factory.buildProtocol(None).makeConnection(server)  # the connection succeeds: the relay is linked
    assert proto.link is not None and server.producer is client
    client.producer.pauseProducing()  # the client's buffer is full: it reads nothing
    assert server.producerState == "paused"
    proto.dataReceived(b"".join(client_frame(ws.PING, b"%d" % i) for i in range(1000)))
    assert client.value() == b""
    client.producer.resumeProducing()
    assert client.value() == ws.frame(ws.PONG, b"999") and server.producerState == "producing"
    proto.dataReceived(client_frame(ws.PING, b"now") + client_frame(ws.BINARY, b"key"))
    assert client.value().endswith(ws.frame(ws.PONG, b"now")) and server.value() == b"key"


def pty_session(endpoint: ConsoleEndpoint, limits: ConsoleLimits) -> tuple[ConsoleSession, StringTransport, Any]:
    reactor = MemoryReactorClock()
    proto = ConsoleSession(endpoint, reactor, limits, "OpaqueRef:vm", label="test")
    client = StringTransport()
    proto.makeConnection(client)
    return proto, client, reactor


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pty_relay_uses_the_descriptor_the_driver_held(tmp_path: Path) -> None:
    """The relay relays the pty the driver opened and checked (``HeldPty``), never reopening the path;
    without one, or with a descriptor that is not a terminal, the session is refused, nothing is set
    on anything and no descriptor is left open."""
    checked = os.openpty()
    try:
        path = os.ttyname(checked[1])
        limits = ConsoleLimits()
        held = HeldPty(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        proto, client, _ = pty_session(ConsoleEndpoint("vt100", "pty", path=path, pty=held), limits)
        assert proto.link is not None and not client.disconnecting
        os.write(checked[0], b"login: ")
        proto.link.transport.doRead()
        assert client.value() == b"login: "
        proto.dataReceived(b"root\r")
        proto.link.transport.doWrite()  # the memory reactor does not run the writer
        os.set_blocking(checked[0], False)
        assert os.read(checked[0], 100) == b"root\r"
        proto.connectionLost()
        plain = tmp_path / "file"
        plain.write_bytes(b"data")
        fds = open_fds()
        for held in (None, HeldPty(os.open(plain, os.O_RDWR)), HeldPty(-1)):
            proto, client, _ = pty_session(ConsoleEndpoint("vt100", "pty", path=path, pty=held), limits)
            assert proto.link is None and client.disconnecting, held
            proto.connectionLost()
        assert open_fds() == fds and limits.open == {} and plain.read_bytes() == b"data"
    finally:
        for fd in checked:
            os.close(fd)


# ------------------------------------------------------------------ the sim driver


def test_sim_console_endpoints(env: Any, admin: Any) -> None:
    pv = admin("VM.create", vm_record())
    admin("VM.start", pv, False, False)
    hvm = admin("VM.create", vm_record(HVM_boot_policy="BIOS order", HVM_boot_params={"order": "dc"}, PV_kernel=""))
    admin("VM.start", hvm, False, False)
    driver = env.api.hypervisor.driver
    uuid = admin("VM.get_uuid", pv)
    assert driver.console_endpoint(uuid, "vt100") == ConsoleEndpoint("vt100", "sim", name=admin("VM.get_name_label", pv))
    with pytest.raises(NoConsole):
        driver.console_endpoint(uuid, "rfb")
    assert driver.console_endpoint(admin("VM.get_uuid", hvm), "rfb").kind == "sim"
    protocols = [admin("console.get_protocol", c) for c in admin("VM.get_consoles", hvm)]
    assert protocols == ["rfb", "vt100"]
    admin("VM.pause", pv)
    assert driver.console_endpoint(uuid, "vt100").protocol == "vt100"  # a paused guest keeps its console
    admin("VM.unpause", pv)
    admin("VM.hard_shutdown", pv)
    with pytest.raises(NoSuchDomain):
        driver.console_endpoint(uuid, "vt100")
    assert admin("VM.get_consoles", pv) == []


# ------------------------------------------------------------------ a real daemon and real clients


@pytest.fixture(scope="module")
def consoles(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon with a running PV VM, a running HVM VM and a halted VM; sessions of three roles."""
    import XenAPI

    d = RealDaemon(tmp_path_factory.mktemp("consoles"), config="[limits]\nmax_consoles_per_vm = 2\n")
    x = XenAPI.Session(d.url)
    x.login_with_password("admin", PASSWORD)
    pv = x.xenapi.VM.create(vm_record(name_label="console pv"))
    x.xenapi.VM.start(pv, False, False)
    hvm = x.xenapi.VM.create(vm_record(name_label="console-hvm", HVM_boot_policy="BIOS order",
                                       HVM_boot_params={"order": "dc"}, PV_kernel=""))
    x.xenapi.VM.start(hvm, False, False)
    halted = x.xenapi.VM.create(vm_record(name_label="halted"))
    sessions = {"admin": x._session}
    for user in ("operator", "reader"):
        s = XenAPI.Session(d.url)
        s.login_with_password(user, PASSWORD)
        sessions[user] = s._session
    d.api, d.sessions = x.xenapi, sessions
    d.vms = {"pv": pv, "hvm": hvm, "halted": halted}
    d.dom0 = next(v for v, r in x.xenapi.VM.get_all_records().items() if r["is_control_domain"])
    yield d
    d.stop()


def status_of(head: bytes) -> int:
    return int(head.split(b"\r\n")[0].split(b" ")[1])


def retried(open_: Callable[[], tuple[socket.socket, bytes]]) -> tuple[socket.socket, bytes]:
    """*open_*'s socket and reply head, retried a little while a session closed by the previous
    test is still counted (503)."""
    for _ in range(50):
        sock, head = open_()
        if status_of(head) != 503:
            return sock, head
        sock.close()
        time.sleep(0.1)
    return sock, head


def raw_connect(d: Any, query: str, session: str | None = None, headers: str = "") -> tuple[socket.socket, bytes]:
    """What Xen Orchestra's proxy does: CONNECT, the cookie, a blank line; the reply's head back."""
    return retried(lambda: _raw_connect(d, query, session, headers))


def _raw_connect(d: Any, query: str, session: str | None, headers: str) -> tuple[socket.socket, bytes]:
    cookie = f"Cookie: session_id={session}\r\n" if session else ""
    return d.raw_request(f"CONNECT /console?{query} HTTP/1.0\r\nHost: 127.0.0.1\r\n{cookie}{headers}\r\n".encode(),
                         timeout=10)


def read_until(sock: socket.socket, marker: bytes, start: bytes = b"") -> bytes:
    data = start
    while marker not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before {marker!r}: {data!r}"
        data += piece
    return data


def console_of(d: Any, vm: str, protocol: str) -> str:
    return next(d.api.console.get_uuid(c) for c in d.api.VM.get_consoles(vm)
                if d.api.console.get_protocol(c) == protocol)


def test_serial_console_by_connect_like_xen_orchestra(consoles: Any) -> None:
    location = consoles.api.console.get_location(consoles.api.VM.get_consoles(consoles.vms["pv"])[0])
    assert location == f"http://127.0.0.1:{consoles.port}/console?uuid={console_of(consoles, consoles.vms['pv'], 'vt100')}"
    sock, head = raw_connect(consoles, location.split("?", 1)[1], consoles.sessions["operator"])
    with sock:
        status, rest = head.split(b"\r\n\r\n", 1)[0], head.split(b"\r\n\r\n", 1)[1]
        assert status.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"  # as xapi, though the request said HTTP/1.0
        assert b"Connection: keep-alive" in status and b"Cache-Control: no-cache, no-store" in status
        banner = read_until(sock, b"login: ", rest)
        assert b'VM "console pv"' in banner and banner.endswith(b"console-pv login: ")
        sock.sendall(b"root\r")
        assert read_until(sock, b"Password: ") == b"root\r\nPassword: "


def test_serial_console_by_websocket(consoles: Any) -> None:
    from websockets.sync.client import connect

    uri = f"ws://127.0.0.1:{consoles.port}/console?ref={consoles.vms['pv']}"
    auth = base64.b64encode(f"operator:{PASSWORD}".encode()).decode()
    with connect(uri, additional_headers={"Authorization": f"Basic {auth}"}, subprotocols=["binary"],
                 open_timeout=10) as client:
        assert client.subprotocol == "binary"
        received = b""
        while b"login: " not in received:
            message = client.recv(timeout=10)
            assert isinstance(message, bytes)
            received += message
        assert b'VM "console pv"' in received
        client.ping().wait(10)
        client.send(b"admin")
        assert client.recv(timeout=10) == b"admin"
        client.send(b"\x7f")
        assert client.recv(timeout=10) == b"\b \b"


def test_hvm_rfb_console_with_a_vnc_client(consoles: Any, tmp_path: Path) -> None:
    """vncdotool (a real VNC client) captures the screen through a CONNECT proxy, as Xen
    Orchestra relays it."""
    import subprocess
    import sys

    query = f"ref={consoles.vms['hvm']}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def proxy() -> None:
        client, _ = listener.accept()
        upstream, head = raw_connect(consoles, query, consoles.sessions["operator"])
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            client.sendall(rest)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    threading.Thread(target=proxy, daemon=True).start()
    shot = tmp_path / "screen.png"
    vncdo = Path(sys.executable).parent / "vncdo"
    subprocess.run([str(vncdo), "-s", f"127.0.0.1::{listener.getsockname()[1]}", "--delay", "0",
                    "capture", str(shot)], check=True, timeout=60, capture_output=True)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (640, 400)
    assert image.getpixel((0, 0)) == (200, 200, 200)  # the frame
    assert image.getpixel((320, 30)) == (16, 24, 48)  # the background
    listener.close()


def test_rfb_handshake_through_connect_then_garbage(consoles: Any) -> None:
    sock, head = raw_connect(consoles, f"uuid={consoles.api.VM.get_uuid(consoles.vms['hvm'])}",
                             consoles.sessions["admin"])
    with sock:
        assert status_of(head) == 200
        assert read_until(sock, b"\n", head.split(b"\r\n\r\n", 1)[1]) == b"RFB 003.008\n"
        sock.sendall(b"RFB 003.003\n\x01")
        init = read_until(sock, b"console-hvm")
        assert init[:4] == b"\0\0\0\1" and struct.unpack("!HH", init[4:8]) == (640, 400)
        sock.sendall(b"\xee" * 32)  # no such message type: the session ends
        assert sock.recv(100) == b""


@pytest.mark.parametrize("who,target,status", [
    (None, "pv", 401), ("reader", "pv", 403), ("operator", "halted", 500), ("operator", "nothing", 404),
    ("operator", "", 500), ("operator", "dom0", 403), ("admin", "dom0", 200)])
def test_connect_refusals_as_xapi(consoles: Any, who: str | None, target: str, status: int) -> None:
    vm = {"dom0": consoles.dom0, "nothing": "OpaqueRef:no-such-thing"}.get(target) or consoles.vms.get(target, "")
    sock, head = raw_connect(consoles, f"ref={vm}" if target else "x=1",
                             consoles.sessions[who] if who else None)
    with sock:
        assert head.split(b"\r\n")[0].split(b" ")[1] == str(status).encode(), head
        if status == 401:
            assert b'WWW-Authenticate: Basic realm="xapid"' in head
        if status == 200:
            assert b"login: " in read_until(sock, b"login: ", head.split(b"\r\n\r\n", 1)[1])


def test_a_bad_password_and_a_bad_session_are_401(consoles: Any) -> None:
    bad = base64.b64encode(b"operator:wrong").decode()
    for session, headers in ((None, f"Authorization: Basic {bad}\r\n"), ("OpaqueRef:forged", "")):
        sock, head = raw_connect(consoles, f"ref={consoles.vms['pv']}", session, headers)
        sock.close()
        assert status_of(head) == 401, head


def test_too_many_sessions_on_one_vm_is_503(consoles: Any) -> None:
    query = f"ref={consoles.vms['pv']}"
    opened = [raw_connect(consoles, query, consoles.sessions["operator"])[0] for _ in range(2)]
    sock, head = _raw_connect(consoles, query, consoles.sessions["operator"], "")
    sock.close()
    assert status_of(head) == 503 and b"Retry-After" in head, head
    for s in opened:
        s.close()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon allowing 3 console sessions per user (2 per VM), with two running VMs."""
    import XenAPI

    d = RealDaemon(tmp_path_factory.mktemp("capped"),
                   config="[limits]\nmax_consoles_per_vm = 2\nmax_consoles_per_user = 3\n")
    x = XenAPI.Session(d.url)
    x.login_with_password("admin", PASSWORD)
    d.vms = {}
    for name in ("first", "second"):
        d.vms[name] = x.xenapi.VM.create(vm_record(name_label=name))
        x.xenapi.VM.start(d.vms[name], False, False)
    d.sessions = {"admin": x._session}
    s = XenAPI.Session(d.url)
    s.login_with_password("operator", PASSWORD)
    d.sessions["operator"] = s._session
    yield d
    d.stop()


def test_too_many_sessions_of_one_user_is_503_others_still_admitted(capped: Any) -> None:
    """One vm-operator cannot take every session by spreading them over VMs (max_consoles_per_user)."""
    first, second = f"ref={capped.vms['first']}", f"ref={capped.vms['second']}"
    operator, admin = capped.sessions["operator"], capped.sessions["admin"]
    opened = [raw_connect(capped, query, operator) for query in (first, first, second)]
    assert all(status_of(head) == 200 for _, head in opened)
    sock, head = _raw_connect(capped, second, operator, "")  # the VM has room: the user has not
    with sock:
        assert status_of(head) == 503 and b"Retry-After: " in head, head
        rest = head.split(b"\r\n\r\n", 1)[1]
        assert b"too many console sessions of this user (3 at most)" in read_until(sock, b"at most)", rest)
    other, head = _raw_connect(capped, second, admin, "")  # another user is still let in
    with other:
        assert status_of(head) == 200, head
        assert b"login: " in read_until(other, b"login: ", head.split(b"\r\n\r\n", 1)[1])
    opened[2][0].close()  # the operator closes one: admitted again (once the daemon saw it close)
    again, head = raw_connect(capped, second, operator)
    with again:
        assert status_of(head) == 200, head
    for s, _ in opened:
        s.close()


def websocket_open(d: Any, query: str, extra: str = "") -> tuple[socket.socket, bytes]:
    key = base64.b64encode(os.urandom(16)).decode()
    return retried(lambda: d.raw_request(
        f"GET /console?{query} HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode(), timeout=10))


@pytest.mark.parametrize("frame,code", [
    (client_frame(ws.BINARY, b"", size=2 << 20)[:14], ws.TOO_BIG),
    (client_frame(ws.BINARY, b"abc", mask=b""), ws.PROTOCOL_ERROR)])
def test_hostile_websocket_frames_get_a_close_frame(consoles: Any, frame: bytes, code: int) -> None:
    sock, head = websocket_open(consoles, f"ref={consoles.vms['pv']}&session_id={consoles.sessions['operator']}")
    with sock:
        assert head.startswith(b"HTTP/1.1 101")
        data = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(frame)
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        closing = data.rfind(b"\x88")
        assert closing >= 0 and struct.unpack("!H", data[closing + 2:closing + 4])[0] == code


def test_websocket_refusals(consoles: Any) -> None:
    session = consoles.sessions["operator"]
    pv = consoles.vms["pv"]
    cross = f"Origin: https://evil.example\r\nCookie: session_id={session}\r\n"
    sock, head = websocket_open(consoles, f"ref={pv}", cross)  # a foreign page riding the cookie
    sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    sock, head = websocket_open(consoles, f"ref={pv}&session_id={session}", "Origin: https://evil.example\r\n")
    sock.close()
    assert head.startswith(b"HTTP/1.1 101"), head  # the page knew the session itself
    sock = socket.create_connection(("127.0.0.1", consoles.port), timeout=10)
    with sock:
        sock.sendall(f"GET /console?ref={pv}&session_id={session} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 400")
    sock, head = websocket_open(consoles, f"ref={pv}", "Sec-WebSocket-Version: 8\r\n")
    sock.close()
    assert head.startswith(b"HTTP/1.1 401")  # credentials come first


def test_daemon_survives_and_serves_after_hostile_consoles(consoles: Any) -> None:
    sock, head = raw_connect(consoles, f"ref={consoles.vms['pv']}", consoles.sessions["operator"])
    with sock:
        assert status_of(head) == 200
    assert consoles.api.VM.get_power_state(consoles.vms["pv"]) == "Running"
    assert "Traceback" not in consoles.log.read_text()


def test_rfb_pipelined_update_requests_are_merged_not_amplified() -> None:
    server = RfbServer("vm")
    rfb_handshake(server, b"RFB 003.008\n")
    flood = struct.pack("!BBHHHH", 3, 0, 0, 0, 640, 400) * 1000  # 10 kB asking for 1000 full screens
    answer = server.feed(flood)
    assert len(answer) <= 3 * 640 * 400 * 4 and answer[:4] == b"\0\0\0\1"
    assert len(server.feed(struct.pack("!BBHHHH", 3, 0, 0, 0, 4, 1))) == 16 + 4 * 4  # still answering
