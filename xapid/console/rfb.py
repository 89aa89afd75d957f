"""The simulator's graphical console: a small RFB (VNC) server, RFC 6143.

The handshake offers ``RFB 003.008`` and accepts a client speaking 3.3, 3.7 or 3.8 (a later
3.x is spoken to as 3.8), with the security type None only; ServerInit describes a
:data:`WIDTH` × :data:`HEIGHT` framebuffer in 32-bit true colour and names the VM.  The
framebuffer is static: a frame and a band whose colours derive from the VM's name, sent in
the Raw encoding (which every client decodes) for every non-incremental
FramebufferUpdateRequest, clipped to the screen; an incremental request is left pending, as
a server does while nothing changes.  Requests arriving together are answered with at most two
screens' worth of updates (RFC 6143 lets a server merge requests), so 10 bytes of input never
turn into unbounded output.  SetPixelFormat is honoured for true-colour formats of
8, 16 or 32 bits; key and pointer events and cut text are read and ignored.

Anything else is refused by closing: an unknown version or message type, a security type
other than None, a colour-map pixel format, cut text over :data:`CUT_TEXT_MAX` (skipped as it
streams, never buffered).  Input is consumed from one buffer; each message costs time linear
in its size.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

WIDTH, HEIGHT = 640, 400
CUT_TEXT_MAX = 1 << 20
ENCODINGS_MAX = 1024
_VERSION = re.compile(rb"RFB (\d{3})\.(\d{3})\n\Z")


class RfbError(Exception):
    """The client broke the protocol: the session ends."""


@dataclass(frozen=True)
class PixelFormat:
    bits: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    def pack(self) -> bytes:
        return struct.pack("!BBBBHHHBBB3x", self.bits, self.depth, self.big_endian, self.true_colour,
                           self.red_max, self.green_max, self.blue_max,
                           self.red_shift, self.green_shift, self.blue_shift)

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bits, depth, big, true, rmax, gmax, bmax, rs, gs, bs = struct.unpack("!BBBBHHHBBB3x", data)
        return cls(bits, depth, bool(big), bool(true), rmax, gmax, bmax, rs, gs, bs)

    def encode(self, rgb: tuple[int, int, int]) -> bytes:
        """One pixel of colour *rgb* (0-255 each) in this format."""
        r, g, b = rgb
        value = ((r * self.red_max // 255) << self.red_shift | (g * self.green_max // 255) << self.green_shift
                 | (b * self.blue_max // 255) << self.blue_shift)
        size = self.bits // 8
        return (value & ((1 << self.bits) - 1)).to_bytes(size, "big" if self.big_endian else "little")


def palette(name: str) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """Background, frame and band colours of the VM named *name* (the band's from its name)."""
    digest = hashlib.sha256(name.encode()).digest()
    band = (64 + digest[0] % 160, 64 + digest[1] % 160, 64 + digest[2] % 160)
    return (16, 24, 48), (200, 200, 200), band


class RfbServer:
    """One RFB session: :meth:`start` gives the server's first bytes, :meth:`feed` the answer to
    each piece of client input; RfbError when the client must be disconnected."""

    def __init__(self, name: str, width: int = WIDTH, height: int = HEIGHT) -> None:
        self.name = name
        self.width, self.height = width, height
        self.format = PixelFormat()
        self.version = 0  # 3, 7 or 8 once agreed
        self.state = "version"
        self.updates = 0
        self._buf = bytearray()
        self._skip = 0  # bytes of cut text still to skip
        self._colours = palette(name)

    def start(self) -> bytes:
        return b"RFB 003.008\n"

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        self._buf += data
        while self._step(out):
            pass
        return bytes(out)

    def _take(self, size: int) -> bytes | None:
        if len(self._buf) < size:
            return None
        piece = bytes(self._buf[:size])
        del self._buf[:size]
        return piece

    def _step(self, out: bytearray) -> bool:
        """Handle one complete client message if the buffer holds it; False when it needs more."""
        if self.state == "version":
            return self._version(out)
        if self.state == "security":
            return self._security(out)
        if self.state == "init":
            return self._init(out)
        return self._message(out)

    def _version(self, out: bytearray) -> bool:
        """The client's ProtocolVersion: 3.3, 3.7 or 3.8 (later minors as 3.8); offer security None."""
        line = self._take(12)
        if line is None:
            return False
        match = _VERSION.match(line)
        if not match or int(match.group(1)) != 3 or int(match.group(2)) < 3:
            raise RfbError(f"unsupported protocol version {line!r}")
        minor = int(match.group(2))
        self.version = 8 if minor >= 8 else 7 if minor == 7 else 3
        if self.version == 3:
            out += struct.pack("!I", 1)  # security None, chosen by the server
            self.state = "init"
        else:
            out += b"\x01\x01"  # one type: None
            self.state = "security"
        return True

    def _security(self, out: bytearray) -> bool:
        """The client's choice of security type: None, or refused."""
        choice = self._take(1)
        if choice is None:
            return False
        if choice != b"\x01":
            if self.version == 8:
                reason = b"only the security type None is offered"
                out += struct.pack("!II", 1, len(reason)) + reason
            raise RfbError(f"security type {choice[0]} refused")
        if self.version == 8:
            out += struct.pack("!I", 0)
        self.state = "init"
        return True

    def _init(self, out: bytearray) -> bool:
        """ClientInit, answered with ServerInit (size, pixel format, name)."""
        if self._take(1) is None:  # ClientInit: the shared flag (every session is shared here)
            return False
        name = self.name.encode("utf-8")[:256]
        out += struct.pack("!HH", self.width, self.height) + self.format.pack()
        out += struct.pack("!I", len(name)) + name
        self.state = "normal"
        return True

    def _message(self, out: bytearray) -> bool:
        """One client message of the normal phase, by its type byte."""
        buf = self._buf
        if not buf:
            return False
        kind = buf[0]
        if kind == 0:  # SetPixelFormat
            return self._set_pixel_format()
        if kind == 2:  # SetEncodings: only Raw is ever used, which needs no agreement
            if len(buf) < 4:
                return False
            count = struct.unpack_from("!H", buf, 2)[0]
            if count > ENCODINGS_MAX:
                raise RfbError(f"{count} encodings")
            return self._take(4 + 4 * count) is not None
        if kind == 3:  # FramebufferUpdateRequest
            message = self._take(10)
            if message is None:
                return False
            incremental, x, y, w, h = struct.unpack("!BHHHH", message[1:])
            if not incremental and len(out) < 2 * self.width * self.height * 4:  # beyond: merged
                out += self.update(x, y, w, h)
            return True
        if kind == 4:  # KeyEvent
            return self._take(8) is not None
        if kind == 5:  # PointerEvent
            return self._take(6) is not None
        if kind == 6:  # ClientCutText: skipped, never kept
            return self._cut_text()
        raise RfbError(f"unknown client message type {kind}")

    def _set_pixel_format(self) -> bool:
        message = self._take(20)
        if message is None:
            return False
        fmt = PixelFormat.unpack(message[4:20])
        if not fmt.true_colour or fmt.bits not in (8, 16, 32) or fmt.depth == 0:
            raise RfbError("only true-colour pixel formats of 8, 16 or 32 bits are served")
        self.format = fmt
        return True

    def _cut_text(self) -> bool:
        """ClientCutText: its text is dropped as it arrives (up to CUT_TEXT_MAX bytes)."""
        buf = self._buf
        if len(buf) < 8:
            return False
        size = struct.unpack_from("!I", buf, 4)[0]
        if size > CUT_TEXT_MAX:
            raise RfbError(f"cut text of {size} bytes")
        have = min(size, len(buf) - 8)
        del buf[:8 + have]
        self._skip = size - have
        return not self._skip

    def update(self, x: int, y: int, w: int, h: int) -> bytes:
        """A FramebufferUpdate of the rectangle, clipped to the screen (no rectangle when empty)."""
        x, y = min(x, self.width), min(y, self.height)
        w, h = min(w, self.width - x), min(h, self.height - y)
        self.updates += 1
        if w <= 0 or h <= 0:
            return struct.pack("!BxH", 0, 0)
        head = struct.pack("!BxH", 0, 1) + struct.pack("!HHHHi", x, y, w, h, 0)
        background, frame, band = (self.format.encode(c) for c in self._colours)  # once per update
        edge, plain, banded = (line[x * len(frame):(x + w) * len(frame)] for line in (
            frame * self.width, *(frame * 8 + inner * (self.width - 16) + frame * 8 for inner in (background, band))))
        return head + b"".join(self._row_kind(row, edge, plain, banded) for row in range(y, y + h))

    def _row_kind(self, row: int, edge: bytes, plain: bytes, banded: bytes) -> bytes:
        """Row *row* of the screen: the frame's edge, the band, or the plain background."""
        if row < 8 or row >= self.height - 8:
            return edge
        return banded if self.height // 3 <= row < 2 * self.height // 3 else plain
