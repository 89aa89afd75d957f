"""The web origins ``[server] cors_origins`` allows: one reading for CORS replies
(:mod:`xapid.wire.resource`) and for console WebSockets (:mod:`xapid.console.routes`).

An origin is compared as browsers send it, ``scheme://host[:port]``: case-insensitively (a host
name's case means nothing) and without a trailing slash.  ``*`` allows any origin."""

from __future__ import annotations

from collections.abc import Iterable


def normal(origin: str) -> str:
    """*origin* as origins are compared: lower case, no trailing slash."""
    return origin.rstrip("/").lower()


class AllowedOrigins:
    """The configured origins; false when there are none (and no ``*``)."""

    def __init__(self, configured: Iterable[str]) -> None:
        listed = tuple(configured)
        self.any = "*" in listed
        self._allowed = frozenset(normal(o) for o in listed if o != "*")

    def __bool__(self) -> bool:
        return self.any or bool(self._allowed)

    def allows(self, origin: bytes) -> bool:
        """Whether a request's ``Origin`` header value is allowed."""
        return self.any or normal(origin.decode("latin-1")) in self._allowed
