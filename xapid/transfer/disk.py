"""The disk side of a transfer: what an export reads (a plan of segments) and where an import
writes (a temporary file made the VDI's only when the whole body arrived).

Everything here blocks: the routes run it in the thread pool, one call per segment or batch.
"""

from __future__ import annotations

import os
import select
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xapid.transfer import sparse, vhd

READ_CHUNK = 1 << 20  # bytes read per thread-pool call on export
ZERO_CHUNK = 4 << 20  # bytes of a hole written per step on export (no disk read; the zero buffer's size)


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the export stream: *length* bytes of the disk at *offset* (``kind`` ``data``),
    zeros (``zero``), or literal bytes (``literal``: VHD metadata, in *literal*)."""

    kind: str
    offset: int = 0
    length: int = 0
    literal: bytes = b""


def open_disk(path: Path) -> int:
    """A read-only descriptor of a disk file; never follows a symlink."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def raw_plan(fd: int, size: int, base_fd: int | None = None, base_size: int = 0) -> list[Segment]:
    """The raw image of the disk: its data extents read, its holes sent as zeros.  With a base,
    the blocks equal to the base's are sent as zeros too (only changed blocks carry data)."""
    if base_fd is None:
        spans = list(sparse.extents(fd, size))
    else:
        block = vhd.BLOCK_SIZE
        spans = [(i * block, min(block, size - i * block))
                 for i in sparse.changed_blocks(fd, size, base_fd, base_size, block)]
    plan: list[Segment] = []
    at = 0
    for start, length in spans:
        if start > at:
            plan.append(Segment("zero", at, start - at))
        if plan and plan[-1].kind == "data" and plan[-1].offset + plan[-1].length == start:
            prev = plan.pop()
            plan.append(Segment("data", prev.offset, prev.length + length))
        else:
            plan.append(Segment("data", start, length))
        at = start + length
    if at < size:
        plan.append(Segment("zero", at, size - at))
    return plan


def vhd_plan(fd: int, size: int, timestamp: float, base_fd: int | None = None,
             base_size: int = 0) -> tuple[list[Segment], int]:
    """A dynamic VHD of the disk holding its allocated blocks (with a base: the blocks that
    differ from it), as segments, and the stream's length."""
    block = vhd.BLOCK_SIZE
    if base_fd is None:
        blocks = sparse.allocated_blocks(fd, size, block)
    else:
        blocks = sparse.changed_blocks(fd, size, base_fd, base_size, block)
    layout = vhd.VhdLayout(size, blocks, timestamp=timestamp)
    bitmap = layout.bitmap()
    plan = [Segment("literal", literal=layout.head())]
    for index in blocks:
        plan.append(Segment("literal", literal=bitmap))
        offset = index * block
        length = min(block, size - offset)
        plan.append(Segment("data", offset, length))
        if length < block:
            plan.append(Segment("zero", 0, block - length))
    plan.append(Segment("literal", literal=layout.tail()))
    return plan, layout.length


def plan_length(plan: Iterable[Segment]) -> int:
    return sum(len(s.literal) if s.kind == "literal" else s.length for s in plan)


def read_piece(fd: int, offset: int, length: int) -> bytes:
    """*length* bytes of the disk at *offset*; past the file's end (a disk that shrank) zeros."""
    return sparse.read_exact(fd, offset, length)


class ImportTarget:
    """A temporary file receiving an import: a fresh sparse file for a new disk, else a
    copy-on-write copy (reflink, or a sparse copy) of the VDI's file.  :meth:`commit` makes it
    the disk atomically (``rename``); :meth:`discard` removes it, leaving the disk as it was."""

    def __init__(self, partial: Path, size: int, source: Path | None = None) -> None:
        self.partial = partial
        self.size = size
        self.source = source
        self.fresh = source is None
        self.fd: int | None = None
        self.created = False  # the temporary file is ours (never remove one we did not make)
        self.written = 0

    def prepare(self) -> None:
        fd = os.open(self.partial, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.fd = fd
        self.created = True
        try:
            if self.source is not None:
                src = open_disk(self.source)
                try:
                    sparse.sparse_copy(src, fd, self.size)
                finally:
                    os.close(src)
            else:
                os.ftruncate(fd, self.size)
        except BaseException:
            self.discard()
            raise

    def apply(self, ops: list[vhd.Op]) -> int:
        """Carry out the write operations of a parser; the number of data bytes written."""
        fd = self.fd
        assert fd is not None
        written = 0
        for op in ops:
            if op.offset < 0 or op.offset + op.length > self.size:  # the parsers check; never trust twice
                raise ValueError(f"write at {op.offset}+{op.length} outside the {self.size}-byte disk")
            if op.data is None:
                if not self.fresh:
                    sparse.zero_range(fd, op.offset, op.length)
            else:
                written += sparse.write_sparse(fd, op.offset, op.data, self.fresh)
        self.written += written
        return written

    def commit(self, final: Path, publish: Any = None) -> None:
        """Make the written file the disk *final*: fsync, then an atomic rename (or *publish*(partial,
        final) for a new disk, which never replaces an existing file)."""
        fd = self.fd
        assert fd is not None
        os.fsync(fd)
        os.close(fd)
        self.fd = None
        if publish is not None:
            publish(self.partial, final)
        else:
            os.replace(self.partial, final)
        self.created = False
        try:
            dirfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError:
            pass

    def discard(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.created:
            self.created = False
            try:
                self.partial.unlink()
            except FileNotFoundError:
                pass


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


class Cursor:
    """Where a direct export (:func:`send_plan`) stands in its plan: segment *index*, byte *pos* in it."""

    __slots__ = ("index", "pos")

    def __init__(self) -> None:
        self.index = 0
        self.pos = 0


def _wait_writable(sock_fd: int, stop: Any, idle: float) -> None:
    """Block until *sock_fd* takes more (poll), checking *stop* every half second; ConnectionError
    when the peer is gone, the transfer was stopped, or it read nothing for *idle* seconds."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    waited = 0.0
    while True:
        if stop():
            raise ConnectionError("the transfer was stopped")
        events = poller.poll(500)
        if events:
            if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                raise ConnectionError("the client closed the connection")
            return
        waited += 0.5
        if waited >= idle:
            raise ConnectionError(f"the client read nothing for {idle:g} s")


def _send_view(sock_fd: int, view: memoryview, stop: Any, idle: float) -> None:
    done = 0
    while done < len(view):
        try:
            done += os.write(sock_fd, view[done:])
        except BlockingIOError:
            _wait_writable(sock_fd, stop, idle)


def _send_file(sock_fd: int, fd: int, offset: int, count: int, stop: Any, idle: float) -> None:
    """*count* bytes of *fd* at *offset* to the socket with ``sendfile`` (no copy through Python);
    past the file's end (a disk that shrank) zeros."""
    done = 0
    while done < count:
        try:
            n = os.sendfile(sock_fd, fd, offset + done, count - done)
        except BlockingIOError:
            _wait_writable(sock_fd, stop, idle)
            continue
        if n == 0:  # end of file: the rest reads as zeros
            rest = count - done
            while rest:
                step = min(rest, ZERO_CHUNK)
                _send_view(sock_fd, sparse.zeros(step), stop, idle)
                rest -= step
            return
        done += n


def send_plan(sock_fd: int, fd: int, plan: list[Segment], cursor: Cursor, budget: int, stop: Any,
              idle: float) -> int:
    """Send the export *plan* from *cursor* straight to the (non-blocking) socket *sock_fd*: data
    with ``sendfile``, holes from one preallocated zero buffer, literals as they are; at most about
    *budget* bytes per call (the caller checks cancels and reports progress between calls).  Returns
    the bytes sent; *cursor* moves on.  Blocks: runs in the thread pool, on a ``dup`` of the socket."""
    sent = 0
    while cursor.index < len(plan) and sent < budget:
        seg = plan[cursor.index]
        total = len(seg.literal) if seg.kind == "literal" else seg.length
        n = min(total - cursor.pos, max(budget - sent, 0) or total)
        if seg.kind == "data":
            _send_file(sock_fd, fd, seg.offset + cursor.pos, n, stop, idle)
        elif seg.kind == "zero":
            left = n
            while left:
                step = min(left, ZERO_CHUNK)
                _send_view(sock_fd, sparse.zeros(step), stop, idle)
                left -= step
        else:
            _send_view(sock_fd, memoryview(seg.literal)[cursor.pos:cursor.pos + n], stop, idle)
        sent += n
        cursor.pos += n
        if cursor.pos >= total:
            cursor.index, cursor.pos = cursor.index + 1, 0
    return sent


DIRECT_BUFFER = 4 << 20  # import: the reusable buffer a direct read fills before each write (sparse.ZERO_GRAIN multiple)


class SocketImport:
    """A raw import's body read straight from a ``dup`` of the client's (non-blocking) socket into
    two reusable buffers and written at its offsets with holes left for its all-zero grains
    (:func:`sparse.write_sparse`): no copy through the reactor, no allocation per piece.  While
    one buffer is written (by a writer thread of its own: a fresh file's first writes cost the
    file system more than the copy), the next is read.

    ``step(budget)`` blocks (the thread pool runs it, one call at a time): it reads and writes
    about *budget* bytes (less when the client pauses for half a second, so that its caller can
    check for a cancel) and returns how many it consumed, all of them written; *first* (bytes
    that arrived with the request head) is written first.  It stops after *count* bytes.
    ``ConnectionError`` when the client closed, went quiet for *idle* seconds, or *stop()*
    turned True; ``close()`` ends the writer thread (always call it)."""

    def __init__(self, sock_fd: int, first: bytes, count: int, target: ImportTarget, offset: int,
                 idle: float, stop: Any) -> None:
        self.sock_fd = sock_fd
        self.first = first[:count]
        self.left = count
        self.target = target
        self.offset = offset
        self.idle = idle
        self.stop = stop
        self._size = min(DIRECT_BUFFER, max(count, 1))
        self._bufs: list[bytearray] = []  # allocated by the first step (in the thread pool)
        self._turn = 0
        self._writer: ThreadPoolExecutor | None = None
        self._silent = 0.0  # seconds without input so far
        self._quiet = False  # the client paused: step returns early (its caller checks for a cancel)

    @property
    def done(self) -> bool:
        return self.left <= 0

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _readable(self) -> bool:
        """Wait up to half a second for input; False if none came (after *idle* seconds of
        silence in all: ConnectionError)."""
        if self.stop():
            raise ConnectionError("the transfer was stopped")
        poller = select.poll()
        poller.register(self.sock_fd, select.POLLIN)
        events = poller.poll(500)
        if events:
            if events[0][1] & select.POLLNVAL:
                raise ConnectionError("the connection was closed")
            self._silent = 0.0
            return True  # readable, or an error/hang-up that the read reports
        self._silent += 0.5
        if self._silent >= self.idle:
            raise ConnectionError(f"the client sent nothing for {self.idle:g} s")
        return False

    def _write(self, view: memoryview, offset: int) -> int:
        fd = self.target.fd
        assert fd is not None
        if offset < 0 or offset + len(view) > self.target.size:
            raise ValueError(f"write at {offset}+{len(view)} outside the {self.target.size}-byte disk")
        if sparse.is_zero(view):  # a whole buffer of zeros (most of a sparse disk): one memcmp
            if not self.target.fresh:
                sparse.zero_range(fd, offset, len(view))
            return 0
        return sparse.write_sparse(fd, offset, view, self.target.fresh)

    def _fill(self, view: memoryview, want: int) -> int:
        filled = 0
        while filled < want:
            if self.stop():
                raise ConnectionError("the transfer was stopped")
            try:
                n = os.readv(self.sock_fd, [view[filled:want]])
            except BlockingIOError:
                if not self._readable():
                    self._quiet = True
                    return filled
                continue
            except OSError as exc:
                raise ConnectionError(exc.strerror or str(exc)) from None
            if n == 0:
                raise ConnectionError("the client closed the connection before the end of the body")
            filled += n
        return filled

    def step(self, budget: int) -> int:
        consumed = 0
        if self.first:
            first, self.first = self.first, b""
            self.target.written += self._write(memoryview(first), self.offset)
            self.offset += len(first)
            self.left -= len(first)
            consumed += len(first)
        if self._writer is None:
            self._bufs = [bytearray(self._size), bytearray(self._size)]
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="xapid-import-write")
        pending: Future[int] | None = None
        try:
            self._quiet = False
            while self.left > 0 and consumed < budget and not self._quiet:
                view = memoryview(self._bufs[self._turn])
                filled = self._fill(view, min(len(view), self.left))
                if not filled:
                    continue
                self._turn ^= 1
                if pending is not None:
                    self.target.written += pending.result()
                pending = self._writer.submit(self._write, view[:filled], self.offset)
                self.offset += filled
                self.left -= filled
                consumed += filled
        finally:
            if pending is not None:
                self.target.written += pending.result()  # a write error is raised here
        return consumed
