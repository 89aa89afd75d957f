"""Value markers shared by the XML-RPC and JSON-RPC encoders."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# the value markers and bounds live in the core (xapid.apitypes); re-exported for the wire modules
from xapid.apitypes import DEFAULT_LIMITS, INT64_MAX, INT64_MIN, HugeInt, Int32, Limits, Preencoded

__all__ = ["DEFAULT_LIMITS", "INT64_MAX", "INT64_MIN", "HugeInt", "Int32", "Limits", "Preencoded", "WireError",
           "MAX_INT_TEXT", "parse_int"]


class WireError(Exception):
    """A request body that is not a usable call (answered with HTTP 500, as xapi does)."""


# Python refuses to convert int text over 4 300 digits (sys.int_max_str_digits), and the
# conversion is quadratic below that: longer literals are never converted (see HugeInt).
MAX_INT_TEXT = 4_000
_INT_TEXT = re.compile(r"[-+]?[0-9]+")


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


def float_map_members(value: dict[Any, Any], prefixes: dict[str, str], make_prefix: Callable[[str], str],
                      suffix: str, limit: int) -> list[str] | None:
    """The members of a map of string keys to finite floats (``host.query_stats``), each written
    ``prefix + repr(float) + suffix`` with the key's prefix made once by *make_prefix* and memoised in
    *prefixes* (cleared past *limit*); None for any other map (the general path then says what is wrong)."""
    values = value.values()
    if not values or not all(type(v) is float for v in values):
        return None
    total = sum(values)
    if total - total != 0.0:  # a NaN or infinity (or an overflow)
        return None
    get = prefixes.get
    members: list[str] = []
    append = members.append
    for k, v in value.items():
        prefix = get(k)
        if prefix is None:
            if not isinstance(k, str):
                return None
            prefix = make_prefix(k)
            if len(prefixes) >= limit:
                prefixes.clear()
            prefixes[k] = prefix
        append(prefix + repr(v) + suffix)
    return members
