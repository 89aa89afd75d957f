"""The query side of the sampler: the ``data_source`` records of an owner, latest values,
selection of sources by glob, and consolidated ("cooked") values over a window."""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Callable
from typing import Any

from xapid.stats.rrd import RRDTable
from xapid.stats.sources import DISPLAY_MAX, NAN, UNBOUNDED, spec_of, wire_float

_GLOB_CHARS = re.compile(r"[*?\[]")


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> Callable[[str], Any]:
    """A case-sensitive matcher of a shell glob (``fnmatch`` semantics), compiled once."""
    return re.compile(fnmatch.translate(pattern)).match



class SourceQueries:
    """Reading the archives of :attr:`table` (mixed into :class:`xapid.stats.sampler.Sampler`)."""

    table: RRDTable

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
                maximum = DISPLAY_MAX.get(ds.units, NAN)
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
        table = self.table
        if _GLOB_CHARS.search(uuid_glob):
            uuid_match = _glob(uuid_glob)
            prefix = kind + ":"
            owners = [o for o in table.owners() if o.startswith(prefix) and uuid_match(o[len(prefix):])]
        else:  # one owner: no scan
            owners = [f"{kind}:{uuid_glob}"]
        if name_glob == "*":
            return [(owner, name) for owner in owners for name in table.names(owner)]
        name_match = _glob(name_glob)
        return [(owner, name) for owner in owners for name in table.names(owner) if name_match(name)]

    def cooked(self, keys: list[tuple[str, str]], window: float, cf: str) -> dict[str, float]:
        """``{"<owner>:<uuid>:<name>": value}`` consolidated over the last *window* s; unknown values omitted."""
        if not keys:
            return {}
        values = self.table.average(keys, window, cf)
        return {f"{o}:{n}": v for (o, n), v in zip(keys, values.tolist()) if v == v}  # NaN (unknown) left out
