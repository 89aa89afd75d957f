"""The domain table of the ``xen`` driver: one ``xc_domain_getinfolist`` read as :class:`DomainInfo`."""

from __future__ import annotations

from xapid.backend.interface import BackendError, DomainInfo
from xapid.backend.xen.core import XenCore, state_of
from xapid.backend.xen.libs import XenError
from xapid.backend.xen.xenctrl import (
    XcDomainInfo,
    XEN_DOMINF_hvm_guest,
    XEN_DOMINF_shutdown,
)
from xapid.constants import PAGE, KiB


class DomainTable(XenCore):
    """Domains as :class:`DomainInfo` (build records first, xenstore for the others)."""

    # -- domains -----------------------------------------------------------------------

    def _info(self, raw: XcDomainInfo) -> DomainInfo:
        xc = self._ctrl()
        domid = raw.domain
        uuid = raw.uuid
        record = self._record(uuid) if domid else {}
        spec = record.get("spec", {})
        online = raw.nr_online_vcpus
        vcpu_times, vcpu_cpus = [], []
        for vcpu in range(raw.max_vcpu_id + 1):
            try:
                info = xc.vcpu_getinfo(domid, vcpu)
            except XenError:
                continue
            if info.online:
                vcpu_times.append(info.cpu_time)
                vcpu_cpus.append(info.cpu)
        target = record.get("memory_target") or raw.tot_pages * PAGE
        name = spec.get("name", "")
        xs = self._store()
        if not record:  # a domain xapid did not build (or dom0): ask xenstore
            try:
                target = int(xs.read(f"/local/domain/{domid}/memory/target")) * KiB
            except (XenError, ValueError):
                pass
        if not name:
            try:
                name = xs.read(f"/local/domain/{domid}/name").decode(errors="replace")
            except XenError:
                name = "Domain-0" if domid == 0 else ""
        kind = spec.get("domain_type") or ("hvm" if raw.flags & XEN_DOMINF_hvm_guest else "pv")
        return DomainInfo(
            domid=domid, uuid=uuid, name=name, state=state_of(raw),
            shutdown_reason=raw.shutdown_reason if raw.flags & XEN_DOMINF_shutdown else "",  # type: ignore[arg-type]  # a code newer than Xen 4.17's comes as its number
            memory_actual=raw.tot_pages * PAGE, memory_target=target,
            memory_max=int(spec.get("memory_static_max") or self._unbuilt_max(raw)),
            vcpus=online, vcpus_max=raw.max_vcpu_id + 1, cpu_time_ns=raw.cpu_time + record.get("cpu_offset", 0),
            vcpu_time_ns=tuple(vcpu_times), vcpu_cpu=tuple(vcpu_cpus),
            start_time=record.get("start_time", 0.0), domain_type=kind, is_control_domain=domid == 0,
        )

    def _unbuilt_max(self, raw: XcDomainInfo) -> int:
        """The static maximum (bytes) of a domain xapid did not build, dom0 above all: xenstore's
        ``memory/static-max`` (KiB), else the hypervisor ceiling — which for a dom0 without
        ``dom0_mem=…,max:`` is "unlimited" (~0 pages), so never above the host's memory."""
        try:
            return int(self._store().read(f"/local/domain/{raw.domain}/memory/static-max")) * KiB
        except (XenError, ValueError, BackendError):
            pass
        try:
            total = self._ctrl().physinfo().total_pages
        except XenError:
            total = raw.max_pages
        return min(raw.max_pages, total) * PAGE

    def list_domains(self) -> list[DomainInfo]:
        """Every domain, dom0 included, ordered by domid (one ``xc_domain_getinfolist``)."""
        return [self._info(raw) for raw in self._raw_domains()]

    def domain_info(self, uuid: str) -> DomainInfo:
        """One domain by handle; NoSuchDomain when absent."""
        return self._info(self._find(uuid))
