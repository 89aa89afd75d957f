"""Where a disk file holds data: allocated extents (``SEEK_DATA``/``SEEK_HOLE``), the blocks they
touch, the blocks that differ from a base disk, and writing that leaves holes where data is zero.

Everything here blocks (file I/O): callers run it in the thread pool.  Costs are linear in the
number of extents (the allocation map) or in the bytes actually compared or written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from collections.abc import Iterator

ZERO_GRAIN = 64 << 10  # zero detection granularity when writing imported data
_ZEROS = bytes(4 << 20)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FICLONE = 0x40049409


def is_zero(data: bytes | memoryview) -> bool:
    """Whether *data* (≤ 4 MiB) is all zero bytes (a memcmp, no copy)."""
    return len(data) <= len(_ZEROS) and _ZEROS.startswith(data)


def zeros(length: int) -> memoryview:
    """A read-only view of *length* (≤ 4 MiB) zero bytes, without allocating."""
    return memoryview(_ZEROS)[:length]


def extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (offset, length) data extents of the open file *fd* within its first *size* bytes, in order.

    Where the file system cannot tell (no ``SEEK_DATA``), the whole range is one extent."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size - offset
                return
            raise
        if start >= size:
            return
        try:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                end = size
            else:
                raise
        end = min(end, size)
        if end <= start:  # defensive: a file that changed under us
            end = min(size, start + 1)
        yield start, end - start
        offset = end


def blocks_of(spans: Iterator[tuple[int, int]], block_size: int) -> list[int]:
    """The sorted, distinct indices of the *block_size* blocks that the (offset, length) *spans* touch."""
    out: list[int] = []
    for offset, length in spans:
        if length <= 0:
            continue
        first, last = offset // block_size, (offset + length - 1) // block_size
        if out and out[-1] >= first:
            first = out[-1] + 1
        out.extend(range(first, last + 1))
    return out


def allocated_blocks(fd: int, size: int, block_size: int) -> list[int]:
    """The blocks of the disk *fd* (virtual *size*) that hold allocated data."""
    return blocks_of(extents(fd, size), block_size)


def read_exact(fd: int, offset: int, length: int) -> bytes:
    """*length* bytes at *offset*; past the end of the file they read as zeros."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(fd, length - got, offset + got)
            if not more:
                parts.append(bytes(length - got))
                break
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def read_block(fd: int, index: int, block_size: int, size: int) -> bytes:
    """Block *index* of the disk (zero-padded to *block_size* past the disk's end)."""
    offset = index * block_size
    length = max(0, min(block_size, size - offset))
    data = read_exact(fd, offset, length) if length else b""
    if length < block_size:
        data += bytes(block_size - length)
    return data


def changed_blocks(fd: int, size: int, base_fd: int, base_size: int, block_size: int) -> list[int]:
    """The blocks of disk *fd* whose content differs from the base disk *base_fd*.

    Only blocks allocated in either disk are compared (elsewhere both read as zeros); a block
    past the base's end differs if it holds anything other than zeros."""
    mine = extents(fd, size)
    theirs = extents(base_fd, min(base_size, size))
    candidates = sorted(set(blocks_of(mine, block_size)) | set(blocks_of(theirs, block_size)))
    changed = []
    for index in candidates:
        if read_block(fd, index, block_size, size) != read_block(base_fd, index, block_size, min(base_size, size)):
            changed.append(index)
    return changed


def is_hole(fd: int, offset: int, length: int) -> bool:
    """Whether *fd* holds no data in [offset, offset+length) (unknown: False)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        return exc.errno == errno.ENXIO


_libc: ctypes.CDLL | None = None
_punch_ok = True


def _fallocate() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        except (OSError, AttributeError):
            return None
    return _libc


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of *fd* read as zeros: nothing if already a hole, else punch a
    hole (or write zeros where the file system cannot)."""
    global _punch_ok
    if length <= 0 or is_hole(fd, offset, length):
        return
    if _punch_ok:
        libc = _fallocate()
        if libc is not None:
            rc = libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if rc == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        _punch_ok = False
    done = 0
    while done < length:
        step = min(len(_ZEROS), length - done)
        done += os.pwrite(fd, zeros(step), offset + done)


def write_sparse(fd: int, offset: int, data: bytes | memoryview, fresh: bool) -> int:
    """Write *data* at *offset*, leaving holes for its all-zero ``ZERO_GRAIN`` pieces (on a *fresh*
    file they are skipped; otherwise the range is zeroed as :func:`zero_range`).  Returns the
    number of bytes of data actually written."""
    view = memoryview(data)
    written = 0
    pos = 0
    total = len(view)
    while pos < total:
        # pieces aligned on the disk's ZERO_GRAIN boundaries
        step = min(total - pos, ZERO_GRAIN - (offset + pos) % ZERO_GRAIN)
        piece = view[pos:pos + step]
        if is_zero(piece):
            # coalesce the following zero pieces: one hole check (and punch) for the run
            end = pos + step
            while end < total:
                nstep = min(total - end, ZERO_GRAIN)
                if not is_zero(view[end:end + nstep]):
                    break
                end += nstep
            if not fresh:
                zero_range(fd, offset + pos, end - pos)
            step = end - pos
        else:
            # coalesce the following non-zero pieces into one write
            end = pos + step
            while end < total:
                nstep = min(total - end, ZERO_GRAIN)
                if is_zero(view[end:end + nstep]):
                    break
                end += nstep
            chunk = view[pos:end]
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], offset + pos + done)
            written += len(chunk)
            step = end - pos
        pos += step
    return written


def sparse_copy(src_fd: int, dst_fd: int, size: int) -> None:
    """Make *dst_fd* a copy of *src_fd* (*size* bytes): a reflink where the file system shares blocks,
    else the data extents only (holes stay holes)."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        os.ftruncate(dst_fd, size)
        return
    except OSError:
        pass
    os.ftruncate(dst_fd, size)
    for start, length in extents(src_fd, size):
        done = 0
        while done < length:
            step = min(4 << 20, length - done)
            data = os.pread(src_fd, step, start + done)
            if not data:
                break
            write_sparse(dst_fd, start + done, data, fresh=True)
            done += len(data)
