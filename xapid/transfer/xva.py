"""The XVA format as xapi writes and reads it: a tar whose first entry is ``ova.xml`` (the
rpclib XML-RPC value ``{version, objects}``, export_vsn 2), then each disk as 1 MiB chunks
``Ref:<n>/%08d``, each followed by its checksum entry (``.xxhash``: XXH64 as 16 upper-case hex
digits, written here; ``.checksum``: SHA-1 hex, read too).  All-zero chunks are left out
except a disk's first and last; an importer places a chunk at the previous chunk's end plus
(index gap - 1) x the first chunk's length, so a 0-byte keep-alive chunk shifts nothing.
The whole tar may be wrapped in zstd or gzip (detected on import by magic).

Everything here is synchronous; the export side reads disks and the import side reads a
blocking byte source, so both run in the thread pool (see :mod:`xapid.transfer.xva_routes`).
Every bound is explicit: ``ova.xml`` at most :data:`MAX_OVA_XML` bytes, a chunk at most
:data:`MAX_CHUNK`, checksum entries at most 128 bytes; names are matched exactly (no path is
ever made from one); costs are linear in the stream's (decompressed) bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Protocol

import xxhash
import zstandard
from lxml import etree

from xapid.transfer.sparse import allocated_blocks, is_zero, read_block, write_sparse
from xapid.wire.values import WireError
from xapid.wire.xmlrpc import decode_value, encode_value

CHUNK = 1 << 20  # xapi's chunk size
MAX_CHUNK = 4 << 20  # the largest chunk an import accepts (xapi writes 1 MiB)
MAX_OVA_XML = 16 << 20
MAX_CHECKSUM = 128
MAX_PAX = 64 << 10
MAX_DEPTH = 64
EXPORT_VSN = 2
KEEPALIVE = 5.0  # seconds of silence while skipping zero chunks before a 0-byte chunk
BLOCK = 512
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_NAME = re.compile(r"(Ref:[0-9]{1,9})/([0-9]{8,10})")
_REF_ID = re.compile(r"Ref:[0-9]{1,9}")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                          remove_comments=True, remove_pis=True)


class XvaError(Exception):
    """The stream is not an XVA this importer accepts; *code* is the Xen-API error to report."""

    def __init__(self, message: str, code: str = "IMPORT_ERROR") -> None:
        super().__init__(message)
        self.code = code


class PrematureEnd(XvaError):
    def __init__(self, message: str = "the XVA stream ended early") -> None:
        super().__init__(message, "IMPORT_ERROR_PREMATURE_EOF")


class ChecksumError(XvaError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "IMPORT_ERROR_SOME_CHECKSUMS_FAILED")


# ------------------------------------------------------------------------------- tar writing


def tar_header(name: str, size: int, mtime: float = 0) -> bytes:
    """A ustar header for a regular file *name* of *size* bytes (mode 0644, owner root)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    info.uname = info.gname = "root"
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


TAR_END = bytes(2 * BLOCK)


def xxh64_hex(data: bytes | memoryview) -> str:
    """XXH64 (seed 0) as xapi prints it: 16 upper-case hex digits."""
    return "%016X" % xxhash.xxh64_intdigest(data)


def tar_file(name: str, data: bytes, mtime: float = 0) -> bytes:
    """One whole tar entry (header, data, padding)."""
    return tar_header(name, len(data), mtime) + data + padding(len(data))


def chunk_entries(prefix: str, index: int, data: bytes, mtime: float = 0) -> bytes:
    """Chunk *index* of disk *prefix* and its ``.xxhash`` entry, as tar bytes."""
    name = "%s/%08d" % (prefix, index)
    return tar_file(name, data, mtime) + tar_file(name + ".xxhash", xxh64_hex(data).encode(), mtime)


# ------------------------------------------------------------------------------- ova.xml


def encode_ova(version: dict[str, Any], objects: list[dict[str, Any]]) -> bytes:
    """``ova.xml``: the bare rpclib value ``{version, objects}`` (no XML declaration)."""
    return encode_value({"version": version, "objects": objects})


def decode_ova(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(version, objects) of an ``ova.xml``; XvaError when it is not one."""
    if len(data) > MAX_OVA_XML:
        raise XvaError(f"ova.xml is larger than {MAX_OVA_XML} bytes")
    try:
        root = etree.fromstring(data, _PARSER)
        value = decode_value(root, MAX_DEPTH)
    except (etree.XMLSyntaxError, WireError, ValueError, TypeError) as exc:
        raise XvaError(f"ova.xml is not an XML-RPC value: {str(exc)[:200]}") from None
    if not isinstance(value, dict) or not isinstance(value.get("objects"), list):
        raise XvaError("ova.xml has no objects list")
    version = value.get("version")
    if not isinstance(version, dict):
        raise XvaError("ova.xml has no version struct")
    try:
        vsn = export_vsn(version)
    except ValueError:
        raise XvaError("ova.xml export_vsn is not a number", "IMPORT_INCOMPATIBLE_VERSION") from None
    if vsn < 0 or vsn > EXPORT_VSN:
        raise XvaError(f"export_vsn {vsn} is not readable (0 to {EXPORT_VSN})", "IMPORT_INCOMPATIBLE_VERSION")
    objects = []
    for obj in value["objects"]:
        if (not isinstance(obj, dict) or not isinstance(obj.get("class"), str) or not isinstance(obj.get("id"), str)
                or not isinstance(obj.get("snapshot"), dict)):
            raise XvaError("an ova.xml object lacks class, id or snapshot")
        objects.append(obj)
    return version, objects


def export_vsn(version: dict[str, Any]) -> int:
    return int(str(version.get("export_vsn", "0")).strip() or "0")


# ------------------------------------------------------------------------------- export side


@dataclass(frozen=True)
class DiskSource:
    """A disk to export: its ``Ref:<n>`` prefix, its file, its virtual size."""

    prefix: str
    path: str
    size: int


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Plain:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self) -> None:
        self._obj = zstandard.ZstdCompressor(level=3).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


def compressor(kind: str) -> Compressor:
    """``""`` (none), ``gzip`` or ``zstd``."""
    if kind == "zstd":
        return _Zstd()
    if kind == "gzip":
        return zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return _Plain()


class XvaWriter:
    """Produces an XVA stream piece by piece: :meth:`next_piece` (blocking: run it in the pool)
    returns up to about *piece* bytes of (compressed) tar, b"" at the end.

    Disks are read block by block; only allocated blocks are read (the rest are holes), and
    all-zero blocks are left out except each disk's first and last.  After *keepalive* seconds
    without a chunk while skipping, a 0-byte chunk is written (xapi's keep-alive)."""

    def __init__(self, ova_xml: bytes, disks: list[DiskSource], compression: str = "", piece: int = 4 << 20,
                 mtime: float = 0, clock: Callable[[], float] = time.monotonic, keepalive: float = KEEPALIVE):
        self._compress = compressor(compression)
        self._piece = piece
        self._mtime = mtime
        self._clock = clock
        self._keepalive = keepalive
        self._parts = self._generate(ova_xml, sorted(disks, key=lambda d: d.prefix))
        self._done = False
        self.total = sum(d.size for d in disks)
        self.progressed = 0  # virtual bytes of disk covered so far

    def _generate(self, ova_xml: bytes, disks: list[DiskSource]) -> Generator[bytes, None, None]:
        yield tar_file("ova.xml", ova_xml, self._mtime)
        # importers measure every gap in units of the stream's first chunk: when that one is
        # short (a first disk under 1 MiB), no chunk is left out, so no gap is ever measured
        sized = [d for d in disks if d.size > 0]
        dense = bool(sized) and sized[0].size < CHUNK
        for disk in disks:
            yield from self._disk(disk, dense)
        yield TAR_END

    def _disk(self, disk: DiskSource, dense: bool) -> Generator[bytes, None, None]:
        if disk.size <= 0:
            return
        last = (disk.size - 1) // CHUNK
        fd = os.open(disk.path, os.O_RDONLY)
        try:
            wanted = set(range(last + 1)) if dense else set(allocated_blocks(fd, disk.size, CHUNK))
            wanted.update((0, last))
            index = 0  # the chunk number written next (it runs ahead of the block after a keep-alive)
            quiet_since = self._clock()
            for block in range(last + 1):
                self.progressed = min(disk.size, (block + 1) * CHUNK)
                if block not in wanted:
                    data = b""
                else:
                    data = read_block(fd, block, CHUNK, disk.size)
                    if block == last:
                        data = data[: disk.size - block * CHUNK]
                if block in (0, last) or dense or (data and not is_zero(data)):
                    yield chunk_entries(disk.prefix, index, data, self._mtime)
                    quiet_since = self._clock()
                elif self._clock() - quiet_since > self._keepalive:
                    yield chunk_entries(disk.prefix, index, b"", self._mtime)
                    index += 1
                    quiet_since = self._clock()
                index += 1
        finally:
            os.close(fd)

    def next_piece(self) -> bytes:
        """The next bytes of the stream (b"" once it is complete)."""
        if self._done:
            return b""
        out: list[bytes] = []
        size = 0
        for part in self._parts:
            data = self._compress.compress(part)
            if data:
                out.append(data)
                size += len(data)
            if size >= self._piece:
                return b"".join(out)
        self._done = True
        out.append(self._compress.flush())
        return b"".join(out)

    def close(self) -> None:
        self._parts.close()


# ------------------------------------------------------------------------------- import side


class Decompressor:
    """Push decompression of the whole stream, its wrapping found by magic (zstd, gzip, none).

    :meth:`push` yields the decompressed bytes of one input piece in bounded pieces (zstd is fed
    256 bytes at a time, gzip asks for at most 1 MiB per call), so a decompression bomb costs
    time linear in its output, never memory."""

    ZSTD_STEP = 256

    def __init__(self) -> None:
        self.kind: str | None = None  # decided once 4 bytes arrived
        self._head = b""
        self._zstd: Any = None
        self._gzip: Any = None

    def push(self, data: bytes) -> Iterator[bytes]:
        if self.kind is None:
            self._head += data
            if len(self._head) < 4:
                return
            data, self._head = self._head, b""
            self.kind = ("zstd" if data.startswith(ZSTD_MAGIC) else "gzip" if data.startswith(GZIP_MAGIC)
                         else "")
            if self.kind == "zstd":
                self._zstd = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
            elif self.kind == "gzip":
                self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if not data:
            return
        if self.kind == "zstd":
            view = memoryview(data)
            for i in range(0, len(view), self.ZSTD_STEP):
                try:
                    out = self._zstd.decompress(view[i:i + self.ZSTD_STEP])
                except zstandard.ZstdError as exc:
                    raise XvaError(f"bad zstd data: {exc}") from None
                if out:
                    yield out
        elif self.kind == "gzip":
            tail = data
            while tail:
                if self._gzip.eof:
                    return  # after the gzip stream: ignored, like the tar's own tail
                try:
                    out = self._gzip.decompress(tail, 1 << 20)
                except zlib.error as exc:
                    raise XvaError(f"bad gzip data: {exc}") from None
                tail = self._gzip.unconsumed_tail
                if out:
                    yield out
        else:
            yield data

    def end(self) -> Iterator[bytes]:
        """What is left once the input ended (a stream under 4 bytes)."""
        if self.kind is None and self._head:
            self.kind = ""
            data, self._head = self._head, b""
            yield data


@dataclass
class DiskTarget:
    """A disk being imported: its prefix, an open file descriptor, its virtual size."""

    prefix: str
    fd: int
    size: int
    offset: int = 0  # position after the last chunk
    last: int = -1  # index of the last chunk


OVA, NEED_DISKS, DISKS, DONE = "ova", "need-disks", "disks", "done"


class XvaParser:
    """Reads an XVA stream pushed piece by piece (:meth:`feed`; blocking disk writes: run it in
    the pool, one call at a time).  ``feed`` returns :data:`NEED_DISKS` once ``ova.xml`` is read
    (:attr:`ova`): the caller creates the disks and calls :meth:`set_disks`, then ``feed(b"")``
    continues with what was already received.  Chunks are written where xapi's importer puts
    them (holes stay holes), each checked against its checksum entry unless *force*.  Once every
    disk is full the rest of the stream is ignored (:data:`DONE`).  XvaError on any deviation."""

    def __init__(self, force: bool = False) -> None:
        self.force = force
        self.phase = OVA
        self.ova: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
        self.checksums = True
        self.received = 0  # disk bytes placed (data and skipped zeros)
        self._decomp = Decompressor()
        self._queue: list[Iterator[bytes]] = []
        self._cur: memoryview = memoryview(b"")
        # tar state
        self._hbuf = bytearray()
        self._ebuf = bytearray()
        self._name = ""
        self._want = 0  # bytes of the current entry still to come
        self._skip = 0  # padding or ignored entry bytes still to skip
        self._in_entry = False
        self._tar_ended = False
        # disk state
        self._disks: list[DiskTarget] = []
        self._disk = 0
        self._first = -1
        self._pending: tuple[str, bytes] | None = None  # a chunk awaiting its checksum entry
        self._limit: Callable[[str], int | None] = ova_limit

    def set_disks(self, disks: list[DiskTarget]) -> None:
        self._disks = sorted((d for d in disks if d.size > 0), key=lambda d: d.prefix)
        self._limit = chunk_limit({d.prefix for d in self._disks})
        self.phase = DISKS
        self._advance()

    def feed(self, data: bytes) -> str:
        if self.phase == DONE:
            return DONE
        if data:
            self._queue.append(self._decomp.push(data))
        return self._run()

    def finish(self) -> None:
        """The stream ended: XvaError unless every disk was received."""
        if self.phase != DONE:
            self._queue.append(self._decomp.end())
            self._run()
        if self.phase != DONE:
            raise PrematureEnd("the XVA stream ended before all of its disks' data" if self.phase == DISKS
                               else "the XVA stream ended before its ova.xml")

    def _run(self) -> str:
        while self.phase in (OVA, DISKS):
            if not self._cur:
                piece = self._next_piece()
                if piece is None:
                    return self.phase
                self._cur = memoryview(piece)
            used = self._consume(self._cur)
            self._cur = self._cur[used:]
        return self.phase

    def _next_piece(self) -> bytes | None:
        while self._queue:
            piece = next(self._queue[0], None)
            if piece is None:
                self._queue.pop(0)
            elif piece:
                return piece
        return None

    def _consume(self, view: memoryview) -> int:
        """Advance the tar machine over *view*; returns the bytes used (it stops after an entry
        that changes the phase)."""
        if self._tar_ended:
            if self.phase == DISKS:
                raise PrematureEnd("the tar ended before all of the disks' data")
            raise PrematureEnd("the tar ended before its ova.xml")
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            return n
        if self._in_entry:
            n = min(self._want, len(view))
            self._ebuf += view[:n]
            self._want -= n
            if self._want == 0:
                self._in_entry = False
                self._skip = -len(self._ebuf) % BLOCK
                data, self._ebuf = bytes(self._ebuf), bytearray()
                self._entry(self._name, data)
            return n
        n = min(BLOCK - len(self._hbuf), len(view))
        self._hbuf += view[:n]
        if len(self._hbuf) < BLOCK:
            return n
        head, self._hbuf = bytes(self._hbuf), bytearray()
        if head == bytes(BLOCK):
            self._tar_ended = True
            return n
        name, size, kind = _parse_header(head)
        if kind in ("x", "g", "5"):  # pax headers and directories: skipped
            if size > MAX_PAX:
                raise XvaError("a pax header or directory entry is too large")
            self._skip = size + (-size % BLOCK)
            return n
        if kind not in ("0", "\0", "7"):
            raise XvaError(f"unexpected tar entry type {kind!r} for {name[:100]!r}")
        bound = self._limit(name)
        if bound is None:
            raise XvaError(f"unexpected file in the XVA: {name[:100]!r}")
        if size > bound:
            raise XvaError(f"{name[:100]} has {size} bytes (at most {bound})")
        self._name, self._want = name, size
        if size == 0:
            self._entry(name, b"")
        else:
            self._in_entry = True
        return n

    def _entry(self, name: str, data: bytes) -> None:
        if self.phase == OVA:
            self.ova = decode_ova(data)
            self.checksums = export_vsn(self.ova[0]) > 0
            self.phase = NEED_DISKS
            return
        if self._pending is not None:
            self._check(self._pending, name, data)
            self._pending = None
            self._advance()
            return
        disk = self._disks[self._disk]
        match = _CHUNK_NAME.fullmatch(name)
        if match is None or match.group(1) != disk.prefix:
            raise XvaError(f"expected a chunk of {disk.prefix}, got {name[:100]!r}")
        index = int(match.group(2))
        if index <= disk.last:
            raise XvaError(f"chunk {name} is out of order (after index {disk.last})")
        if self._first < 0:
            if not data:
                raise XvaError("the first chunk is empty")
            self._first = len(data)
        gap = (index - disk.last - 1) * self._first
        offset = disk.offset + gap
        end = offset + len(data)
        if end > disk.size:
            raise XvaError(f"chunk {name} ends at byte {end}, beyond the disk's {disk.size}")
        if data and not is_zero(data):
            write_sparse(disk.fd, offset, data, fresh=True)
        disk.offset, disk.last = end, index
        self.received += gap + len(data)
        if self.checksums:
            self._pending = (name, data)
        else:
            self._advance()

    def _advance(self) -> None:
        """Move past full disks; DONE once all are."""
        while self._disk < len(self._disks) and self._disks[self._disk].offset >= self._disks[self._disk].size:
            self._disk += 1
        if self._disk >= len(self._disks) and self._pending is None:
            self.phase = DONE

    def _check(self, chunk: tuple[str, bytes], name: str, text: bytes) -> None:
        base, _, ext = name.rpartition(".")
        if base != chunk[0] or ext not in ("xxhash", "checksum"):
            raise XvaError(f"expected the checksum of {chunk[0]}, got {name[:100]!r}")
        if self.force:
            return
        expected = text.decode("ascii", "replace").strip()
        actual = xxh64_hex(chunk[1]) if ext == "xxhash" else hashlib.sha1(chunk[1]).hexdigest()
        if expected.lower() != actual.lower():
            raise ChecksumError(f"chunk {chunk[0]}: checksum {expected[:64]!r} differs from the data's {actual}")


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:
            raise XvaError(f"negative tar {what}")
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]{1,22}", text):
        raise XvaError(f"bad tar {what}")
    return int(text, 8)


def _parse_header(head: bytes) -> tuple[str, int, str]:
    stored = _octal(head[148:156], "checksum")
    computed = sum(head[:148]) + 8 * 32 + sum(head[156:])
    if stored != computed:
        raise XvaError("bad tar header checksum (not a tar, or a corrupt stream)")
    name = head[0:100].split(b"\0", 1)[0]
    if head[257:262] == b"ustar":
        prefix = head[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise XvaError("a tar entry name is not UTF-8") from None
    return text, _octal(head[124:136], "size"), chr(head[156])


def chunk_limit(prefixes: set[str]) -> Callable[[str], int | None]:
    """The entry bound of the disk part: chunks of known disks, and their checksums."""

    def limit(name: str) -> int | None:
        base, dot, ext = name.rpartition(".")
        if dot and ext in ("xxhash", "checksum"):
            match = _CHUNK_NAME.fullmatch(base)
            return MAX_CHECKSUM if match and match.group(1) in prefixes else None
        match = _CHUNK_NAME.fullmatch(name)
        return MAX_CHUNK if match and match.group(1) in prefixes else None

    return limit


def ova_limit(name: str) -> int | None:
    return MAX_OVA_XML if name == "ova.xml" else None


def is_ref_id(text: str) -> bool:
    return bool(_REF_ID.fullmatch(text))
