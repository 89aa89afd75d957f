"""Finding the Xen libraries by name, errno-aware errors, and the hypervisor presence check."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

L = TypeVar("L")

SUPPORTED_ABI = "4.17"
PRIVCMD_PATHS = ("/dev/xen/privcmd", "/proc/xen/privcmd")
PACKAGES = {
    "xenctrl": "libxenmisc4.17",
    "xenlight": "libxenmisc4.17",
    "xenstore": "libxenstore4",
    "xentoollog": "libxentoollog1",
}
_SONAME_VERSION = re.compile(r"\.so\.(\d+(?:\.\d+)*)$")


class XenUnavailable(Exception):
    """Xen cannot be used here; the message is one line for the user."""


class UnsupportedAbi(XenUnavailable):
    """The installed libraries or the running hypervisor are not Xen 4.17."""


class XenError(OSError):
    """A Xen library call failed; ``errno`` is the C errno it left."""


def last_error(call: str) -> XenError:
    """A :class:`XenError` for *call* from the errno the last ctypes call left."""
    err = ctypes.get_errno()
    return XenError(err, f"{call}: {os.strerror(err)}")


def check_hypervisor(paths: Sequence[str] = PRIVCMD_PATHS) -> None:
    """Raise :class:`XenUnavailable` unless a privcmd device (the hypercall interface) exists."""
    if not any(os.path.exists(path) for path in paths):
        raise XenUnavailable(f"no Xen hypervisor: {paths[0]} not found (is this dom0 of a Xen host?)")


def soname_version(soname: str) -> str:
    """The version a shared-object name carries: ``libxenctrl.so.4.17`` → ``4.17``."""
    match = _SONAME_VERSION.search(soname)
    return match.group(1) if match else ""


def find(name: str) -> str:
    """The file name of ``lib<name>`` as the dynamic linker finds it; never a hard-coded path."""
    found = ctypes.util.find_library(name)
    if found is None:
        raise XenUnavailable(f"lib{name} not found (install {PACKAGES.get(name, 'libxen-dev')})")
    return found


def load(name: str, abi: str | None = None) -> ctypes.CDLL:
    """Load ``lib<name>``; when *abi* is given its soname must carry that Xen release."""
    soname = find(name)
    if abi is not None and soname_version(soname) != abi:
        raise UnsupportedAbi(f"unsupported Xen ABI: {soname} found, xapid supports Xen {abi}")
    return ctypes.CDLL(soname, use_errno=True)


@functools.cache
def load_libc() -> ctypes.CDLL:
    """The C library, with ``free`` declared (Xen libraries return malloc'd memory); found once."""
    libc = ctypes.CDLL(find("c"), use_errno=True)
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.fclose.restype = ctypes.c_int
    libc.fflush.argtypes = [ctypes.c_void_p]
    libc.fflush.restype = ctypes.c_int
    libc.freopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    libc.freopen.restype = ctypes.c_void_p
    return libc


def declare(lib: L, prototypes: Mapping[str, tuple[Any, list[Any]]]) -> L:
    """Set restype and argtypes of every function in *prototypes* (name -> (restype, argtypes)) on *lib*."""
    for name, (restype, argtypes) in prototypes.items():
        func = getattr(lib, name)
        func.restype = restype
        func.argtypes = argtypes
    return lib
