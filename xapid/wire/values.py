"""Value markers shared by the XML-RPC and JSON-RPC encoders."""

from __future__ import annotations

import re
from collections.abc import Callable, Sized
from typing import Any, TypeVar

# the value markers and bounds live in the core (xapid.apitypes); re-exported for the wire modules
from xapid.apitypes import DEFAULT_LIMITS, INT64_MAX, INT64_MIN, HugeInt, Int32, Limits, Preencoded

__all__ = ["DEFAULT_LIMITS", "INT64_MAX", "INT64_MIN", "HugeInt", "Int32", "Limits", "Preencoded", "WireError",
           "MAX_INT_TEXT", "Memo", "parse_int"]


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


MEMO_ITEM_MAX = 4096  # a longer encoded fragment is never memoised: one object's own, and it would hold memory
MEMO_BYTES = 16 << 20  # a memo is emptied once its fragments reach this many bytes (characters for text)


_F = TypeVar("_F", bound=Sized)


class Memo(dict[Any, _F]):
    """Encoded fragments shared by the encoders' replies, bounded in entries and in size.

    Reads are plain dict reads; :meth:`keep` (on a miss) empties the memo first when it holds
    *limit* entries or :data:`MEMO_BYTES`, and never keeps a fragment over :data:`MEMO_ITEM_MAX`:
    record values come from clients and guests (a map of large strings), so a count bound alone
    would let each distinct value pin its encoding until the memo fills."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        super().__init__()
        self.held = 0  # the kept fragments' total length

    def keep(self, key: Any, fragment: _F, limit: int) -> _F:
        """*fragment*, kept under *key* if small enough (see the class)."""
        size = len(fragment)
        if size > MEMO_ITEM_MAX:
            return fragment
        if len(self) >= limit or self.held + size > MEMO_BYTES:
            self.clear()
        self[key] = fragment
        self.held += size
        return fragment

    def clear(self) -> None:
        super().clear()
        self.held = 0


def float_map_members(value: dict[Any, Any], prefixes: Memo[str], make_prefix: Callable[[str], str],
                      suffix: str, limit: int) -> list[str] | None:
    """The members of a map of string keys to finite floats (``host.query_stats``), each written
    ``prefix + repr(float) + suffix`` with the key's prefix made once by *make_prefix* and memoised in
    *prefixes* (at most *limit* entries); None for any other map (the general path then says what is wrong)."""
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
            prefix = prefixes.keep(k, make_prefix(k), limit)
        append(prefix + repr(v) + suffix)
    return members
