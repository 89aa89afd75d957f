"""Run blocking work off the reactor: one seam, a thread pool in the daemon, inline in tests.

A thread's result reaches the reactor through :class:`Completions`, a socket pair the reactor
polls like any client's socket, rather than through ``callFromThread``: the reactor runs thread
calls only after it has handled every socket its last poll returned, so under a burst of input
(a thousand ``event.from`` watchers re-arming after a change) a finished database commit waited
for the whole burst, and with it the reply of the call that made the change.  Polled as a
socket, a result is handled in the order it became ready among the sockets.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


log = Logger()


class Runner(Protocol):
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred: ...


class Completions:
    """Results of worker threads, delivered in the reactor thread when the reactor polls a socket
    pair (an ``IReadDescriptor`` added with ``addReader`` on creation; :meth:`close` removes it)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._inbox, self._bell = socket.socketpair()
        self._inbox.setblocking(False)
        self._bell.setblocking(False)
        self._done: deque[tuple[Deferred[Any], bool, Any]] = deque()  # appended by threads, taken by the reactor
        reactor.addReader(self)

    def deliver(self, d: Deferred[Any], ok: bool, outcome: Any) -> None:
        """(Any thread) fire *d* with *outcome* in the reactor thread: its callback if *ok*, else its
        errback (*outcome* a :class:`Failure`)."""
        self._done.append((d, ok, outcome))  # before the bell: a drained bell never hides a result
        try:
            self._bell.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the bell is full: it is ringing already
        except OSError:
            pass  # closed at shutdown: the reactor is gone

    def fileno(self) -> int:
        return self._inbox.fileno()

    def doRead(self) -> None:
        try:
            while self._inbox.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._done:
            d, ok, outcome = self._done.popleft()
            try:
                if ok:
                    d.callback(outcome)
                else:
                    d.errback(outcome)
            except Exception:  # noqa: BLE001 - one bad Deferred must not stop every later result
                log.failure("delivering a worker thread's result failed")

    def connectionLost(self, reason: Any) -> None:
        pass  # removed by the reactor only if doRead raised, which it does not: close() ends it

    def logPrefix(self) -> str:
        return "xapid-runner"

    def close(self) -> None:
        if self._inbox.fileno() >= 0:
            self._reactor.removeReader(self)
            self._inbox.close()
            self._bell.close()


class ThreadRunner:
    """Runs calls in a Twisted thread pool, results delivered in the reactor thread (through
    *completions*, shared by the runners of one reactor, or one of its own)."""

    def __init__(self, reactor: Any, pool: ThreadPool, completions: Completions | None = None):
        self._pool = pool
        self._completions = completions if completions is not None else Completions(reactor)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        d: Deferred[Any] = Deferred()
        completions = self._completions

        def work() -> None:
            try:
                outcome: Any = fn(*args, **kwargs)
            except BaseException:  # noqa: BLE001 - delivered as a failed Deferred
                completions.deliver(d, False, Failure())
            else:
                completions.deliver(d, True, outcome)

        self._pool.callInThread(work)
        return d


class InlineRunner:
    """Runs calls synchronously: for deterministic tests and start-up work."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        try:
            return succeed(fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - delivered as a failed Deferred like the pool does
            return fail()
