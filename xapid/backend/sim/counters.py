"""Precomputed per-domain counter frames: what :meth:`SimBackend.read_counters` reports of a domain,
computed once per change of the domain and only advanced by the time at every metrics tick."""

from __future__ import annotations

from typing import Any

from xapid.backend.interface import DiskCounters, DomainInfo, NicCounters
from xapid.backend.sim.model import IO_RATES, IO_REQUEST_SIZE, NS, SimDomain, placement


class CounterFrame:
    """What :meth:`SimBackend.read_counters` reports of one domain, precomputed: everything but
    the time since the domain's last checkpoint.  :meth:`at` gives the same values as
    :meth:`SimDomain.info` and :meth:`SimDomain.device_counters` (the same float expressions, so the
    same rounding); :meth:`fits` tells whether the domain changed since the frame was built
    (every attribute those read, the device lists and rate maps compared by identity and size)."""

    __slots__ = ("dom", "key", "io", "usage", "cpu_base_ns", "running", "since", "load", "prefix", "suffix",
                 "online", "times", "offline_ns", "disks", "disk_rates", "nics", "nic_rates", "constant")

    def __init__(self, dom: SimDomain, cpus: int) -> None:
        self.dom = dom
        self.key = self._key(dom, cpus)
        self.io = dict(dom.io)
        self.usage = dom.usage()
        self.cpu_base_ns = dom.cpu_base_ns
        self.running = dom.state == "running"
        self.since = dom.since
        self.load = dom.load
        online = dom.vcpus
        self.online = online
        self.times = tuple(dom.vcpu_time_ns[:online])
        self.offline_ns = sum(dom.vcpu_time_ns[online:])
        self.prefix = (dom.domid, dom.uuid, dom.name, dom.state, dom.shutdown_reason, dom.memory_target,
                       dom.memory_target, dom.memory_max, online, dom.vcpus_max)
        self.suffix = (placement(dom.domid, online, cpus), dom.start_time, dom.domain_type, dom.domid == 0)
        acc, io, load, zero = dom.io_acc, dom.io, dom.load, (0, 0)
        self.disks = [(d["device"], *acc.get(f"vbd:{d['device']}", zero)) for d in dom.disks]
        self.disk_rates = ((io["disk_read"] if "disk_read" in io else load * IO_RATES["disk_read"]),
                           (io["disk_write"] if "disk_write" in io else load * IO_RATES["disk_write"]))
        self.nics = [(int(n["devid"]), *acc.get(f"vif:{int(n['devid'])}", zero)) for n in dom.nics]
        self.nic_rates = ((io["net_rx"] if "net_rx" in io else load * IO_RATES["net_rx"]),
                          (io["net_tx"] if "net_tx" in io else load * IO_RATES["net_tx"]))
        # a domain that does not run reports the same counters at any time: computed once
        self.constant: tuple[DomainInfo, list[DiskCounters], list[NicCounters]] | None = \
            None if self.running else self._compute(0.0)

    @staticmethod
    def _key(dom: SimDomain, cpus: int) -> tuple[Any, ...]:
        return (dom.domid, dom.state, dom.since, dom.load, dom.vcpus, dom.vcpus_max, dom.memory_target,
                dom.memory_max, dom.shutdown_reason, dom.name, dom.cpu_base_ns, dom.start_time, cpus,
                dom.vcpu_time_ns, len(dom.vcpu_time_ns), dom.disks, len(dom.disks), dom.nics, len(dom.nics),
                dom.io_acc, len(dom.io_acc))

    def fits(self, dom: SimDomain, cpus: int) -> bool:
        """Whether *dom* is still what this frame was built from (the element tuples compare
        mutable members by identity first, hence their sizes too; the rate overrides by value)."""
        return dom is self.dom and self.key == self._key(dom, cpus) and dom.io == self.io

    def at(self, now: float) -> tuple[DomainInfo, list[DiskCounters], list[NicCounters]]:
        """The domain's info, disk and NIC counters at *now*."""
        if self.constant is not None:
            return self.constant
        return self._compute(max(0.0, now - self.since))

    def _compute(self, dt: float) -> tuple[DomainInfo, list[DiskCounters], list[NicCounters]]:
        growth = round(self.load * dt * NS) if self.running else 0
        times = tuple([t + growth for t in self.times])
        cpu = sum(times) + self.offline_ns
        info = DomainInfo._make(self.prefix + (cpu, times) + self.suffix)
        uuid = self.prefix[1]
        disks: list[DiskCounters] = []
        nics: list[NicCounters] = []
        if not self.running:
            dt = 0.0
        if self.disks:
            rd, wr = round(self.disk_rates[0] * dt), round(self.disk_rates[1] * dt)
            for device, r, w in self.disks:
                r, w = r + rd, w + wr
                disks.append(DiskCounters(uuid, device, r, w, r // IO_REQUEST_SIZE, w // IO_REQUEST_SIZE))
        if self.nics:
            rx, tx = round(self.nic_rates[0] * dt), round(self.nic_rates[1] * dt)
            nics = [NicCounters(uuid, devid, r + rx, w + tx) for devid, r, w in self.nics]
        return info, disks, nics
