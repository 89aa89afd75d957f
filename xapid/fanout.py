"""Follow-up work held back while one change answers many waiting callers.

When a change wakes a thousand ``event.from`` watchers, every reply should leave as soon as
possible: the last watcher's wait is the time to send every reply before it.  So the waker marks
the fan-out (:func:`sending`), and while it lasts the connections answering those replies send
them at once but queue what comes after a reply (setting the next deadline, reading the next
request) with :func:`later`; the queue runs, in order, when the fan-out ends, before the reactor
reads anything more.  Outside a fan-out :func:`later` refuses and callers do the work inline.

A reply woken this way may also take the *express lane* (:class:`Wait`): its bytes are written
before any waiter's callbacks run, so the last watcher waits for the sends before it and not for
every other watcher's Python as well.

Everything here runs on the reactor thread; fan-outs do not nest (an inner one joins the outer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

_queue: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None


@contextmanager
def sending() -> Iterator[None]:
    """A fan-out: the follow-ups queued inside run when it ends (each one's failure logged, never
    stopping the others)."""
    global _queue
    if _queue is not None:  # nested: the outer fan-out runs ours
        yield
        return
    queue: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
    _queue = queue
    try:
        yield
    finally:
        _queue = None
        for work, args in queue:  # _queue is None again: what a follow-up does runs inline
            try:
                work(*args)
            except Exception:  # noqa: BLE001 - one connection's bug must not strand the others
                log.failure("a follow-up after a fan-out failed")


def active() -> bool:
    """A fan-out is sending: follow-ups may be held back."""
    return _queue is not None


def later(work: Callable[..., None], *args: Any) -> bool:
    """Queue *work* to run when the current fan-out ends; False (nothing queued) outside one."""
    if _queue is None:
        return False
    _queue.append((work, args))
    return True


class Sender(Protocol):
    """The connection a :class:`Wait`'s reply goes to, as the express lane sees it."""

    def send_early(self, wait: "Wait", reply: Any) -> bool:
        """Write *reply*, the one *wait* is about to give, now; False (nothing written) when it cannot."""


class Wait(Deferred[Any]):
    """A deferred reply that one change may answer together with many others (``event.from``).

    Besides its callback chain it carries an express lane, filled in by the layers that will
    turn its value into bytes: ``encode`` (set by the layer that builds the reply; the very
    function its callback applies, or one returning the same object for the same value) and
    ``sender`` (the connection, :class:`Sender`).  The waker calls :meth:`express` for every
    waiter first and fires them all afterwards; the chain then runs as usual, and the connection,
    given the reply it already sent, sends nothing more.  A layer that would change the value on
    the way clears ``encode`` (no express lane).  The lane closes when the Wait fires, either way.
    """

    encode: Callable[[Any], Any] | None = None
    sender: Sender | None = None

    def callback(self, result: Any) -> None:
        self.encode = self.sender = None
        super().callback(result)

    def errback(self, fail: Failure | BaseException | None = None) -> None:
        self.encode = self.sender = None
        super().errback(fail)

    def express(self, value: Any) -> bool:
        """Send the reply *value* makes now, ahead of the callbacks; False when there is no lane
        (or it failed, which is logged: the callbacks then answer as usual)."""
        encode, sender = self.encode, self.sender
        if encode is None or sender is None or self.called:
            return False
        try:
            return sender.send_early(self, encode(value))
        except Exception:  # noqa: BLE001 - the callbacks still answer this waiter
            log.failure("the express lane of a reply failed")
            return False
