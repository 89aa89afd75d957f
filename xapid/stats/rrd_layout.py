"""The archive layout of :mod:`xapid.stats.rrd` (xapi's), its bytes per source, and its records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

STEP = 5
HEARTBEAT = 300
#: (pdp_per_row, rows) of each archive, finest first.
ARCHIVES: tuple[tuple[int, int], ...] = ((1, 120), (12, 120), (720, 168), (17280, 366))
CFS = ("AVERAGE", "MIN", "MAX")
#: Consolidation functions stored by each archive (archive 0 is AVERAGE only, as in xapi).
ARCHIVE_CFS: tuple[tuple[str, ...], ...] = (("AVERAGE",),) + (CFS,) * (len(ARCHIVES) - 1)
XFF = {"AVERAGE": 0.5, "MIN": 1.0, "MAX": 1.0}
KINDS = ("GAUGE", "ABSOLUTE", "DERIVE")
DERIVE_CODE = 2  # KINDS.index("DERIVE")
FORMAT_VERSION = 1

NAN = float("nan")
HUGE = np.finfo(np.float64).max
CONSOLIDATED = ARCHIVES[1:]  # archives with accumulators, stacked on axis 0 of the _acc_* arrays

#: Bytes of archive rows and per-slot state per data source (fixed, independent of history).
BYTES_PER_SOURCE = 8 * (
    sum(rows * len(cfs) for (_, rows), cfs in zip(ARCHIVES, ARCHIVE_CFS))
    + 4 * len(CONSOLIDATED)  # accumulators: sum, count, min, max
    + 9  # min, max, lo, hi, last_raw, last_time, pdp_sum, pdp_known, the raw scratch row
) + 2  # kind (int8), not_derive (bool)


class DataSource(NamedTuple):
    """One data source's description (the record behind ``get_data_sources``)."""

    owner: str
    name: str
    kind: str
    min: float
    max: float
    units: str
    description: str
    slot: int


class Export(NamedTuple):
    """The result of :meth:`RRDTable.fetch`.

    ``step`` is the archive's resolution in seconds; ``timestamps`` (int64) the row times, newest
    first; ``values`` a float64 matrix, one row per timestamp and one column per requested source;
    ``start`` / ``end`` the oldest / newest row time (both ``end`` when there is no row).
    """

    step: int
    timestamps: np.ndarray
    values: np.ndarray
    start: int
    end: int


@dataclass
class Ring:
    """The rows of one CF of one archive: shape ``(rows, capacity)``, a tick writes one row."""

    cf: str
    data: np.ndarray


def check_cf(cf: str) -> str:
    """*cf* upper-cased; ValueError unless it is one of :data:`CFS`."""
    cf = cf.upper()
    if cf not in CFS:
        raise ValueError(f"unknown consolidation function {cf!r} (expected one of {', '.join(CFS)})")
    return cf
