"""Xen-API value types: parsing the schema's type expressions, coercing wire values.

In memory, API values are plain Python: ``str`` (strings, refs, enums), ``int``, ``float``,
``bool``, ``datetime`` (UTC-aware), ``list`` (sets), ``dict`` with ``str`` keys (maps).
Map keys are kept in their wire (string) form whatever their declared type.
"""

from __future__ import annotations

import json
import math
import re
import xmlrpc.client
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Protocol

from xapid.errors import XenAPIError, field_type_error, invalid_value

NULL_REF = "OpaqueRef:NULL"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
PRIMITIVES = ("string", "int", "float", "bool", "datetime", "void")


# xapi's int is OCaml's Int64: anything outside is FIELD_TYPE_ERROR, however it arrived.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class Int32(int):
    """An int sent as ``<i4>`` on XML-RPC (only ``event.from``'s ``valid_ref_counts``)."""


class Preencoded(Protocol):
    """A value able to give (and cache) its own encoding in a wire format.

    ``encoded(fmt, encode)`` returns the UTF-8 encoding for format *fmt* ("xml" or "json"),
    calling ``encode(plain_value)`` at most once per format until the underlying object changes.
    """

    def encoded(self, fmt: str, encode: Callable[[Any], bytes]) -> bytes: ...


class SharedValue:
    """A :class:`Preencoded` reply value answered to many callers at once (one ``event.from`` batch
    for every watcher it wakes, one ``host.query_stats`` answer per sample): each wire encoding is
    made once.  ``value`` is the plain value; ``reply[key]`` reads a member of a struct value;
    ``replies`` is where the wire keeps the finished replies carrying it (one per protocol)."""

    __slots__ = ("value", "cache", "replies")

    def __init__(self, value: Any):
        self.value = value
        self.cache: dict[str, bytes] = {}
        self.replies: dict[str, Any] = {}

    def encoded(self, fmt: str, encode: Callable[[Any], bytes]) -> bytes:
        text = self.cache.get(fmt)
        if text is None:
            text = self.cache[fmt] = encode(self.value)
        return text

    def __getitem__(self, key: str) -> Any:
        return self.value[key]


class HugeInt(int):
    """Stands for an integer literal too long to convert (the wire decoders make it, see
    :func:`xapid.wire.values.parse_int`).

    Its value is ±2⁶⁴, outside every API int (so FIELD_TYPE_ERROR for int parameters); as a
    float it is out of range (INVALID_VALUE).  ``text`` is a short description for errors.
    """

    text: str

    @classmethod
    def of(cls, literal: str) -> "HugeInt":
        negative = literal.startswith("-")
        value = cls(-(1 << 64) if negative else 1 << 64)
        value.text = f"{literal[:20]}... ({len(literal)} characters)"
        return value


class Limits:
    """Bounds on what a request may contain.

    The body, nesting and element bounds are checked by the wire decoders; the value bounds
    (``max_string_bytes`` for every string, ``max_collection_items`` for every set, map and
    record) by :func:`coerce`, which knows the parameter's name.
    """

    def __init__(self, max_body: int = 8 << 20, max_depth: int = 64, max_elements: int = 1_000_000, *,
                 max_string_bytes: int = 1 << 20, max_collection_items: int = 10_000):
        self.max_body = max_body
        self.max_depth = max_depth
        self.max_elements = max_elements
        self.max_string_bytes = max_string_bytes
        self.max_collection_items = max_collection_items


DEFAULT_LIMITS = Limits()


def utc(seconds: float, *, exact: bool = False) -> datetime:
    """*seconds* since the epoch as a UTC datetime, in whole seconds as xapi's datetimes
    (*exact*: keeping the fraction)."""
    return datetime.fromtimestamp(seconds if exact else int(seconds), tz=timezone.utc)


@dataclass(frozen=True)
class Type:
    """A parsed type expression, e.g. ``(string -> VM ref set) map``."""

    kind: str  # string int float bool datetime void ref enum set map record
    name: str = ""  # class (ref, record) or enum name
    elem: "Type | None" = None  # set element, map value
    key: "Type | None" = None  # map key

    @property
    def item(self) -> "Type":
        """The element type of a set, the value type of a map (:func:`parse_type` always gives one)."""
        if self.elem is None:
            raise TypeError(f"{self.kind} type has no element type")
        return self.elem

    @property
    def map_key(self) -> "Type":
        """The key type of a map."""
        if self.key is None:
            raise TypeError(f"{self.kind} type has no key type")
        return self.key

    def __str__(self) -> str:
        if self.kind in PRIMITIVES:
            return self.kind
        if self.kind in ("ref", "record"):
            return f"{self.name} {self.kind}"
        if self.kind == "enum":
            return self.name
        if self.kind == "set":
            return f"{self.elem} set"
        return f"({self.key} -> {self.elem}) map"


class TypeSyntaxError(ValueError):
    pass


def parse_type(text: str, enums: frozenset[str]) -> Type:
    """Parse xapi's type notation; names that are not primitives or enums must be refs/records."""
    t = text.strip()
    if t.endswith(" set"):
        return Type("set", elem=parse_type(t[:-4], enums))
    if t.endswith(" map"):
        inner = t[:-4].strip()
        if not (inner.startswith("(") and inner.endswith(")")):
            raise TypeSyntaxError(f"map type needs '(K -> V) map': {text!r}")
        inner = inner[1:-1]
        depth = 0
        for i, ch in enumerate(inner):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0 and inner.startswith("->", i):
                return Type("map", key=parse_type(inner[:i], enums), elem=parse_type(inner[i + 2 :], enums))
        raise TypeSyntaxError(f"map type without '->': {text!r}")
    for suffix in ("ref", "record"):
        if t.endswith(" " + suffix):
            name = t[: -len(suffix) - 1].strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise TypeSyntaxError(f"bad class name in {text!r}")
            return Type(suffix, name=name)
    if t in PRIMITIVES:
        return Type(t)
    if t in enums:
        return Type("enum", name=t)
    raise TypeSyntaxError(f"unknown type {text!r}")


def zero_value(t: Type) -> Any:
    """The value a field of type *t* holds when nothing set it (fresh containers)."""
    if t.kind == "set":
        return []
    if t.kind in ("map", "record"):
        return {}
    return {"string": "", "int": 0, "float": 0.0, "bool": False, "datetime": EPOCH, "void": "",
            "ref": NULL_REF, "enum": ""}[t.kind]


def parse_default(t: Type, text: str, enum_values: Mapping[str, tuple[str, ...]]) -> Any:
    """Parse a schema ``default`` attribute into a value of type *t* (raises ValueError)."""
    if t.kind in ("set", "map"):
        return coerce(t, json.loads(text), "default", enum_values)
    if t.kind == "bool":
        if text not in ("true", "false"):
            raise ValueError(f"bool default must be true or false, not {text!r}")
        return text == "true"
    return coerce(t, text, "default", enum_values)


_SURROGATE = re.compile("[\ud800-\udfff]")
_DT_FORMATS = ("%Y%m%dT%H:%M:%SZ", "%Y%m%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y%m%dT%H%M%SZ")


def parse_datetime(text: str) -> datetime:
    for fmt in _DT_FORMATS:
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def format_datetime(value: datetime) -> str:
    """xapi's datetime text: ``YYYYMMDDTHH:MM:SSZ`` in UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.strftime("%Y%m%dT%H:%M:%SZ")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_DIGITS = re.compile(r"\s*([-+]?)(\d+)\s*")  # disjoint classes: no backtracking blow-up


def _string_too_long(value: str, limit: int) -> int:
    """The UTF-8 size of *value* when it is over *limit* bytes, else 0 (encoding only when needed)."""
    if len(value) > limit:
        return len(value.encode("utf-8", "surrogatepass"))
    if len(value) * 4 <= limit:
        return 0
    size = len(value.encode("utf-8", "surrogatepass"))
    return size if size > limit else 0


def _finite(value: float, field: str, text: Any) -> float:
    """*value* if finite; NaN and ±infinity (also 1e999 overflowing) are INVALID_VALUE."""
    if math.isfinite(value):
        return value
    raise invalid_value(field, text if isinstance(text, str) and len(text) <= 64 else repr(value))


def coerce(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
           limits: Limits = DEFAULT_LIMITS) -> Any:
    """Turn a decoded wire value into the in-memory value of type *t*.

    Accepts every form real clients send (ints as ``<int>``/``<i8>`` or digit strings, floats
    as ints or numeric strings, datetimes as ``DateTime`` or text).  Raises FIELD_TYPE_ERROR
    for a value of the wrong kind or an int outside 64 bits (xapi's int64), and INVALID_VALUE
    for a bad enum or datetime text, a NaN or infinite float, a string longer than
    ``limits.max_string_bytes`` or a set, map or record with more than
    ``limits.max_collection_items`` entries (the value is then described, not echoed).
    Work is linear in the size of *value*.
    """
    coercer = _COERCERS.get(t.kind)
    if coercer is None:
        raise XenAPIError("INTERNAL_ERROR", f"cannot coerce type {t}")
    return coercer(t, value, field, enum_values, limits)


def _coerce_string(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                   limits: Limits) -> Any:
    """A string or ref: bounded in size, encodable as UTF-8."""
    if isinstance(value, str):
        size = _string_too_long(value, limits.max_string_bytes)
        if size:
            raise invalid_value(field, f"a string of {size} bytes (at most {limits.max_string_bytes})")
        if _SURROGATE.search(value):  # not encodable as UTF-8 (a JSON "\ud800" escape)
            raise invalid_value(field, value.encode("utf-8", "backslashreplace").decode())
        return value
    raise field_type_error(field)


def _coerce_int(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                limits: Limits) -> Any:
    """An int64 from an int or a digit string."""
    if _is_int(value):
        if INT64_MIN <= value <= INT64_MAX:
            return int(value)
        raise field_type_error(field)
    if isinstance(value, str):
        match = _DIGITS.fullmatch(value)
        digits = match.group(2).lstrip("0") or "0" if match is not None else ""
        if match is not None and digits and len(digits) <= 19:  # checked before int(): no digit-limit error, no quadratic work
            number = int(match.group(1) + digits)
            if INT64_MIN <= number <= INT64_MAX:
                return number
    raise field_type_error(field)


def _coerce_float(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                  limits: Limits) -> Any:
    """A finite float from a float, an int or numeric text."""
    if isinstance(value, float):
        return _finite(value, field, None)
    if isinstance(value, HugeInt):
        raise invalid_value(field, value.text)
    if _is_int(value):
        try:
            return float(value)
        except OverflowError:  # beyond 1.8e308
            raise invalid_value(field, f"an integer of {len(str(value))} digits") from None
    if isinstance(value, str):
        if len(value) > 1024:  # no float needs more text: refused without converting
            raise invalid_value(field, f"a number of {len(value)} characters")
        try:
            return _finite(float(value), field, value.strip())
        except ValueError:
            raise field_type_error(field) from None
    raise field_type_error(field)


def _coerce_bool(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                 limits: Limits) -> Any:
    """A bool from a bool or ``true``/``false`` text (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise field_type_error(field)


def _coerce_enum(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                 limits: Limits) -> Any:
    """One of the enum's values (matched case-insensitively, as xapi does)."""
    if not isinstance(value, str):
        raise field_type_error(field)
    allowed = enum_values[t.name]
    if value in allowed:
        return value
    for candidate in allowed:  # xapi matches enum text case-insensitively
        if candidate.lower() == value.lower():
            return candidate
    raise invalid_value(field, value)


def _coerce_datetime(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                     limits: Limits) -> Any:
    """An aware datetime from a datetime, an XML-RPC DateTime or text."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, xmlrpc.client.DateTime):
        value = value.value
    if isinstance(value, str):
        try:
            return parse_datetime(value)
        except ValueError:
            raise invalid_value(field, value) from None
    raise field_type_error(field)


def _coerce_set(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                limits: Limits) -> Any:
    """A list of distinct coerced elements, the first occurrence kept in the client's order."""
    if not isinstance(value, (list, tuple)):
        raise field_type_error(field)
    _check_items(value, field, limits)
    out: list[Any] = []
    seen: set[Any] = set()  # items are all of the element type: hash equality is list equality
    unhashable: list[Any] = []  # sets of sets or maps (none in the schema today): compared in full
    elem = t.item
    for item in value:
        item = coerce(elem, item, field, enum_values, limits)
        try:
            if item in seen:
                continue
            seen.add(item)
        except TypeError:
            if item in unhashable:
                continue
            unhashable.append(item)
        out.append(item)  # first occurrence kept, in the client's order
    return out


def _coerce_map(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                limits: Limits) -> Any:
    """A dict of coerced keys (as text) and values."""
    if not isinstance(value, dict):
        raise field_type_error(field)
    _check_items(value, field, limits)
    result: dict[str, Any] = {}
    key_type, elem = t.map_key, t.item
    for k, v in value.items():
        key = coerce(key_type, k if isinstance(k, str) else str(k), field, enum_values, limits)
        result[str(key).lower() if isinstance(key, bool) else str(key)] = coerce(elem, v, field, enum_values, limits)
    return result


def _coerce_record(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                   limits: Limits) -> Any:
    """A dict, bounded in size (its fields are coerced by the handler)."""
    if not isinstance(value, dict):
        raise field_type_error(field)
    _check_items(value, field, limits)  # its fields are coerced by the handler (generic.create_fields)
    return value


def _coerce_void(t: Type, value: Any, field: str, enum_values: Mapping[str, tuple[str, ...]],
                 limits: Limits) -> Any:
    """The value itself."""
    return value


_Coercer = Callable[[Type, Any, str, Mapping[str, tuple[str, ...]], Limits], Any]
#: the coercion of each type kind (see :func:`coerce`)
_COERCERS: dict[str, _Coercer] = {
    "string": _coerce_string,
    "ref": _coerce_string,
    "int": _coerce_int,
    "float": _coerce_float,
    "bool": _coerce_bool,
    "enum": _coerce_enum,
    "datetime": _coerce_datetime,
    "set": _coerce_set,
    "map": _coerce_map,
    "record": _coerce_record,
    "void": _coerce_void,
}


def _check_items(value: Any, field: str, limits: Limits) -> None:
    if len(value) > limits.max_collection_items:
        raise invalid_value(field, f"{len(value)} items (at most {limits.max_collection_items})")


def from_json(t: Type, value: Any) -> Any:
    """A value of type *t* from the store's JSON (datetimes as xapi text; trusted input)."""
    if t.kind == "datetime":
        return parse_datetime(value) if isinstance(value, str) else EPOCH
    if t.kind == "set":
        elem = t.item
        return [from_json(elem, v) for v in value]
    if t.kind == "map":
        elem = t.item
        return {k: from_json(elem, v) for k, v in value.items()}
    return value
