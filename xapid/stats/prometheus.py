"""The metrics engine for Prometheus: ``/metrics`` in the text exposition format.

A custom collector on a private registry reads the latest 5-s value of every data source at
scrape time (nothing is registered per scrape, nothing global).  Series, all gauges:

================================================  ===========================================
``xapid_host_cpu_utilisation{cpu}``              pCPU busy fraction (host ``cpu<N>``)
``xapid_host_cpu_average_utilisation``           ``cpu_avg``
``xapid_host_memory_total_bytes`` / ``_free_``   ``memory_total_kib`` / ``memory_free_kib`` × 1024
``xapid_host_network_{receive,transmit}_bytes_per_second{device}``  ``pif_<dev>_rx/tx``
``xapid_vm_cpu_usage``                           ``cpu_usage`` (whole domain, 0–1)
``xapid_vm_vcpu_utilisation{vcpu}``              ``cpu<N>``
``xapid_vm_memory_bytes`` / ``_target_bytes``    ``memory`` / ``memory_target``
``xapid_vm_disk_{read,write}_bytes_per_second{device}``  ``vbd_<dev>_read/write``
``xapid_vm_disk_{read,write}_requests_per_second{device}``  ``vbd_<dev>_iops_read/write``
``xapid_vm_network_{receive,transmit}_bytes_per_second{device}``  ``vif_<n>_rx/tx``
================================================  ===========================================

Host series carry ``host_uuid`` (and ``host``, its name); VM series ``vm_uuid`` and ``vm`` (the
VM's name label).  Unknown values (NaN) are left out.  ``xapid_vms{power_state}`` counts VMs.

A scrape renders the text itself (:meth:`MetricsCollector.render`), byte for byte what
``prometheus_client.generate_latest`` makes of :meth:`MetricsCollector.collect`, without a Python
object per sample: the line prefixes (``name{labels} ``) are planned once per set of sources and
names, the values taken from the archives' latest row in one NumPy step, and the bytes kept until
the next tick (or a change of names, power states or sources).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString
from prometheus_client.core import GaugeMetricFamily

from xapid.stats.rrd import DataSource, RRDTable

#: (owner kind, source-name pattern, metric, help, label for the captured part, scale); first match wins
RULES: list[tuple[str, re.Pattern[str], str, str, str, float]] = [
    ("host", re.compile(r"cpu(\d+)"), "xapid_host_cpu_utilisation", "Physical CPU busy fraction", "cpu", 1.0),
    ("host", re.compile(r"cpu_avg"), "xapid_host_cpu_average_utilisation", "Mean physical CPU busy fraction", "", 1.0),
    ("host", re.compile(r"memory_total_kib"), "xapid_host_memory_total_bytes", "Host memory", "", 1024.0),
    ("host", re.compile(r"memory_free_kib"), "xapid_host_memory_free_bytes", "Free host memory", "", 1024.0),
    ("host", re.compile(r"pif_(.+)_rx"), "xapid_host_network_receive_bytes_per_second",
     "Bytes received per second on a physical interface", "device", 1.0),
    ("host", re.compile(r"pif_(.+)_tx"), "xapid_host_network_transmit_bytes_per_second",
     "Bytes sent per second on a physical interface", "device", 1.0),
    ("vm", re.compile(r"cpu_usage"), "xapid_vm_cpu_usage", "Domain CPU usage (fraction of its vCPUs)", "", 1.0),
    ("vm", re.compile(r"cpu(\d+)"), "xapid_vm_vcpu_utilisation", "vCPU busy fraction", "vcpu", 1.0),
    ("vm", re.compile(r"memory"), "xapid_vm_memory_bytes", "Memory allocated to the VM", "", 1.0),
    ("vm", re.compile(r"memory_target"), "xapid_vm_memory_target_bytes", "Balloon target of the VM", "", 1.0),
    ("vm", re.compile(r"vbd_(.+)_iops_read"), "xapid_vm_disk_read_requests_per_second", "Disk reads per second",
     "device", 1.0),
    ("vm", re.compile(r"vbd_(.+)_iops_write"), "xapid_vm_disk_write_requests_per_second", "Disk writes per second",
     "device", 1.0),
    ("vm", re.compile(r"vbd_(.+)_read"), "xapid_vm_disk_read_bytes_per_second", "Disk bytes read per second",
     "device", 1.0),
    ("vm", re.compile(r"vbd_(.+)_write"), "xapid_vm_disk_write_bytes_per_second", "Disk bytes written per second",
     "device", 1.0),
    ("vm", re.compile(r"vif_(\d+)_rx"), "xapid_vm_network_receive_bytes_per_second",
     "Bytes received per second on a virtual interface", "device", 1.0),
    ("vm", re.compile(r"vif_(\d+)_tx"), "xapid_vm_network_transmit_bytes_per_second",
     "Bytes sent per second on a virtual interface", "device", 1.0),
]


def _rule(kind: str, name: str) -> tuple[str, str, str, str, float] | None:
    for owner_kind, pattern, metric, help_text, label, scale in RULES:
        match = pattern.fullmatch(name)
        if owner_kind == kind and match:
            return metric, help_text, label, match.group(1) if label else "", scale
    return None


def _label_value(text: str) -> str:
    """A label value escaped as the text format wants (backslash, newline, double quote)."""
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _head(metric: str, help_text: str) -> str:
    """A family's HELP (escaped as the text format wants) and TYPE lines."""
    escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {metric} {escaped}\n# TYPE {metric} gauge\n"


def _go_float(value: float) -> str:
    """``floatToGoString``, with its common case (a finite value printed by ``repr`` without an
    exponent switch) inline."""
    if value == value and value not in (math.inf, -math.inf):
        text = repr(value)
        if not (value > 0 and text.find(".") > 6):
            return text
    return floatToGoString(value)


class _Plan(NamedTuple):
    """What a set of sources and names renders to, but the values: per sample its slot, scale,
    line prefix and family (an index into *heads*, the HELP and TYPE lines of each family)."""

    slots: np.ndarray
    scales: np.ndarray
    prefixes: list[str]
    families: list[int]
    heads: list[str]


def _plan(layout: list[tuple[str, list[DataSource]]], names: dict[str, str]) -> _Plan:
    slots: list[int] = []
    scales: list[float] = []
    prefixes: list[str] = []
    families: list[int] = []
    metrics: dict[str, int] = {}
    heads: list[str] = []
    for owner, sources in layout:
        kind, _, uuid = owner.partition(":")
        if kind not in ("host", "vm"):
            continue
        base = {"host_uuid": uuid, "host": names.get(owner, "")} if kind == "host" else \
            {"vm_uuid": uuid, "vm": names.get(owner, "")}
        for source in sources:
            rule = _rule(kind, source.name)
            if rule is None:
                continue
            metric, help_text, label, captured, scale = rule
            labels = dict(base, **({label: captured} if label else {}))
            family = metrics.get(metric)
            if family is None:  # a family's label names are those of its first sample, as GaugeMetricFamily
                family = metrics[metric] = len(heads)
                heads.append(_head(metric, help_text))
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(labels.items()))
            slots.append(source.slot)
            scales.append(scale)
            prefixes.append(f"{metric}{{{text}}} ")
            families.append(family)
    return _Plan(np.array(slots, dtype=np.intp), np.array(scales, dtype=np.float64), prefixes, families, heads)


class MetricsCollector:
    """Collects the latest value of every archived source; *names* gives owner -> display name,
    *power_states* the VM count per power state."""

    def __init__(self, table: RRDTable, names: Callable[[], dict[str, str]],
                 power_states: Callable[[], dict[str, int]]) -> None:
        self.table = table
        self.names = names
        self.power_states = power_states
        self.renders = 0  # expositions rendered (not served from the cache)
        self._plan_key: tuple[list[tuple[str, list[DataSource]]], dict[str, str]] | None = None
        self._plan: _Plan | None = None
        self._cached: tuple[Any, ...] | None = None  # (last update, plan, power states, bytes)

    def render(self) -> bytes:
        """The text exposition: the same bytes as ``generate_latest`` over :meth:`collect`, cached
        until the table's next update or a change of the sources, names or power states."""
        table = self.table
        names = self.names()
        states = self.power_states()
        layout = [(owner, table.sources(owner)) for owner in table.owners()]
        plan = self._plan
        if plan is None or self._plan_key != (layout, names):
            plan = self._plan = _plan(layout, names)
            self._plan_key = (layout, names)
        cached = self._cached
        stamp = table.last_update
        if cached is not None and cached[0] == stamp and cached[1] is plan and cached[2] == states:
            return cached[3]
        body = self._render(plan, states)
        self._cached = (stamp, plan, states, body)
        self.renders += 1
        return body

    def _render(self, plan: _Plan, states: dict[str, int]) -> bytes:
        out = ["# HELP xapid_vms VMs (templates and the control domain excluded) by power state\n"
               "# TYPE xapid_vms gauge\n"]
        out += [f'xapid_vms{{power_state="{_label_value(state)}"}} {_go_float(float(count))}\n'
                for state, count in sorted(states.items())]
        row = self.table.latest_row()
        if row is not None and len(plan.slots):
            values = (row[plan.slots] * plan.scales).tolist()
            lines: dict[int, list[str]] = {}  # per family in order of its first known sample
            prefixes, families = plan.prefixes, plan.families
            for i, value in enumerate(values):
                if value != value:  # NaN: unknown, left out
                    continue
                family = lines.get(families[i])
                if family is None:
                    family = lines[families[i]] = [plan.heads[families[i]]]
                family.append(f"{prefixes[i]}{_go_float(value)}\n")
            for family in lines.values():
                out += family
        return "".join(out).encode("utf-8")

    def collect(self) -> Iterator[Any]:
        families: dict[str, GaugeMetricFamily] = {}
        names = self.names()
        table = self.table
        for owner in table.owners():
            kind, _, uuid = owner.partition(":")
            if kind not in ("host", "vm"):
                continue
            sources = table.sources(owner)
            values = table.latest(np.array([s.slot for s in sources], dtype=np.intp)).tolist()
            base = {"host_uuid": uuid, "host": names.get(owner, "")} if kind == "host" else \
                {"vm_uuid": uuid, "vm": names.get(owner, "")}
            for source, value in zip(sources, values):
                rule = _rule(kind, source.name)
                if rule is None or math.isnan(value):
                    continue
                metric, help_text, label, captured, scale = rule
                labels = dict(base, **({label: captured} if label else {}))
                family = families.get(metric)
                if family is None:
                    family = families[metric] = GaugeMetricFamily(metric, help_text, labels=list(labels))
                family.add_metric(list(labels.values()), value * scale)
        states = GaugeMetricFamily("xapid_vms", "VMs (templates and the control domain excluded) by power state",
                                   labels=["power_state"])
        for state, count in sorted(self.power_states().items()):
            states.add_metric([state], count)
        yield states
        yield from families.values()


class MetricsRegistry(CollectorRegistry):
    """A private registry holding only *collector*, which :func:`exposition` renders directly."""

    def __init__(self, collector: MetricsCollector) -> None:
        super().__init__(auto_describe=False)
        self.collector = collector
        self.register(collector)


def registry_for(collector: MetricsCollector) -> MetricsRegistry:
    """A private registry holding only *collector*."""
    return MetricsRegistry(collector)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of *registry* (``Content-Type: text/plain; version=0.0.4``): rendered
    by the collector itself (cached per tick) for a :class:`MetricsRegistry`."""
    if isinstance(registry, MetricsRegistry):
        return registry.collector.render()
    return generate_latest(registry)


CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
