"""The named pieces of one sampler tick: the segments of sources it records, what each measures,
the marks kept from the previous tick, and the tick's work (:class:`Sample`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from xapid.backend.interface import Counters, DomainInfo


class Segment(NamedTuple):
    """A group of sources of one owner recorded together (a VM's CPU and memory, one disk …)."""

    slots: tuple[int, ...]
    names: tuple[str, ...]
    live: tuple[bool, ...]  # per source, whether a written live field (memory) shows it



class Subject(NamedTuple):
    """What a segment measures: the host, a VM, or one of a VM's disks ("vbd") or network cards ("vif")."""

    kind: str
    vm: Any = None  # the VM object (None for the host)
    device: str = ""


class Placed(NamedTuple):
    """A segment as a tick records it: its owner, its slots, what it measures."""

    owner: str
    segment: Segment
    subject: Subject


class DomainLayout(NamedTuple):
    """A domain handle's VM object, owner and VM segment, reused every tick while the VM is the same."""

    vm: Any
    owner: str
    placed: Placed


class HostMark(NamedTuple):
    """The host's previous tick: its time and idle nanoseconds per physical CPU."""

    t: float
    idle: tuple[int, ...]


class CpuMark:
    """A VM's previous tick (time, domid, domain CPU nanoseconds), updated in place every tick."""

    __slots__ = ("t", "domid", "cpu_ns")

    def __init__(self, t: float, domid: int, cpu_ns: int) -> None:
        self.t, self.domid, self.cpu_ns = t, domid, cpu_ns


class Index(NamedTuple):
    """A tick's sources as arrays: the slot of every value, the first value of every segment,
    and whether a written live field shows the value."""

    idx: np.ndarray
    starts: list[int]
    live: np.ndarray


class Latest(NamedTuple):
    """The slots recorded by the previous tick and their latest values."""

    idx: np.ndarray
    rates: np.ndarray


class Sample:
    """The work of one tick: the raw values in slot order, the segments they fill, and per domain
    handle its layout, per owner its domain's counters, the owners whose domain was rebuilt."""

    __slots__ = ("t", "counters", "host", "raws", "placed", "vms", "doms", "rebuilt")

    def __init__(self, t: float, counters: Counters, host: Any) -> None:
        self.t = t
        self.counters = counters
        self.host = host
        self.raws: list[float] = []
        self.placed: list[Placed] = []
        self.vms: dict[str, DomainLayout] = {}
        self.doms: dict[str, DomainInfo] = {}
        self.rebuilt: list[str] = []
