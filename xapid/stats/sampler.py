"""The metrics sampler: one batched counter read per tick → RRD archives and live metrics fields.

Every *period* seconds (on the injected clock) :meth:`Sampler.tick` reads
:meth:`IBackend.read_counters` once, turns the counters into xapi's data sources
(``metrics.md`` §3) of the host (owner ``host:<uuid>``) and of every VM with a domain
(owner ``vm:<uuid>``; the domain handle is the VM uuid, so a VM's archives survive its reboots),
records them with a single :meth:`RRDTable.update_indexed`, and writes the live 1.0 metrics
fields (VM_metrics, host_cpu, host_metrics, VBD_metrics, VIF_metrics, PIF_metrics) — one
``store.update`` per object per tick, only when a value changed.

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
``<state_dir>/rrd.npz`` every *save_every* ticks and at :meth:`stop`, through the runner (the
reactor thread only copies the arrays).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xapid.backend.interface import Counters
from xapid.stats.rrd import HEARTBEAT, RRDTable

log = Logger()

NS = 1_000_000_000
NAN = float("nan")
DEFAULT_PERIOD = 5.0
MIN_PERIOD = 1.0
RRD_FILE = "rrd.npz"


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
        self._domids: dict[str, int] = {}  # VM uuid → domid at the previous tick
        self._prev_host: tuple[float, tuple[int, ...]] | None = None  # (t, idle ns per pCPU)
        self._prev_cpu: dict[str, tuple[float, int, int]] = {}  # VM uuid → (t, domid, cpu ns)
        self._saving = False
        self._failing = 0  # consecutive failed ticks

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
        """Write the table to the save path: copied on the reactor thread, written by the runner."""
        if self.save_path is None or self._saving:
            return
        self._saving = True
        try:
            snapshot = copy.deepcopy(self.table)
            if self.runner is not None:
                await self.runner.run(snapshot.save, self.save_path)
            else:
                snapshot.save(self.save_path)
        finally:
            self._saving = False

    # ---------------------------------------------------------------------------------- tick

    async def tick(self) -> None:
        """Read the counters once and record them; raises on failure (the loop logs and skips)."""
        counters: Counters = await self.hypervisor.call("read_counters")
        t = float(counters.timestamp)
        if self.table.last_update is not None and not t > self.table.last_update:
            log.warn("metrics sample at {t} is not after the last one ({last}); skipped", t=t,
                     last=self.table.last_update)
            return
        store = self.store
        host = store.get(self.host_ref(), "host")
        host_owner = f"host:{host.fields['uuid']}"
        keys: list[tuple[str, str]] = []
        raws: list[float] = []

        def put(owner: str, name: str, raw: float) -> None:
            keys.append((owner, name))
            raws.append(raw)

        # -- host
        idle = tuple(p.idle_time_ns for p in counters.pcpus)
        host_cpu = [NAN] * len(idle)
        prev = self._prev_host
        if prev is not None and len(prev[1]) == len(idle) and 0 < t - prev[0] <= HEARTBEAT:
            wall = (t - prev[0]) * NS
            host_cpu = [NAN if i1 < i0 else min(1.0, max(0.0, 1.0 - (i1 - i0) / wall))
                        for i0, i1 in zip(prev[1], idle)]
        self._prev_host = (t, idle)
        for p, value in zip(counters.pcpus, host_cpu):
            put(host_owner, f"cpu{p.number}", value)
        known = [v for v in host_cpu if not math.isnan(v)]
        put(host_owner, "cpu_avg", sum(known) / len(known) if known and len(known) == len(host_cpu) else NAN)
        put(host_owner, "memory_total_kib", counters.total_memory / 1024)
        put(host_owner, "memory_free_kib", counters.free_memory / 1024)
        for pif in counters.pifs:
            put(host_owner, f"pif_{pif.device}_rx", float(pif.rx_bytes))
            put(host_owner, f"pif_{pif.device}_tx", float(pif.tx_bytes))

        # -- VMs
        vms: dict[str, Any] = {}
        rebuilt: list[str] = []
        usage: dict[str, float] = {}
        control = host.fields.get("control_domain")
        for dom in counters.domains:
            # The domain handle is the VM uuid, except for the control domain (found through the host).
            vm = store.find(control) if dom.is_control_domain and control else store.by_uuid(dom.uuid)
            if vm is None or vm.cls != "VM":
                continue
            owner = f"vm:{vm.fields['uuid']}"
            vms[dom.uuid] = (vm, dom, owner)
            if self._domids.get(dom.uuid, dom.domid) != dom.domid:
                rebuilt.append(owner)
            self._domids[dom.uuid] = dom.domid
            for i, ns in enumerate(dom.vcpu_time_ns):
                put(owner, f"cpu{i}", ns / NS)
            before = self._prev_cpu.get(dom.uuid)
            value = NAN
            if before is not None and before[1] == dom.domid and dom.cpu_time_ns >= before[2] \
                    and 0 < t - before[0] <= HEARTBEAT and dom.vcpus:
                value = (dom.cpu_time_ns - before[2]) / ((t - before[0]) * NS * dom.vcpus)
            self._prev_cpu[dom.uuid] = (t, dom.domid, dom.cpu_time_ns)
            usage[dom.uuid] = value
            put(owner, "cpu_usage", value)
            put(owner, "memory", float(dom.memory_actual))
            put(owner, "memory_target", float(dom.memory_target))
        for disk in counters.disks:
            if disk.uuid in vms:
                owner = vms[disk.uuid][2]
                put(owner, f"vbd_{disk.device}_read", float(disk.read_bytes))
                put(owner, f"vbd_{disk.device}_write", float(disk.write_bytes))
                put(owner, f"vbd_{disk.device}_iops_read", float(disk.read_reqs))
                put(owner, f"vbd_{disk.device}_iops_write", float(disk.write_reqs))
        for nic in counters.nics:
            if nic.uuid in vms:
                owner = vms[nic.uuid][2]
                put(owner, f"vif_{nic.devid}_rx", float(nic.rx_bytes))
                put(owner, f"vif_{nic.devid}_tx", float(nic.tx_bytes))
        for uuid in list(self._prev_cpu):
            if uuid not in vms:  # no domain now: the next one starts a fresh cpu_usage baseline
                self._prev_cpu.pop(uuid)
        # (_domids keeps halted VMs' last domid: a new domain after a halt is detected as rebuilt too)

        idx = np.fromiter((self._slot(o, n) for o, n in keys), dtype=np.intp, count=len(keys))
        raw = np.array(raws, dtype=np.float64)
        if rebuilt:
            owners = set(rebuilt)
            self.table.rebase(np.array([s for (o, _), s in zip(keys, idx) if o in owners], dtype=np.intp))
        self.table.update_indexed(t, idx, raw)
        self.ticks += 1
        self._forget_destroyed()
        rates = dict(zip(keys, self.table.latest(idx).tolist()))
        self._write_live(t, host, host_owner, host_cpu, counters, vms, rates)

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

    def _forget_destroyed(self) -> None:
        """Drop the archives of VMs that no longer exist."""
        for owner in self.table.owners():
            kind, _, uuid = owner.partition(":")
            if kind == "vm" and self.store.by_uuid(uuid) is None:
                self.table.forget_owner(owner)
                self._domids.pop(uuid, None)
                for key in [k for k in self._slots if k[0] == owner]:
                    del self._slots[key]

    def _write_live(self, t: float, host: Any, host_owner: str, host_cpu: list[float], counters: Counters,
                    vms: dict[str, Any], rates: dict[tuple[str, str], float]) -> None:
        """Update the live metrics objects: one update per object, only when something changed."""
        store = self.store
        now = datetime.fromtimestamp(int(t), tz=timezone.utc)

        def write(ref: str, cls: str, values: dict[str, Any]) -> None:
            obj = store.find(ref)
            if obj is None or obj.cls != cls:
                return
            values = {k: v for k, v in values.items()
                      if not (isinstance(v, float) and math.isnan(v)) and obj.fields.get(k) != v}
            if values:
                store.update(ref, {**values, "last_updated": now} if "last_updated" in obj.fields else values)

        with store.transaction():
            by_number = {o.fields["number"]: o.ref for o in store.all("host_cpu") if o.fields["host"] == host.ref}
            for p, value in zip(counters.pcpus, host_cpu):
                if p.number in by_number:
                    write(by_number[p.number], "host_cpu", {"utilisation": value})
            write(host.fields["metrics"], "host_metrics",
                  {"memory_free": counters.free_memory, "memory_total": counters.total_memory})
            pifs = {o.fields["device"]: o.fields["metrics"] for o in store.all("PIF")
                    if o.fields.get("physical") and o.fields.get("host") == host.ref}
            for pif in counters.pifs:
                if pif.device in pifs:
                    write(pifs[pif.device], "PIF_metrics", _io_kbs(rates, host_owner, f"pif_{pif.device}_rx",
                                                                    f"pif_{pif.device}_tx"))
            for vm, dom, owner in vms.values():
                utilisation = {str(i): rates[(owner, f"cpu{i}")] for i in range(len(dom.vcpu_time_ns))}
                values: dict[str, Any] = {"memory_actual": dom.memory_actual, "VCPUs_number": dom.vcpus}
                if not any(math.isnan(v) for v in utilisation.values()):
                    values["VCPUs_utilisation"] = utilisation
                write(vm.fields["metrics"], "VM_metrics", values)
                for vbd_ref in vm.fields.get("VBDs", ()):
                    vbd = store.find(vbd_ref)
                    if vbd is None or (owner, f"vbd_{vbd.fields['device']}_read") not in rates:
                        continue
                    dev = vbd.fields["device"]
                    write(vbd.fields["metrics"], "VBD_metrics",
                          _io_kbs(rates, owner, f"vbd_{dev}_read", f"vbd_{dev}_write"))
                for vif_ref in vm.fields.get("VIFs", ()):
                    vif = store.find(vif_ref)
                    if vif is None or (owner, f"vif_{vif.fields['device']}_rx") not in rates:
                        continue
                    dev = vif.fields["device"]
                    write(vif.fields["metrics"], "VIF_metrics", _io_kbs(rates, owner, f"vif_{dev}_rx", f"vif_{dev}_tx"))

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
        keys = []
        for owner in self.table.owners():
            okind, _, uuid = owner.partition(":")
            if okind == kind and fnmatch.fnmatchcase(uuid, uuid_glob):
                keys.extend((owner, ds.name) for ds in self.table.sources(owner)
                            if fnmatch.fnmatchcase(ds.name, name_glob))
        return keys

    def cooked(self, keys: list[tuple[str, str]], window: float, cf: str) -> dict[str, float]:
        """``{"<owner>:<uuid>:<name>": value}`` consolidated over the last *window* s; unknown values omitted."""
        if not keys:
            return {}
        values = self.table.average(keys, window, cf)
        return {f"{o}:{n}": float(v) for (o, n), v in zip(keys, values.tolist()) if not math.isnan(v)}


def _io_kbs(rates: dict[tuple[str, str], float], owner: str, read: str, write: str) -> dict[str, float]:
    """The 1.0 ``io_read_kbs``/``io_write_kbs`` fields (KiB/s) from two byte-rate sources."""
    return {"io_read_kbs": rates[(owner, read)] / 1024, "io_write_kbs": rates[(owner, write)] / 1024}
