"""The server side of RFC 6455 WebSockets, as much as a console relay needs.

:func:`accept` checks an upgrade request and gives the ``101`` headers; :class:`FrameParser`
turns client bytes into messages (masked frames only, fragments reassembled, control frames
answered by the caller); :func:`frame` builds an unmasked server frame.  Nothing here does
I/O, so every rule is tested on bytes.

Bounds against a hostile client: a frame header announcing more than ``max_frame`` bytes, or
a fragmented message growing past ``max_message``, is refused (close code 1009) before its
payload is read; unmasked frames, reserved bits, unknown opcodes, fragmented or long control
frames, a continuation without a start and a text message that is not UTF-8 are protocol
errors (1002/1007).  The parser keeps one buffer consumed from the front; unmasking is one
big-integer XOR per frame, so the cost is linear in the input.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)

NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED, BAD_DATA, POLICY, TOO_BIG = 1000, 1001, 1002, 1003, 1007, 1008, 1009
#: close codes a peer may send (RFC 6455 §7.4), besides the 3000-4999 private range
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class HandshakeError(Exception):
    """The request is not an acceptable WebSocket upgrade: *status* and extra *headers*."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = headers


class ProtocolError(Exception):
    """The client broke the framing rules: close the connection with *code*."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _tokens(value: bytes) -> set[bytes]:
    return {part.strip().lower() for part in value.split(b",") if part.strip()}


def is_upgrade(headers: dict[bytes, bytes]) -> bool:
    """Whether the request asks for a WebSocket (``Upgrade: websocket``)."""
    return b"websocket" in _tokens(headers.get(b"upgrade", b""))


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def accept(method: bytes, version: bytes, headers: dict[bytes, bytes],
           protocols: tuple[bytes, ...] = (b"binary",)) -> list[tuple[bytes, bytes]]:
    """The ``101 Switching Protocols`` headers for a valid upgrade request; HandshakeError
    (400, or 426 for another WebSocket version) otherwise.  Of the client's subprotocols the
    first of *protocols* it offers is chosen (noVNC offers ``binary``); none is fine too."""
    if method != b"GET" or version != b"HTTP/1.1":
        raise HandshakeError(400, "a WebSocket upgrade is a GET in HTTP/1.1")
    if not is_upgrade(headers) or b"upgrade" not in _tokens(headers.get(b"connection", b"")):
        raise HandshakeError(400, "not a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)")
    if headers.get(b"sec-websocket-version", b"").strip() != b"13":
        raise HandshakeError(426, "only WebSocket version 13 is spoken here", ((b"Sec-WebSocket-Version", b"13"),))
    key = headers.get(b"sec-websocket-key", b"").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        raise HandshakeError(400, "bad Sec-WebSocket-Key")
    reply = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", accept_key(key))]
    offered = [p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",") if p.strip()]
    for name in protocols:
        if name in offered:
            reply.append((b"Sec-WebSocket-Protocol", name))
            break
    return reply


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One unmasked (server) frame."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 126, size)
    else:
        head = struct.pack("!BBQ", first, 127, size)
    return head + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with *code* and a short reason (cut to fit a control frame)."""
    return frame(CLOSE, struct.pack("!H", code) + reason.encode()[:120])


def unmask(data: bytes | bytearray, key: bytes) -> bytes:
    """*data* XOR the repeated 4-byte *key*."""
    size = len(data)
    if not size:
        return b""
    pad = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(size, "big")


@dataclass(frozen=True)
class Message:
    """A complete message (*opcode* TEXT or BINARY) or a control frame (CLOSE, PING, PONG)."""

    opcode: int
    payload: bytes


class FrameParser:
    """Client frames in, messages out; ProtocolError on the first violation."""

    def __init__(self, max_frame: int = 1 << 20, max_message: int = 4 << 20) -> None:
        self.max_frame = max_frame
        self.max_message = max_message
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._size = 0
        self._opcode: int | None = None  # of the fragmented message under way

    def feed(self, data: bytes) -> list[Message]:
        """Parse what *data* completes; the rest waits for more."""
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        while True:
            header = self._header(buf)
            if header is None:
                break
            fin, opcode, size, offset = header
            self._check(fin, opcode, size)
            end = offset + 4 + size
            if len(buf) < end:
                break
            key = bytes(buf[offset:offset + 4])
            payload = unmask(buf[offset + 4:end], key)
            del buf[:end]
            if opcode in _CONTROL:
                out.append(Message(opcode, payload))
                continue
            message = self._assemble(fin, opcode, payload, size)
            if message is not None:
                out.append(message)
        return out

    @staticmethod
    def _header(buf: bytearray) -> tuple[int, int, int, int] | None:
        """``(fin, opcode, payload size, offset of the mask)`` of the frame at the start of *buf*,
        None until its header is complete; ProtocolError for reserved bits or an unmasked frame."""
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        fin, rsv, opcode = first & 0x80, first & 0x70, first & 0x0F
        if rsv:
            raise ProtocolError(PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if not second & 0x80:
            raise ProtocolError(PROTOCOL_ERROR, "client frames must be masked")
        size, offset = second & 0x7F, 2
        if size == 126:
            if len(buf) < 4:
                return None
            size, offset = struct.unpack_from("!H", buf, 2)[0], 4
        elif size == 127:
            if len(buf) < 10:
                return None
            size, offset = struct.unpack_from("!Q", buf, 2)[0], 10
        return fin, opcode, size, offset

    def _check(self, fin: int, opcode: int, size: int) -> None:
        """ProtocolError for a frame that breaks the rules (checked before its payload is awaited)."""
        if opcode in _CONTROL:
            if not fin or size > 125:
                raise ProtocolError(PROTOCOL_ERROR, "control frames are short and never fragmented")
        elif opcode in _DATA or opcode == CONTINUATION:
            if size > self.max_frame:
                raise ProtocolError(TOO_BIG, f"frame of {size} bytes (at most {self.max_frame})")
            if opcode == CONTINUATION and self._opcode is None:
                raise ProtocolError(PROTOCOL_ERROR, "continuation frame without a message")
            if opcode != CONTINUATION and self._opcode is not None:
                raise ProtocolError(PROTOCOL_ERROR, "new message inside a fragmented one")
            if self._size + size > self.max_message:
                raise ProtocolError(TOO_BIG, f"message over {self.max_message} bytes")
        else:
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode}")

    def _assemble(self, fin: int, opcode: int, payload: bytes, size: int) -> Message | None:
        """Add a data frame to the message under way; the whole message once *fin* ends it."""
        if opcode != CONTINUATION:
            self._opcode = opcode
        self._parts.append(payload)
        self._size += size
        if not fin:
            return None
        kind = self._opcode
        assert kind is not None
        whole = b"".join(self._parts)
        self._parts, self._size, self._opcode = [], 0, None
        if kind == TEXT:
            try:
                whole.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(BAD_DATA, "text message is not UTF-8") from None
        return Message(kind, whole)


def close_code(payload: bytes) -> int:
    """The code to answer a client's close frame with (its own code when valid, 1002 when not)."""
    if not payload:
        return NORMAL
    if len(payload) < 2:
        return PROTOCOL_ERROR
    code = struct.unpack("!H", payload[:2])[0]
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return PROTOCOL_ERROR
    return code if code in _SENDABLE or 3000 <= code <= 4999 else PROTOCOL_ERROR
