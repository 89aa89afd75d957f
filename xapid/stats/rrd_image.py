"""The saved form of :class:`xapid.stats.rrd.RRDTable`: one ``.npz`` image, exported, written, read back.

Reads and fills the table's arrays directly (it is the table's companion module).
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from xapid.files import atomic_writer
from xapid.stats.rrd_layout import (
    ARCHIVES,
    DERIVE_CODE,
    FORMAT_VERSION,
    HUGE,
    KINDS,
    STEP,
    DataSource,
)

if TYPE_CHECKING:
    from xapid.stats.rrd import RRDTable

#: the table's per-slot arrays saved in an image (named without the leading underscore)
ARRAYS = ("_kind", "_min", "_max", "_last_raw", "_last_time", "_pdp_sum", "_pdp_known",
          "_acc_sum", "_acc_cnt", "_acc_min", "_acc_max")


def export_image(table: RRDTable) -> dict[str, np.ndarray]:
    """See :meth:`RRDTable.export` (holds the table's lock while copying)."""
    with table.lock:
        used = [i for i in table._info if i is not None]
        width = max((i.slot for i in used), default=-1) + 1
        meta = {
            "version": FORMAT_VERSION,
            "step": STEP,
            "archives": [list(x) for x in ARCHIVES],
            "capacity": table._cap,
            "width": width,
            "last_update": table.last_update,
            "sources": [[i.slot, i.owner, i.name, i.kind, i.min, i.max, i.units, i.description] for i in used],
        }
        image: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for name in ARRAYS:
            image[name.lstrip("_")] = getattr(table, name)[..., :width].copy()
        for a, rings in enumerate(table._rings):
            for ring in rings:
                image[f"rra{a}_{ring.cf}"] = ring.data[:, :width].copy()
    return image


def write_image(path: str | os.PathLike[str], image: dict[str, np.ndarray], compress: bool = False) -> None:
    """Write an :meth:`RRDTable.export` image to *path* atomically (:func:`xapid.files.atomic_writer`, 0600)."""
    with atomic_writer(path, 0o600) as f:
        if compress:
            np.savez_compressed(f, **image)  # type: ignore[arg-type]  # stubs: **kwds typed as allow_pickle
        else:
            np.savez(f, **image)  # type: ignore[arg-type]  # same stub limitation


def read_image(cls: type[RRDTable], path: str) -> RRDTable:
    """A table of class *cls* restored from the image at *path*; ValueError (or another error of
    reading) when the file is damaged or of another format or layout."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"][()]))
        cap, width = _check_meta(meta)
        table = cls(capacity=cap)
        lu = meta["last_update"]
        table.last_update = None if lu is None else float(lu)
        _fill_arrays(table, z, width)
    _restore_sources(table, meta["sources"], cap, width)
    return table


def _check_meta(meta: dict[str, Any]) -> tuple[int, int]:
    """The image's capacity and saved width (slots 0 … width - 1), its format and layout checked."""
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('version')!r}")
    if meta["step"] != STEP or [tuple(x) for x in meta["archives"]] != list(ARCHIVES):
        raise ValueError("different archive layout")
    cap = int(meta["capacity"])
    if cap < 1:
        raise ValueError("bad capacity")
    width = int(meta.get("width", cap))  # the saved columns: slots 0 … width - 1
    if not 0 <= width <= cap:
        raise ValueError("bad width")
    return cap, width


def _fill_arrays(table: RRDTable, z: Any, width: int) -> None:
    """Copy the saved per-slot arrays and archive rows of the open image *z* into *table*."""
    for name in ARRAYS:
        value = z[name.lstrip("_")]
        current = getattr(table, name)[..., :width]
        if value.shape != current.shape:
            raise ValueError(f"{name.lstrip('_')}: shape {value.shape}, expected {current.shape}")
        current[...] = value
    for a, rings in enumerate(table._rings):
        for ring in rings:
            value = z[f"rra{a}_{ring.cf}"]
            if value.shape != ring.data[:, :width].shape:
                raise ValueError(f"rra{a}_{ring.cf}: shape {value.shape}")
            ring.data[:, :width] = value


def _restore_sources(table: RRDTable, sources: list[list[Any]], cap: int, width: int) -> None:
    """Re-register the saved sources in their slots; the other slots become free."""
    used = set()
    for slot, owner, name, kind, lo, hi, units, description in sources:
        slot = int(slot)
        if not 0 <= slot < width or slot in used or kind not in KINDS:
            raise ValueError(f"bad source entry {owner}/{name}")
        used.add(slot)
        table._slots.setdefault(owner, {})[name] = slot
        lo, hi = float(lo), float(hi)
        code = KINDS.index(kind)
        table._kind[slot] = code
        table._not_derive[slot] = code != DERIVE_CODE
        table._lo[slot] = -HUGE if math.isnan(lo) else lo
        table._hi[slot] = HUGE if math.isnan(hi) else hi
        table._info[slot] = DataSource(owner, name, kind, lo, hi, units, description, slot)
    table._free = [s for s in range(cap - 1, -1, -1) if s not in used]
