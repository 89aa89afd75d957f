"""Parked.answer (the wake path of event.from) has the outcome Deferred.callback would have."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred

from xapid.events import Parked


def _chain(d: Deferred[Any], seen: list[Any]) -> None:
    d.addErrback(lambda f: seen.append(("errback-only", f)) or f)  # skipped on success
    d.addCallback(lambda v, n: v + n, 2)
    d.addCallbacks(lambda v: v * 10, lambda f: ("failed", f.value))
    d.addBoth(seen.append)


def test_answer_runs_the_chain_like_callback() -> None:
    for fire in ("answer", "callback"):
        seen: list[Any] = []
        d = Parked()
        _chain(d, seen)
        getattr(d, fire)(1)
        assert seen == [30]
        assert d.called and d.result is None


def test_a_raising_callback_sends_its_failure_down_the_errbacks() -> None:
    seen: list[Any] = []
    d = Parked()
    d.addCallback(lambda v: 1 / 0)
    d.addCallback(lambda v: seen.append(("callback", v)))
    d.addErrback(lambda f: seen.append(("errback", f.type)))
    d.answer(1)
    assert seen == [("errback", ZeroDivisionError)]
    assert d.called


def test_a_callback_returning_a_deferred_holds_the_rest_until_it_fires() -> None:
    seen: list[Any] = []
    inner: Deferred[int] = Deferred()
    d = Parked()
    d.addCallback(lambda v: inner)
    d.addCallback(seen.append)
    d.answer(1)
    assert seen == []
    inner.callback(7)
    assert seen == [7]


def test_a_callback_added_while_answering_runs_in_order() -> None:
    seen: list[Any] = []
    d = Parked()

    def first(value: int) -> int:
        d.addCallback(lambda v: seen.append(("late", v)))
        return value + 1

    d.addCallback(first)
    d.answer(1)
    assert seen == [("late", 2)]


def test_answering_a_cancelled_deferred_does_nothing() -> None:
    seen: list[Any] = []
    d = Parked()
    d.addErrback(lambda f: seen.append(f.check(CancelledError)))
    d.cancel()
    d.answer(1)
    assert seen == [CancelledError]
    assert d.result is None


def test_a_deferred_chained_to_it_gets_the_outcome() -> None:
    for fire in ("answer", "callback"):
        seen: list[Any] = []
        d = Parked()
        d.addCallback(lambda v: v + 1)
        outer: Deferred[Any] = Deferred()
        outer.addCallback(lambda _: d)  # outer waits on d (Twisted's chaining)
        outer.addCallback(seen.append)
        outer.callback(None)
        getattr(d, fire)(1)
        assert seen == [2], fire


def test_cancelling_while_it_waits_on_a_returned_deferred_cancels_that_one() -> None:
    for fire in ("answer", "callback"):
        seen: list[Any] = []
        inner: Deferred[int] = Deferred()
        d = Parked()
        d.addCallback(lambda v: inner)
        d.addErrback(lambda f: seen.append(f.check(CancelledError)))
        getattr(d, fire)(1)
        d.cancel()
        assert seen == [CancelledError], fire
        assert inner.called


def test_a_callback_added_after_answering_runs_at_once() -> None:
    seen: list[Any] = []
    d = Parked()
    d.addCallback(lambda v: v * 2)
    d.answer(4)
    d.addCallback(seen.append)
    assert seen == [8]
