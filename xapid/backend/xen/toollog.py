"""libxentoollog: the loggers handed to libxenctrl and libxenlight.

Without a logger libxenctrl prints its errors on stderr (and ``libxl_ctx_alloc`` crashes).
:class:`QuietLogger` is a stdio-stream logger writing to ``/dev/null``; :class:`FileLogger`
writes libxl's and libxc's diagnostics to a file (rotated by size), from which the driver
takes the error lines of a failed call into the Xen-API error it raises.
"""

from __future__ import annotations

import ctypes
import os
import threading

from xapid.backend.xen.libs import last_error, load, load_libc

XTL_INFO = 5
XTL_ERROR = 8
XTL_CRITICAL = 9
XTL_STDIOSTREAM_SHOW_PID = 0o1
XTL_STDIOSTREAM_SHOW_DATE = 0o2
XTL_STDIOSTREAM_HIDE_PROGRESS = 0o4
ERROR_LINES = 3  # error lines of a failed call put into the Xen-API error


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the prototypes of the libxentoollog functions used here on *lib*."""
    lib.xtl_createlogger_stdiostream.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
    lib.xtl_createlogger_stdiostream.restype = ctypes.c_void_p
    lib.xtl_logger_destroy.argtypes = [ctypes.c_void_p]
    lib.xtl_logger_destroy.restype = None
    return lib


class QuietLogger:
    """A ``xentoollog_logger *`` that discards every message; :meth:`close` is idempotent."""

    def __init__(self) -> None:
        self._lib = bind(load("xentoollog"))
        self._libc = load_libc()
        self._file = self._libc.fopen(b"/dev/null", b"w")
        if not self._file:
            raise last_error("fopen(/dev/null)")
        self.pointer: int | None = self._lib.xtl_createlogger_stdiostream(self._file, XTL_CRITICAL, 0)
        if not self.pointer:
            self._libc.fclose(self._file)
            raise last_error("xtl_createlogger_stdiostream")

    def close(self) -> None:
        """Destroy the logger and close its stream (the logger does not own it)."""
        if self.pointer:
            self._lib.xtl_logger_destroy(self.pointer)
            self._libc.fclose(self._file)
            self.pointer = None


class FileLogger:
    """A ``xentoollog_logger *`` appending to *path* (mode 0600) from *level* up, with date and pid.

    The file is rotated when it exceeds *max_bytes*: renamed to ``<path>.1`` (one old file
    kept) and the same ``FILE *`` reopened on a fresh file with ``freopen``, so the libxl
    context keeps its logger.  :meth:`mark` and :meth:`errors_since` give the error lines a
    call wrote (calls of other threads may interleave: lines are tagged with the pid only).
    """

    def __init__(self, path: str, max_bytes: int = 10 << 20, level: int = XTL_INFO) -> None:
        self._lib = bind(load("xentoollog"))
        self._libc = load_libc()
        self.path = path
        self._max = max_bytes
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        self._file = self._libc.fopen(path.encode(), b"a")
        if not self._file:
            raise last_error(f"fopen({path})")
        flags = XTL_STDIOSTREAM_SHOW_PID | XTL_STDIOSTREAM_SHOW_DATE | XTL_STDIOSTREAM_HIDE_PROGRESS
        self.pointer: int | None = self._lib.xtl_createlogger_stdiostream(self._file, level, flags)
        if not self.pointer:
            self._libc.fclose(self._file)
            raise last_error("xtl_createlogger_stdiostream")

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def mark(self) -> int:
        """Where the file ends now (before a call); rotates first when it is too big."""
        with self._lock:
            if not self.pointer:
                return 0
            self._libc.fflush(self._file)
            if self._size() > self._max:
                self._rotate()
            return self._size()

    def _rotate(self) -> None:
        try:
            os.replace(self.path, self.path + ".1")
        except OSError:
            return
        if self._libc.freopen(self.path.encode(), b"a", self._file):
            os.chmod(self.path, 0o600)
        elif not self._libc.freopen(b"/dev/null", b"a", self._file):  # libxl still holds this FILE *
            raise last_error(f"freopen({self.path})")

    def errors_since(self, mark: int, limit: int = ERROR_LINES) -> list[str]:
        """The last *limit* error lines written since *mark* (``libxl: error: …``), without the date."""
        with self._lock:
            if self.pointer:
                self._libc.fflush(self._file)
        try:
            with open(self.path, "rb") as log:
                if mark <= os.fstat(log.fileno()).st_size:
                    log.seek(mark)
                text = log.read(1 << 20).decode(errors="replace")
        except OSError:
            return []
        lines = [line.strip() for line in text.splitlines() if ": error: " in line or ": critical: " in line]
        return [line[line.find("libx"):] if "libx" in line else line for line in lines[-limit:]]

    def close(self) -> None:
        """Destroy the logger and close its file; idempotent."""
        with self._lock:
            if self.pointer:
                self._lib.xtl_logger_destroy(self.pointer)
                self.pointer = None
            if self._file:
                self._libc.fclose(self._file)
                self._file = None
