"""Precomputed per-domain counter frames: what :meth:`SimBackend.read_counters` reports of a domain,
computed once per change of the domain and only advanced by the time at every metrics tick."""

from __future__ import annotations

from typing import Any, Callable

from xapid.backend.interface import DiskCounters, DomainInfo, NicCounters
from xapid.backend.sim.model import IO_REQUEST_SIZE, NS, SimDomain, placement

# The counters are named tuples built for every domain on every tick: made with tuple.__new__
# directly (the same objects as their constructors make, without a Python frame per tuple).
_new: Callable[..., Any] = tuple.__new__

Reported = tuple[DomainInfo, list[DiskCounters], list[NicCounters]]

_NO_IO: dict[str, float] = {}  # a domain's rate overrides when it has none (never written to)


class CounterFrame:
    """What :meth:`SimBackend.read_counters` reports of one domain, precomputed: everything but
    the time since the domain's last checkpoint.  :meth:`at` gives the same values as
    :meth:`SimDomain.info` and :meth:`SimDomain.device_counters` (the same float expressions, so the
    same rounding).  It has two parts: the *static* one (identity, memory, vCPU counts, devices)
    and the *rate* one (checkpoint time, load, accumulators, I/O rates), so a load change — a
    checkpoint — rebuilds only the latter.  :meth:`current` tells whether the domain changed since
    the frame was built (every attribute those read, the device lists and accumulators compared by
    identity and size, the rate overrides by value) and brings the rate part up to date."""

    __slots__ = ("dom", "static", "rate", "io", "usage", "cpu_base_ns", "running", "online", "prefix", "suffix",
                 "disk_keys", "nic_keys", "since", "load", "times", "times_sum", "offline_ns", "disks",
                 "disk_rates", "nics", "nic_rates", "constant")

    def __init__(self, dom: SimDomain, cpus: int) -> None:
        self.dom = dom
        self.static = self._static(dom, cpus)
        self.usage = dom.usage()
        self.cpu_base_ns = dom.cpu_base_ns
        self.running = dom.state == "running"
        online = dom.vcpus
        self.online = online
        self.prefix = (dom.domid, dom.uuid, dom.name, dom.state, dom.shutdown_reason, dom.memory_target,
                       dom.memory_target, dom.memory_max, online, dom.vcpus_max)
        self.suffix = (placement(dom.domid, online, cpus), dom.start_time, dom.domain_type, dom.domid == 0)
        self.disk_keys = [(d["device"], f"vbd:{d['device']}") for d in dom.disks]
        self.nic_keys = [(int(n["devid"]), f"vif:{int(n['devid'])}") for n in dom.nics]
        self._rates(dom)

    @staticmethod
    def _static(dom: SimDomain, cpus: int) -> tuple[Any, ...]:
        return (dom.domid, dom.state, dom.vcpus, dom.vcpus_max, dom.memory_target, dom.memory_max,
                dom.shutdown_reason, dom.name, dom.cpu_base_ns, dom.start_time, cpus, len(dom.vcpu_time_ns),
                dom.disks, len(dom.disks), dom.nics, len(dom.nics))

    @staticmethod
    def _rate(dom: SimDomain) -> tuple[Any, ...]:
        return (dom.since, dom.load, dom.vcpu_time_ns, len(dom.vcpu_time_ns), dom.io_acc, len(dom.io_acc))

    def _rates(self, dom: SimDomain, rate: tuple[Any, ...] | None = None) -> None:
        """(Re)build the rate part from *dom* (*rate*: its :meth:`_rate` key, when already made)."""
        self.rate = self._rate(dom) if rate is None else rate
        self.io = dict(dom.io) if dom.io else _NO_IO
        self.since = dom.since
        self.load = dom.load
        online = self.online
        all_times = dom.vcpu_time_ns
        if len(all_times) == online:
            self.times = tuple(all_times)
            self.offline_ns = 0
        else:
            self.times = tuple(all_times[:online])
            self.offline_ns = sum(all_times[online:])
        self.times_sum = sum(self.times)
        acc, zero = dom.io_acc, (0, 0)
        # the rates as SimDomain.io_rate gives them (the same expression, so the same rounding)
        self.disks = [(device, *acc.get(key, zero)) for device, key in self.disk_keys]
        self.disk_rates = (dom.io_rate("disk_read"), dom.io_rate("disk_write")) if self.disks else (0.0, 0.0)
        self.nics = [(devid, *acc.get(key, zero)) for devid, key in self.nic_keys]
        self.nic_rates = (dom.io_rate("net_rx"), dom.io_rate("net_tx")) if self.nics else (0.0, 0.0)
        # a domain that does not run reports the same counters at any time: computed once
        self.constant: Reported | None = None if self.running else self._compute(0.0)

    def current(self, dom: SimDomain, cpus: int) -> bool:
        """Whether *dom* is still what the static part was built from (if not, the caller builds a
        new frame); the rate part is rebuilt here when only it changed."""
        if dom is not self.dom or self.static != self._static(dom, cpus):
            return False
        rate = self._rate(dom)
        if self.rate != rate or dom.io != self.io:
            self._rates(dom, rate)
        return True

    def at(self, now: float) -> Reported:
        """The domain's info, disk and NIC counters at *now*."""
        if self.constant is not None:
            return self.constant
        return self._compute(max(0.0, now - self.since))

    def into(self, now: float, domains: list[DomainInfo], disks: list[DiskCounters],
             nics: list[NicCounters]) -> DomainInfo:
        """Append the domain's counters at *now* to the three lists (as :meth:`at` gives them, without
        the per-domain lists); returns the domain's info."""
        if self.constant is not None:
            info, d, n = self.constant
            domains.append(info)
            disks += d
            nics += n
            return info
        dt = max(0.0, now - self.since)
        growth = round(self.load * dt * NS)
        domid, uuid, name, state, reason, actual, target, maximum, online, vcpus_max = self.prefix
        vcpu_cpu, start, domain_type, control = self.suffix
        info = _new(DomainInfo, (
            domid, uuid, name, state, reason, actual, target, maximum, online, vcpus_max,
            self.times_sum + growth * online + self.offline_ns,
            tuple([t + growth for t in self.times]) if growth else self.times,
            vcpu_cpu, start, domain_type, control))
        domains.append(info)
        self._devices(dt, disks, nics)
        return info

    def _compute(self, dt: float) -> Reported:
        disks: list[DiskCounters] = []
        nics: list[NicCounters] = []
        if not self.running:
            dt = 0.0
        growth = round(self.load * dt * NS) if self.running else 0
        info: DomainInfo = _new(DomainInfo, self.prefix + (
            self.times_sum + growth * self.online + self.offline_ns,
            tuple([t + growth for t in self.times]) if growth else self.times) + self.suffix)
        self._devices(dt, disks, nics)
        return info, disks, nics

    def _devices(self, dt: float, disks: list[DiskCounters], nics: list[NicCounters]) -> None:
        """Append the disk and NIC counters *dt* seconds after the checkpoint."""
        uuid = self.prefix[1]
        if self.disks:
            rd, wr = round(self.disk_rates[0] * dt), round(self.disk_rates[1] * dt)
            for device, r, w in self.disks:
                r, w = r + rd, w + wr
                disks.append(_new(DiskCounters, (uuid, device, r, w, r // IO_REQUEST_SIZE, w // IO_REQUEST_SIZE)))
        if self.nics:
            rx, tx = round(self.nic_rates[0] * dt), round(self.nic_rates[1] * dt)
            for devid, r, w in self.nics:
                nics.append(_new(NicCounters, (uuid, devid, r + rx, w + tx)))
