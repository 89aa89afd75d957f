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

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xapid.apitypes import utc
from xapid.backend.interface import Counters
from xapid.stats.queries import SourceQueries
from xapid.stats.rates import RATE_CLASSES, LiveRates
from xapid.stats.rrd import HEARTBEAT, RRDTable, write_image
from xapid.stats.sample import (
    CpuMark,
    DomainLayout,
    HostMark,
    Index,
    Latest,
    Placed,
    Sample,
    Segment,
    Subject,
)
from xapid.stats.sources import NAN, UNBOUNDED, WRITTEN, Spec, spec_of, wire_float

__all__ = ["DEFAULT_PERIOD", "MIN_PERIOD", "RRD_FILE", "UNBOUNDED", "Sampler", "Spec", "spec_of", "wire_float"]

log = Logger()

NS = 1_000_000_000
DEFAULT_PERIOD = 5.0
MIN_PERIOD = 1.0
RRD_FILE = "rrd.npz"


def _ignore_live(first: int, classes: list[str], refs: list[str]) -> None:
    """The sampler's batch listener: its own live writes (metrics mods) concern nothing it tracks."""


class Sampler(SourceQueries):
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
        #: called after every tick that succeeded, outside it (the GC policy schedules its collections here)
        self.after_tick: list[Callable[[], None]] = []
        self._loop: LoopingCall | None = None
        self._slots: dict[tuple[str, str], int] = {}
        self._segments: dict[tuple[str, tuple[Any, ...]], Segment] = {}
        self._rates = LiveRates(store, table)  # the rate fields, computed on read
        # per domain handle its layout and per (handle, kind, device) its placed segment, reused
        # every tick so that an unchanged host yields an identical segment list
        self._layouts: dict[str, DomainLayout] = {}
        self._device_segs: dict[tuple[str, str, Any], Placed] = {}
        self._prev_placed: list[Placed] = []
        self._prev_index = Index(np.zeros(0, dtype=np.intp), [], np.zeros(0, dtype=bool))
        self._previous: Latest | None = None  # the slots and latest values of the last tick
        self._domids: dict[str, int] = {}  # VM uuid → domid at the previous tick
        self._prev_host: HostMark | None = None
        self._prev_cpu: dict[str, CpuMark] = {}  # per VM uuid
        self._saving = False
        self._exporting: Deferred[None] | None = None  # fires when a save's copy of the table is done
        self._failing = 0  # consecutive failed ticks
        self._vm_destroyed = True  # look for archives of gone VMs at the next tick (also those restored at start)
        store.subscribe(self._on_change, _ignore_live)  # live batches are metrics mods, never a VM's del
        for cls in RATE_CLASSES:
            store.compute_on_read(cls, self._rates.refresh)

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
        for hook in list(self.after_tick):
            try:
                hook()
            except Exception:  # noqa: BLE001
                log.failure("an after-tick hook failed")
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
        sample = Sample(t, counters, self.store.get(self.host_ref(), "host"))
        self._sample_host(sample)
        self._sample_domains(sample)
        self._sample_devices(sample)
        self._prune(sample)
        index = self._index(sample)
        self._record(sample, index)
        self._publish(sample, index)

    def _sample_host(self, sample: Sample) -> None:
        """The host's sources: cpu<N> and cpu_avg from idle-time deltas, memory, PIF bytes."""
        t, counters, raws = sample.t, sample.counters, sample.raws
        host_owner = f"host:{sample.host.fields['uuid']}"
        idle = tuple(p.idle_time_ns for p in counters.pcpus)
        host_cpu = [NAN] * len(idle)
        prev = self._prev_host
        if prev is not None and len(prev.idle) == len(idle) and 0 < t - prev.t <= HEARTBEAT:
            wall = (t - prev.t) * NS
            host_cpu = [NAN if i1 < i0 else min(1.0, max(0.0, 1.0 - (i1 - i0) / wall))
                        for i0, i1 in zip(prev.idle, idle)]
        self._prev_host = HostMark(t, idle)
        known = [v for v in host_cpu if not math.isnan(v)]
        raws.extend(host_cpu)
        raws.append(sum(known) / len(known) if known and len(known) == len(host_cpu) else NAN)
        raws.append(counters.total_memory / 1024)
        raws.append(counters.free_memory / 1024)
        for pif in counters.pifs:
            raws.append(float(pif.rx_bytes))
            raws.append(float(pif.tx_bytes))
        shape = ("host", tuple(p.number for p in counters.pcpus), tuple(p.device for p in counters.pifs))
        sample.placed.append(Placed(host_owner, self._segment(host_owner, shape), Subject("host")))

    def _sample_domains(self, sample: Sample) -> None:
        """Every VM's sources: vCPU times (DERIVE), cpu_usage from the domain's CPU-time delta, memory;
        notes the VMs whose domain was rebuilt (domid changed)."""
        t, raws, placed, vms, doms, rebuilt = sample.t, sample.raws, sample.placed, sample.vms, sample.doms, \
            sample.rebuilt
        store = self.store
        control = sample.host.fields.get("control_domain")
        prev_cpu, domids, layouts = self._prev_cpu, self._domids, self._layouts
        for dom in sample.counters.domains:
            uuid = dom.uuid
            # The domain handle is the VM uuid, except for the control domain (found through the host).
            vm = store.find(control) if dom.is_control_domain and control else store.by_uuid(uuid)
            if vm is None or vm.cls != "VM":
                continue
            times = dom.vcpu_time_ns
            layout = layouts.get(uuid)
            if layout is None or layout.vm is not vm or len(layout.placed.segment.slots) != len(times) + 3:
                owner = f"vm:{vm.fields['uuid']}"
                layout = layouts[uuid] = DomainLayout(vm, owner, Placed(
                    owner, self._segment(owner, ("vm", len(times))), Subject("vm", vm)))
            owner = layout.owner
            vms[uuid] = layout
            doms[owner] = dom
            domid = dom.domid
            if domids.get(uuid, domid) != domid:
                rebuilt.append(owner)
            domids[uuid] = domid
            raws.extend([ns / NS for ns in times])
            mark = prev_cpu.get(uuid)
            value = NAN
            cpu = dom.cpu_time_ns
            if mark is None:
                prev_cpu[uuid] = CpuMark(t, domid, cpu)
            else:  # updated in place: no new object per VM per tick
                if mark.domid == domid and cpu >= mark.cpu_ns and 0 < t - mark.t <= HEARTBEAT and dom.vcpus:
                    value = (cpu - mark.cpu_ns) / ((t - mark.t) * NS * dom.vcpus)
                mark.t, mark.domid, mark.cpu_ns = t, domid, cpu
            raws += (value, dom.memory_actual, dom.memory_target)
            placed.append(layout.placed)

    def _sample_devices(self, sample: Sample) -> None:
        """The byte and request counters of every disk and network card of a sampled VM (DERIVE)."""
        raws, placed, vms = sample.raws, sample.placed, sample.vms
        devices = self._device_segs
        for disk in sample.counters.disks:
            layout = vms.get(disk.uuid)
            if layout is not None:
                raws += disk[2:]  # read and write bytes, read and write requests
                key: tuple[str, str, str | int] = (disk.uuid, "vbd", disk.device)
                seg = devices.get(key)
                if seg is None or seg.subject.vm is not layout.vm:
                    owner = layout.owner
                    seg = devices[key] = Placed(owner, self._segment(owner, key[1:]),
                                                 Subject("vbd", layout.vm, disk.device))
                placed.append(seg)
        for nic in sample.counters.nics:
            layout = vms.get(nic.uuid)
            if layout is not None:
                raws += nic[2:]  # rx and tx bytes
                key = (nic.uuid, "vif", nic.devid)
                seg = devices.get(key)
                if seg is None or seg.subject.vm is not layout.vm:
                    owner = layout.owner
                    seg = devices[key] = Placed(owner, self._segment(owner, key[1:]),
                                                 Subject("vif", layout.vm, str(nic.devid)))
                placed.append(seg)

    def _prune(self, sample: Sample) -> None:
        """Drop the caches of domains gone since the last tick."""
        vms = sample.vms
        if len(self._layouts) > len(vms) + 16 or len(self._device_segs) > 2 * len(sample.placed) + 16:
            self._layouts = {u: v for u, v in self._layouts.items() if u in vms}
            self._device_segs = {k: v for k, v in self._device_segs.items() if k[0] in vms}
        prev_cpu = self._prev_cpu
        if len(prev_cpu) > len(vms):
            for uuid in [u for u in prev_cpu if u not in vms]:
                del prev_cpu[uuid]  # no domain now: the next one starts a fresh cpu_usage baseline
        # (_domids keeps halted VMs' last domid: a new domain after a halt is detected as rebuilt too)

    def _index(self, sample: Sample) -> Index:
        """The slot arrays of this tick's segments: the previous tick's when the segments are the same."""
        placed = sample.placed
        if placed == self._prev_placed:  # the usual tick: the same sources in the same order
            return self._prev_index
        count = len(sample.raws)
        idx = np.fromiter(itertools.chain.from_iterable(p.segment.slots for p in placed), dtype=np.intp, count=count)
        starts = list(itertools.accumulate((len(p.segment.slots) for p in placed), initial=0))[:-1]
        live = np.fromiter(itertools.chain.from_iterable(p.segment.live for p in placed), dtype=bool, count=count)
        self._prev_placed, self._prev_index = placed, Index(idx, starts, live)
        return self._prev_index

    def _record(self, sample: Sample, index: Index) -> None:
        """One archive update (after dropping the DERIVE baselines of rebuilt domains); then the
        archives of destroyed VMs are forgotten."""
        if sample.rebuilt:
            owners = set(sample.rebuilt)
            self.table.rebase(np.fromiter(itertools.chain.from_iterable(
                p.segment.slots for p in sample.placed if p.owner in owners), dtype=np.intp))
        self.table.update_indexed(sample.t, index.idx, np.array(sample.raws, dtype=np.float64))
        self.ticks += 1
        if self._vm_destroyed:
            self._vm_destroyed = False
            self._forget_destroyed()

    def _publish(self, sample: Sample, index: Index) -> None:
        """Write the live fields of the segments whose written sources changed (all of them when
        the set of sources changed, and those of rebuilt domains)."""
        rates = self.table.latest(index.idx)
        changed = self._changed_segments(index, rates)
        order: Sequence[int]
        if changed is None:
            order = range(len(sample.placed))
        else:
            if sample.rebuilt:
                owners = set(sample.rebuilt)
                changed |= np.fromiter((p.owner in owners for p in sample.placed), dtype=bool,
                                       count=len(sample.placed))
            order = np.flatnonzero(changed).tolist()
        if order:
            self._write_live(sample, order)

    def _segment(self, owner: str, shape: tuple[Any, ...]) -> Segment:
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
            seg = self._segments[key] = Segment(tuple(self._slot(owner, n) for n in names), tuple(names),
                                                 tuple(bool(WRITTEN.fullmatch(n)) for n in names))
        return seg

    def _changed_segments(self, index: Index, rates: np.ndarray) -> np.ndarray | None:
        """Per segment, whether a source shown by a live field has a latest value (*rates*) that
        differs from the previous tick's; None when the set of sources changed (then every
        segment is looked at)."""
        previous = self._previous
        idx = index.idx
        self._previous = Latest(idx, rates)
        if previous is None or (previous.idx is not idx and (previous.idx.shape != idx.shape
                                                             or not np.array_equal(previous.idx, idx))):
            return None
        old = previous.rates
        # the same value give or take float noise (a DERIVE of large counters wobbles in the last bits)
        differs = ~(np.isclose(rates, old, rtol=1e-9, atol=0.0) | (np.isnan(rates) & np.isnan(old)))
        differs &= index.live
        if not index.starts:
            return np.zeros(0, dtype=bool)
        return np.logical_or.reduceat(differs, index.starts)

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
        self._drop_segments({owner})

    def _drop_segments(self, owners: set[str]) -> None:
        """Forget the cached slot groups of *owners* (their slots were freed and may be reused):
        one pass over the caches however many owners go at once."""
        self._segments = {k: v for k, v in self._segments.items() if k[0] not in owners}
        self._layouts = {u: v for u, v in self._layouts.items() if v.owner not in owners}
        self._device_segs = {k: v for k, v in self._device_segs.items() if v.owner not in owners}
        self._prev_placed = []
        self._previous = None

    def _on_change(self, change: Any) -> None:
        self._rates.on_change(change)
        if change.op == "del" and change.cls == "VM":
            self._vm_destroyed = True

    def _forget_destroyed(self) -> None:
        """Drop the archives of VMs that no longer exist (run by the tick after a VM is destroyed);
        the caches are swept once for all of them, so a mass destroy costs no more than linear."""
        gone: set[str] = set()
        for owner in self.table.owners():
            kind, _, uuid = owner.partition(":")
            if kind == "vm" and self.store.by_uuid(uuid) is None:
                self.table.forget_owner(owner)
                self._domids.pop(uuid, None)
                gone.add(owner)
        if gone:
            self._slots = {k: v for k, v in self._slots.items() if k[0] not in gone}
            self._drop_segments(gone)

    def _write_live(self, sample: Sample, order: Sequence[int]) -> None:
        """Write the state fields (memory, vCPU count) of the segments numbered in *order* (those
        whose written sources changed) in one :meth:`Store.live_batch`: at most one event per
        object per tick.  Rates are not written: :meth:`LiveRates.refresh` computes them on read."""
        now = utc(sample.t)
        placed, doms, counters = sample.placed, sample.doms, sample.counters
        with self.store.live_batch() as batch:
            for i in order:
                owner, _, subject = placed[i]
                if subject.kind == "vm":
                    dom = doms[owner]
                    batch.set(subject.vm.fields["metrics"], {"memory_actual": dom.memory_actual,
                                                             "VCPUs_number": dom.vcpus, "last_updated": now})
                elif subject.kind == "host":
                    batch.set(sample.host.fields["metrics"], {"memory_free": counters.free_memory,
                                                              "memory_total": counters.total_memory,
                                                              "last_updated": now})
