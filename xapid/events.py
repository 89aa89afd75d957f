"""Events from store changes: ``event.from`` long polls and the legacy register/next queues.

The hub listens to the store (which emits one :class:`Change` per write) and keeps, per
object, only the position of its latest change — so a watcher that comes back late gets
each object's latest state once, and memory does not grow with the number of watchers or
the age of their tokens.  Deletions are kept as tombstones up to a bound; a token older
than the oldest forgotten tombstone, or from an earlier daemon run, gets EVENTS_LOST and
the client re-reads everything.

Waiting is a deferred reply: a watcher is a Deferred in a list, woken (once per reactor
turn, so a transaction's writes arrive together) when a change it subscribes to happens,
or when its timeout passes, or failed with SESSION_INVALID when its session ends.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid import fanout
from xapid.errors import XenAPIError, session_invalid
from xapid.schema import Schema
from xapid.store import CachedRecord, Change, Store
from xapid.apitypes import Int32, SharedValue

log = Logger()

MAX_TIMEOUT = 3600.0


@dataclass
class _Entry:
    seq: int
    cls: str
    created: int  # seq of the object's add
    when: float
    deleted: bool = False


class Subscription:
    """Parsed ``event.from`` classes: '*', class names, or 'class/ref' (case-insensitive)."""

    def __init__(self, schema: Any, classes: list[str]):
        self.all = False
        self.classes: set[str] = set()
        self.refs: set[str] = set()
        for item in classes:
            if not isinstance(item, str) or not re.fullmatch(r"\*|[A-Za-z_][A-Za-z0-9_]*(/.+)?", item):
                raise XenAPIError("EVENT_SUBSCRIPTION_PARSE_FAILURE", item)
            if item == "*":
                self.all = True
                continue
            name, _, ref = item.partition("/")
            spec = schema.class_by_lower(name)
            if spec is None:
                continue  # unknown names match nothing, as xapi
            if ref:
                self.refs.add(ref)
            else:
                self.classes.add(spec.name)
        self.key = (self.all, frozenset(self.classes), frozenset(self.refs))  # what equal subscriptions share

    def matches(self, cls: str, ref: str) -> bool:
        return self.all or cls in self.classes or ref in self.refs


class _Waiter:
    """One parked event.from: its subscription and token, the Deferred its reply fires, and where
    it is registered (its timeout bucket, its session's end callbacks) so dropping it is O(1)."""

    __slots__ = ("subscription", "token", "deferred", "session", "bucket", "share", "registered")

    def __init__(self, subscription: Subscription, token: int, deferred: fanout.Wait, session: Any, bucket: int):
        self.subscription = subscription
        self.token = token
        self.deferred = deferred
        self.session = session
        self.bucket = bucket
        self.share = (subscription.key, token)  # the waiters answered alike: same subscription, same token
        self.registered = True


def _class_name(schema: Schema, name: str) -> str:
    """The class *name* names, in any case; *name* itself when there is none."""
    spec = schema.class_by_lower(name)
    return spec.name if spec else name


@dataclass
class _Queue:
    """A legacy event.register subscription with its bounded queue."""

    classes: set[str]
    events: deque[dict[str, Any]] = field(default_factory=deque)
    lost: bool = False
    waiter: Deferred[Any] | None = None


class EventHub:
    def __init__(self, store: Store, reactor: Any, *, tombstones: int = 10_000, queue_size: int = 1_000):
        self.store = store
        self.schema = store.schema
        self.reactor = reactor
        self.epoch = int(time.time() * 1000)  # distinguishes tokens of earlier runs
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # ref -> latest change, oldest first
        self._tombstones: deque[str] = deque()
        self._max_tombstones = tombstones
        self._horizon = 0  # changes at or before this seq may have been forgotten
        self._waiters: dict[int, _Waiter] = {}  # by id(): removal is O(1) when many wait
        self._groups: dict[tuple[Any, int], dict[int, _Waiter]] = {}  # by share: a wake costs O(groups)
        self._buckets: dict[int, dict[int, _Waiter]] = {}  # whole second when the wait times out
        self._expiry: Any = None  # the one timer, for the earliest bucket
        self._subscriptions: dict[tuple[str, ...], Subscription] = {}
        self._wake_pending = False
        self._queues: dict[str, _Queue] = {}
        self._queue_size = queue_size
        self._evented = {name for name, spec in self.schema.classes.items() if spec.events}
        for cls in self._evented:
            for obj in store.all(cls):
                self._entries[obj.ref] = _Entry(0, cls, 0, 0.0)
        store.subscribe(self._on_change, self._on_live)

    # -- recording changes -----------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.cls not in self._evented:
            return
        now = self.reactor.seconds()
        entry = self._entries.pop(change.ref, None)
        if change.op == "add" or entry is None:
            entry = _Entry(change.seq, change.cls, change.seq, now)
        entry.seq, entry.when, entry.deleted = change.seq, now, change.op == "del"
        self._entries[change.ref] = entry
        if entry.deleted:
            self._tombstones.append(change.ref)
            self._compact()
        self._queue(change, now)
        if self._waiters and not self._wake_pending:
            self._wake_pending = True
            self.reactor.callLater(0, self._wake)

    def _on_live(self, first: int, classes: list[str], refs: list[str]) -> None:
        """A batch of metrics writes (:meth:`Store.live_batch`): mods of existing objects."""
        now = self.reactor.seconds()
        entries = self._entries
        evented = self._evented
        seq = first - 1
        for cls, ref in zip(classes, refs):
            seq += 1
            if cls not in evented:
                continue
            entry = entries.pop(ref, None)
            if entry is None:
                entry = _Entry(seq, cls, seq, now)
            else:
                entry.seq, entry.when, entry.deleted = seq, now, False
            entries[ref] = entry
            if self._queues:
                self._queue(Change(seq, cls, "mod", ref), now)
        if self._waiters and not self._wake_pending:
            self._wake_pending = True
            self.reactor.callLater(0, self._wake)

    def _compact(self) -> None:
        while len(self._tombstones) > self._max_tombstones:
            ref = self._tombstones.popleft()
            entry = self._entries.get(ref)
            if entry is not None and entry.deleted:
                del self._entries[ref]
                self._horizon = max(self._horizon, entry.seq)

    # -- event.from --------------------------------------------------------------------------

    def token(self, seq: int | None = None) -> str:
        return f"{self.store.seq if seq is None else seq:020d},{self.epoch:020d}"

    def parse_token(self, token: str) -> int:
        if token == "":
            return -1
        match = re.fullmatch(r"\s*(\d{1,20})(?:,(\d{1,20}))?\s*", token)  # bounded: int() of it never fails
        if match is None:
            raise XenAPIError("EVENT_FROM_TOKEN_PARSE_FAILURE", token)
        seq = int(match.group(1))
        if match.group(2) is not None and int(match.group(2)) != self.epoch or seq > self.store.seq:
            raise XenAPIError("EVENTS_LOST")
        if seq < self._horizon:
            raise XenAPIError("EVENTS_LOST")
        return seq

    def collect(self, subscription: Subscription, since: int) -> list[dict[str, Any]]:
        """Each matching object changed after *since*, once, oldest change first."""
        events = []
        for ref, entry in reversed(self._entries.items()):
            if entry.seq <= since:
                break
            if not subscription.matches(entry.cls, ref):
                continue
            if entry.deleted:
                if entry.created > since:
                    continue  # born and gone since the token: the watcher never knew it
                events.append(self._event(entry, "del", ref))
            else:
                events.append(self._event(entry, "add" if entry.created > since else "mod", ref))
        events.reverse()
        return events

    def _event(self, entry: _Entry, op: str, ref: str) -> dict[str, Any]:
        event: dict[str, Any] = {"id": str(entry.seq), "timestamp": f"{entry.when:.6f}", "class": entry.cls.lower(),
                 "operation": op, "ref": ref}
        if op != "del":
            event["snapshot"] = CachedRecord(self.store.get(ref))
        return event

    def counts(self) -> dict[str, Int32]:
        return {name.lower(): Int32(self.store.count(name)) for name in self.schema.classes
                if self.schema.classes[name].persist or name in self._evented}

    def batch(self, events: list[dict[str, Any]]) -> SharedValue:
        """An event.from reply; encoded once per wire format however many watchers get it."""
        return SharedValue({"events": events, "valid_ref_counts": self.counts(), "token": self.token()})

    def subscription(self, classes: list[str]) -> Subscription:
        """The parsed subscription, cached: watchers re-send the same list every call."""
        key = tuple(classes) if all(isinstance(c, str) for c in classes) else None
        cached = self._subscriptions.get(key) if key is not None else None
        if cached is None:
            cached = Subscription(self.schema, classes)
            if key is not None:
                if len(self._subscriptions) >= 1024:
                    self._subscriptions.clear()
                self._subscriptions[key] = cached
        return cached

    def wait_from(self, session: Any, classes: list[str], token: str, timeout: float) -> Any:
        """The event.from reply now when something changed, else a Deferred for it.

        The wait ends on the first whole second at or after *timeout* (timeouts are kept in
        one-second buckets with one timer for all of them, so arming a wait stays cheap).
        """
        subscription = self.subscription(classes)
        since = self.parse_token(token)
        events = self.collect(subscription, since)
        if events or timeout <= 0:
            return self.batch(events)
        d = fanout.Wait(lambda _: self._drop(waiter))
        bucket = math.ceil(self.reactor.seconds() + min(timeout, MAX_TIMEOUT))
        waiter = _Waiter(subscription, since, d, session, bucket)
        key = id(waiter)
        waiting = self._buckets.get(bucket)
        if waiting is None:
            waiting = self._buckets[bucket] = {}
        waiting[key] = waiter
        self._schedule_expiry(bucket)
        session.ended[key] = partial(self._session_ended, waiter)
        self._waiters[key] = waiter
        group = self._groups.get(waiter.share)
        if group is None:
            group = self._groups[waiter.share] = {}
        group[key] = waiter
        return d

    def _session_ended(self, waiter: _Waiter) -> None:
        self._drop(waiter)
        if not waiter.deferred.called:
            waiter.deferred.errback(session_invalid(waiter.session.ref))

    def _drop(self, waiter: _Waiter) -> None:
        """Unregister *waiter* everywhere (idempotent)."""
        if not waiter.registered:
            return
        waiter.registered = False
        key = id(waiter)
        self._waiters.pop(key, None)
        waiting = self._buckets.get(waiter.bucket)
        if waiting is not None:
            waiting.pop(key, None)
        waiter.session.ended.pop(key, None)
        group = self._groups.get(waiter.share)
        if group is not None:
            group.pop(key, None)
            if not group:
                del self._groups[waiter.share]

    def _schedule_expiry(self, bucket: int) -> None:
        timer = self._expiry
        if timer is not None and timer.active():
            if timer.getTime() <= bucket:
                return
            timer.cancel()
        self._expiry = self.reactor.callLater(max(0.0, bucket - self.reactor.seconds()), self._expire)

    def _expire(self) -> None:
        """Answer the waits whose timeout passed: no events and a fresh token."""
        self._expiry = None
        now = self.reactor.seconds()
        for bucket in sorted(b for b in self._buckets if b <= now):
            for waiter in list(self._buckets.pop(bucket).values()):
                self._drop(waiter)
                if not waiter.deferred.called:
                    waiter.deferred.callback(self.batch([]))
        pending = [b for b, waiting in self._buckets.items() if waiting]
        if pending:
            self._schedule_expiry(min(pending))

    def _wake(self) -> None:
        """Answer every waiter with news.  Waiters with the same subscription and token (the usual
        case: a fleet of clients in step) form a group, checked once and sharing one reply built and
        encoded once, so a change that concerns nobody costs O(groups), not O(watchers).  Every reply
        that can take the express lane (:class:`fanout.Wait`) is written before any callback runs."""
        self._wake_pending = False
        answered = []
        for share, group in list(self._groups.items()):
            first = next(iter(group.values()))
            events = self.collect(first.subscription, first.token)
            if events:
                del self._groups[share]
                answered.append((group, self.batch(events)))
        if not answered:
            return
        buckets = self._buckets
        waiters = self._waiters
        with fanout.sending():  # every reply leaves before any connection's follow-up work
            for group, reply in answered:  # the express lane: bytes first, before any bookkeeping
                for waiter in group.values():
                    waiter.deferred.express(reply)
            woken = []
            for group, reply in answered:
                for key, waiter in group.items():  # _drop, inline: this loop runs once per watcher
                    waiter.registered = False
                    waiters.pop(key, None)  # (a cancel during the sends may have dropped it already)
                    waiting = buckets.get(waiter.bucket)
                    if waiting is not None:
                        waiting.pop(key, None)
                    waiter.session.ended.pop(key, None)
                    woken.append((waiter, reply))
            for waiter, reply in woken:
                if not waiter.deferred.called:
                    waiter.deferred.callback(reply)

    @property
    def watchers(self) -> int:
        return len(self._waiters)

    # -- legacy register / next ----------------------------------------------------------------

    def register(self, session: Any, classes: list[str]) -> None:
        names = {"*" if c == "*" else _class_name(self.schema, c) for c in classes}
        queue = self._queues.get(session.ref)
        if queue is None:
            queue = self._queues[session.ref] = _Queue(set())
            session.ended[("queue", session.ref)] = lambda: self._end_queue(session.ref)
        queue.classes |= names

    def unregister(self, session: Any, classes: list[str]) -> None:
        queue = self._queues.get(session.ref)
        if queue is None:
            return
        for c in classes:
            spec = self.schema.class_by_lower(c)
            queue.classes.discard(spec.name if spec else c)
        if not queue.classes:
            self._end_queue(session.ref, lost=False)

    def _end_queue(self, ref: str, lost: bool = True) -> None:
        queue = self._queues.pop(ref, None)
        if queue is not None and queue.waiter is not None and not queue.waiter.called:
            queue.waiter.errback(session_invalid(ref) if lost else XenAPIError("SESSION_NOT_REGISTERED", ref))

    def _queue(self, change: Change, now: float) -> None:
        for queue in self._queues.values():
            if "*" not in queue.classes and change.cls not in queue.classes:
                continue
            if len(queue.events) >= self._queue_size:
                queue.lost = True
                queue.events.clear()
            elif not queue.lost:
                queue.events.append(self._legacy_event(change, now))
            if queue.waiter is not None and not queue.waiter.called:
                waiter, queue.waiter = queue.waiter, None
                self.reactor.callLater(0, self._deliver, queue, waiter)

    def _legacy_event(self, change: Change, now: float) -> dict[str, Any]:
        obj = self.store.find(change.ref)
        event = {"id": str(change.seq), "timestamp": f"{now:.6f}", "class": change.cls.lower(),
                 "operation": change.op, "ref": change.ref,
                 "obj_uuid": obj.fields.get("uuid", "") if obj is not None else ""}
        if change.op != "del" and obj is not None:
            event["snapshot"] = dict(obj.fields)
        return event

    def _deliver(self, queue: _Queue, waiter: Deferred[Any]) -> None:
        if waiter.called:
            return
        try:
            waiter.callback(self._take(queue))
        except XenAPIError as error:
            waiter.errback(error)

    def _take(self, queue: _Queue) -> list[dict[str, Any]]:
        if queue.lost:
            queue.lost = False
            raise XenAPIError("EVENTS_LOST")
        events = list(queue.events)
        queue.events.clear()
        return events

    def next(self, session: Any) -> Any:
        """Queued events now, or a Deferred firing with the next ones."""
        queue = self._queues.get(session.ref)
        if queue is None:
            raise XenAPIError("SESSION_NOT_REGISTERED", session.ref)
        if queue.events or queue.lost:
            return self._take(queue)
        d: Deferred[Any] = Deferred(lambda _: setattr(queue, "waiter", None))
        queue.waiter = d
        return d
