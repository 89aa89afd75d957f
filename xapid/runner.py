"""Run blocking work off the reactor: one seam, a thread pool in the daemon, inline in tests."""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class Runner(Protocol):
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred: ...


class ThreadRunner:
    """Runs calls in a Twisted thread pool, results delivered in the reactor thread."""

    def __init__(self, reactor: Any, pool: ThreadPool):
        self._reactor = reactor
        self._pool = pool

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)


class InlineRunner:
    """Runs calls synchronously: for deterministic tests and start-up work."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        try:
            return succeed(fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - delivered as a failed Deferred like the pool does
            return fail()
