"""Performance counters of the ``xen`` driver: domains, pCPUs, blkback, netback and host NICs."""

from __future__ import annotations

from twisted.logger import Logger

from xapid.backend.interface import (
    BackendError,
    Counters,
    DiskCounters,
    NicCounters,
    PifCounters,
)
from xapid.backend.xen.core import read_int
from xapid.backend.xen.devices import Devices
from xapid.backend.xen.domains import DomainTable
from xapid.backend.xen.hostfacts import HostFacts
from xapid.backend.xen.libs import XenError
from xapid.constants import PAGE

log = Logger()


class CounterReader(DomainTable, Devices, HostFacts):
    """One :class:`Counters` snapshot per sampler tick."""

    # -- counters ----------------------------------------------------------------------

    def read_counters(self) -> Counters:
        """One ``xc_domain_getinfolist`` for every domain, plus pCPU idle times, blkback and netback statistics."""
        xc = self._ctrl()
        phys = xc.physinfo()
        domains = []
        for raw in xc.domain_getinfolist():  # one domain that cannot be read is skipped, not the tick
            try:
                domains.append(self._info(raw))
            except (BackendError, XenError, OSError) as exc:
                log.debug("counters: skipping domain {domid}: {error}", domid=raw.domain, error=str(exc))
        disks: list[DiskCounters] = []
        nics: list[NicCounters] = []
        devices = self._sysfs / "bus" / "xen-backend" / "devices"
        net = self._sysfs / "class" / "net"
        for dom in domains:
            if dom.domid == 0:
                continue
            try:
                devices_of = self._device_ids(dom)
                nic_ids = self._nic_ids(dom)
            except (BackendError, XenError, OSError) as exc:
                log.debug("counters: no devices of domain {domid}: {error}", domid=dom.domid, error=str(exc))
                continue
            for device, devid in devices_of.items():
                stats = devices / f"vbd-{dom.domid}-{devid}" / "statistics"
                disks.append(DiskCounters(dom.uuid, device, read_int(stats / "rd_sect") * 512,
                                          read_int(stats / "wr_sect") * 512, read_int(stats / "rd_req"),
                                          read_int(stats / "wr_req")))
            for devid in nic_ids:
                stats = net / f"vif{dom.domid}.{devid}" / "statistics"
                # the backend's transmit is the guest's receive
                nics.append(NicCounters(dom.uuid, int(devid), read_int(stats / "tx_bytes"),
                                        read_int(stats / "rx_bytes")))
        try:
            pifs = [PifCounters(nic.device, read_int(net / nic.device / "statistics" / "rx_bytes"),
                                read_int(net / nic.device / "statistics" / "tx_bytes"))
                    for nic in self.physical_nics()]
        except OSError as exc:
            log.debug("counters: no physical interfaces: {error}", error=str(exc))
            pifs = []
        try:
            pcpus = self._pcpus(phys)
        except XenError as exc:
            log.debug("counters: no physical CPU times: {error}", error=str(exc))
            pcpus = []
        return Counters(
            timestamp=self._clock(), domains=tuple(domains),
            pcpus=tuple(pcpus),
            free_memory=phys.free_pages * PAGE, total_memory=phys.total_pages * PAGE,
            disks=tuple(disks), nics=tuple(nics), pifs=tuple(pifs),
        )
