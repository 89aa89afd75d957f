"""The store's objects and what it says about them (:mod:`xapid.store`): :class:`Obj` (one stored
object), :class:`CachedRecord` (its record on the way to the wire), :class:`Change` (one write),
:func:`new_ref`, and the reading back of saved records (:func:`decode_record`, :func:`clean_floats`)."""

from __future__ import annotations

import math
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Callable

from twisted.logger import Logger

from xapid.apitypes import from_json
from xapid.schema import ClassSpec

log = Logger(namespace="xapid.store")  # the store's warnings, wherever written


def new_ref() -> str:
    """An unguessable reference: ``OpaqueRef:<uuid4>``."""
    return f"OpaqueRef:{uuidlib.uuid4()}"


class Obj:
    """One stored object.  ``fields`` is the record; ``cache`` holds encoded forms."""

    __slots__ = ("cls", "ref", "fields", "cache")

    def __init__(self, cls: str, ref: str, fields: dict[str, Any]):
        self.cls = cls
        self.ref = ref
        self.fields = fields
        self.cache: dict[str, Any] = {}


class CachedRecord:
    """An object's record on its way to the wire: encoded once per format until the object
    changes (every write clears ``Obj.cache``)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def encoded(self, fmt: str, encode: Callable[[Any], bytes]) -> bytes:
        cache = self.obj.cache
        text = cache.get(fmt)
        if text is None:
            text = cache[fmt] = encode(self.obj.fields)
        encoded: bytes = text  # the cache holds what encode returned
        return encoded

    @property
    def value(self) -> dict[str, Any]:
        """The record as a plain dict (a copy)."""
        return dict(self.obj.fields)


@dataclass(frozen=True)
class Change:
    """One write: ``op`` is add, mod or del; ``seq`` increases by one per change."""

    seq: int
    cls: str
    op: str
    ref: str


def decode_record(spec: ClassSpec, data: dict[str, Any]) -> dict[str, Any]:
    """A record from its stored JSON (as :meth:`xapid.store.Store.load` reads it): the schema
    defaults, with the fields the class still has taken from *data*."""
    record = spec.defaults()
    for name, value in data.items():
        f = spec.fields.get(name)
        if f is not None:
            record[name] = from_json(f.type, value)
    return record


def clean_floats(spec: ClassSpec, obj: Obj) -> bool:
    """Reset NaN and ±Infinity (saved by an older xapid; the wires refuse them now) in float
    fields, and in sets and maps of floats, to the field's default (0.0); one warning per field.
    Returns whether anything was reset."""
    changed = False
    for name, value in obj.fields.items():
        f = spec.fields.get(name)
        if f is None:
            continue
        t = f.type
        if t.kind == "float" and isinstance(value, float) and not math.isfinite(value):
            default = f.default if isinstance(f.default, float) and math.isfinite(f.default) else 0.0
            obj.fields[name] = default
        elif t.kind in ("set", "map") and t.elem is not None and t.elem.kind == "float" and any(
                isinstance(v, float) and not math.isfinite(v) for v in (value.values() if t.kind == "map" else value)):
            default = 0.0
            obj.fields[name] = ({k: _finite(v) for k, v in value.items()} if t.kind == "map"
                                else [_finite(v) for v in value])
        else:
            continue
        changed = True
        log.warn("{cls} {ref}: field {field} held a non-finite float ({value}) saved by an older xapid; "
                 "reset to {default}", cls=obj.cls, ref=obj.ref, field=name, value=repr(value), default=default)
    return changed


def _finite(value: Any) -> Any:
    return 0.0 if isinstance(value, float) and not math.isfinite(value) else value
