"""Value markers shared by the XML-RPC and JSON-RPC encoders."""

from __future__ import annotations

import re

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
