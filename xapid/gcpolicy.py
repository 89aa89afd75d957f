"""The daemon's garbage-collection policy: the long-lived object graph frozen, collections between ticks.

CPython's cyclic collector walks every tracked object of a generation; a full collection over the
inventory of a large host (1 000 VMs: millions of objects) takes ~150 ms, and the automatic ones
fall wherever allocation happens to cross a threshold, often inside a metrics tick.  The policy:

* at install (after the inventory is loaded): one full collection, then :func:`gc.freeze` moves
  every surviving object to the permanent generation, which collections no longer walk;
* after every *refreeze_every*-th metrics tick, from the reactor once the tick is done (never
  inside it): a collection of what is not frozen (cheap: only what was allocated since the last
  freeze), then :func:`gc.freeze` again, so objects that lived that long stop being walked too;
* after every *full_every*-th tick: :func:`gc.unfreeze` and one full collection before freezing
  again, so cyclic garbage among frozen objects (rare: objects are freed by reference counting)
  is reclaimed at a known, rare moment (once an hour at the default 5-s period);
* the automatic thresholds stay as they are; :meth:`GcPolicy.uninstall` unfreezes.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

REFREEZE_EVERY = 12  # ticks: a minute at the default 5-s period
FULL_EVERY = 720  # ticks: an hour at the default 5-s period


class GcPolicy:
    """Installs the policy on a sampler (anything with an ``after_tick`` list of callables) and
    schedules its collections on *reactor* (``callLater``)."""

    def __init__(self, reactor: Any, *, refreeze_every: int = REFREEZE_EVERY, full_every: int = FULL_EVERY) -> None:
        if refreeze_every < 1 or full_every < 1:
            raise ValueError("collection intervals must be at least one tick")
        self.reactor = reactor
        self.refreeze_every = refreeze_every
        self.full_every = full_every
        self.ticks = 0
        self.collections = 0  # collections this policy ran (young and full)
        self.full_collections = 0
        self.last_cpu = 0.0  # CPU seconds of the last collection
        self._owner: Any = None
        self._pending: Any = None  # the scheduled collection's delayed call

    @property
    def installed(self) -> bool:
        return self._owner is not None

    def install(self, sampler: Any) -> None:
        """Freeze the graph built so far and collect after the sampler's ticks from now on."""
        if self._owner is not None:
            return
        self._run(full=True)
        self._owner = sampler
        sampler.after_tick.append(self._after_tick)
        log.info("garbage collection: {frozen} objects frozen at start ({ms:.0f} ms); collections between ticks",
                 frozen=gc.get_freeze_count(), ms=self.last_cpu * 1e3)

    def uninstall(self) -> None:
        """Stop scheduling collections and unfreeze (the collector walks everything again)."""
        if self._owner is None:
            return
        hooks: list[Callable[[], None]] = self._owner.after_tick
        if self._after_tick in hooks:
            hooks.remove(self._after_tick)
        self._owner = None
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        gc.unfreeze()

    def _after_tick(self) -> None:
        self.ticks += 1
        full = self.ticks % self.full_every == 0
        if (full or self.ticks % self.refreeze_every == 0) and self._pending is None:
            self._pending = self.reactor.callLater(0, self._scheduled, full)

    def _scheduled(self, full: bool) -> None:
        self._pending = None
        if self._owner is not None:
            self._run(full)

    def _run(self, full: bool) -> None:
        start = time.process_time()
        if full:
            gc.unfreeze()
            self.full_collections += 1
        gc.collect()
        gc.freeze()
        self.collections += 1
        self.last_cpu = time.process_time() - start
