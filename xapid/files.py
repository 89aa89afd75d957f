"""Replacing a file atomically: the one writer every file the daemon rewrites goes through.

A reader sees the old file or the new one, never a part: the data goes to a temporary file in the
same directory (created with its final mode, so it is never readable more widely than the file it
replaces), is flushed and fsynced, renamed over the target with :func:`os.replace`, and the
directory is fsynced so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the entries of *directory* (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int | None = 0o600, *,
                  temp: str | os.PathLike[str] | None = None) -> Iterator[BinaryIO]:
    """A binary file whose content replaces *path* when the ``with`` block ends without an error.

    *mode*: the new file's permission bits, exactly (whatever the umask); ``None``: those of
    ``open(path, "w")`` (0666 less the umask).  *temp*: the temporary file's name (a stale one is
    removed first); by default a fresh hidden name next to *path*.  On an error the temporary
    file is removed and *path* is left as it was.  Raises :class:`OSError`.
    """
    path = Path(path)
    if temp is None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    else:
        tmp = Path(temp)
        tmp.unlink(missing_ok=True)
    fd = os.open(tmp, _FLAGS, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # the umask may have removed bits of a public file's mode
        with os.fdopen(fd, "wb") as out:
            fd = -1  # closed with out from here on
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomically(path: str | os.PathLike[str], data: bytes | str, mode: int | None = 0o600, *,
                     temp: str | os.PathLike[str] | None = None) -> None:
    """Replace *path* by *data* (``str``: UTF-8) through :func:`atomic_writer`."""
    with atomic_writer(path, mode, temp=temp) as out:
        out.write(data.encode("utf-8") if isinstance(data, str) else data)
