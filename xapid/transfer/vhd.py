"""VHD (Microsoft Virtual Hard Disk v1.0) streams, as xapi's vhd-tool reads and writes them.

* :class:`VhdLayout` describes a **dynamic** VHD holding only chosen 2 MiB blocks: the footer
  copy, the dynamic header, the BAT, then each block (a sector bitmap with every bit set, the
  data), then the footer.  Its length is known before the first byte, so an export can announce
  it; the blocks' data is read from the disk one at a time while the stream is written.
* :class:`VhdParser` is a push parser for import: fed the body as it arrives, it returns write
  operations (:class:`Op`) for the disk, never holding more than the BAT and one sector bitmap.
  Hostile input (bad cookies or checksums, absurd sizes, a BAT pointing outside the stream or
  at overlapping places) raises :class:`FormatError` before anything is written where it can be
  seen up front, otherwise as soon as it is seen; the cost is linear in the input.  Checking a
  large BAT is the one long step (~0.3 s at a million entries): :meth:`VhdParser.costly` tells
  the caller which piece to feed in a thread.
* :class:`RawParser` and :class:`ChunkedParser` do the same for raw bodies and XenServer's
  chunked protocol ({u64 LE offset, u32 LE length, data}…, ended by an all-zero header).

Blocks absent from an imported VHD's BAT leave the disk unchanged (a delta applied over its
base); within a present block, sectors whose bitmap bit is clear read as zeros (dynamic disk)
or are left unchanged (differencing disk).
"""

from __future__ import annotations

import struct
import sys
import uuid as uuidlib
from array import array
from dataclasses import dataclass

SECTOR = 512
BLOCK_SIZE = 2 << 20
MAX_VHD_SIZE = 2040 << 30  # xapi's limit (VDI_TOO_LARGE beyond)
MAX_BAT_ENTRIES = 1 << 21  # 4 TiB of 2 MiB blocks: far above MAX_VHD_SIZE's need
# a BAT from this many entries is worth parsing off the reactor (~0.25 µs an entry: 4 ms here, 0.3 s at 1M)
THREAD_BAT_ENTRIES = 1 << 14
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
DYNAMIC, DIFFERENCING, FIXED = 3, 4, 2
UNUSED = 0xFFFFFFFF
_VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
assert FOOTER.size == 512 and HEADER.size == 1024


class FormatError(ValueError):
    """The body is not an acceptable stream of its format (HTTP 400 / the task's failure)."""


@dataclass(frozen=True, slots=True)
class Op:
    """Write *data* at *offset*; ``data is None``: make *length* bytes there read as zeros."""

    offset: int
    length: int
    data: bytes | memoryview | None


def checksum(struct_bytes: bytes | bytearray, field_at: int) -> int:
    """The VHD checksum: the ones' complement of the byte sum, the checksum field counted as zero."""
    total = sum(struct_bytes) - sum(struct_bytes[field_at:field_at + 4])
    return (~total) & 0xFFFFFFFF


def geometry(size: int) -> tuple[int, int, int]:
    """The CHS geometry (cylinders, heads, sectors per track) of the VHD specification for *size* bytes."""
    sectors = min(size // SECTOR, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def make_footer(size: int, timestamp: float, unique_id: bytes, disk_type: int = DYNAMIC) -> bytes:
    """A 512-byte VHD footer for a disk of *size* bytes (creator ``tap``, XenServer's, so readers
    such as qemu take the size from the footer, not the geometry)."""
    cyl, heads, spt = geometry(size)
    data_offset = SECTOR if disk_type != FIXED else 0xFFFFFFFFFFFFFFFF
    stamp = max(0, int(timestamp) - _VHD_EPOCH) & 0xFFFFFFFF
    fields = [FOOTER_COOKIE, 2, 0x00010000, data_offset, stamp, b"tap\0", 0x00010003, b"Lnux", size, size,
              cyl, heads, spt, disk_type, 0, unique_id, 0, bytes(427)]
    raw = FOOTER.pack(*fields)
    fields[14] = checksum(raw, 64)
    return FOOTER.pack(*fields)


def make_header(table_offset: int, entries: int, block_size: int = BLOCK_SIZE) -> bytes:
    """A 1024-byte dynamic disk header (no parent)."""
    fields = [HEADER_COOKIE, 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000, entries, block_size, 0, bytes(16), 0, 0,
              bytes(512), bytes(192), bytes(256)]
    raw = HEADER.pack(*fields)
    fields[6] = checksum(raw, 36)
    return HEADER.pack(*fields)


def _round_sector(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR * SECTOR


class VhdLayout:
    """A dynamic VHD of virtual *size* bytes holding the blocks *blocks* (sorted, distinct)."""

    def __init__(self, size: int, blocks: list[int], *, timestamp: float, unique_id: bytes | None = None,
                 block_size: int = BLOCK_SIZE) -> None:
        if size > MAX_VHD_SIZE:
            raise FormatError(f"a VHD holds at most {MAX_VHD_SIZE} bytes, not {size}")
        self.size = size
        self.block_size = block_size
        self.entries = (size + block_size - 1) // block_size
        if any(b < 0 or b >= self.entries for b in blocks[:1] + blocks[-1:]):
            raise ValueError("block index outside the disk")
        self.blocks = blocks
        self.unique_id = unique_id or uuidlib.uuid4().bytes
        self.timestamp = timestamp
        self.bitmap_bytes = _round_sector(block_size // SECTOR // 8)
        self.table_offset = 3 * SECTOR
        self.bat_bytes = _round_sector(self.entries * 4)
        self.data_start = self.table_offset + self.bat_bytes
        self.stride = self.bitmap_bytes + block_size
        self.length = self.data_start + len(blocks) * self.stride + SECTOR

    def head(self) -> bytes:
        """The footer copy, the dynamic header and the BAT (everything before the first block)."""
        bat = array("I", [UNUSED]) * self.entries
        sector = self.data_start // SECTOR
        step = self.stride // SECTOR
        for n, index in enumerate(self.blocks):
            bat[index] = sector + n * step
        if sys.byteorder == "little":
            bat.byteswap()
        table = bat.tobytes().ljust(self.bat_bytes, b"\xff")
        footer = make_footer(self.size, self.timestamp, self.unique_id)
        return footer + make_header(self.table_offset, self.entries, self.block_size) + table

    def bitmap(self) -> bytes:
        """A block's sector bitmap: every sector present."""
        used = self.block_size // SECTOR // 8
        return b"\xff" * used + bytes(self.bitmap_bytes - used)

    def tail(self) -> bytes:
        return make_footer(self.size, self.timestamp, self.unique_id)


# ------------------------------------------------------------------------------------------ import


class _Parser:
    """Shared bounds of the push parsers: the disk's *limit* (its virtual size)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.limit:
            raise FormatError(f"data at bytes {offset}-{offset + length} is beyond the disk's virtual size "
                              f"({self.limit} bytes)")


class RawParser(_Parser):
    """A raw disk image from byte 0: each piece is written where it falls."""

    def feed(self, data: bytes) -> list[Op]:
        if not data:
            return []
        self._check_range(self.received, len(data))
        op = Op(self.received, len(data), data)
        self.received += len(data)
        return [op]

    def finish(self) -> list[Op]:
        return []


class ChunkedParser(_Parser):
    """XenServer's chunked protocol: frames {u64 LE offset, u32 LE length, data}, ended by a zero header."""

    _HEAD = struct.Struct("<QI")
    MAX_FRAME = 1 << 30

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._buf = bytearray()
        self._left = 0  # data bytes of the current frame still to come
        self._at = 0  # where they go
        self._ended = False

    @property
    def ended(self) -> bool:
        """The end marker (an all-zero header) arrived."""
        return self._ended

    def feed(self, data: bytes) -> list[Op]:
        self.received += len(data)
        ops: list[Op] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._ended:
                raise FormatError("data after the chunked stream's end marker")
            if self._left:
                take = min(self._left, len(view) - pos)
                ops.append(Op(self._at, take, bytes(view[pos:pos + take])))
                self._at += take
                self._left -= take
                pos += take
                continue
            need = 12 - len(self._buf)
            self._buf += view[pos:pos + need]
            pos += min(need, len(view) - pos)
            if len(self._buf) < 12:
                break
            offset, length = self._HEAD.unpack(self._buf)
            self._buf.clear()
            if offset == 0 and length == 0:
                self._ended = True
                continue
            if length > self.MAX_FRAME:
                raise FormatError(f"a chunk of {length} bytes (at most {self.MAX_FRAME})")
            self._check_range(offset, length)
            self._at, self._left = offset, length
        return ops

    def finish(self) -> list[Op]:
        if not self._ended:
            raise FormatError("the chunked stream ended without its end marker (truncated)")
        return []


class VhdParser(_Parser):
    """A dynamic (or differencing) VHD stream, read forward once."""

    def __init__(self, limit: int, body_length: int | None = None) -> None:
        super().__init__(limit)
        self.body_length = body_length
        self._buf = bytearray()
        self._want = SECTOR  # bytes the current structure needs
        self._state = "footer"
        self._skip = 0  # bytes to discard before the current structure
        self.disk_type = 0
        self.size = 0
        self.block_size = 0
        self._entries = 0
        self._table_offset = 0
        # the allocated blocks, increasing by place in the stream: sector << 32 | block index, one
        # 8-byte item each (up to MAX_BAT_ENTRIES: 16 MiB, where tuples would take ~220 MB)
        self._plan = array("Q")
        self._next = 0
        self._bitmap_bytes = 0
        self._runs: list[tuple[int, int, bool]] = []  # the current block's (start, end, present) runs
        self._run_at = 0  # the run holding the next data byte: blocks arrive in order, so runs are walked once
        self._block_pos = 0  # bytes of the current block's data already seen
        self._block_index = 0
        self._tail = bytearray()  # the last bytes seen after the blocks (the footer)
        self._leading = b""  # the footer copy the stream began with
        self._after_blocks = bytearray()  # the first bytes after the blocks (up to a footer's worth)

    # -- structures ---------------------------------------------------------------------------

    def _footer(self, raw: bytes) -> None:
        (cookie, _features, _version, data_offset, _ts, _app, _cver, _os, _orig, current, _c, _h, _s, disk_type,
         check, _uid, _saved, _res) = FOOTER.unpack(raw)
        if cookie != FOOTER_COOKIE:
            raise FormatError("not a VHD: the footer cookie is not 'conectix'")
        if check != checksum(raw, 64):
            raise FormatError(f"bad VHD footer checksum ({check:#x}, computed {checksum(raw, 64):#x})")
        if disk_type == FIXED:
            raise FormatError("a fixed VHD is a raw image followed by a footer: import it with format=raw")
        if disk_type not in (DYNAMIC, DIFFERENCING):
            raise FormatError(f"unknown VHD disk type {disk_type}")
        if current > MAX_VHD_SIZE:
            raise FormatError(f"VHD virtual size {current} is beyond the VHD limit ({MAX_VHD_SIZE})")
        if current > self.limit:
            raise FormatError(f"VHD virtual size {current} exceeds the VDI's virtual_size ({self.limit})")
        self._leading = bytes(raw[:SECTOR])
        if data_offset < SECTOR or data_offset > 1 << 40 or data_offset % SECTOR:
            raise FormatError(f"VHD header offset {data_offset} is not after the footer copy")
        self.disk_type, self.size = disk_type, current
        self._go("header", data_offset - SECTOR, 1024)

    def _header(self, raw: bytes, at: int) -> None:
        (cookie, _data, table_offset, version, entries, block_size, check, *_rest) = HEADER.unpack(raw)
        if cookie != HEADER_COOKIE:
            raise FormatError("bad VHD dynamic header: the cookie is not 'cxsparse'")
        if check != checksum(raw, 36):
            raise FormatError(f"bad VHD dynamic header checksum ({check:#x}, computed {checksum(raw, 36):#x})")
        if version != 0x00010000:
            raise FormatError(f"unknown VHD header version {version:#x}")
        if block_size < 4096 or block_size > 64 << 20 or block_size & (block_size - 1):
            raise FormatError(f"VHD block size {block_size} is not a power of two between 4 KiB and 64 MiB")
        needed = (self.size + block_size - 1) // block_size
        if entries < needed or entries > MAX_BAT_ENTRIES:
            raise FormatError(f"VHD BAT of {entries} entries for {needed} blocks (at most {MAX_BAT_ENTRIES})")
        end = at + 1024
        if table_offset < end or table_offset % SECTOR or table_offset > 1 << 40:
            raise FormatError(f"VHD BAT offset {table_offset} is not after the header (streams are read forward)")
        self.block_size, self._entries = block_size, entries
        self._bitmap_bytes = _round_sector(block_size // SECTOR // 8)
        self._table_offset = table_offset
        self._go("bat", table_offset - end, _round_sector(entries * 4))

    def _bat(self, raw: bytes) -> None:
        bat = array("I")
        bat.frombytes(bytes(raw[: self._entries * 4]))
        if sys.byteorder == "little":
            bat.byteswap()
        needed = (self.size + self.block_size - 1) // self.block_size
        stride = self._bitmap_bytes + self.block_size
        first = self._table_offset + len(raw)
        plan = array("Q")
        ordered = True
        last = -1
        for index, sector in enumerate(bat):
            if sector == UNUSED:
                continue
            if index >= needed:
                raise FormatError(f"VHD BAT entry {index} is beyond the disk's {needed} blocks")
            plan.append(sector << 32 | index)
            if sector <= last:
                ordered = False
            last = sector
        del bat
        if not ordered:
            plan = array("Q", sorted(plan))
        previous_end = first
        for key in plan:
            offset, index = (key >> 32) * SECTOR, key & 0xFFFFFFFF
            if offset < previous_end:
                raise FormatError(f"VHD BAT entry {index} points at byte {offset}, inside the metadata or "
                                  "another block")
            previous_end = offset + stride
        if self.body_length is not None and previous_end + SECTOR > self.body_length:
            raise FormatError(f"VHD BAT points at byte {previous_end}, beyond the {self.body_length}-byte body")
        self._plan = plan
        self._next = 0
        self._after_structure(first)

    def _after_structure(self, at: int) -> None:
        """Move to the next block's bitmap (or to the trailer)."""
        if self._next < len(self._plan):
            key = self._plan[self._next]
            offset, index = (key >> 32) * SECTOR, key & 0xFFFFFFFF
            self._block_index = index
            self._go("bitmap", offset - at, self._bitmap_bytes)
        else:
            self._state, self._skip, self._want = "trailer", 0, 0

    def _bitmap(self, raw: bytes) -> None:
        sectors = self.block_size // SECTOR
        bits = int.from_bytes(raw[: sectors // 8], "big")
        full = (1 << sectors) - 1
        runs: list[tuple[int, int, bool]] = []
        if bits == full:
            runs.append((0, self.block_size, True))
        elif bits == 0:
            runs.append((0, self.block_size, False))
        else:
            bitstring = format(bits, f"0{sectors}b")  # linear in the bitmap
            start = 0
            for n in range(1, sectors + 1):
                if n == sectors or bitstring[n] != bitstring[start]:
                    runs.append((start * SECTOR, n * SECTOR, bitstring[start] == "1"))
                    start = n
        self._runs = runs
        self._run_at = 0
        self._block_pos = 0
        self._state, self._skip, self._want = "data", 0, 0

    def _go(self, state: str, skip: int, want: int) -> None:
        if skip < 0:
            raise FormatError("VHD structures overlap")
        self._state, self._skip, self._want = state, skip, want

    # -- feeding ------------------------------------------------------------------------------

    def costly(self, size: int) -> bool:
        """Whether feeding *size* more bytes may parse a BAT of :data:`THREAD_BAT_ENTRIES` entries
        or more (so the caller feeds it in a thread): the piece completes such a BAT, or arrives
        before the header is known and is large enough to hold a header and such a BAT."""
        if self._state in ("footer", "header"):
            return size >= 2 * SECTOR + THREAD_BAT_ENTRIES * 4
        return (self._state == "bat" and self._entries >= THREAD_BAT_ENTRIES
                and self._skip + self._want - len(self._buf) <= size)

    def feed(self, data: bytes) -> list[Op]:
        """The writes that *data* (the next bytes of the body) calls for; FormatError if it is not acceptable."""
        ops: list[Op] = []
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        pos = 0
        n = len(view)
        while pos < n:
            at = self.received + pos  # stream offset of view[pos]
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            if self._state == "data":
                take = min(self.block_size - self._block_pos, n - pos)
                self._data(view[pos:pos + take], ops)
                pos += take
                if self._block_pos == self.block_size:
                    self._next += 1
                    self._after_structure(self.received + pos)
                continue
            if self._state == "trailer":
                if len(self._after_blocks) < SECTOR:
                    self._after_blocks += view[pos:pos + SECTOR - len(self._after_blocks)]
                self._tail += view[pos:]
                if len(self._tail) > SECTOR:
                    del self._tail[: len(self._tail) - SECTOR]
                pos = n
                continue
            take = min(self._want - len(self._buf), n - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if len(self._buf) < self._want:
                continue
            raw = bytes(self._buf)
            self._buf.clear()
            start = at + take - len(raw)
            if self._state == "footer":
                self._footer(raw)
            elif self._state == "header":
                self._header(raw, start)
            elif self._state == "bat":
                self._bat(raw)
            elif self._state == "bitmap":
                self._bitmap(raw)
        self.received += n
        return ops

    def _data(self, piece: memoryview, ops: list[Op]) -> None:
        """The writes of *piece*, the block's next bytes: only the runs it overlaps are visited
        (resuming at :attr:`_run_at`), so a block costs its runs plus its pieces, whatever the
        bitmap and however small the pieces."""
        base = self._block_index * self.block_size
        lo, hi = self._block_pos, self._block_pos + len(piece)
        runs = self._runs
        i = self._run_at
        while i < len(runs) and runs[i][0] < hi:
            start, end, present = runs[i]
            a, b = max(start, lo), min(end, hi)
            disk_a, disk_b = base + a, min(base + b, self.size)
            if disk_a < disk_b:
                if present:
                    ops.append(Op(disk_a, disk_b - disk_a, piece[a - lo:a - lo + disk_b - disk_a]))
                elif self.disk_type == DYNAMIC:
                    ops.append(Op(disk_a, disk_b - disk_a, None))
            if end > hi:
                break  # the run goes on in the next piece
            i += 1
        self._run_at = i
        self._block_pos = hi

    @property
    def ended(self) -> bool:
        """Every block arrived and the footer right after them repeats the stream's leading copy:
        the VHD is whole, whatever the body announced (a client sending a stream of unknown length
        announces more, as Xen Orchestra does, and may wait for the reply before closing)."""
        return (self._state == "trailer" and len(self._after_blocks) >= SECTOR
                and bytes(self._after_blocks[:SECTOR]) == self._leading)

    def finish(self) -> list[Op]:
        if self._state != "trailer":
            raise FormatError(f"the VHD stream is truncated (it ended while reading its {self._state})")
        if self.ended:
            return []
        if len(self._tail) < SECTOR or bytes(self._tail[:8]) != FOOTER_COOKIE:
            raise FormatError("the VHD stream does not end with its footer (truncated)")
        return []
