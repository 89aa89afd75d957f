"""xapi's HTTP export formats of the metrics archives, built from an :class:`RRDTable`.

* :func:`xport_rows` + :func:`render_xport` — ``/rrd_updates``: rrdtool *xport* rows of many
  sources, as XML or JSON;
* :func:`render_dump` of :meth:`RRDTable.dump` — ``/host_rrd`` and ``/vm_rrd``: a whole RRD,
  rrdtool-dump style, as XML or JSON.

The table is read (numpy copies) in the reactor thread; rendering, the costly part, may run in
another thread.

Formats (``metrics.md`` §5): numbers printed with ``%.15g``, zero as ``0.0``, NaN as ``NaN``,
infinities as ``Infinity``/``-Infinity``; in JSON every leaf, numbers included, is a string;
xport rows newest first, dump rows oldest first.  Legend entries are ``CF:owner:uuid:name``.
Pure functions: no HTTP, no clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple
from xml.sax.saxutils import escape

import numpy as np

from xapid.stats.rrd import ARCHIVE_CFS, ARCHIVES, STEP, RRDTable

XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>'


class ExportError(ValueError):
    """A query the archives cannot answer; the message is one line for the client."""


def num(value: float) -> str:
    """xapi's rendering of a number."""
    if math.isnan(value):
        return "NaN"
    if value == 0:
        return "0.0"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return f"{value:.15g}"


def _nums(values: np.ndarray) -> list[str]:
    return [num(v) for v in values.tolist()]


def _archive_of_step(step: int) -> int:
    return next(a for a, (ppr, _) in enumerate(ARCHIVES) if ppr * STEP == step)


class Xport(NamedTuple):
    """Rows for ``/rrd_updates``, copied out of the table (safe to render in another thread)."""

    start: int
    end: int
    step: int
    legend: list[str]
    times: list[int]  # newest first
    values: np.ndarray  # one row per time, one column per legend entry


def xport_rows(table: RRDTable, keys: Sequence[tuple[str, str]], start: float, interval: float = 0,
               cf: str | None = None) -> Xport:
    """The rows of *keys* (``("vm:<uuid>", name)`` …) from *start* on (negative: relative to the
    last update).  The archive is chosen as xapi does (:meth:`RRDTable.fetch`) for *cf*, or for
    AVERAGE when *cf* is None — which then exports every CF that archive stores.  ExportError
    for a CF that is not archived."""
    if cf is not None and cf not in ("AVERAGE", "MIN", "MAX"):
        raise ExportError(f"cf {cf!r} is not archived (AVERAGE, MIN or MAX)")
    first = table.fetch(keys, cf or "AVERAGE", start=start, interval=interval)
    cfs = [cf] if cf else list(ARCHIVE_CFS[_archive_of_step(first.step)])
    exports = [first] + [table.fetch(keys, c, start=start, interval=interval) for c in cfs[1:]]
    legend = [f"{c}:{owner}:{name}" for c in cfs for owner, name in keys]
    values = np.hstack([e.values for e in exports])
    return Xport(first.start, first.end, first.step, legend, first.timestamps.tolist(), values)


def render_xport(rows: Xport, as_json: bool = False) -> bytes:
    """*rows* as xapi's xport XML, or its JSON (every leaf a string)."""
    if as_json:
        return json.dumps({
            "meta": {"start": str(rows.start), "step": str(rows.step), "end": str(rows.end),
                     "rows": str(len(rows.times)), "columns": str(len(rows.legend)), "legend": rows.legend},
            "data": [{"t": str(t), "values": _nums(row)} for t, row in zip(rows.times, rows.values)],
        }, separators=(",", ":")).encode()
    parts = [XML_HEAD, "<xport><meta><start>", str(rows.start), "</start><step>", str(rows.step),
             "</step><end>", str(rows.end), "</end><rows>", str(len(rows.times)), "</rows><columns>",
             str(len(rows.legend)), "</columns><legend>"]
    parts.extend(f"<entry>{escape(entry)}</entry>" for entry in rows.legend)
    parts.append("</legend></meta><data>")
    for t, row in zip(rows.times, rows.values):
        parts.append(f"<row><t>{t}</t>")
        parts.extend(f"<v>{v}</v>" for v in _nums(row))
        parts.append("</row>")
    parts.append("</data></xport>")
    return "".join(parts).encode()


def _stringify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stringify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify(v) for v in value]
    if isinstance(value, float):
        return num(value)
    return str(value)


def render_dump(rrd: dict[str, Any], as_json: bool = False) -> bytes:
    """``/host_rrd``, ``/vm_rrd``: a whole RRD (:meth:`RRDTable.dump`) as rrdtool-dump XML or JSON."""
    lastupdate = str(int(rrd["lastupdate"] or 0))
    if as_json:
        body = {"version": rrd["version"], "step": str(rrd["step"]), "lastupdate": lastupdate,
                "ds": _stringify(rrd["ds"]),
                "rra": [{"cf": r["cf"], "pdp_per_row": str(r["pdp_per_row"]),
                         "params": {"xff": num(r["params"]["xff"])},
                         "cdp_prep": {"ds": _stringify(r["cdp_prep"])},
                         "database": [_nums(np.asarray(row, dtype=np.float64)) for row in r["database"]]}
                        for r in rrd["rra"]]}
        return json.dumps(body, separators=(",", ":")).encode()
    parts = [XML_HEAD, "<rrd><version>", rrd["version"], "</version><step>", str(rrd["step"]),
             "</step><lastupdate>", lastupdate, "</lastupdate>"]
    for ds in rrd["ds"]:
        parts.append(
            f"<ds><name>{escape(ds['name'])}</name><type>{ds['type']}</type>"
            f"<minimal_heartbeat>{ds['minimal_heartbeat']}</minimal_heartbeat><min>{num(ds['min'])}</min>"
            f"<max>{num(ds['max'])}</max><last_ds>{num(ds['last_ds'])}</last_ds><value>{num(ds['value'])}</value>"
            f"<unknown_sec>{ds['unknown_sec']}</unknown_sec></ds>")
    for rra in rrd["rra"]:
        parts.append(f"<rra><cf>{rra['cf']}</cf><pdp_per_row>{rra['pdp_per_row']}</pdp_per_row>"
                     f"<params><xff>{num(rra['params']['xff'])}</xff></params><cdp_prep>")
        for prep in rra["cdp_prep"]:
            parts.append(f"<ds><primary_value>{num(prep['primary_value'])}</primary_value>"
                         f"<secondary_value>{num(prep['secondary_value'])}</secondary_value>"
                         f"<value>{num(prep['value'])}</value>"
                         f"<unknown_datapoints>{prep['unknown_datapoints']}</unknown_datapoints></ds>")
        parts.append("</cdp_prep><database>")
        for row in rra["database"]:
            parts.append("<row>" + "".join(f"<v>{num(v)}</v>" for v in row) + "</row>")
        parts.append("</database></rra>")
    parts.append("</rrd>")
    return "".join(parts).encode()
