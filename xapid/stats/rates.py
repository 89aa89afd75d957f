"""Rate fields computed on read: ``VM_metrics.VCPUs_utilisation``, ``host_cpu.utilisation`` and
``io_read_kbs``/``io_write_kbs`` of VBD, VIF and PIF metrics, brought to the latest sample when an
object is read (``Store.compute_on_read``): always current, never an event, no work per tick.

Where each object's rates come from (its sampler owner and source names) is kept in a map built once
and then kept current one object at a time from the store's change events: adding or removing a VM,
disk or NIC costs the same on a host with 10 000 disks as on one with 10 (issue 20)."""

from __future__ import annotations

from typing import Any

from xapid.apitypes import utc
from xapid.stats.rrd import RRDTable

#: Classes whose rate fields are computed on read, and those whose changes alter where they come from.
RATE_CLASSES = ("VM_metrics", "host_cpu", "VBD_metrics", "VIF_metrics", "PIF_metrics")
RATE_OWNERS = frozenset(("VM", "VBD", "VIF", "host", "host_cpu", "PIF"))
_RATE_CLASS_SET = frozenset(RATE_CLASSES)
#: per device class, the ref field naming the object whose uuid its sources are under
_PARENT = {"VBD": "VM", "VIF": "VM", "host_cpu": "host", "PIF": "host"}
_IO_NAMES = {"VBD": ("vbd_{}_read", "vbd_{}_write"), "VIF": ("vif_{}_rx", "vif_{}_tx"),
             "PIF": ("pif_{}_rx", "pif_{}_tx")}

Source = tuple[str, str, tuple[str, ...]]


class LiveRates:
    """The rate fields of the objects of *store*, read from the latest row of *table*."""

    def __init__(self, store: Any, table: RRDTable) -> None:
        self.store = store
        self.table = table
        # objects with rate fields → (kind, owner, sources), built on first use, then kept current
        # by on_change; None = to build
        self._sources: dict[str, Source] | None = None
        self._fresh: dict[str, float] = {}  # ref → the table's last update it was refreshed at
        # what the map's entries come from: object (VM, VBD, VIF, host_cpu, PIF) → the key of the
        # entry it made; key → the object that made it; device → (its class, the VM or host its
        # sources are under); VM or host → its devices (also those whose VM or host is missing)
        self._made: dict[str, str] = {}
        self._maker: dict[str, str] = {}
        self._parent_of: dict[str, tuple[str, str]] = {}
        self._children: dict[str, dict[str, str]] = {}

    def on_change(self, change: Any) -> None:
        """Keep the map current for the one object added, removed or changed (and, for a VM or host
        added or removed, its devices); forget the refresh mark of what it concerns."""
        cls = change.cls
        if change.op == "del" and cls in _RATE_CLASS_SET:
            self._fresh.pop(change.ref, None)
        if cls not in RATE_OWNERS or self._sources is None:
            return
        if cls != "host":  # a host makes no entry: its CPUs and PIFs do
            self._place(cls, change.ref)
        if cls in ("VM", "host") and change.op != "mod":  # a uuid does not change: mods leave devices alone
            for child, child_cls in list(self._children.get(change.ref, {}).items()):
                self._place(child_cls, child)

    def refresh(self, obj: Any) -> None:
        """Bring an object's rate fields to the latest sample, in place and without an event, at
        most once per sample: ``VM_metrics.VCPUs_utilisation``, ``host_cpu.utilisation`` and
        ``io_read_kbs``/``io_write_kbs`` of VBD, VIF and PIF metrics (read / rx and write / tx).
        Unknown values leave a field as it was; an object with no archives yet is left alone."""
        last = self.table.last_update
        ref = obj.ref
        if last is None or self._fresh.get(ref) == last:
            return
        sources = self._sources
        if sources is None:
            sources = self._build()
        self._fresh[ref] = last
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

    @property
    def sources(self) -> dict[str, Source]:
        """Every object with rate fields → (kind, owner, its sources): the map as kept (a copy)."""
        return dict(self._sources if self._sources is not None else self._build())

    def _build(self) -> dict[str, Source]:
        """The map from scratch (first use): every VM, VBD, VIF, host_cpu and PIF placed in turn."""
        self._sources, self._fresh = {}, {}
        self._made, self._maker, self._parent_of, self._children = {}, {}, {}, {}
        for cls in ("VM", "VBD", "VIF", "host_cpu", "PIF"):
            for ref in self.store.refs(cls):
                self._place(cls, ref)
        return self._sources

    def _place(self, cls: str, ref: str) -> None:
        """Take the entry *ref* made out of the map and put in the one it makes now (none when it is
        gone, or not sampled: a device without a VM or device name, a virtual PIF…)."""
        sources = self._sources
        assert sources is not None
        key = self._made.pop(ref, None)
        if key is not None:
            self._fresh.pop(key, None)
            if self._maker.get(key) == ref:
                del self._maker[key]
                del sources[key]
        link = self._parent_of.pop(ref, None)
        if link is not None:
            children = self._children[link[1]]
            del children[ref]
            if not children:
                del self._children[link[1]]
        store = self.store
        obj = store.peek(ref)
        if obj is None or obj.cls != cls:
            return
        fields = obj.fields
        parent_field = _PARENT.get(cls)
        entry: Source
        if parent_field is None:  # a VM
            key, entry = fields.get("metrics"), ("vcpus", f"vm:{fields['uuid']}", ())
        else:
            parent_ref = fields.get(parent_field)
            if not isinstance(parent_ref, str):
                return
            self._parent_of[ref] = (cls, parent_ref)
            self._children.setdefault(parent_ref, {})[ref] = cls
            parent = store.peek(parent_ref)
            if parent is None or parent.cls != parent_field:
                return
            owner = f"{parent_field.lower()}:{parent.fields['uuid']}"
            if cls == "host_cpu":
                key, entry = ref, ("cpu", owner, (f"cpu{fields['number']}",))
            else:
                device = fields.get("device")
                if not device or (cls == "PIF" and not fields.get("physical")):
                    return
                read, write = _IO_NAMES[cls]
                key, entry = fields.get("metrics"), ("io", owner, (read.format(device), write.format(device)))
        if not isinstance(key, str):
            return
        sources[key] = entry
        self._made[ref] = key
        self._maker[key] = ref
        self._fresh.pop(key, None)
