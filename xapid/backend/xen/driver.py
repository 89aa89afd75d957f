"""The ``xen`` driver: :class:`IBackend` on libxenctrl and libxenstore (work in progress).

:meth:`XenBackend.open` refuses with :class:`HypervisorUnavailable` (one line) when there is
no hypervisor, the libraries are missing or not Xen 4.17, or a connection cannot be made.
Operations not yet written raise :class:`NotSupported`.
"""

from __future__ import annotations

import ctypes
import pathlib
from collections.abc import Callable, Sequence
from typing import NoReturn

from zope.interface import implementer

from xapid.backend.interface import (
    Counters,
    DiskSpec,
    DomainInfo,
    DomainSpec,
    HostInfo,
    HypervisorUnavailable,
    IBackend,
    NicSpec,
    NotSupported,
    PhysicalCPU,
    PhysicalNic,
)
from xapid.backend.xen.libs import PRIVCMD_PATHS, XenError, XenUnavailable, check_hypervisor
from xapid.backend.xen.toollog import QuietLogger
from xapid.backend.xen.xenctrl import XenCtrl, load_xenctrl
from xapid.backend.xen.xenstore import XenStore

PAGE = 4096


def _todo(operation: str) -> NoReturn:
    raise NotSupported(f"{operation} is not implemented by the xen driver yet")


@implementer(IBackend)
class XenBackend:
    """Drives the local Xen hypervisor; *xenctrl_lib* and *privcmd* are seams for tests."""

    name = "xen"

    def __init__(
        self,
        state_dir: pathlib.Path,
        clock: Callable[[], float],
        *,
        privcmd: Sequence[str] = PRIVCMD_PATHS,
        xenctrl_lib: Callable[[], ctypes.CDLL] = load_xenctrl,
    ) -> None:
        self._state_dir = state_dir
        self._clock = clock
        self._privcmd = privcmd
        self._xenctrl_lib = xenctrl_lib
        self._logger: QuietLogger | None = None
        self._xc: XenCtrl | None = None
        self._xs: XenStore | None = None
        self.xen_version = ""

    def open(self) -> None:
        """Check for a hypervisor, load the libraries, open libxenctrl and xenstore, check the version."""
        try:
            check_hypervisor(self._privcmd)
            lib = self._xenctrl_lib()
            self._logger = QuietLogger()
            self._xc = XenCtrl(lib, self._logger.pointer)
            self.xen_version = self._xc.check_abi()
            self._xs = XenStore()
        except XenUnavailable as exc:
            self.close()
            raise HypervisorUnavailable(str(exc)) from None
        except XenError as exc:
            self.close()
            raise HypervisorUnavailable(f"cannot connect to Xen: {exc.strerror}") from None

    def close(self) -> None:
        """Close xenstore, libxenctrl and the logger; idempotent."""
        for handle in (self._xs, self._xc, self._logger):
            if handle is not None:
                handle.close()
        self._xs = self._xc = self._logger = None

    def _ctrl(self) -> XenCtrl:
        if self._xc is None:
            raise HypervisorUnavailable("the xen driver is not open")
        return self._xc

    def free_memory(self) -> int:
        """Free host memory in bytes (``xc_physinfo``)."""
        return self._ctrl().physinfo().free_pages * PAGE

    def physical_cpus(self) -> list[PhysicalCPU]:
        """Every physical CPU with its cumulative idle time (``xc_getcpuinfo``)."""
        xc = self._ctrl()
        return [PhysicalCPU(n, idle) for n, idle in enumerate(xc.cpu_idle_times(xc.max_cpus()))]

    def host_info(self) -> HostInfo:
        _todo("host_info")

    def physical_nics(self) -> list[PhysicalNic]:
        _todo("physical_nics")

    def list_domains(self) -> list[DomainInfo]:
        _todo("list_domains")

    def domain_info(self, uuid: str) -> DomainInfo:
        _todo("domain_info")

    def create_domain(self, spec: DomainSpec, paused: bool) -> DomainInfo:
        _todo("create_domain")

    def destroy_domain(self, uuid: str) -> None:
        _todo("destroy_domain")

    def pause_domain(self, uuid: str) -> None:
        _todo("pause_domain")

    def unpause_domain(self, uuid: str) -> None:
        _todo("unpause_domain")

    def shutdown_domain(self, uuid: str, reason: str, timeout: float) -> None:
        _todo("shutdown_domain")

    def reboot_domain(self, uuid: str) -> DomainInfo:
        _todo("reboot_domain")

    def suspend_domain(self, uuid: str, path: str, timeout: float) -> None:
        _todo("suspend_domain")

    def resume_domain(self, spec: DomainSpec, path: str, paused: bool) -> DomainInfo:
        _todo("resume_domain")

    def set_vcpus(self, uuid: str, count: int) -> None:
        _todo("set_vcpus")

    def set_memory_target(self, uuid: str, target: int) -> None:
        _todo("set_memory_target")

    def attach_disk(self, uuid: str, disk: DiskSpec) -> None:
        _todo("attach_disk")

    def detach_disk(self, uuid: str, device: str) -> None:
        _todo("detach_disk")

    def attach_nic(self, uuid: str, nic: NicSpec) -> None:
        _todo("attach_nic")

    def detach_nic(self, uuid: str, devid: int) -> None:
        _todo("detach_nic")

    def read_counters(self) -> Counters:
        _todo("read_counters")
