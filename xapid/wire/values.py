"""Value markers shared by the XML-RPC and JSON-RPC encoders."""

from __future__ import annotations

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
    """Bounds on what a request may contain."""

    def __init__(self, max_body: int = 8 << 20, max_depth: int = 64, max_elements: int = 1_000_000):
        self.max_body = max_body
        self.max_depth = max_depth
        self.max_elements = max_elements
