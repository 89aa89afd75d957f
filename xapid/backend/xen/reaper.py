"""Reaping libxl's children from Twisted's SIGCHLD handling (:class:`LibxlReaper`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.logger import Logger

log = Logger()


REAPER_KEY = "xapid-libxl-children"  # our entry in Twisted's reap registry (never a pid)


class LibxlReaper:
    """SIGCHLD → ``libxl_childproc_sigchld_occurred``, in the reactor thread.

    Twisted owns SIGCHLD: its reactor installs a no-op handler with ``set_wakeup_fd`` and, when
    woken, calls ``reapProcess()`` on every entry of ``twisted.internet.process.reapProcessHandlers``
    (``_SIGCHLDWaker.doRead`` → ``reapAllProcesses``); each Twisted process reaps only its own
    pid.  This object sits in that registry under a key that is no pid, so every SIGCHLD the
    reactor sees also reaches libxl, which reaps only its own children (main-loop mode): both
    sides reap selectively and Twisted's children are still reaped by Twisted.  The registry is
    Twisted's (not public API); the driver's 1 s health tick calls :meth:`reapProcess` too, so a
    reactor without signal handlers, or a change in Twisted, costs latency, not a hang.
    """

    def __init__(self, reap: Callable[[], None]) -> None:
        self._reap = reap

    def reapProcess(self) -> None:  # noqa: N802 - Twisted's name
        try:
            self._reap()
        except Exception:  # noqa: BLE001 - never break Twisted's own reaping loop
            log.failure("libxl child reaping failed")

    def install(self) -> None:
        _reap_handlers()[REAPER_KEY] = self

    def uninstall(self) -> None:
        handlers = _reap_handlers()
        if handlers.get(REAPER_KEY) is self:
            del handlers[REAPER_KEY]


def _reap_handlers() -> dict[object, object]:
    """Twisted's reap registry, typed ``dict[int, _BaseProcess]``: our entry's key is no pid and
    its value only has the ``reapProcess()`` that ``reapAllProcesses`` calls."""
    from twisted.internet import process

    return cast("dict[object, object]", process.reapProcessHandlers)
