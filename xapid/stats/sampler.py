"""The metrics sampler: one batched counter read per tick → RRD archives and live metrics fields.

Every *period* seconds (on the injected clock) :meth:`Sampler.tick` reads
:meth:`IBackend.read_counters` once, turns the counters into xapi's data sources
(``metrics.md`` §3) of the host (owner ``host:<uuid>``) and of every VM with a domain
(owner ``vm:<uuid>``; the domain handle is the VM uuid, so a VM's archives survive its reboots),
records them with a single :meth:`RRDTable.update_indexed`, and keeps the live 1.0 metrics
fields current in two ways:

* state (``VM_metrics.memory_actual``/``VCPUs_number``, ``host_metrics.memory_free``/``memory_total``)
  is written in one ``Store.live_batch``, only for the objects whose value changed, so watchers get
  at most one event per object per tick;
* rates (``VM_metrics.VCPUs_utilisation``, ``host_cpu.utilisation``, ``io_read_kbs``/``io_write_kbs``
  of VBD, VIF and PIF metrics) are computed when the object is read (``Store.compute_on_read``)
  from the latest sample: always current, never an event (xapi moved them to RRDs too), and no
  work per tick.

How each source is derived:

* Cumulative counters (vCPU time, disk bytes and requests, VIF and PIF bytes) are ``DERIVE``
  sources: the table computes Δvalue/Δt and turns a decrease (counter reset, wrap) into one
  unknown step.  When a VM's domain was rebuilt (its domid changed) its DERIVE baselines are
  dropped first (:meth:`RRDTable.rebase`), so a reboot never produces a spike even when the new
  counter happens to exceed the old one.
* Host ``cpu<N>`` (1 − Δidle/Δwall), ``cpu_avg`` and VM ``cpu_usage`` (Δdomain CPU time /
  (Δwall × online vCPUs)) are computed here from integer nanosecond deltas against the previous
  tick and recorded as ``GAUGE`` (unknown on the first tick, after a gap and after a reset).
* Memory sources are ``GAUGE``.

A tick that fails is logged and skipped; the loop goes on.  The table is saved to
``<state_dir>/rrd.npz`` every *save_every* ticks and at :meth:`stop`; the copy and the write
both run through the runner, off the reactor thread.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xapid.apitypes import utc
from xapid.backend.interface import Counters
from xapid.stats.rrd import HEARTBEAT, RRDTable, write_image

log = Logger()

NS = 1_000_000_000
NAN = float("nan")
DEFAULT_PERIOD = 5.0
MIN_PERIOD = 1.0
RRD_FILE = "rrd.npz"


class _Segment(NamedTuple):
    """A group of sources of one owner recorded together (a VM's CPU and memory, one disk …)."""

    slots: tuple[int, ...]
    names: tuple[str, ...]
    live: tuple[bool, ...]  # per source, whether a written live field (memory) shows it


class Spec(NamedTuple):
    """How a data source is archived and described (the ``data_source`` record)."""

    kind: str
    units: str
    min: float
    max: float
    description: str


#: Data source families, by owner kind: (name regex, spec).  ``{0}`` in a description is the
#: name's captured part (CPU number, device).
_FAMILIES: dict[str, list[tuple[re.Pattern[str], Spec]]] = {
    "host": [
        (re.compile(r"cpu(\d+)"), Spec("GAUGE", "(fraction)", 0.0, 1.0, "Physical CPU {0} usage")),
        (re.compile(r"cpu_avg"), Spec("GAUGE", "(fraction)", 0.0, 1.0, "Average physical CPU usage")),
        (re.compile(r"memory_total_kib"), Spec("GAUGE", "KiB", 0.0, NAN, "Total amount of memory in the host")),
        (re.compile(r"memory_free_kib"), Spec("GAUGE", "KiB", 0.0, NAN, "Total amount of free memory")),
        (re.compile(r"pif_(.+)_rx"), Spec("DERIVE", "B/s", 0.0, NAN, "Bytes per second received on physical interface {0}")),
        (re.compile(r"pif_(.+)_tx"), Spec("DERIVE", "B/s", 0.0, NAN, "Bytes per second sent on physical interface {0}")),
    ],
    "vm": [
        (re.compile(r"cpu(\d+)"), Spec("DERIVE", "(fraction)", 0.0, NAN, "CPU{0} usage")),
        (re.compile(r"cpu_usage"), Spec("GAUGE", "(fraction)", 0.0, 1.0, "Domain CPU usage")),
        (re.compile(r"memory"), Spec("GAUGE", "B", 0.0, NAN, "Memory currently allocated to VM")),
        (re.compile(r"memory_target"), Spec("GAUGE", "B", 0.0, NAN, "Target of VM balloon driver")),
        (re.compile(r"vbd_(.+)_read"), Spec("DERIVE", "B/s", 0.0, NAN, "Reads from device {0} in bytes per second")),
        (re.compile(r"vbd_(.+)_write"), Spec("DERIVE", "B/s", 0.0, NAN, "Writes to device {0} in bytes per second")),
        (re.compile(r"vbd_(.+)_iops_read"), Spec("DERIVE", "requests/s", 0.0, NAN, "Read requests per second of device {0}")),
        (re.compile(r"vbd_(.+)_iops_write"), Spec("DERIVE", "requests/s", 0.0, NAN, "Write requests per second of device {0}")),
        (re.compile(r"vif_(\d+)_rx"), Spec("DERIVE", "B/s", 0.0, NAN, "Bytes per second received on virtual interface {0}")),
        (re.compile(r"vif_(\d+)_tx"), Spec("DERIVE", "B/s", 0.0, NAN, "Bytes per second sent on virtual interface {0}")),
    ],
}

#: The displayed upper bound of sources archived without one (a vCPU's DERIVE is left unbounded
#: in the table so that float rounding of Δtime never turns a fully busy vCPU into unknown).
_DISPLAY_MAX = {"(fraction)": 1.0}


#: What the wire shows for a missing bound (XML-RPC and JSON cannot carry NaN or infinities).
UNBOUNDED = float(np.finfo(np.float64).max)


def wire_float(value: float, instead: float) -> float:
    """*value*, or *instead* when it is NaN or infinite (not representable on the wire)."""
    return value if math.isfinite(value) else instead


def spec_of(owner_kind: str, name: str) -> tuple[Spec, str]:
    """The spec and description of the source *name* of an owner kind ("host", "vm"); KeyError if unknown."""
    best: tuple[Spec, str] | None = None
    for pattern, spec in _FAMILIES[owner_kind]:
        m = pattern.fullmatch(name)
        if m:  # later families are more specific (memory_target after memory, iops after read)
            best = (spec, spec.description.format(*m.groups()))
    if best is None:
        raise KeyError(name)
    return best


#: The sources a written field shows (memory_actual, host memory); the rates are computed on read.
_WRITTEN = re.compile(r"memory|memory_total_kib|memory_free_kib")
#: Classes whose rate fields are computed on read, and those whose changes alter where they come from.
_RATE_CLASSES = ("VM_metrics", "host_cpu", "VBD_metrics", "VIF_metrics", "PIF_metrics")
_RATE_OWNERS = frozenset(("VM", "VBD", "VIF", "host", "host_cpu", "PIF"))

_GLOB_CHARS = re.compile(r"[*?\[]")


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> Callable[[str], Any]:
    """A case-sensitive matcher of a shell glob (``fnmatch`` semantics), compiled once."""
    return re.compile(fnmatch.translate(pattern)).match


def _ignore_live(first: int, classes: list[str], refs: list[str]) -> None:
    """The sampler's batch listener: its own live writes (metrics mods) concern nothing it tracks."""


class Sampler:
    """Samples the backend every *period* seconds into *table* and the live metrics objects.

    *hypervisor* is the :class:`xapid.backend.proxy.Hypervisor`; *reactor* the clock for the
    loop; *host_ref* a callable giving the host object's ref; *save_path* (optional) where the
    table is saved every *save_every* ticks and at stop, through *runner*.
    """

    def __init__(self, hypervisor: Any, store: Any, table: RRDTable, reactor: Any, period: float = DEFAULT_PERIOD,
                 *, host_ref: Callable[[], str], save_path: str | Path | None = None, runner: Any = None,
                 save_every: int = 60):
        if period < MIN_PERIOD:
            raise ValueError(f"sampling period {period} below {MIN_PERIOD} s")
        self.hypervisor = hypervisor
        self.store = store
        self.table = table
        self.reactor = reactor
        self.period = float(period)
        self.host_ref = host_ref
        self.save_path = Path(save_path) if save_path is not None else None
        self.runner = runner
        self.save_every = max(1, int(save_every))
        self.ticks = 0
        self.failures = 0
        self._loop: LoopingCall | None = None
        self._slots: dict[tuple[str, str], int] = {}
        self._segments: dict[tuple[str, tuple[Any, ...]], _Segment] = {}
        # objects with rate fields → (kind, owner, sources), built on demand; None = to rebuild
        self._rate_sources: dict[str, tuple[str, str, tuple[str, ...]]] | None = None
        self._rates_fresh: dict[str, float] = {}  # ref → the table's last update it was refreshed at
        self._building = False
        # per domain handle (VM object, owner, its VM segment) and per (handle, kind, device) its
        # segment, reused every tick so that an unchanged host yields an identical segment list
        self._layouts: dict[str, tuple[Any, str, tuple[str, _Segment, Any]]] = {}
        self._device_segs: dict[tuple[str, str, Any], tuple[str, _Segment, Any]] = {}
        self._prev_segs: list[tuple[str, _Segment, Any]] = []
        self._prev_layout: tuple[np.ndarray, list[int], np.ndarray] = (np.zeros(0, dtype=np.intp), [],
                                                                       np.zeros(0, dtype=bool))
        self._previous: tuple[np.ndarray, np.ndarray] | None = None  # (idx, latest values) of the last tick
        self._domids: dict[str, int] = {}  # VM uuid → domid at the previous tick
        self._prev_host: tuple[float, tuple[int, ...]] | None = None  # (t, idle ns per pCPU)
        self._prev_cpu: dict[str, list[Any]] = {}  # VM uuid → [t, domid, cpu ns]
        self._saving = False
        self._exporting: Deferred[None] | None = None  # fires when a save's copy of the table is done
        self._failing = 0  # consecutive failed ticks
        self._vm_destroyed = True  # look for archives of gone VMs at the next tick (also those restored at start)
        store.subscribe(self._on_change, _ignore_live)  # live batches are metrics mods, never a VM's del
        for cls in _RATE_CLASSES:
            store.compute_on_read(cls, self._refresh_rates)

    # ---------------------------------------------------------------------------------- loop

    def start(self) -> None:
        """Tick every period on the injected clock (first tick one period from now)."""
        if self._loop is not None and self._loop.running:
            return
        self._loop = LoopingCall(self._safe_tick)
        self._loop.clock = self.reactor
        self._loop.start(self.period, now=False)

    async def stop(self) -> None:
        """Stop ticking and save the archives (when a save path is set)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.save_path is not None:
            await self.save()

    async def _safe_tick(self) -> None:
        try:
            await self.tick()
        except Exception:  # noqa: BLE001 - one bad tick must not stop the loop
            self.failures += 1
            self._failing += 1
            if self._failing == 1:  # the first of a run of failures in full, then one line per 60
                log.failure("metrics sampling tick failed; skipped")
            elif self._failing % 60 == 0:
                log.warn("metrics sampling still failing ({count} ticks in a row)", count=self._failing)
            return
        if self._failing:
            log.info("metrics sampling recovered after {count} failed ticks", count=self._failing)
            self._failing = 0
        if self.save_path is not None and self.ticks % self.save_every == 0:
            try:
                await self.save()
            except Exception:  # noqa: BLE001
                log.failure("saving the metrics archives failed")

    async def save(self) -> None:
        """Write the table to the save path: copied (:meth:`RRDTable.export`) and written by the
        runner, off the reactor thread; a tick arriving during the copy waits for it."""
        if self.save_path is None or self._saving:
            return
        self._saving = True
        try:
            if self.runner is None:
                self.table.save(self.save_path)
                return
            exported = self._exporting = Deferred()
            try:
                image = await self.runner.run(self.table.export)
            finally:
                self._exporting = None
                exported.callback(None)
            await self.runner.run(write_image, self.save_path, image)
        finally:
            self._saving = False

    # ---------------------------------------------------------------------------------- tick

    async def tick(self) -> None:
        """Read the counters once and record them; raises on failure (the loop logs and skips)."""
        counters: Counters = await self.hypervisor.read_counters()
        while self._exporting is not None:  # a save is copying the table in a worker thread
            await self._exporting
        t = float(counters.timestamp)
        if self.table.last_update is not None and not t > self.table.last_update:
            log.warn("metrics sample at {t} is not after the last one ({last}); skipped", t=t,
                     last=self.table.last_update)
            return
        store = self.store
        host = store.get(self.host_ref(), "host")
        host_owner = f"host:{host.fields['uuid']}"
        segs: list[tuple[str, _Segment, Any]] = []  # (owner, slots, what they measure), in idx order
        raws: list[float] = []

        # -- host
        idle = tuple(p.idle_time_ns for p in counters.pcpus)
        host_cpu = [NAN] * len(idle)
        prev = self._prev_host
        if prev is not None and len(prev[1]) == len(idle) and 0 < t - prev[0] <= HEARTBEAT:
            wall = (t - prev[0]) * NS
            host_cpu = [NAN if i1 < i0 else min(1.0, max(0.0, 1.0 - (i1 - i0) / wall))
                        for i0, i1 in zip(prev[1], idle)]
        self._prev_host = (t, idle)
        known = [v for v in host_cpu if not math.isnan(v)]
        raws.extend(host_cpu)
        raws.append(sum(known) / len(known) if known and len(known) == len(host_cpu) else NAN)
        raws.append(counters.total_memory / 1024)
        raws.append(counters.free_memory / 1024)
        for pif in counters.pifs:
            raws.append(float(pif.rx_bytes))
            raws.append(float(pif.tx_bytes))
        segs.append((host_owner, self._segment(host_owner, ("host", tuple(p.number for p in counters.pcpus),
                                                            tuple(p.device for p in counters.pifs))), ("host",)))

        # -- VMs
        vms: dict[str, Any] = {}  # domain handle → (VM object, owner)
        rebuilt: list[str] = []
        control = host.fields.get("control_domain")
        prev_cpu = self._prev_cpu
        domids = self._domids
        layouts = self._layouts
        doms: dict[str, Any] = {}  # owner → its domain's counters
        for dom in counters.domains:
            uuid = dom.uuid
            # The domain handle is the VM uuid, except for the control domain (found through the host).
            vm = store.find(control) if dom.is_control_domain and control else store.by_uuid(uuid)
            if vm is None or vm.cls != "VM":
                continue
            times = dom.vcpu_time_ns
            layout = layouts.get(uuid)
            if layout is None or layout[0] is not vm or len(layout[2][1].slots) != len(times) + 3:
                owner = f"vm:{vm.fields['uuid']}"
                layout = layouts[uuid] = (vm, owner, (owner, self._segment(owner, ("vm", len(times))), ("vm", vm)))
            owner = layout[1]
            vms[uuid] = layout
            doms[owner] = dom
            domid = dom.domid
            if domids.get(uuid, domid) != domid:
                rebuilt.append(owner)
            domids[uuid] = domid
            raws.extend([ns / NS for ns in times])
            before = prev_cpu.get(uuid)
            value = NAN
            cpu = dom.cpu_time_ns
            if before is None:
                prev_cpu[uuid] = [t, domid, cpu]
            else:  # updated in place: no new object per VM per tick
                if before[1] == domid and cpu >= before[2] and 0 < t - before[0] <= HEARTBEAT and dom.vcpus:
                    value = (cpu - before[2]) / ((t - before[0]) * NS * dom.vcpus)
                before[0], before[1], before[2] = t, domid, cpu
            raws += (value, dom.memory_actual, dom.memory_target)
            segs.append(layout[2])
        devices = self._device_segs
        for disk in counters.disks:
            entry = vms.get(disk.uuid)
            if entry is not None:
                raws += disk[2:]  # read and write bytes, read and write requests
                key: tuple[str, str, str | int] = (disk.uuid, "vbd", disk.device)
                seg = devices.get(key)
                if seg is None or seg[2][1] is not entry[0]:
                    owner = entry[1]
                    seg = devices[key] = (owner, self._segment(owner, key[1:]), ("vbd", entry[0], disk.device))
                segs.append(seg)
        for nic in counters.nics:
            entry = vms.get(nic.uuid)
            if entry is not None:
                raws += nic[2:]  # rx and tx bytes
                key = (nic.uuid, "vif", nic.devid)
                seg = devices.get(key)
                if seg is None or seg[2][1] is not entry[0]:
                    owner = entry[1]
                    seg = devices[key] = (owner, self._segment(owner, key[1:]), ("vif", entry[0], str(nic.devid)))
                segs.append(seg)
        if len(layouts) > len(vms) + 16 or len(devices) > 2 * len(segs) + 16:  # domains gone: drop their caches
            self._layouts = {u: v for u, v in layouts.items() if u in vms}
            self._device_segs = {k: v for k, v in devices.items() if k[0] in vms}
        if len(prev_cpu) > len(vms):
            for uuid in [u for u in prev_cpu if u not in vms]:
                del prev_cpu[uuid]  # no domain now: the next one starts a fresh cpu_usage baseline
        # (_domids keeps halted VMs' last domid: a new domain after a halt is detected as rebuilt too)

        if segs == self._prev_segs:  # the usual tick: the same sources in the same order
            idx, starts, live = self._prev_layout
        else:
            sizes = [len(seg.slots) for _, seg, _ in segs]
            idx = np.fromiter(itertools.chain.from_iterable(seg.slots for _, seg, _ in segs), dtype=np.intp,
                              count=len(raws))
            starts = list(itertools.accumulate(sizes, initial=0))[:-1]
            live = np.fromiter(itertools.chain.from_iterable(seg.live for _, seg, _ in segs), dtype=bool,
                               count=len(raws))
            self._prev_segs, self._prev_layout = segs, (idx, starts, live)
        if rebuilt:
            owners = set(rebuilt)
            self.table.rebase(np.fromiter(itertools.chain.from_iterable(
                seg.slots for o, seg, _ in segs if o in owners), dtype=np.intp))
        self.table.update_indexed(t, idx, np.array(raws, dtype=np.float64))
        self.ticks += 1
        if self._vm_destroyed:
            self._vm_destroyed = False
            self._forget_destroyed()
        rates = self.table.latest(idx)
        changed = self._changed_segments(idx, rates, starts, live)
        order: Sequence[int]
        if changed is None:
            order = range(len(segs))
        else:
            if rebuilt:
                changed |= np.fromiter((o in owners for o, _, _ in segs), dtype=bool, count=len(segs))
            order = np.flatnonzero(changed).tolist()
        if order:
            self._write_live(t, host, counters, doms, segs, order)

    def _segment(self, owner: str, shape: tuple[Any, ...]) -> _Segment:
        """The slots (and names) of one group of an owner's sources, cached by its shape."""
        key = (owner, shape)
        seg = self._segments.get(key)
        if seg is None:
            kind = shape[0]
            if kind == "host":
                names = [f"cpu{n}" for n in shape[1]] + ["cpu_avg", "memory_total_kib", "memory_free_kib"]
                names += [f"pif_{d}_{x}" for d in shape[2] for x in ("rx", "tx")]
            elif kind == "vm":
                names = [f"cpu{i}" for i in range(shape[1])] + ["cpu_usage", "memory", "memory_target"]
            elif kind == "vbd":
                names = [f"vbd_{shape[1]}_{x}" for x in ("read", "write", "iops_read", "iops_write")]
            else:
                names = [f"vif_{shape[1]}_{x}" for x in ("rx", "tx")]
            seg = self._segments[key] = _Segment(tuple(self._slot(owner, n) for n in names), tuple(names),
                                                 tuple(bool(_WRITTEN.fullmatch(n)) for n in names))
        return seg

    def _changed_segments(self, idx: np.ndarray, rates: np.ndarray, starts: list[int],
                          live: np.ndarray) -> np.ndarray | None:
        """Per segment, whether a source shown by a live field (*live*) has a latest value that
        differs from the previous tick's; None when the set of sources changed (then every
        segment is looked at)."""
        previous = self._previous
        self._previous = (idx, rates)
        if previous is None or (previous[0] is not idx and (previous[0].shape != idx.shape
                                                             or not np.array_equal(previous[0], idx))):
            return None
        old = previous[1]
        # the same value give or take float noise (a DERIVE of large counters wobbles in the last bits)
        differs = ~(np.isclose(rates, old, rtol=1e-9, atol=0.0) | (np.isnan(rates) & np.isnan(old)))
        differs &= live
        if not starts:
            return np.zeros(0, dtype=bool)
        return np.logical_or.reduceat(differs, starts)

    def _slot(self, owner: str, name: str) -> int:
        key = (owner, name)
        s = self._slots.get(key)
        if s is None:
            spec, description = spec_of(owner.split(":", 1)[0], name)
            maximum = NAN if spec.kind == "DERIVE" else spec.max
            s = self.table.ensure(owner, name, spec.kind, spec.min, maximum, spec.units, description)
            self._slots[key] = s
        return s

    def forget(self, owner: str, name: str) -> None:
        """Drop a source's archives (forget_data_source_archives); it is recreated by the next tick."""
        self.table.forget(owner, name)
        self._slots.pop((owner, name), None)
        self._drop_segments(owner)

    def _drop_segments(self, owner: str) -> None:
        """Forget the cached slot groups of *owner* (its slots were freed and may be reused)."""
        for key in [k for k in self._segments if k[0] == owner]:
            del self._segments[key]
        self._layouts = {u: v for u, v in self._layouts.items() if v[1] != owner}
        self._device_segs = {k: v for k, v in self._device_segs.items() if v[0] != owner}
        self._prev_segs = []
        self._previous = None

    def _on_change(self, change: Any) -> None:
        cls = change.cls
        if cls in _RATE_OWNERS and (change.op != "mod" or cls in ("VBD", "VIF", "PIF")):
            self._rate_sources = None  # an object added or removed, a device renamed
            self._rates_fresh = {}
        if change.op == "del" and cls == "VM":
            self._vm_destroyed = True

    def _forget_destroyed(self) -> None:
        """Drop the archives of VMs that no longer exist (run by the tick after a VM is destroyed)."""
        for owner in self.table.owners():
            kind, _, uuid = owner.partition(":")
            if kind == "vm" and self.store.by_uuid(uuid) is None:
                self.table.forget_owner(owner)
                self._domids.pop(uuid, None)
                for key in [k for k in self._slots if k[0] == owner]:
                    del self._slots[key]
                self._drop_segments(owner)

    def _write_live(self, t: float, host: Any, counters: Counters, doms: dict[str, Any],
                    segs: list[tuple[str, _Segment, Any]], order: Any) -> None:
        """Write the state fields (memory, vCPU count) of the segments numbered in *order* (those
        whose written sources changed) in one :meth:`Store.live_batch`: at most one event per
        object per tick.  Rates are not written: :meth:`_refresh_rates` computes them on read."""
        now = utc(t)
        with self.store.live_batch() as batch:
            for i in order:
                owner, _, subject = segs[i]
                kind = subject[0]
                if kind == "vm":
                    dom = doms[owner]
                    batch.set(subject[1].fields["metrics"], {"memory_actual": dom.memory_actual,
                                                             "VCPUs_number": dom.vcpus, "last_updated": now})
                elif kind == "host":
                    batch.set(host.fields["metrics"], {"memory_free": counters.free_memory,
                                                       "memory_total": counters.total_memory, "last_updated": now})

    def _refresh_rates(self, obj: Any) -> None:
        """Bring an object's rate fields to the latest sample, in place and without an event, at
        most once per sample: ``VM_metrics.VCPUs_utilisation``, ``host_cpu.utilisation`` and
        ``io_read_kbs``/``io_write_kbs`` of VBD, VIF and PIF metrics (read / rx and write / tx).
        Unknown values leave a field as it was; an object with no archives yet is left alone."""
        last = self.table.last_update
        ref = obj.ref
        if last is None or self._rates_fresh.get(ref) == last or self._building:
            return
        sources = self._rate_sources
        if sources is None:
            self._building = True  # reading host_cpu objects to build the map must not refresh them
            try:
                sources = self._rate_sources = self._build_rate_sources()
            finally:
                self._building = False
        self._rates_fresh[ref] = last
        where = sources.get(ref)
        if where is None:
            return
        kind, owner, names = where
        fields = obj.fields
        row = self.table.latest_row()
        if row is None:  # never: last_update is set
            return
        slot = self.table.slot
        try:
            if kind == "vcpus":
                online = fields.get("VCPUs_number", 0)
                values = [float(row[slot(owner, f"cpu{n}")]) for n in range(online if isinstance(online, int) else 0)]
                if not values or sum(values) != sum(values):  # none, or one unknown
                    return
                fresh: dict[str, Any] = {"VCPUs_utilisation": {str(n): v for n, v in enumerate(values)}}
            elif kind == "cpu":
                value = float(row[slot(owner, names[0])])
                fresh = {"utilisation": value} if value == value else {}
            else:
                read, write = float(row[slot(owner, names[0])]) / 1024, float(row[slot(owner, names[1])]) / 1024
                fresh = {k: v for k, v in (("io_read_kbs", read), ("io_write_kbs", write)) if v == v}
        except KeyError:  # not sampled yet (e.g. a device added since the VM last ran)
            return
        fresh = {k: v for k, v in fresh.items() if fields.get(k) != v}
        if fresh:
            if "last_updated" in fields:
                fresh["last_updated"] = utc(last)
            fields.update(fresh)
            obj.cache.clear()

    def _build_rate_sources(self) -> dict[str, tuple[str, str, tuple[str, ...]]]:
        """Every object with rate fields → (kind, owner, its sources)."""
        store = self.store
        out: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for vm in store.all("VM"):
            out[vm.fields["metrics"]] = ("vcpus", f"vm:{vm.fields['uuid']}", ())
        for cls, names in (("VBD", ("vbd_{}_read", "vbd_{}_write")), ("VIF", ("vif_{}_rx", "vif_{}_tx"))):
            for dev in store.all(cls):
                vm = store.find(dev.fields.get("VM", ""))
                device = dev.fields.get("device")
                if vm is not None and device:
                    out[dev.fields["metrics"]] = ("io", f"vm:{vm.fields['uuid']}",
                                                  (names[0].format(device), names[1].format(device)))
        hosts = {h.ref: f"host:{h.fields['uuid']}" for h in store.all("host")}
        for cpu in store.all("host_cpu"):
            if cpu.fields.get("host") in hosts:
                out[cpu.ref] = ("cpu", hosts[cpu.fields["host"]], (f"cpu{cpu.fields['number']}",))
        for pif in store.all("PIF"):
            if pif.fields.get("physical") and pif.fields.get("host") in hosts:
                device = pif.fields["device"]
                out[pif.fields["metrics"]] = ("io", hosts[pif.fields["host"]], (f"pif_{device}_rx", f"pif_{device}_tx"))
        return out

    # ------------------------------------------------------------------------------- queries

    def data_sources(self, owner: str) -> list[dict[str, Any]]:
        """The ``data_source`` records of *owner* ("vm:<uuid>", "host:<uuid>")."""
        kind = owner.split(":", 1)[0]
        out = []
        for ds in self.table.sources(owner):
            try:
                spec, _ = spec_of(kind, ds.name)
                maximum = spec.max
            except KeyError:
                maximum = ds.max
            if math.isnan(maximum):
                maximum = _DISPLAY_MAX.get(ds.units, NAN)
            out.append({"name_label": ds.name, "name_description": ds.description, "enabled": True,
                        "standard": True, "units": ds.units, "min": wire_float(ds.min, -UNBOUNDED),
                        "max": wire_float(maximum, UNBOUNDED), "value": self.value(owner, ds.name)})
        return out

    def value(self, owner: str, name: str) -> float:
        """The latest value of a source for the wire: 0.0 while unknown (KeyError if no such source)."""
        return wire_float(self.table.last(owner, name), 0.0)

    def has(self, owner: str, name: str) -> bool:
        try:
            self.table.slot(owner, name)
        except KeyError:
            return False
        return True

    def select(self, pattern: str) -> list[tuple[str, str]]:
        """The (owner, name) keys matching ``<owner>:<uuid or glob>:<name glob>``; ValueError if malformed."""
        parts = pattern.split(":")
        if len(parts) != 3 or parts[0] not in ("vm", "host") or not parts[1] or not parts[2]:
            raise ValueError(pattern)
        kind, uuid_glob, name_glob = parts
        table = self.table
        if _GLOB_CHARS.search(uuid_glob):
            uuid_match = _glob(uuid_glob)
            prefix = kind + ":"
            owners = [o for o in table.owners() if o.startswith(prefix) and uuid_match(o[len(prefix):])]
        else:  # one owner: no scan
            owners = [f"{kind}:{uuid_glob}"]
        if name_glob == "*":
            return [(owner, name) for owner in owners for name in table.names(owner)]
        name_match = _glob(name_glob)
        return [(owner, name) for owner in owners for name in table.names(owner) if name_match(name)]

    def cooked(self, keys: list[tuple[str, str]], window: float, cf: str) -> dict[str, float]:
        """``{"<owner>:<uuid>:<name>": value}`` consolidated over the last *window* s; unknown values omitted."""
        if not keys:
            return {}
        values = self.table.average(keys, window, cf)
        return {f"{o}:{n}": v for (o, n), v in zip(keys, values.tolist()) if v == v}  # NaN (unknown) left out
