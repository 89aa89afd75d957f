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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from xapid.stats.rrd import RRDTable

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


class MetricsCollector:
    """Collects the latest value of every archived source; *names* gives owner -> display name,
    *power_states* the VM count per power state."""

    def __init__(self, table: RRDTable, names: Callable[[], dict[str, str]],
                 power_states: Callable[[], dict[str, int]]) -> None:
        self.table = table
        self.names = names
        self.power_states = power_states

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


def registry_for(collector: MetricsCollector) -> CollectorRegistry:
    """A private registry holding only *collector*."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of *registry* (``Content-Type: text/plain; version=0.0.4``)."""
    return generate_latest(registry)


CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
