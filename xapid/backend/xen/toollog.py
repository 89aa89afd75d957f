"""libxentoollog: the quiet logger handed to libxenctrl (and later libxenlight).

Without a logger libxenctrl prints its errors on stderr (and ``libxl_ctx_alloc`` crashes);
:class:`QuietLogger` is a stdio-stream logger writing to ``/dev/null``.
"""

from __future__ import annotations

import ctypes

from xapid.backend.xen.libs import last_error, load, load_libc

XTL_CRITICAL = 9


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
