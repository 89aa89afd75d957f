"""The thread runner on the real reactor: results and failures come back in the reactor thread, and a
result that is ready is handled in its turn among the sockets that are ready, not after all of them."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool

from xapid.runner import Completions, ThreadRunner


@pytest.fixture
def runner() -> Any:
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-runner")
    pool.start()
    completions = Completions(reactor)
    yield ThreadRunner(reactor, pool, completions), completions
    pool.stop()
    completions.close()


@pytest_twisted.ensureDeferred
async def test_results_and_failures_arrive_in_the_reactor_thread(runner: Any) -> None:
    run, _ = runner
    here = threading.get_ident()
    ran_in: list[int] = []

    def work(x: int) -> int:
        ran_in.append(threading.get_ident())
        return x * 2

    assert await run.run(work, 21) == 42
    assert ran_in and ran_in[0] != here
    seen: list[int] = []

    def after(value: Any) -> Any:
        seen.append(threading.get_ident())
        return value

    with pytest.raises(ZeroDivisionError):
        await run.run(lambda: 1 // 0).addBoth(after)
    assert seen == [here]
    results = await Deferred.fromCoroutine(_gather([run.run(work, i) for i in range(50)]))
    assert results == [i * 2 for i in range(50)]


async def _gather(ds: list[Deferred[Any]]) -> list[Any]:
    return [await d for d in ds]


class _Recorder:
    """A socket the reactor reads, noting in *order* when it was handled."""

    def __init__(self, name: str, order: list[str]) -> None:
        self.name, self.order = name, order
        self.inside, self.outside = socket.socketpair()
        self.inside.setblocking(False)

    def fileno(self) -> int:
        return self.inside.fileno()

    def doRead(self) -> None:
        self.inside.recv(100)
        self.order.append(self.name)

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return self.name


@pytest_twisted.ensureDeferred
async def test_a_ready_result_is_not_held_behind_the_sockets_ready_after_it(runner: Any) -> None:
    """The reactor's thread calls wait until every socket of a poll was handled: a database commit
    finished before a burst of requests arrived waited for the whole burst.  A result is now handled
    in the order it became ready: before the sockets that became ready after it."""
    run, completions = runner
    order: list[str] = []
    sockets = [_Recorder(f"socket {i}", order) for i in range(20)]
    for s in sockets:
        reactor.addReader(s)
    try:
        delivered = threading.Event()
        original = completions.deliver

        def deliver(*args: Any) -> None:
            original(*args)
            delivered.set()

        completions.deliver = deliver  # type: ignore[method-assign]
        d = run.run(lambda: "commit done").addCallback(order.append)
        assert delivered.wait(10)  # the reactor thread is held here: nothing is handled meanwhile
        for s in sockets:
            s.outside.send(b"x")
        while len(order) < len(sockets) + 1:
            waiter: Deferred[None] = Deferred()
            reactor.callLater(0.01, waiter.callback, None)
            await waiter
        await d
        assert order[0] == "commit done", order
    finally:
        for s in sockets:
            reactor.removeReader(s)
            s.inside.close()
            s.outside.close()


@pytest_twisted.ensureDeferred
async def test_a_result_that_cannot_be_delivered_stops_nothing_after_it(runner: Any) -> None:
    """A Deferred that fails to fire (here: fired already) is logged; the results after it still arrive."""
    from twisted.logger import globalLogPublisher

    run, completions = runner
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        bad: Deferred[Any] = Deferred()
        bad.callback("fired elsewhere")
        completions.deliver(bad, True, "late")
        assert await run.run(lambda: 42) == 42
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any("delivering a worker thread's result failed" in str(e.get("log_format")) for e in logged)
