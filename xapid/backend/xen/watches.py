"""Xenstore watch events delivered through the Twisted reactor.

:class:`WatchReader` is an ``IReadDescriptor`` on :meth:`XenStore.fileno`: when the
descriptor becomes readable it drains every pending event and hands each to a callback
in the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xapid.backend.xen.xenstore import XenStore

log = Logger()


@implementer(IReadDescriptor)
class WatchReader:
    """Calls ``callback(path, token)`` for every watch event of *store* while started."""

    def __init__(self, store: XenStore, callback: Callable[[str, str], Any]) -> None:
        self._store = store
        self._callback = callback
        self._fd = store.fileno()
        self._reactor: IReactorFDSet | None = None

    def start(self, reactor: IReactorFDSet) -> None:
        """Begin delivering events through *reactor*."""
        self._reactor = reactor
        reactor.addReader(self)

    def stop(self) -> None:
        """Stop delivering events; idempotent."""
        if self._reactor is not None:
            self._reactor.removeReader(self)
            self._reactor = None

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "xenstore-watch"

    def doRead(self) -> None:
        """Drain the pending events, then deliver them until a callback stops the reader.

        Draining first means no library call follows a callback, which may close the store.
        A failing callback is logged and does not stop the others.
        """
        events = []
        while (event := self._store.check_watch()) is not None:
            events.append(event)
        for path, token in events:
            if self._reactor is None:
                break
            try:
                self._callback(path, token)
            except Exception:
                log.failure("xenstore watch callback failed for {path}", path=path)

    def connectionLost(self, reason: Failure) -> None:
        self._reactor = None
