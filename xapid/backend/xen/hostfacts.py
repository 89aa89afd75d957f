"""Host facts of the ``xen`` driver: physical CPUs, memory, DMI strings and network cards."""

from __future__ import annotations

import os
import pathlib
import socket
from typing import Any

from xapid.backend.interface import HostInfo, PhysicalCPU, PhysicalNic
from xapid.backend.xen.core import XenCore, read_int
from xapid.constants import PAGE


class HostFacts(XenCore):
    """What :class:`HostInfo`, :class:`PhysicalCPU` and :class:`PhysicalNic` report."""

    # -- host --------------------------------------------------------------------------

    def physical_cpus(self) -> list[PhysicalCPU]:
        """Every physical CPU with its cumulative idle time (``xc_getcpuinfo``)."""
        return self._pcpus(self._ctrl().physinfo())

    def _pcpus(self, phys: Any) -> list[PhysicalCPU]:
        """``xc_getcpuinfo`` over CPU ids 0..max_cpu_id: entry *i* is CPU *i* as the hypervisor
        numbers it (ids may have holes: ``nr_cpus`` counts CPUs, it is no bound on their ids)."""
        ids = max(phys.nr_cpus, phys.max_cpu_id + 1)
        return [PhysicalCPU(n, idle) for n, idle in enumerate(self._ctrl().cpu_idle_times(ids))]

    def host_info(self) -> HostInfo:
        """Host facts from ``xc_physinfo``/``xc_version``, ``/proc/cpuinfo`` and the DMI tables."""
        xc = self._ctrl()
        phys = xc.physinfo()
        cpu = self._cpuinfo()
        sockets = max(1, phys.nr_cpus // max(1, phys.cores_per_socket * phys.threads_per_core))
        dmi = self._sysfs / "class" / "dmi" / "id"
        bios = {key: value for key, name in (("bios-vendor", "bios_vendor"), ("bios-version", "bios_version"),
                                             ("system-manufacturer", "sys_vendor"),
                                             ("system-product-name", "product_name"),
                                             ("system-serial-number", "product_serial"))
                if (value := self._text(dmi / name))}
        return HostInfo(
            hostname=socket.gethostname(),
            address=self._address(),
            total_memory=phys.total_pages * PAGE,
            xen_version=self.xen_version,
            capabilities=tuple(xc.capabilities().split()),
            sched_policy=xc.sched_id(),
            cpu_count=phys.nr_cpus,
            socket_count=sockets,
            cores_per_socket=phys.cores_per_socket,
            threads_per_core=phys.threads_per_core,
            cpu_vendor=cpu.get("vendor_id", ""),
            cpu_model_name=cpu.get("model name", ""),
            cpu_speed_mhz=phys.cpu_khz // 1000,
            cpu_family=int(cpu.get("cpu family", "0") or 0),
            cpu_model=int(cpu.get("model", "0") or 0),
            cpu_stepping=int(cpu.get("stepping", "0") or 0),
            cpu_flags=cpu.get("flags", ""),
            cpu_features=" ".join(f"{word:08x}" for word in phys.hw_cap),
            bios_strings=bios,
        )

    def _cpuinfo(self) -> dict[str, str]:
        """The first processor's entries of ``/proc/cpuinfo``."""
        facts: dict[str, str] = {}
        for line in self._text(self._procfs / "cpuinfo").splitlines():
            if not line.strip():
                if facts:
                    break
                continue
            key, _, value = line.partition(":")
            facts.setdefault(key.strip(), value.strip())
        return facts

    @staticmethod
    def _text(path: pathlib.Path) -> str:
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    @staticmethod
    def _address() -> str:
        """The address of the interface holding the default route (no packet is sent)."""
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("192.0.2.1", 9))
                return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"

    def physical_nics(self) -> list[PhysicalNic]:
        """Interfaces under ``/sys/class/net`` backed by a device (not bridges, vifs or loopback)."""
        nics = []
        base = self._sysfs / "class" / "net"
        for entry in sorted(base.iterdir()) if base.is_dir() else []:
            if not (entry / "device").exists():
                continue
            speed = read_int(entry / "speed")
            nics.append(PhysicalNic(
                device=entry.name, mac=self._text(entry / "address"), mtu=read_int(entry / "mtu"),
                carrier=read_int(entry / "carrier") == 1, speed=max(0, speed),
                duplex=self._text(entry / "duplex") == "full",
                pci_bus_path=os.path.basename(os.path.realpath(entry / "device")),
            ))
        return nics
