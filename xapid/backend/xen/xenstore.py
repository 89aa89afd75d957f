"""libxenstore (4.x, ``libxenstore.so.4``): the xenstore database of a Xen host.

The socket comes from ``$XENSTORED_PATH`` or ``$XENSTORED_RUNDIR/socket`` (read by the
library at :class:`XenStore` creation), else ``/var/run/xenstored/socket`` or the xenbus
device.  Every function returning memory has ``restype = c_void_p`` and the memory is freed
once with ``free()`` (string vectors are a single allocation).
"""

from __future__ import annotations

import ctypes
import errno
import functools
from collections.abc import Callable
from ctypes import POINTER, c_bool, c_char_p, c_int, c_uint, c_uint32, c_ulong, c_void_p
from typing import TypeVar

from xapid.backend.xen.libs import XenError, declare, last_error, load, load_libc

T = TypeVar("T")

XBT_NULL = 0
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1
XS_PERM_NONE = 0
XS_PERM_READ = 1
XS_PERM_WRITE = 2
XS_PERM_OWNER = 8
TRANSACTION_ATTEMPTS = 16


class XsPermissions(ctypes.Structure):
    """``struct xs_permissions``: *perms* (``XS_PERM_*``) granted to domain *id*."""

    _fields_ = [("id", c_uint), ("perms", c_uint)]


_H = c_void_p  # struct xs_handle *
_T = c_uint32  # xs_transaction_t
_PROTOTYPES: dict[str, tuple[type | None, list[type]]] = {
    "xs_open": (c_void_p, [c_ulong]),
    "xs_close": (None, [_H]),
    "xs_directory": (c_void_p, [_H, _T, c_char_p, POINTER(c_uint)]),
    "xs_read": (c_void_p, [_H, _T, c_char_p, POINTER(c_uint)]),
    "xs_write": (c_bool, [_H, _T, c_char_p, c_char_p, c_uint]),
    "xs_mkdir": (c_bool, [_H, _T, c_char_p]),
    "xs_rm": (c_bool, [_H, _T, c_char_p]),
    "xs_get_permissions": (c_void_p, [_H, _T, c_char_p, POINTER(c_uint)]),
    "xs_set_permissions": (c_bool, [_H, _T, c_char_p, POINTER(XsPermissions), c_uint]),
    "xs_watch": (c_bool, [_H, c_char_p, c_char_p]),
    "xs_unwatch": (c_bool, [_H, c_char_p, c_char_p]),
    "xs_fileno": (c_int, [_H]),
    "xs_check_watch": (c_void_p, [_H]),
    "xs_transaction_start": (_T, [_H]),
    "xs_transaction_end": (c_bool, [_H, _T, c_bool]),
    "xs_get_domain_path": (c_void_p, [_H, c_uint]),
    "xs_introduce_domain": (c_bool, [_H, c_uint, c_ulong, c_uint]),
    "xs_release_domain": (c_bool, [_H, c_uint]),
    "xs_is_domain_introduced": (c_bool, [_H, c_uint]),
}


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare argtypes/restype of every libxenstore function used here on *lib*."""
    return declare(lib, _PROTOTYPES)


@functools.cache
def _library() -> ctypes.CDLL:
    """libxenstore, found (``find_library`` runs ``ldconfig``) and bound once per process."""
    return bind(load("xenstore"))


#: errnos of a call on a connection whose xenstored is gone (measured with the C xenstored:
#: EPIPE/EBADF on reads and writes, EINVAL from xs_check_watch, ECONNREFUSED on a new xs_open)
CONNECTION_LOST = frozenset({errno.EPIPE, errno.EBADF, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN,
                             errno.EINVAL})


class XenStore:
    """An open xenstore connection; methods raise :class:`XenError` with the library's errno.

    *t* arguments are transaction ids (:data:`XBT_NULL` for none).  The handle is
    thread-safe (libxenstore locks internally).
    """

    def __init__(self) -> None:
        self._lib = _library()
        self._libc = load_libc()
        self._handle: int | None = self._lib.xs_open(0)
        if not self._handle:
            raise last_error("xs_open")

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._handle:
            self._lib.xs_close(self._handle)
            self._handle = None

    def _h(self) -> int:
        if not self._handle:
            raise XenError(errno.EBADF, "the xenstore connection is closed")
        return self._handle

    def _check(self, ok: bool, call: str, path: str) -> None:
        if not ok:
            raise last_error(f"{call}({path})")

    def _take_strings(self, ptr: int, count: int) -> list[str]:
        """Decode a malloc'd ``char *[count]`` and free it."""
        try:
            vector = ctypes.cast(ptr, POINTER(c_char_p))
            return [vector[i].decode() for i in range(count)]
        finally:
            self._libc.free(ptr)

    def read(self, path: str, t: int = XBT_NULL) -> bytes:
        """The value at *path*; ``XenError(ENOENT)`` when it does not exist."""
        length = c_uint(0)
        ptr = self._lib.xs_read(self._h(), t, path.encode(), ctypes.byref(length))
        if not ptr:
            raise last_error(f"xs_read({path})")
        try:
            return ctypes.string_at(ptr, length.value)
        finally:
            self._libc.free(ptr)

    def write(self, path: str, value: bytes | str, t: int = XBT_NULL) -> None:
        """Create or replace *path* (and missing parents) with *value*."""
        data = value.encode() if isinstance(value, str) else value
        self._check(self._lib.xs_write(self._h(), t, path.encode(), data, len(data)), "xs_write", path)

    def mkdir(self, path: str, t: int = XBT_NULL) -> None:
        """Create an empty node at *path* (no error when it exists)."""
        self._check(self._lib.xs_mkdir(self._h(), t, path.encode()), "xs_mkdir", path)

    def rm(self, path: str, t: int = XBT_NULL) -> None:
        """Remove *path* and everything below it."""
        self._check(self._lib.xs_rm(self._h(), t, path.encode()), "xs_rm", path)

    def directory(self, path: str, t: int = XBT_NULL) -> list[str]:
        """The names of the children of *path*."""
        count = c_uint(0)
        ptr = self._lib.xs_directory(self._h(), t, path.encode(), ctypes.byref(count))
        if not ptr:
            raise last_error(f"xs_directory({path})")
        return self._take_strings(ptr, count.value)

    def get_permissions(self, path: str, t: int = XBT_NULL) -> list[tuple[int, int]]:
        """(domid, ``XS_PERM_*``) pairs; the first is the owner and the default for others."""
        count = c_uint(0)
        ptr = self._lib.xs_get_permissions(self._h(), t, path.encode(), ctypes.byref(count))
        if not ptr:
            raise last_error(f"xs_get_permissions({path})")
        try:
            perms = ctypes.cast(ptr, POINTER(XsPermissions))
            return [(perms[i].id, perms[i].perms) for i in range(count.value)]
        finally:
            self._libc.free(ptr)

    def set_permissions(self, path: str, perms: list[tuple[int, int]], t: int = XBT_NULL) -> None:
        """Replace the permissions of *path* (see :meth:`get_permissions`)."""
        array = (XsPermissions * len(perms))(*(XsPermissions(domid, bits) for domid, bits in perms))
        self._check(
            self._lib.xs_set_permissions(self._h(), t, path.encode(), array, len(perms)), "xs_set_permissions", path
        )

    def transaction_start(self) -> int:
        """Start a transaction; its id is passed as *t* to the other methods."""
        t = self._lib.xs_transaction_start(self._h())
        if t == XBT_NULL:
            raise last_error("xs_transaction_start")
        return t

    def transaction_end(self, t: int, abort: bool = False) -> bool:
        """Commit (or abort) *t*; False when it conflicted with another change (EAGAIN)."""
        if self._lib.xs_transaction_end(self._h(), t, abort):
            return True
        if ctypes.get_errno() == errno.EAGAIN:
            return False
        raise last_error("xs_transaction_end")

    def transact(self, body: Callable[[int], T], attempts: int = TRANSACTION_ATTEMPTS) -> T:
        """Run *body(t)* in a transaction and commit it, rerunning it while commits conflict.

        An exception from *body* aborts the transaction.  ``XenError(EAGAIN)`` after
        *attempts* conflicting commits.
        """
        for _ in range(attempts):
            t = self.transaction_start()
            try:
                result = body(t)
            except BaseException:
                self.transaction_end(t, abort=True)
                raise
            if self.transaction_end(t):
                return result
        raise XenError(errno.EAGAIN, f"xenstore transaction conflicted {attempts} times")

    def watch(self, path: str, token: str) -> None:
        """Watch *path* (or a special path such as ``@releaseDomain``); it fires once at once."""
        self._check(self._lib.xs_watch(self._h(), path.encode(), token.encode()), "xs_watch", path)

    def unwatch(self, path: str, token: str) -> None:
        """Remove a watch set by :meth:`watch`."""
        self._check(self._lib.xs_unwatch(self._h(), path.encode(), token.encode()), "xs_unwatch", path)

    def fileno(self) -> int:
        """A descriptor that is readable while watch events are pending."""
        fd = self._lib.xs_fileno(self._h())
        if fd < 0:
            raise last_error("xs_fileno")
        return fd

    def check_watch(self) -> tuple[str, str] | None:
        """The next pending watch event as (path, token), or None; never blocks."""
        ptr = self._lib.xs_check_watch(self._h())
        if not ptr:
            if ctypes.get_errno() == errno.EAGAIN:
                return None
            raise last_error("xs_check_watch")
        path, token = self._take_strings(ptr, 2)
        return path, token

    def get_domain_path(self, domid: int) -> str:
        """The home of domain *domid* in the store, e.g. ``/local/domain/7``."""
        ptr = self._lib.xs_get_domain_path(self._h(), domid)
        if not ptr:
            raise last_error(f"xs_get_domain_path({domid})")
        try:
            return ctypes.string_at(ptr).decode()
        finally:
            self._libc.free(ptr)

    def introduce_domain(self, domid: int, mfn: int, evtchn: int) -> None:
        """Tell xenstored about a new domain's ring page and event channel (fires ``@introduceDomain``)."""
        self._check(self._lib.xs_introduce_domain(self._h(), domid, mfn, evtchn), "xs_introduce_domain", str(domid))

    def release_domain(self, domid: int) -> None:
        """Tell xenstored a domain is gone (fires ``@releaseDomain``)."""
        self._check(self._lib.xs_release_domain(self._h(), domid), "xs_release_domain", str(domid))

    def is_domain_introduced(self, domid: int) -> bool:
        """Whether xenstored knows domain *domid*."""
        return bool(self._lib.xs_is_domain_introduced(self._h(), domid))
