"""Value markers shared by the XML-RPC and JSON-RPC encoders."""

from __future__ import annotations

import re
from typing import Any, Callable, Protocol


class Int32(int):
    """An int sent as ``<i4>`` on XML-RPC (only ``event.from``'s ``valid_ref_counts``)."""


class Preencoded(Protocol):
    """A value able to give (and cache) its own encoding in a wire format.

    ``encoded(fmt, encode)`` returns the UTF-8 encoding for format *fmt* ("xml" or "json"),
    calling ``encode(plain_value)`` at most once per format until the underlying object changes.
    """

    def encoded(self, fmt: str, encode: Callable[[Any], bytes]) -> bytes: ...


class WireError(Exception):
    """A request body that is not a usable call (answered with HTTP 500, as xapi does)."""


class Limits:
    """Bounds on what a request may contain.

    The body, nesting and element bounds are checked by the wire decoders; the value bounds
    (``max_string_bytes`` for every string, ``max_collection_items`` for every set, map and
    record) by :func:`xapid.apitypes.coerce`, which knows the parameter's name.
    """

    def __init__(self, max_body: int = 8 << 20, max_depth: int = 64, max_elements: int = 1_000_000, *,
                 max_string_bytes: int = 1 << 20, max_collection_items: int = 10_000):
        self.max_body = max_body
        self.max_depth = max_depth
        self.max_elements = max_elements
        self.max_string_bytes = max_string_bytes
        self.max_collection_items = max_collection_items


DEFAULT_LIMITS = Limits()

# xapi's int is OCaml's Int64: anything outside is FIELD_TYPE_ERROR, however it arrived.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Python refuses to convert int text over 4 300 digits (sys.int_max_str_digits), and the
# conversion is quadratic below that: longer literals are never converted (see HugeInt).
MAX_INT_TEXT = 4_000
_INT_TEXT = re.compile(r"[-+]?[0-9]+")


class HugeInt(int):
    """Stands for an integer literal too long to convert (over ``MAX_INT_TEXT`` characters).

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


def parse_int(text: str) -> int:
    """An integer literal from the wire (``<int>``, ``<i8>``, a JSON number) without
    Python's digit-limit ValueError: over ``MAX_INT_TEXT`` characters gives a :class:`HugeInt`.
    Raises ValueError for text that is not an integer."""
    text = text.strip()
    if len(text) > MAX_INT_TEXT:
        if _INT_TEXT.fullmatch(text) is None:
            raise ValueError(f"invalid integer literal of {len(text)} characters")
        return HugeInt.of(text)
    return int(text)
