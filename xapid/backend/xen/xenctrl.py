"""libxenctrl (Xen 4.17): domain and host control through hypercalls.

Structures follow ``xenctrl.h``/``xen/domctl.h``/``xen/sysctl.h`` of 4.17 (checked by
``tests/xen/test_abi.py`` against the installed headers).  :class:`XenCtrl` never calls a
libxenctrl function on a NULL handle: that kills the process instead of raising.
"""

from __future__ import annotations

import ctypes
import errno
import uuid as uuidlib
from ctypes import (
    POINTER,
    c_char,
    c_int,
    c_uint,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)

from xapid.backend.xen.libs import (
    SUPPORTED_ABI,
    UnsupportedAbi,
    XenError,
    declare,
    last_error,
    load,
)

XENVER_version = 0
XENVER_extraversion = 1
XENVER_compile_info = 2
XENVER_capabilities = 3
XENVER_changeset = 4
XENVER_commandline = 9

XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_blocked = 1 << 4
XEN_DOMINF_running = 1 << 5
XEN_DOMINF_debugged = 1 << 6
XEN_DOMINF_xs_domain = 1 << 7
XEN_DOMINF_hap = 1 << 8
XEN_DOMINF_shutdownshift = 16
XEN_DOMINF_shutdownmask = 0xFF

SHUTDOWN_REASONS = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog", 5: "soft_reset"}
SCHEDULERS = {5: "credit", 6: "credit2", 7: "arinc653", 8: "rtds", 9: "null"}


class XenArchDomainConfig(ctypes.Structure):
    """``struct xen_arch_domainconfig`` (x86)."""

    _fields_ = [("emulation_flags", c_uint32), ("misc_flags", c_uint32)]


class XcDomainInfo(ctypes.Structure):
    """``xc_domaininfo_t`` (``struct xen_domctl_getdomaininfo``); memory counts are 4 KiB pages."""

    _fields_ = [
        ("domain", c_uint16),
        ("pad1", c_uint16),
        ("flags", c_uint32),
        ("tot_pages", c_uint64),
        ("max_pages", c_uint64),
        ("outstanding_pages", c_uint64),
        ("shr_pages", c_uint64),
        ("paged_pages", c_uint64),
        ("shared_info_frame", c_uint64),
        ("cpu_time", c_uint64),
        ("nr_online_vcpus", c_uint32),
        ("max_vcpu_id", c_uint32),
        ("ssidref", c_uint32),
        ("handle", c_uint8 * 16),
        ("cpupool", c_uint32),
        ("gpaddr_bits", c_uint8),
        ("pad2", c_uint8 * 7),
        ("arch_config", XenArchDomainConfig),
    ]

    @property
    def uuid(self) -> str:
        """The domain handle as a UUID string."""
        return str(uuidlib.UUID(bytes=bytes(self.handle)))

    @property
    def shutdown_reason(self) -> str:
        """Why the guest shut down (meaningful only with ``XEN_DOMINF_shutdown``)."""
        code = (self.flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask
        return SHUTDOWN_REASONS.get(code, str(code))


class XcPhysInfo(ctypes.Structure):
    """``xc_physinfo_t`` (``struct xen_sysctl_physinfo``)."""

    _fields_ = [
        ("threads_per_core", c_uint32),
        ("cores_per_socket", c_uint32),
        ("nr_cpus", c_uint32),
        ("max_cpu_id", c_uint32),
        ("nr_nodes", c_uint32),
        ("max_node_id", c_uint32),
        ("cpu_khz", c_uint32),
        ("capabilities", c_uint32),
        ("arch_capabilities", c_uint32),
        ("pad", c_uint32),
        ("total_pages", c_uint64),
        ("free_pages", c_uint64),
        ("scrub_pages", c_uint64),
        ("outstanding_pages", c_uint64),
        ("max_mfn", c_uint64),
        ("hw_cap", c_uint32 * 8),
    ]


class XcVcpuInfo(ctypes.Structure):
    """``xc_vcpuinfo_t`` (``struct xen_domctl_getvcpuinfo``); ``vcpu`` is an input."""

    _fields_ = [
        ("vcpu", c_uint32),
        ("online", c_uint8),
        ("blocked", c_uint8),
        ("running", c_uint8),
        ("cpu_time", c_uint64),
        ("cpu", c_uint32),
    ]


class XcCpuInfo(ctypes.Structure):
    """``xc_cpuinfo_t`` (``struct xen_sysctl_cpuinfo``): cumulative idle time of one pCPU, ns."""

    _fields_ = [("idletime", c_uint64)]


class SchedCredit(ctypes.Structure):
    """``struct xen_domctl_sched_credit`` (``_credit2`` has the same layout)."""

    _fields_ = [("weight", c_uint16), ("cap", c_uint16)]


class CompileInfo(ctypes.Structure):
    """``xen_compile_info_t``."""

    _fields_ = [
        ("compiler", c_char * 64),
        ("compile_by", c_char * 16),
        ("compile_domain", c_char * 32),
        ("compile_date", c_char * 32),
    ]


_H = c_void_p  # xc_interface *
_PROTOTYPES: dict[str, tuple[type | None, list[type]]] = {
    "xc_interface_open": (c_void_p, [c_void_p, c_void_p, c_uint]),
    "xc_interface_close": (c_int, [_H]),
    "xc_domain_getinfolist": (c_int, [_H, c_uint32, c_uint, POINTER(XcDomainInfo)]),
    "xc_physinfo": (c_int, [_H, POINTER(XcPhysInfo)]),
    "xc_getcpuinfo": (c_int, [_H, c_int, POINTER(XcCpuInfo), POINTER(c_int)]),
    "xc_get_max_cpus": (c_int, [_H]),
    "xc_vcpu_getinfo": (c_int, [_H, c_uint32, c_uint32, POINTER(XcVcpuInfo)]),
    "xc_domain_pause": (c_int, [_H, c_uint32]),
    "xc_domain_unpause": (c_int, [_H, c_uint32]),
    "xc_domain_destroy": (c_int, [_H, c_uint32]),
    "xc_domain_shutdown": (c_int, [_H, c_uint32, c_int]),
    "xc_domain_setmaxmem": (c_int, [_H, c_uint32, c_uint64]),
    "xc_domain_max_vcpus": (c_int, [_H, c_uint32, c_uint]),
    "xc_sched_id": (c_int, [_H, POINTER(c_int)]),
    "xc_sched_credit_domain_get": (c_int, [_H, c_uint32, POINTER(SchedCredit)]),
    "xc_sched_credit_domain_set": (c_int, [_H, c_uint32, POINTER(SchedCredit)]),
    "xc_sched_credit2_domain_get": (c_int, [_H, c_uint32, POINTER(SchedCredit)]),
    "xc_sched_credit2_domain_set": (c_int, [_H, c_uint32, POINTER(SchedCredit)]),
    "xc_version": (c_int, [_H, c_int, c_void_p]),
}


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare argtypes/restype of every libxenctrl function used here on *lib*."""
    return declare(lib, _PROTOTYPES)


def load_xenctrl() -> ctypes.CDLL:
    """libxenctrl found by name; refused unless its soname carries the supported Xen release."""
    return bind(load("xenctrl", abi=SUPPORTED_ABI))


class XenCtrl:
    """An open ``xc_interface``; every method raises :class:`XenError` on failure."""

    def __init__(self, lib: ctypes.CDLL, logger: int | None) -> None:
        """Open the interface through *lib* (see :func:`load_xenctrl`), logging to *logger*."""
        self._lib = lib
        self._handle: int | None = lib.xc_interface_open(logger, logger, 0)
        if not self._handle:
            raise last_error("xc_interface_open")

    def close(self) -> None:
        """Close the interface; idempotent."""
        if self._handle:
            self._lib.xc_interface_close(self._handle)
            self._handle = None

    def _h(self) -> int:
        if not self._handle:
            raise XenError(errno.EBADF, "the xenctrl interface is closed")
        return self._handle

    def _call(self, name: str, *args: object) -> int:
        """Call *name* on the handle; a negative result raises with the errno left behind."""
        rc = getattr(self._lib, name)(self._h(), *args)
        if rc < 0:
            raise last_error(name)
        return rc

    def version(self) -> tuple[int, int]:
        """The hypervisor's (major, minor)."""
        packed = self._call("xc_version", XENVER_version, None)
        return packed >> 16, packed & 0xFFFF

    def _version_string(self, cmd: int, size: int) -> str:
        buf = ctypes.create_string_buffer(size)
        self._call("xc_version", cmd, buf)
        return buf.value.decode(errors="replace")

    def extraversion(self) -> str:
        """The version suffix, e.g. ``.3`` or ``-rc``."""
        return self._version_string(XENVER_extraversion, 16)

    def capabilities(self) -> str:
        """Space-separated guest ABIs, e.g. ``xen-3.0-x86_64 hvm-3.0-x86_32``."""
        return self._version_string(XENVER_capabilities, 1024)

    def changeset(self) -> str:
        """The source changeset the hypervisor was built from."""
        return self._version_string(XENVER_changeset, 64)

    def commandline(self) -> str:
        """The hypervisor's boot command line (``dom0_mem=…`` and the like)."""
        return self._version_string(XENVER_commandline, 1024)

    def compile_info(self) -> CompileInfo:
        """Compiler, builder and build date of the hypervisor."""
        info = CompileInfo()
        self._call("xc_version", XENVER_compile_info, ctypes.byref(info))
        return info

    def check_abi(self) -> str:
        """The full hypervisor version; :class:`UnsupportedAbi` unless it is the supported release."""
        major, minor = self.version()
        if f"{major}.{minor}" != SUPPORTED_ABI:
            raise UnsupportedAbi(f"unsupported Xen hypervisor {major}.{minor}: xapid supports Xen {SUPPORTED_ABI}")
        return f"{major}.{minor}{self.extraversion()}"

    def domain_getinfolist(self, first: int = 0, max_domains: int = 1024) -> list[XcDomainInfo]:
        """Existing domains with domid ≥ *first*, ordered by domid, at most *max_domains*."""
        infos = (XcDomainInfo * max_domains)()
        count = self._call("xc_domain_getinfolist", first, max_domains, infos)
        return list(infos[:count])

    def domain_getinfo(self, domid: int) -> XcDomainInfo:
        """One domain; ``XenError(ESRCH)`` when it does not exist."""
        found = self.domain_getinfolist(domid, 1)
        if not found or found[0].domain != domid:
            raise XenError(errno.ESRCH, f"no domain {domid}")
        return found[0]

    def physinfo(self) -> XcPhysInfo:
        """Host CPU topology and memory (pages)."""
        info = XcPhysInfo()
        self._call("xc_physinfo", ctypes.byref(info))
        return info

    def max_cpus(self) -> int:
        """The number of physical CPU slots."""
        return self._call("xc_get_max_cpus")

    def cpu_idle_times(self, max_cpus: int) -> list[int]:
        """Cumulative idle time (ns) of each physical CPU (``xc_getcpuinfo``)."""
        infos = (XcCpuInfo * max_cpus)()
        count = c_int(0)
        self._call("xc_getcpuinfo", max_cpus, infos, ctypes.byref(count))
        return [info.idletime for info in infos[: count.value]]

    def vcpu_getinfo(self, domid: int, vcpu: int) -> XcVcpuInfo:
        """State and cumulative CPU time of one vCPU."""
        info = XcVcpuInfo(vcpu=vcpu)
        self._call("xc_vcpu_getinfo", domid, vcpu, ctypes.byref(info))
        return info

    def domain_pause(self, domid: int) -> None:
        """Pause the domain."""
        self._call("xc_domain_pause", domid)

    def domain_unpause(self, domid: int) -> None:
        """Unpause the domain."""
        self._call("xc_domain_unpause", domid)

    def domain_destroy(self, domid: int) -> None:
        """Destroy the domain immediately."""
        self._call("xc_domain_destroy", domid)

    def domain_shutdown(self, domid: int, reason: int) -> None:
        """Mark the domain shut down with *reason* (a ``SHUTDOWN_REASONS`` key), as a crash would."""
        self._call("xc_domain_shutdown", domid, reason)

    def domain_setmaxmem(self, domid: int, max_kib: int) -> None:
        """Set the domain's memory ceiling in KiB."""
        self._call("xc_domain_setmaxmem", domid, max_kib)

    def domain_max_vcpus(self, domid: int, count: int) -> None:
        """Set the domain's maximum number of vCPUs (at build time)."""
        self._call("xc_domain_max_vcpus", domid, count)

    def sched_id(self) -> str:
        """The default scheduler's name (``credit``, ``credit2`` …)."""
        sched = c_int(0)
        self._call("xc_sched_id", ctypes.byref(sched))
        return SCHEDULERS.get(sched.value, str(sched.value))

    def sched_credit_get(self, domid: int, credit2: bool = False) -> tuple[int, int]:
        """The domain's (weight, cap) under the credit (or credit2) scheduler."""
        params = SchedCredit()
        self._call(f"xc_sched_credit{'2' if credit2 else ''}_domain_get", domid, ctypes.byref(params))
        return params.weight, params.cap

    def sched_credit_set(self, domid: int, weight: int, cap: int, credit2: bool = False) -> None:
        """Set the domain's weight and cap under the credit (or credit2) scheduler."""
        params = SchedCredit(weight=weight, cap=cap)
        self._call(f"xc_sched_credit{'2' if credit2 else ''}_domain_set", domid, ctypes.byref(params))
