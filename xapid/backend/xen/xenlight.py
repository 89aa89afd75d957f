"""libxenlight (Xen 4.17): domain building, save/restore and devices through libxl.

Configs cross the boundary as libxl's JSON (``libxl_domain_config_from_json``), so no libxl
structure is laid out here beyond opaque buffers of the sizes ``tests/xen/test_abi.py``
checks.  :class:`XenLight` never calls libxl on a NULL context.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    POINTER,
    c_char_p,
    c_int,
    c_int64,
    c_uint,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any, Callable, TypeVar

from xapid.backend.xen.libs import SUPPORTED_ABI, declare, load, load_libc

L = TypeVar("L")
T = TypeVar("T")

DOMAIN_CONFIG_SIZE = 1288
RESTORE_PARAMS_SIZE = 24
DEVICE_DISK_SIZE = 144
DEVICE_NIC_SIZE = 504
LIBXL_VERSION = 0
#: libxl_domain_restore_params.stream_version: 2 is libxl's own stream format, the one
#: libxl_domain_suspend writes (init leaves 1, a legacy xend image run through convert-legacy-stream)
LIBXL_STREAM_VERSION_V2 = 2
LIBXL_SUSPEND_LIVE = 2
#: libxl_sigchld_owner (libxl_event.h): the application owns SIGCHLD and tells libxl
#: (libxl_childproc_sigchld_occurred) from its main loop; libxl reaps only its own children.
LIBXL_SIGCHLD_OWNER_MAINLOOP = 1

ERRORS = {-1: "ERROR_NONSPECIFIC", -2: "ERROR_VERSION", -3: "ERROR_FAIL", -4: "ERROR_NI", -5: "ERROR_NOMEM",
          -6: "ERROR_INVAL", -7: "ERROR_BADFAIL", -8: "ERROR_GUEST_TIMEDOUT", -9: "ERROR_TIMEDOUT",
          -10: "ERROR_NOPARAVIRT", -11: "ERROR_NOT_READY", -12: "ERROR_OSEVENT_REG_FAIL",
          -13: "ERROR_BUFFERFULL", -14: "ERROR_UNKNOWN_CHILD", -15: "ERROR_LOCK_FAIL",
          -16: "ERROR_JSON_CONFIG_EMPTY", -17: "ERROR_DEVICE_EXISTS", -18: "ERROR_CHECKPOINT_DEVOPS_DOES_NOT_MATCH",
          -19: "ERROR_CHECKPOINT_DEVICE_NOT_SUPPORTED", -20: "ERROR_VNUMA_CONFIG_INVALID",
          -21: "ERROR_DOMAIN_NOTFOUND", -22: "ERROR_ABORTED", -23: "ERROR_NOTFOUND", -24: "ERROR_DOMAIN_DESTROYED",
          -25: "ERROR_FEATURE_REMOVED", -26: "ERROR_PROTOCOL_ERROR_QMP", -27: "ERROR_UNKNOWN_QMP_ERROR",
          -28: "ERROR_QMP_GENERIC_ERROR", -29: "ERROR_QMP_COMMAND_NOT_FOUND",
          -30: "ERROR_QMP_DEVICE_NOT_ACTIVE", -31: "ERROR_QMP_DEVICE_NOT_FOUND", -32: "ERROR_QEMU_API"}



class ChildprocHooks(ctypes.Structure):
    """``libxl_childproc_hooks`` (libxl_event.h, 24 bytes on x86-64).  libxl does not copy it:
    it must outlive the context."""

    _fields_ = [("chldowner", c_int), ("fork_replacement", c_void_p), ("reaped_callback", c_void_p)]


class RestoreParams(ctypes.Structure):
    """``libxl_domain_restore_params`` (_libxl_types.h; its layout is checked by test_abi)."""

    _fields_ = [("checkpointed_stream", c_int), ("stream_version", c_uint32), ("colo_proxy_script", c_char_p),
                ("userspace_colo_proxy", c_int)]


_CTX = c_void_p
_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "libxl_ctx_alloc": (c_int, [POINTER(c_void_p), c_int, c_uint, c_void_p]),
    "libxl_ctx_free": (c_int, [_CTX]),
    "libxl_domain_config_init": (None, [c_void_p]),
    "libxl_domain_config_dispose": (None, [c_void_p]),
    "libxl_domain_config_from_json": (c_int, [_CTX, c_void_p, c_char_p]),
    "libxl_domain_config_to_json": (c_void_p, [_CTX, c_void_p]),
    "libxl_domain_create_new": (c_int, [_CTX, c_void_p, POINTER(c_uint32), c_void_p, c_void_p]),
    "libxl_domain_create_restore": (c_int, [_CTX, c_void_p, POINTER(c_uint32), c_int, c_int, c_void_p, c_void_p,
                                            c_void_p]),
    "libxl_domain_restore_params_init": (None, [c_void_p]),
    "libxl_domain_restore_params_dispose": (None, [c_void_p]),
    "libxl_domain_unpause": (c_int, [_CTX, c_uint32, c_void_p]),
    "libxl_domain_pause": (c_int, [_CTX, c_uint32, c_void_p]),
    "libxl_domain_destroy": (c_int, [_CTX, c_uint32, c_void_p]),
    "libxl_domain_suspend": (c_int, [_CTX, c_uint32, c_int, c_int, c_void_p]),
    "libxl_device_disk_init": (None, [c_void_p]),
    "libxl_device_disk_dispose": (None, [c_void_p]),
    "libxl_device_disk_from_json": (c_int, [_CTX, c_void_p, c_char_p]),
    "libxl_device_disk_add": (c_int, [_CTX, c_uint32, c_void_p, c_void_p]),
    "libxl_device_disk_remove": (c_int, [_CTX, c_uint32, c_void_p, c_void_p]),
    "libxl_device_nic_init": (None, [c_void_p]),
    "libxl_device_nic_dispose": (None, [c_void_p]),
    "libxl_device_nic_from_json": (c_int, [_CTX, c_void_p, c_char_p]),
    "libxl_device_nic_add": (c_int, [_CTX, c_uint32, c_void_p, c_void_p]),
    "libxl_device_nic_remove": (c_int, [_CTX, c_uint32, c_void_p, c_void_p]),
    "libxl_childproc_setmode": (None, [_CTX, POINTER(ChildprocHooks), c_void_p]),
    "libxl_childproc_sigchld_occurred": (None, [_CTX]),
    "libxl_set_memory_target": (c_int, [_CTX, c_uint32, c_int64, c_int, c_int]),
    "libxl_wait_for_memory_target": (c_int, [_CTX, c_uint32, c_int]),
    "libxl_get_free_memory": (c_int, [_CTX, POINTER(c_uint64)]),
}


class XenLightError(Exception):
    """A libxl call failed; ``code`` is libxl's (negative) error code."""

    def __init__(self, call: str, code: int) -> None:
        self.code = code
        self.name = ERRORS.get(code, str(code))
        self.strerror = f"{call}: {self.name}"
        super().__init__(self.strerror)


def bind(lib: L) -> L:
    """Declare argtypes/restype of every libxenlight function used here on *lib*."""
    return declare(lib, _PROTOTYPES)


def load_xenlight() -> ctypes.CDLL:
    """libxenlight found by name; refused unless its soname carries the supported Xen release."""
    return bind(load("xenlight", abi=SUPPORTED_ABI))


class XenLight:
    """An open libxl context; methods raise :class:`XenLightError`."""

    def __init__(self, lib: Any, logger: int | None) -> None:
        """Open a context through *lib* (libxenlight with its prototypes bound, :func:`bind`; tests
        give a fake of the same functions, hence ``Any``) logging to *logger* (never None: libxl
        crashes without one)."""
        if not logger:
            raise XenLightError("libxl_ctx_alloc", -6)
        self._lib: Any = lib
        self._libc = load_libc()
        ctx = c_void_p()
        rc = lib.libxl_ctx_alloc(ctypes.byref(ctx), LIBXL_VERSION, 0, logger)
        if rc or not ctx.value:
            raise XenLightError("libxl_ctx_alloc", rc or -3)
        self._ctx: int | None = ctx.value
        # Before any call that may fork: the application (the Twisted reactor) owns SIGCHLD.
        # Without this libxl installs its own handler at its first child, asserts that none was
        # there (Twisted's is) and aborts the process.  The driver calls sigchld_occurred().
        self._hooks = ChildprocHooks(LIBXL_SIGCHLD_OWNER_MAINLOOP, None, None)
        lib.libxl_childproc_setmode(self._ctx, ctypes.byref(self._hooks), None)

    def sigchld_occurred(self) -> None:
        """Let libxl reap those of its children that exited (``waitpid(pid, WNOHANG)`` on its own
        pids only).  Any thread but never a signal handler; a no-op on a closed context."""
        if self._ctx:
            self._lib.libxl_childproc_sigchld_occurred(self._ctx)

    def close(self) -> None:
        """Free the context; idempotent."""
        if self._ctx:
            self._lib.libxl_ctx_free(self._ctx)
            self._ctx = None

    def _c(self) -> int:
        if not self._ctx:
            raise XenLightError("libxl (closed context)", -3)
        return self._ctx

    def _check(self, call: str, rc: int) -> None:
        if rc:
            raise XenLightError(call, rc)

    def _with_config(self, config_json: str, use: Callable[[Any], T]) -> T:
        buf = ctypes.create_string_buffer(DOMAIN_CONFIG_SIZE)
        lib = self._lib
        lib.libxl_domain_config_init(buf)
        try:
            self._check("libxl_domain_config_from_json",
                        lib.libxl_domain_config_from_json(self._c(), buf, config_json.encode()))
            return use(buf)
        finally:
            lib.libxl_domain_config_dispose(buf)

    def validate(self, config_json: str) -> str:
        """libxl's canonical JSON of *config_json*; XenLightError when libxl refuses it."""

        def canonical(buf: object) -> str:
            ptr = self._lib.libxl_domain_config_to_json(self._c(), buf)
            if not ptr:
                raise XenLightError("libxl_domain_config_to_json", -3)
            try:
                return ctypes.string_at(ptr).decode()
            finally:
                self._libc.free(ptr)

        return self._with_config(config_json, canonical)

    def create(self, config_json: str) -> int:
        """Build a domain from *config_json*; it is left paused.  Returns its domid."""

        def build(buf: object) -> int:
            domid = c_uint32(0)
            self._check("libxl_domain_create_new", self._lib.libxl_domain_create_new(
                self._c(), buf, ctypes.byref(domid), None, None))
            return domid.value

        return self._with_config(config_json, build)

    def restore(self, config_json: str, fd: int) -> int:
        """Rebuild a domain from the image on *fd* (written by :meth:`suspend`), paused; its domid."""

        def build(buf: object) -> int:
            domid = c_uint32(0)
            params = RestoreParams()
            self._lib.libxl_domain_restore_params_init(ctypes.byref(params))
            params.stream_version = LIBXL_STREAM_VERSION_V2
            try:
                self._check("libxl_domain_create_restore", self._lib.libxl_domain_create_restore(
                    self._c(), buf, ctypes.byref(domid), fd, -1, ctypes.byref(params), None, None))
            finally:
                self._lib.libxl_domain_restore_params_dispose(ctypes.byref(params))
            return domid.value

        return self._with_config(config_json, build)

    def _domain_call(self, name: str, domid: int, *args: object) -> None:
        self._check(name, getattr(self._lib, name)(self._c(), domid, *args))

    def unpause(self, domid: int) -> None:
        """Unpause the domain."""
        self._domain_call("libxl_domain_unpause", domid, None)

    def pause(self, domid: int) -> None:
        """Pause the domain."""
        self._domain_call("libxl_domain_pause", domid, None)

    def destroy(self, domid: int) -> None:
        """Destroy the domain and remove its devices and xenstore area."""
        self._domain_call("libxl_domain_destroy", domid, None)

    def suspend(self, domid: int, fd: int, live: bool = False) -> None:
        """Save the domain to *fd*; it is left shut down (reason suspend) for the caller to destroy."""
        self._domain_call("libxl_domain_suspend", domid, fd, LIBXL_SUSPEND_LIVE if live else 0, None)

    def set_memory_target(self, domid: int, target_kib: int, relative: bool = False, enforce: bool = True) -> None:
        """libxl's memory target: ``memory/target`` and ``/vm/<uuid>/memory`` in xenstore, the PoD
        target of HVM/PVH guests and (*enforce*) the hypervisor ceiling, video RAM included."""
        self._domain_call("libxl_set_memory_target", domid, target_kib, int(relative), int(enforce))

    def wait_for_memory_target(self, domid: int, seconds: int) -> None:
        """Wait while the domain makes progress towards its memory target; ERROR_FAIL when it stalls."""
        self._domain_call("libxl_wait_for_memory_target", domid, seconds)

    def free_memory_kib(self) -> int:
        """Memory free for new domains, as libxl counts it (KiB)."""
        free = c_uint64(0)
        self._check("libxl_get_free_memory",
                    self._lib.libxl_get_free_memory(self._c(), ctypes.byref(free)))
        return free.value

    def _device(self, kind: str, action: str, domid: int, device_json: str) -> None:
        size = DEVICE_DISK_SIZE if kind == "disk" else DEVICE_NIC_SIZE
        buf = ctypes.create_string_buffer(size)
        lib = self._lib
        getattr(lib, f"libxl_device_{kind}_init")(buf)
        try:
            self._check(f"libxl_device_{kind}_from_json",
                        getattr(lib, f"libxl_device_{kind}_from_json")(self._c(), buf, device_json.encode()))
            self._check(f"libxl_device_{kind}_{action}",
                        getattr(lib, f"libxl_device_{kind}_{action}")(self._c(), domid, buf, None))
        finally:
            getattr(lib, f"libxl_device_{kind}_dispose")(buf)

    def disk_add(self, domid: int, disk_json: str) -> None:
        """Hot-plug the disk described by *disk_json* (libxl_device_disk JSON)."""
        self._device("disk", "add", domid, disk_json)

    def disk_remove(self, domid: int, disk_json: str) -> None:
        """Hot-unplug the disk identified by *disk_json*."""
        self._device("disk", "remove", domid, disk_json)

    def nic_add(self, domid: int, nic_json: str) -> None:
        """Hot-plug the network card described by *nic_json*."""
        self._device("nic", "add", domid, nic_json)

    def nic_remove(self, domid: int, nic_json: str) -> None:
        """Hot-unplug the network card identified by *nic_json*."""
        self._device("nic", "remove", domid, nic_json)
