"""Domain-death reports (the ``@releaseDomain`` watch) and connection health (probes, reconnection)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xapid.backend.interface import BackendError
from xapid.backend.xen.core import (
    BACKOFF_MAX,
    HEALTH_INTERVAL,
    PRIVCMD_LOST,
    RELEASE,
    XenCore,
    state_of,
)
from xapid.backend.xen.libs import XenError, XenUnavailable
from xapid.backend.xen.watches import WatchReader
from xapid.backend.xen.xenctrl import XenCtrl
from xapid.backend.xen.xenlight import XenLight, XenLightError
from xapid.backend.xen.xenstore import CONNECTION_LOST, XenStore

log = Logger()


class DomainMonitor(XenCore):
    """Reports domains that stop on their own; probes xenstored and privcmd and reconnects."""

    # -- domain death ------------------------------------------------------------------

    def watch_domains(self, reactor: Any, listener: Callable[[str], Any]) -> None:
        """Report domains that shut down, crash or vanish on their own to *listener(uuid)*.

        The ``@releaseDomain`` watch is read in *reactor*; the domain table is then compared
        in a reactor pool thread (hypercalls), and the listener called back in the reactor
        thread.  Operations of this driver in flight are not reported (their caller sees the
        outcome).
        """
        self._listener = listener
        self._reactor = reactor
        try:
            self._watch_xs = XenStore()
            self._watch_xs.watch(RELEASE, "xapid")
        except XenError as exc:
            raise BackendError(f"cannot watch {RELEASE}: {exc.strerror}") from None
        self._reader = WatchReader(self._watch_xs, self._on_release)
        self._reader.start(reactor)
        # the first table is read in a pool thread (hypercalls stay off the reactor): it is the
        # baseline, merged under what operations recorded since (see _compare)
        if hasattr(reactor, "callInThread"):  # a test clock has no threads: the first event primes
            reactor.callInThread(self._compare)
        self._health = LoopingCall(self._tick)
        self._health.clock = reactor
        self._health.start(HEALTH_INTERVAL, now=False)

    def _on_release(self, path: str, token: str) -> None:
        if path == RELEASE and self._listener is not None:
            self._reactor.callInThread(self._compare)

    def _compare(self) -> None:
        """In a pool thread: the domains that stopped or vanished since the last look, reported."""
        with self._lock:
            try:  # one getinfolist: cheap enough for every health tick
                now = {raw.uuid: (raw.domain, state_of(raw)) for raw in self._raw_domains()}
            except (BackendError, XenError) as exc:
                log.warn("cannot list domains after {watch}: {error}", watch=RELEASE, error=str(exc))
                return
            if not self._primed:  # the baseline: what this driver's own operations recorded wins
                for uuid, seen in now.items():
                    self._known.setdefault(uuid, seen)
                self._primed = True
            changed = [u for u, (domid, state) in now.items()
                       if state in ("shutdown", "crashed") and self._known.get(u) != (domid, state)]
            changed += [u for u in self._known if u not in now]
            self._known = now
            changed = [u for u in changed if u not in self._busy]
        for uuid in changed:
            log.info("domain {uuid} changed on its own: {state}", uuid=uuid, state=now.get(uuid, (0, "gone"))[1])
            self._reactor.callFromThread(self._listener, uuid)

    @contextmanager
    def _operating(self, uuid: str, keeps: bool = True) -> Iterator[None]:
        """Mark *uuid* busy (its changes are the caller's news, not the listener's) during an
        operation.  After a successful operation that leaves the domain in place (*keeps*), its
        state is looked at once more: a domain that vanished, shut down or crashed meanwhile is
        reported to the listener (the @releaseDomain of that moment was skipped as busy)."""
        with self._lock:
            self._busy.add(uuid)
        ok = False
        try:
            yield
            ok = True
        finally:
            raw = None
            if ok and keeps:
                try:
                    raw = next((r for r in self._raw_domains() if r.uuid == uuid), None)
                except (BackendError, XenError):
                    raw = None
            with self._lock:
                self._busy.discard(uuid)
                if raw is not None:
                    self._known[uuid] = (raw.domain, state_of(raw))
                else:
                    self._known.pop(uuid, None)  # what the operation did is not news
            if ok and keeps and (raw is None or state_of(raw) in ("shutdown", "crashed")):
                state = "gone" if raw is None else state_of(raw)
                log.info("domain {uuid} changed right after an operation: {state}", uuid=uuid, state=state)
                if self._listener is not None and self._reactor is not None:
                    self._reactor.callFromThread(self._listener, uuid)

    # -- connection health --------------------------------------------------------------

    def _tick(self) -> None:
        """Every HEALTH_INTERVAL in the reactor: reap libxl's children, probe in a pool thread."""
        self._reaper.reapProcess()
        if not self._probing and hasattr(self._reactor, "callInThread"):
            self._probing = True
            self._reactor.callInThread(self._probe)

    def _probe(self) -> None:
        """In a pool thread: check xenstored and privcmd, reconnect what is lost, give up in time."""
        try:
            self._check_links()
            if self._lost and time.monotonic() >= self._next_attempt:
                self._reconnect()
            if "privcmd" not in self._lost and self._listener is not None and self._primed:
                # domains that stopped without a @releaseDomain reaching us (a restarted xenstored
                # forgot the registrations of domains built before it) are still noticed
                self._compare()
            for what, since in list(self._lost.items()):
                if time.monotonic() - since > self.xenstored_timeout:
                    line = (f"{what} unreachable for more than {self.xenstored_timeout:g} s "
                            f"([xen] xenstored_timeout): exiting so that the service manager restarts xapid")
                    self._reactor.callFromThread(self._fatal, line)
                    break
        except Exception:  # noqa: BLE001 - the probe must keep running
            log.failure("xen driver health probe failed")
        finally:
            self._probing = False

    def _check_links(self) -> None:
        if "xenstored" not in self._lost:
            try:
                watch = self._watch_xs
                if watch is not None:
                    while (event := watch.check_watch()) is not None:  # a dead connection: EINVAL
                        self._reactor.callFromThread(self._on_release, *event)
                self._store().read("/local/domain/0/domid")
            except XenError as exc:
                if exc.errno in CONNECTION_LOST:
                    self._mark_lost("xenstored", exc)
        if "privcmd" not in self._lost:
            try:
                self._ctrl().version()
            except XenError as exc:
                if exc.errno in PRIVCMD_LOST:
                    self._mark_lost("privcmd", exc)

    def _mark_lost(self, what: str, exc: Exception) -> None:
        if what not in self._lost:
            log.warn("lost the connection to {what} ({error}); reconnecting for up to {timeout} s",
                     what=what, error=str(exc), timeout=self.xenstored_timeout)
            self._lost[what] = time.monotonic()
            self._next_attempt = 0.0
            self._backoff = HEALTH_INTERVAL

    def _reconnect(self) -> None:
        """Open new handles for what was lost (libxl's context holds both kinds); old ones retire."""
        logger = self._logger
        if logger is None:  # closed while the probe ran: nothing to reconnect
            return
        try:
            xc = XenCtrl(self._xenctrl_lib(), logger.pointer) if "privcmd" in self._lost else None
            if xc is not None:
                xc.version()
            xs = watch = None
            if "xenstored" in self._lost:
                xs, watch = XenStore(), XenStore()
                watch.watch(RELEASE, "xapid")
            xl = XenLight(self._xenlight_lib(), logger.pointer)
        except (XenError, XenLightError, XenUnavailable) as exc:
            self._next_attempt = time.monotonic() + self._backoff
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)
            log.info("reconnection failed: {error}; next attempt in {delay:g} s", error=str(exc),
                     delay=self._backoff)
            return
        with self._lock:
            if xc is not None:
                self._retired.append(self._xc)
                self._xc = xc
            if xs is not None:
                self._retired += [self._xs, self._watch_xs]
                self._xs, self._watch_xs = xs, watch
            self._retired.append(self._xl)
            self._xl = xl
            lost, self._lost = sorted(self._lost), {}
        log.info("reconnected to {what}; comparing the domain table again", what=" and ".join(lost))
        if watch is not None:
            self._reactor.callFromThread(self._rearm, watch)
        self._compare()

    def _rearm(self, watch: XenStore) -> None:
        """In the reactor: read the new watch connection instead of the dead one."""
        if self._reader is not None:
            self._reader.stop()
        self._reader = WatchReader(watch, self._on_release)
        self._reader.start(self._reactor)

    def _fatal(self, line: str) -> None:
        log.critical("{line}", line=line)
        if self.on_fatal is not None:
            self.on_fatal(line)
            return
        import sys

        sys.stderr.write(f"xapid: {line}\n")
        sys.stderr.flush()
        os._exit(1)
