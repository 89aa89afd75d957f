"""The data-source catalogue: how each of xapi's data sources of a host or VM is archived and
described (``metrics.md`` §3), and how values are shown on the wire."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

NAN = float("nan")


class Spec(NamedTuple):
    """How a data source is archived and described (the ``data_source`` record)."""

    kind: str
    units: str
    min: float
    max: float
    description: str


#: Data source families, by owner kind: (name regex, spec).  ``{0}`` in a description is the
#: name's captured part (CPU number, device).
FAMILIES: dict[str, list[tuple[re.Pattern[str], Spec]]] = {
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
DISPLAY_MAX = {"(fraction)": 1.0}


#: What the wire shows for a missing bound (XML-RPC and JSON cannot carry NaN or infinities).
UNBOUNDED = float(np.finfo(np.float64).max)


def wire_float(value: float, instead: float) -> float:
    """*value*, or *instead* when it is NaN or infinite (not representable on the wire)."""
    return value if math.isfinite(value) else instead


def spec_of(owner_kind: str, name: str) -> tuple[Spec, str]:
    """The spec and description of the source *name* of an owner kind ("host", "vm"); KeyError if unknown."""
    best: tuple[Spec, str] | None = None
    for pattern, spec in FAMILIES[owner_kind]:
        m = pattern.fullmatch(name)
        if m:  # later families are more specific (memory_target after memory, iops after read)
            best = (spec, spec.description.format(*m.groups()))
    if best is None:
        raise KeyError(name)
    return best


#: The sources a written field shows (memory_actual, host memory); the rates are computed on read.
WRITTEN = re.compile(r"memory|memory_total_kib|memory_free_kib")
