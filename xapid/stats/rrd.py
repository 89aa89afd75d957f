"""Round-robin archives (RRDs) of many data sources, in xapi's layout, computed with numpy.

One :class:`RRDTable` holds every data source of every owner (``"host:<uuid>"``, ``"vm:<uuid>"``,
``"sr:<uuid>"`` …).  A data source lives in a *slot*: column ``slot`` of every array.  All sources
step together, so one sampler tick (:meth:`RRDTable.update_indexed`) is a fixed handful of numpy
operations over all slots, whatever the number of VMs, and never a Python loop per source.
Memory per source is fixed (see :data:`BYTES_PER_SOURCE`); it does not grow with history.

Layout (xapi, ``metrics.md`` §4): primary step 5 s; heartbeat 300 s.

=======  ====  ===========  ==========  ========  ======================
Archive  Rows  pdp_per_row  Resolution  Span      CFs
=======  ====  ===========  ==========  ========  ======================
0        120   1            5 s         10 min    AVERAGE
1        120   12           1 min       2 h       AVERAGE, MIN, MAX
2        168   720          1 h         1 week    AVERAGE, MIN, MAX
3        366   17280        1 day       ~1 year   AVERAGE, MIN, MAX
=======  ====  ===========  ==========  ========  ======================

Archive 0 is AVERAGE only, as in xapi: with one PDP per row its MIN and MAX would equal its
AVERAGE.  AVERAGE rows use xff 0.5, MIN/MAX rows xff 1.0 (xapi's values).

Semantics (rrdtool's, made exact):

* **Rate of an update.**  An update at time ``t`` covers the interval ``(T, t]`` since the table's
  previous update ``T``.  For each slot: ``GAUGE`` and ``ABSOLUTE`` — the value given is the rate
  (``ABSOLUTE`` is a rate computed by the producer, ``metrics.md`` §3); ``DERIVE`` — ``(raw −
  last_raw) / (t − last_time)`` with the slot's own previous raw value and time.  The rate is
  *unknown* (NaN) when: the slot is absent from the update or its raw value is NaN; ``t − T`` exceeds
  the heartbeat; for DERIVE, the slot has no previous raw value, its previous raw value is older than
  the heartbeat, or the delta is negative (a counter reset after a domain reboot, or a 32/64-bit
  wrap — one unknown step rather than a huge or negative rate); the rate lies outside
  ``[min, max]`` (NaN bounds = unbounded) or is not finite.
* **Primary data points (PDPs).**  Step ``k`` covers ``(5(k−1), 5k]``; its PDP is the time-weighted
  average of the known rates over the step: ``Σ rate·seconds / known seconds``, NaN when no second of
  the step is known.  An update at a non-aligned time contributes to the steps it overlaps; when
  several steps elapsed since the previous update, every whole step in between gets that update's
  rate (NaN when unknown, e.g. beyond the heartbeat).  With updates on step boundaries every PDP is
  exactly the rate of the update that ends it.
* **Consolidated rows.**  Row ``j`` of an archive with ``p`` PDPs per row covers PDPs
  ``p(j−1)+1 … pj`` and is stamped ``5·p·j`` (rows are aligned to absolute time, like rrdtool).
  AVERAGE = mean of the known PDPs, or NaN when more than ``xff·p`` PDPs are unknown (PDPs from before
  a source existed count as unknown).  MIN / MAX = min / max of the known PDPs, NaN when none is.
  A row lives in ring position ``j mod rows``; the write position is therefore shared by all slots
  and derived from the time of the last update.

Persistence: :meth:`RRDTable.save` writes one ``.npz`` file atomically (temporary file, fsync,
``os.replace``); :meth:`RRDTable.load` restores it and marks the time between the saved last update
and ``now`` unknown.  A missing or unreadable file gives a fresh table and a warning for the log.

This module is pure: no Twisted, no clock, no I/O except :meth:`save` and :meth:`load`.  The layout
constants and records live in :mod:`xapid.stats.rrd_layout`, the saved image in
:mod:`xapid.stats.rrd_image`, the dump structure in :mod:`xapid.stats.rrd_dump`; all are importable
from here.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from xapid.stats import rrd_dump, rrd_image
from xapid.stats.rrd_image import write_image
from xapid.stats.rrd_layout import (
    ARCHIVE_CFS,
    ARCHIVES,
    BYTES_PER_SOURCE,
    CFS,
    CONSOLIDATED,
    DERIVE_CODE,
    FORMAT_VERSION,
    HEARTBEAT,
    HUGE,
    KINDS,
    NAN,
    STEP,
    XFF,
    DataSource,
    Export,
    Ring,
    check_cf,
)

__all__ = [
    "ARCHIVES", "ARCHIVE_CFS", "BYTES_PER_SOURCE", "CFS", "FORMAT_VERSION", "HEARTBEAT", "KINDS", "STEP", "XFF",
    "DataSource", "Export", "RRDTable", "write_image",
]


class RRDTable:
    """Round-robin archives for many data sources of many owners, updated together.

    *start* (optional) is the creation time: the first update then covers ``(start, t]``.  Without
    it, the first update only records the baseline (raw values and time) and produces no PDP.
    """

    # per-slot arrays, (re)allocated by _alloc (last axis: the slot)
    _kind: np.ndarray
    _not_derive: np.ndarray
    _min: np.ndarray
    _max: np.ndarray
    _lo: np.ndarray
    _hi: np.ndarray
    _last_raw: np.ndarray
    _last_time: np.ndarray
    _pdp_sum: np.ndarray
    _pdp_known: np.ndarray
    _acc_sum: np.ndarray
    _acc_cnt: np.ndarray
    _acc_min: np.ndarray
    _acc_max: np.ndarray
    _rings: list[list[Ring]]
    _raw_buf: np.ndarray

    def __init__(self, start: float | None = None, capacity: int = 16):
        self.last_update: float | None = None if start is None else float(start)
        self._cap = 0
        self._slots: dict[str, dict[str, int]] = {}
        self._info: list[DataSource | None] = []
        self._free: list[int] = []
        #: bumped whenever a source is added or forgotten: what was selected from the table is
        #: still valid while (table, layout) is the same
        self.layout = 0
        #: held by :meth:`export` (which may run in a worker thread) and by :meth:`forget`
        self.lock = threading.Lock()
        self._latest_row: tuple[float, np.ndarray, np.ndarray] | None = None
        self._alloc(max(1, int(capacity)))

    # ----------------------------------------------------------------------------------- storage

    def _alloc(self, cap: int) -> None:
        """Grow every per-slot array to *cap* slots, keeping the existing columns."""
        old = self._cap

        def grow(name: str, shape_head: tuple[int, ...], fill: Any, dtype: Any = np.float64) -> None:
            new = np.full(shape_head + (cap,), fill, dtype=dtype)
            if old:
                new[..., :old] = getattr(self, name)
            setattr(self, name, new)

        grow("_kind", (), 0, np.int8)
        grow("_not_derive", (), True, np.bool_)
        grow("_min", (), NAN)
        grow("_max", (), NAN)
        grow("_lo", (), -HUGE)
        grow("_hi", (), HUGE)
        grow("_last_raw", (), NAN)
        grow("_last_time", (), NAN)
        grow("_pdp_sum", (), 0.0)
        grow("_pdp_known", (), 0.0)
        nacc = len(CONSOLIDATED)
        grow("_acc_sum", (nacc,), 0.0)
        grow("_acc_cnt", (nacc,), 0.0)
        grow("_acc_min", (nacc,), NAN)
        grow("_acc_max", (nacc,), NAN)
        rings: list[list[Ring]] = []
        for a, ((_, rows), cfs) in enumerate(zip(ARCHIVES, ARCHIVE_CFS)):
            row = []
            for c, cf in enumerate(cfs):
                new = np.full((rows, cap), NAN)
                if old:
                    new[:, :old] = self._rings[a][c].data
                row.append(Ring(cf, new))
            rings.append(row)
        self._rings = rings
        self._raw_buf = np.full(cap, NAN)
        self._info.extend([None] * (cap - old))
        self._free.extend(range(cap - 1, old - 1, -1))  # pop() hands out the lowest slot first
        self._cap = cap

    def _reset_slot(self, s: int) -> None:
        self._last_raw[s] = NAN
        self._last_time[s] = NAN
        self._pdp_sum[s] = 0.0
        self._pdp_known[s] = 0.0
        self._acc_sum[:, s] = 0.0
        self._acc_cnt[:, s] = 0.0
        self._acc_min[:, s] = NAN
        self._acc_max[:, s] = NAN
        for rings in self._rings:
            for ring in rings:
                ring.data[:, s] = NAN

    @property
    def capacity(self) -> int:
        """Number of slots allocated (grows by doubling)."""
        return self._cap

    def nbytes(self) -> int:
        """Bytes held by the per-slot arrays (fixed per slot; independent of the number of updates)."""
        total = 0
        for value in vars(self).values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
        return total + sum(r.data.nbytes for rings in self._rings for r in rings)

    # ------------------------------------------------------------------------------ data sources

    def ensure(
        self,
        owner: str,
        name: str,
        kind: str = "GAUGE",
        min: float = NAN,
        max: float = NAN,
        units: str = "",
        description: str = "",
    ) -> int:
        """Add the source ``(owner, name)`` if needed; return its slot.

        An existing source keeps its archives; its bounds, units and description are updated, and a
        change of *kind* restarts the DERIVE baseline.  *min* / *max* NaN = unbounded.
        """
        kind = kind.upper()
        if kind not in KINDS:
            raise ValueError(f"unknown data source kind {kind!r} (expected one of {', '.join(KINDS)})")
        lo, hi = float(min), float(max)
        with self.lock:  # an export may be copying in a worker thread
            names = self._slots.setdefault(owner, {})
            s = names.get(name)
            if s is None:
                if not self._free:
                    self._alloc(self._cap * 2)
                s = self._free.pop()
                names[name] = s
                self._reset_slot(s)
                self.layout += 1
            else:
                old = self._info[s]
                if old is not None and old.kind != kind:
                    self._last_raw[s] = NAN
                    self._last_time[s] = NAN
            code = KINDS.index(kind)
            self._kind[s] = code
            self._not_derive[s] = code != DERIVE_CODE
            self._min[s], self._max[s] = lo, hi
            self._lo[s] = -HUGE if math.isnan(lo) else lo
            self._hi[s] = HUGE if math.isnan(hi) else hi
            self._info[s] = DataSource(owner, name, kind, lo, hi, units, description, s)
            return s

    def forget(self, owner: str, name: str) -> None:
        """Drop the archives of ``(owner, name)`` and free its slot for reuse (no-op if unknown)."""
        with self.lock:
            self._forget(owner, name)

    def _forget(self, owner: str, name: str) -> None:
        names = self._slots.get(owner)
        if not names or name not in names:
            return
        s = names.pop(name)
        self.layout += 1
        if not names:
            del self._slots[owner]
        self._reset_slot(s)
        self._kind[s] = 0
        self._not_derive[s] = True
        self._min[s] = self._max[s] = NAN
        self._lo[s], self._hi[s] = -HUGE, HUGE
        self._info[s] = None
        self._free.append(s)

    def forget_owner(self, owner: str) -> None:
        """Drop every source of *owner* (e.g. a destroyed VM)."""
        for name in list(self._slots.get(owner, ())):
            self.forget(owner, name)

    def owners(self) -> list[str]:
        """Owners that have at least one source, in insertion order."""
        return list(self._slots)

    def names(self, owner: str) -> list[str]:
        """The source names of *owner*, in insertion order (empty if unknown)."""
        return list(self._slots.get(owner, ()))

    def sources(self, owner: str) -> list[DataSource]:
        """The sources of *owner*, in insertion order (empty if unknown)."""
        return [self._info[s] for s in self._slots.get(owner, {}).values()]  # type: ignore[misc]  # a named slot always holds a source

    def source(self, owner: str, name: str) -> DataSource:
        """One source's description; KeyError if unknown."""
        return self._info[self.slot(owner, name)]  # type: ignore[return-value]  # a named slot always holds a source

    def slot(self, owner: str, name: str) -> int:
        """The slot of ``(owner, name)``; KeyError if unknown."""
        try:
            return self._slots[owner][name]
        except KeyError:
            raise KeyError((owner, name)) from None

    def slots(self, keys: Iterable[tuple[str, str]]) -> np.ndarray:
        """Slots of several ``(owner, name)`` keys, as an index array for :meth:`update_indexed`."""
        return np.fromiter((self.slot(o, n) for o, n in keys), dtype=np.intp)

    # ----------------------------------------------------------------------------------- updates

    def update(self, timestamp: float, values: dict[tuple[str, str], float]) -> int:
        """Record ``{(owner, name): raw value}`` at *timestamp*; see :meth:`update_indexed`."""
        idx = self.slots(values)
        raw = np.fromiter(values.values(), dtype=np.float64, count=len(values))
        return self.update_indexed(timestamp, idx, raw)

    def advance(self, timestamp: float) -> int:
        """An update with no values: every source is unknown up to *timestamp*."""
        return self.update_indexed(timestamp, np.empty(0, np.intp), np.empty(0))

    def update_indexed(self, timestamp: float, idx: np.ndarray, raw: np.ndarray) -> int:
        """Record raw values ``raw[i]`` of slots ``idx[i]`` at *timestamp*; return the PDPs completed.

        Slots not in *idx* (or with a NaN raw value) are unknown over ``(last update, timestamp]``.
        *idx* must not repeat a slot.  *timestamp* must be later than the previous update
        (ValueError otherwise, as rrdtool refuses it).  Slots never move (growing the table keeps
        them), so callers may cache them; a slot freed by :meth:`forget` can be handed to a new
        source, so drop cached slots of forgotten sources.
        """
        t = float(timestamp)
        T = self.last_update
        rawf = self._raw_buf
        rawf.fill(NAN)
        rawf[idx] = raw
        present = ~np.isnan(rawf)
        if T is None:  # first update without a creation time: the baseline only
            np.copyto(self._last_raw, rawf, where=present)
            self._last_time[present] = t
            self.last_update = t
            return 0
        if not t > T:
            raise ValueError(f"update at {t!r} is not after the last update at {T!r}")
        rate = self._rates(t, T, rawf)
        np.copyto(self._last_raw, rawf, where=present)
        np.copyto(self._last_time, t, where=present)
        n = self._accumulate(t, T, rate)
        self.last_update = t
        return n

    def _rates(self, t: float, T: float, rawf: np.ndarray) -> np.ndarray:
        """Each slot's rate over ``(T, t]`` from its raw value in *rawf*; NaN where unknown (absent,
        beyond the heartbeat, out of bounds, or a DERIVE without a recent baseline or going back)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            delta = rawf - self._last_raw
            dt = t - self._last_time
            rate = np.where(self._not_derive, rawf, delta / dt)
            ok = rate >= self._lo
            ok &= rate <= self._hi
            ok &= self._not_derive | ((delta >= 0) & (dt <= HEARTBEAT))
            if t - T > HEARTBEAT:
                ok[:] = False
            rate[~ok] = NAN  # also NaN for absent slots (their raw is NaN)
        result: np.ndarray = rate  # np.where is typed Any
        return result

    def _accumulate(self, t: float, T: float, rate: np.ndarray) -> int:
        """Add *rate* over ``(T, t]`` to the PDPs: the current step's sums, and every step it
        completes consolidated into the archives; return the number of steps completed."""
        known = ~np.isnan(rate)
        rz = np.where(known, rate, 0.0)
        k0 = math.floor(T / STEP)
        k1 = math.floor(t / STEP)
        n = k1 - k0
        if n == 0:  # still inside the same step
            d = t - T
            self._pdp_sum += rz * d
            self._pdp_known += known * d
            return 0

        # The step ending at 5(k0+1): the earlier part of it plus this rate up to its end.
        d1 = (k0 + 1) * STEP - T
        fresh = self._pdp_known == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            p1 = (self._pdp_sum + rz * d1) / (self._pdp_known + known * d1)
        np.copyto(p1, rate, where=fresh)  # exactly the rate when it alone covers the step
        # The part of the new, incomplete step that this update covers.
        d2 = t - k1 * STEP
        if d2:
            np.multiply(rz, d2, out=self._pdp_sum)
            np.multiply(known, d2, out=self._pdp_known)
        else:
            self._pdp_sum.fill(0.0)
            self._pdp_known.fill(0.0)

        self._feed(k0, n, p1, rate, rz, known)
        return n

    def _feed(self, k0: int, n: int, p1: np.ndarray, rate: np.ndarray, rz: np.ndarray,
              known: np.ndarray) -> None:
        """Consolidate PDPs ``k0+1`` (= *p1*) and ``k0+2 … k0+n`` (all = *rate*) into the archives."""
        k = k0 + 1
        ring0 = self._rings[0][0].data
        rows0 = ring0.shape[0]
        ring0[k % rows0] = p1
        if n > 1:
            last = k0 + n
            ring0[np.arange(max(k + 1, last + 1 - rows0), last + 1) % rows0] = rate

        # PDP k into every consolidated archive at once (stacked accumulators).
        known1 = ~np.isnan(p1)
        self._acc_sum += np.where(known1, p1, 0.0)
        self._acc_cnt += known1
        np.fmin(self._acc_min, p1, out=self._acc_min)
        np.fmax(self._acc_max, p1, out=self._acc_max)
        for a, (ppr, _) in enumerate(CONSOLIDATED):
            if k % ppr == 0:
                self._emit(a, k // ppr)
            if n > 1:
                self._feed_constant(a, k, n - 1, rate, rz, known)

    def _feed_constant(self, a: int, k: int, m: int, rate: np.ndarray, rz: np.ndarray,
                       known: np.ndarray) -> None:
        """Feed *m* PDPs all equal to *rate*, following PDP *k*, into consolidated archive *a*."""
        ppr, rows = CONSOLIDATED[a]
        need = ppr - k % ppr  # PDPs left to complete the current row
        if m < need:
            self._acc_add(a, m, rate, rz, known)
            return
        self._acc_add(a, need, rate, rz, known)
        k += need
        m -= need
        self._emit(a, k // ppr)
        q, rem = divmod(m, ppr)
        if q:  # whole rows of the constant rate: AVERAGE = MIN = MAX = rate (all known or all not)
            j = k // ppr
            where = np.arange(max(j + 1, j + q + 1 - rows), j + q + 1) % rows
            for ring in self._rings[a + 1]:
                ring.data[where] = rate
        if rem:
            self._acc_add(a, rem, rate, rz, known)

    def _acc_add(self, a: int, count: int, rate: np.ndarray, rz: np.ndarray, known: np.ndarray) -> None:
        if count <= 0:
            return
        self._acc_sum[a] += rz * count
        self._acc_cnt[a] += known * count
        np.fmin(self._acc_min[a], rate, out=self._acc_min[a])
        np.fmax(self._acc_max[a], rate, out=self._acc_max[a])

    def _emit(self, a: int, j: int) -> None:
        """Close row *j* of consolidated archive *a* from its accumulators, and reset them."""
        ppr, rows = CONSOLIDATED[a]
        pos = j % rows
        avg, mn, mx = self._rings[a + 1]
        cnt = self._acc_cnt[a]
        with np.errstate(divide="ignore", invalid="ignore"):
            row = self._acc_sum[a] / cnt
        row[(ppr - cnt) > XFF["AVERAGE"] * ppr] = NAN
        avg.data[pos] = row
        mn.data[pos] = self._acc_min[a]
        mx.data[pos] = self._acc_max[a]
        self._acc_sum[a] = 0.0
        self._acc_cnt[a] = 0.0
        self._acc_min[a] = NAN
        self._acc_max[a] = NAN

    # ----------------------------------------------------------------------------------- queries

    def _archive_rows(self, a: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Times (newest first) and ring positions of the newest *count* rows of archive *a*."""
        ppr, rows = ARCHIVES[a]
        res = ppr * STEP
        assert self.last_update is not None
        j_last = math.floor(self.last_update / res)
        j = j_last - np.arange(min(count, rows))
        return j * res, j % rows

    def _ring(self, a: int, cf: str) -> np.ndarray:
        for ring in self._rings[a]:
            if ring.cf == cf:
                return ring.data
        raise ValueError(f"archive {a} has no {cf} rows")

    def fetch(
        self,
        keys: Sequence[tuple[str, str]],
        cf: str = "AVERAGE",
        start: float = 0,
        end: float | None = None,
        interval: float = 0,
    ) -> Export:
        """Rows of the sources *keys* from *start* (negative: relative to the last update) on.

        The archive is xapi's ``/rrd_updates`` choice: among the archives storing *cf*, finest
        first, the first whose resolution is at least *interval* and whose span reaches back past
        *start* (``start > last row time − rows·resolution``); if none does, the coarsest one, the
        start clamped to its oldest row.  Rows with time ≥ start (and ≤ *end* if given), newest
        first, stamped at the end of their archive step.
        """
        cf = check_cf(cf)
        slots = np.array([self.slot(o, n) for o, n in keys], dtype=np.intp)
        candidates = [a for a, cfs in enumerate(ARCHIVE_CFS) if cf in cfs]
        if self.last_update is None:
            res = ARCHIVES[candidates[0]][0] * STEP
            return Export(res, np.empty(0, np.int64), np.empty((0, len(slots))), 0, 0)
        if start < 0:
            start = self.last_update + start
        pdp_interval = int(interval // STEP) if interval > 0 else 0
        last_pdp = math.floor(self.last_update / STEP) * STEP
        chosen = candidates[-1]
        for a in candidates:
            ppr, rows = ARCHIVES[a]
            if ppr >= pdp_interval and start > last_pdp - STEP * rows * ppr:
                chosen = a
                break
        ppr, rows = ARCHIVES[chosen]
        res = ppr * STEP
        last_row = math.floor(self.last_update / res) * res
        count = math.floor((last_row - start) / res) + 1 if start <= last_row else 0
        times, pos = self._archive_rows(chosen, max(0, count))
        if end is not None:
            keep = times <= end
            times, pos = times[keep], pos[keep]
        values = self._ring(chosen, cf)[pos][:, slots] if len(pos) else np.empty((0, len(slots)))
        times = times.astype(np.int64)
        newest = int(times[0]) if len(times) else int(last_row)
        oldest = int(times[-1]) if len(times) else newest
        return Export(res, times, values, oldest, newest)

    def last(self, owner: str, name: str) -> float:
        """The latest value of a source: its last PDP (NaN if unknown or never updated)."""
        s = self.slot(owner, name)
        row = self.latest_row()
        return NAN if row is None else float(row[s])

    def latest_row(self) -> np.ndarray | None:
        """A read-only view of the newest 5-s row (the last PDP of every slot, by slot), or None
        before the first update; the same view until the next update."""
        lu = self.last_update
        if lu is None:
            return None
        data = self._rings[0][0].data
        cached = self._latest_row
        if cached is None or cached[0] != lu or cached[1] is not data:
            _, pos = self._archive_rows(0, 1)
            view = data[pos[0]]
            view.flags.writeable = False
            cached = self._latest_row = (lu, data, view)
        return cached[2]

    def latest(self, idx: np.ndarray) -> np.ndarray:
        """The last PDP of each slot in *idx* (NaN when unknown or never updated); vectorised :meth:`last`."""
        row = self.latest_row()
        return np.full(len(idx), NAN) if row is None else row[idx]  # fancy indexing: a copy

    def rebase(self, idx: np.ndarray) -> None:
        """Forget the DERIVE baseline of the slots *idx* (their counters restarted, e.g. a rebuilt
        domain): their next update only records the new baseline and yields one unknown step."""
        self._last_raw[idx] = NAN
        self._last_time[idx] = NAN

    def average(self, keys: Sequence[tuple[str, str]], window: float, cf: str = "AVERAGE") -> np.ndarray:
        """The "cooked" statistic: each source consolidated over the last *window* seconds.

        Uses the finest archive storing *cf* whose span covers the window (else the coarsest) and
        its newest ``ceil(window / resolution)`` rows: mean (AVERAGE), min (MIN) or max (MAX) of the
        known rows; NaN where every row is unknown.  E.g. 30 s = the mean of the last six 5-s PDPs.
        """
        cf = check_cf(cf)
        try:
            table = self._slots
            slots = np.fromiter((table[o][n] for o, n in keys), dtype=np.intp, count=len(keys))
        except KeyError:
            slots = self.slots(keys)  # raises the KeyError naming the unknown key
        if self.last_update is None or window <= 0:
            return np.full(len(slots), NAN)
        candidates = [a for a, cfs in enumerate(ARCHIVE_CFS) if cf in cfs]
        chosen = candidates[-1]
        for a in candidates:
            ppr, rows = ARCHIVES[a]
            if ppr * STEP * rows >= window:
                chosen = a
                break
        res = ARCHIVES[chosen][0] * STEP
        _, pos = self._archive_rows(chosen, math.ceil(window / res))
        block = self._ring(chosen, cf)[pos][:, slots]
        known = ~np.isnan(block)
        with np.errstate(divide="ignore", invalid="ignore"):
            if cf == "AVERAGE":
                out = np.where(known, block, 0.0).sum(axis=0) / known.sum(axis=0)
            elif cf == "MIN":
                out = np.where(known, block, np.inf).min(axis=0)
            else:
                out = np.where(known, block, -np.inf).max(axis=0)
        out[~known.any(axis=0)] = NAN
        result: np.ndarray = out  # numpy's reductions are typed Any
        return result

    def dump(self, owner: str) -> dict[str, Any]:
        """An rrdtool-dump-like structure of *owner*'s RRD, as plain Python values.

        ``{"version": "0003", "step", "lastupdate", "ds": [{name, type, minimal_heartbeat, min, max,
        last_ds, value, unknown_sec}], "rra": [{cf, pdp_per_row, params: {xff}, last_row_time,
        cdp_prep: [{primary_value, secondary_value, value, unknown_datapoints}], database: [[one
        float per ds] per row, OLDEST first]}]}``.  ``value`` is the rate·seconds accumulated in the
        current step, ``unknown_sec`` its unknown seconds; ``cdp_prep.value`` the current row's
        running consolidated value (NaN while no PDP is known).  KeyError if the owner is unknown.
        """
        return rrd_dump.dump(self, owner)

    # ------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str], compress: bool = False) -> None:
        """Write the whole table to *path* atomically (``.npz``: temp file, fsync, ``os.replace``).

        *compress* trades CPU for disk (mostly-NaN archives compress well).
        """
        write_image(path, self.export(), compress)

    def export(self) -> dict[str, np.ndarray]:
        """A copy of the table's state for :func:`write_image`, sharing nothing with the table.

        Only the slots up to the highest one in use are copied.  Holds :attr:`lock` while copying,
        so it may run in a worker thread: :meth:`forget` waits for it, and the caller must not
        update the table meanwhile (the sampler's tick waits for the export)."""
        return rrd_image.export_image(self)

    @classmethod
    def load(cls, path: str | os.PathLike[str], now: float | None = None) -> tuple[RRDTable, str | None]:
        """Restore a table saved by :meth:`save`; return ``(table, warning)``.

        The time between the saved last update and *now* becomes unknown (NaN PDPs and rows).  A
        missing, unreadable or inconsistent file gives a fresh, empty table (created at *now*) and a
        warning string for the caller to log; otherwise the warning is None.
        """
        path = os.fspath(path)
        try:
            table = cls._read(path)
        except FileNotFoundError:
            return cls(start=now), f"no saved metrics archives at {path}; starting empty"
        except Exception as exc:  # noqa: BLE001 - any damage means "start empty"
            return cls(start=now), f"unreadable metrics archives {path} ({type(exc).__name__}: {exc}); starting empty"
        if now is not None and table.last_update is not None and now > table.last_update:
            table.advance(now)
        elif now is not None and table.last_update is None:
            table.last_update = float(now)
        return table, None

    @classmethod
    def _read(cls, path: str) -> RRDTable:
        return rrd_image.read_image(cls, path)
