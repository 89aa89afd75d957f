"""The rrdtool-dump-like structure of one owner's archives (:meth:`xapid.stats.rrd.RRDTable.dump`).

Reads the table's arrays directly (it is the table's companion module, not a user of its API).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from xapid.stats.rrd_layout import ARCHIVE_CFS, ARCHIVES, HEARTBEAT, NAN, STEP, XFF

if TYPE_CHECKING:
    from xapid.stats.rrd import RRDTable


def dump(table: RRDTable, owner: str) -> dict[str, Any]:
    """See :meth:`RRDTable.dump`; KeyError if *owner* is unknown."""
    names = table._slots.get(owner)
    if names is None:
        raise KeyError(owner)
    slots = np.array(list(names.values()), dtype=np.intp)
    lu = table.last_update
    k_now = math.floor(lu / STEP) if lu is not None else 0
    elapsed = (lu - k_now * STEP) if lu is not None else 0.0
    ds = _data_sources(table, slots, elapsed)
    last_pdp = (table._rings[0][0].data[table._archive_rows(0, 1)[1][0], slots]
                if lu is not None else np.full(len(slots), NAN))
    rras = []
    for a, ((ppr, rows), cfs) in enumerate(zip(ARCHIVES, ARCHIVE_CFS)):
        if lu is not None:
            times, pos = table._archive_rows(a, rows)
            last_row_time = int(times[0])
        else:
            pos, last_row_time = np.arange(rows)[::-1] % rows, 0
        for cf in cfs:
            database = table._ring(a, cf)[pos[::-1]][:, slots]
            running, unknown = _running_row(table, a, cf, slots, last_pdp, k_now % ppr)
            rras.append(_rra(a, cf, ppr, last_row_time, last_pdp, running, unknown, database))
    return {"version": "0003", "step": STEP, "lastupdate": lu, "ds": ds, "rra": rras}


def _data_sources(table: RRDTable, slots: np.ndarray, elapsed: float) -> list[dict[str, Any]]:
    """The ``ds`` entries: each source's description and its current step's accumulation."""
    ds = []
    for s in slots:
        info = table._info[s]
        assert info is not None
        ds.append({
            "name": info.name,
            "type": info.kind,
            "minimal_heartbeat": HEARTBEAT,
            "min": info.min,
            "max": info.max,
            "last_ds": float(table._last_raw[s]),
            "value": float(table._pdp_sum[s]),
            "unknown_sec": int(round(elapsed - float(table._pdp_known[s]))),
        })
    return ds


def _running_row(table: RRDTable, a: int, cf: str, slots: np.ndarray, last_pdp: np.ndarray,
                 pdps_in_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Archive *a*'s running consolidated value of *cf* and its unknown PDPs, per slot."""
    if a == 0:
        return last_pdp, np.zeros(len(slots), dtype=np.int64)
    c = a - 1
    cnt = table._acc_cnt[c, slots]
    with np.errstate(divide="ignore", invalid="ignore"):
        running = {
            "AVERAGE": table._acc_sum[c, slots] / cnt,
            "MIN": table._acc_min[c, slots],
            "MAX": table._acc_max[c, slots],
        }[cf]
    return running, (pdps_in_row - cnt).astype(np.int64)


def _rra(a: int, cf: str, ppr: int, last_row_time: int, last_pdp: np.ndarray, running: np.ndarray,
         unknown: np.ndarray, database: np.ndarray) -> dict[str, Any]:
    """One ``rra`` entry: its parameters, ``cdp_prep`` per source and rows oldest first."""
    return {
        "cf": cf,
        "pdp_per_row": ppr,
        "params": {"xff": XFF[cf] if a else XFF["AVERAGE"]},
        "last_row_time": last_row_time,
        "cdp_prep": [
            {
                "primary_value": float(last_pdp[i]),
                "secondary_value": float(last_pdp[i]),
                "value": float(running[i]),
                "unknown_datapoints": int(unknown[i]),
            }
            for i in range(len(last_pdp))
        ],
        "database": database.tolist(),
    }
