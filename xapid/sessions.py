"""Sessions: unguessable refs, idle expiry on the injected clock, per-user bounds.

Each session is also a ``session`` object in the store (so the generic getters serve
``session.get_record`` and friends); the manager keeps the caller's role beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.logger import Logger

from xapid.store import Store

log = Logger()


@dataclass
class Session:
    ref: str
    user: str
    role: str
    originator: str
    last_active: float
    ended: dict[object, Callable[[], None]] = field(default_factory=dict)  # key -> called when it ends


class SessionManager:
    def __init__(self, store: Store, clock: Callable[[], float], idle_timeout: float, max_per_user: int = 500):
        self._store = store
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.max_per_user = max_per_user
        self._sessions: dict[str, Session] = {}

    def _stamp(self, now: float) -> datetime:
        return datetime.fromtimestamp(int(now), tz=timezone.utc)

    def create(self, user: str, role: str, originator: str, this_host: str, this_user: str) -> Session:
        """Open a session; the oldest of this user's sessions closes beyond the bound."""
        now = self._clock()
        mine = sorted((s for s in self._sessions.values() if s.user == user), key=lambda s: s.last_active)
        for old in mine[: max(0, len(mine) - self.max_per_user + 1)]:
            self.end(old.ref, "evicted")
        ref = self._store.add("session", {
            "this_host": this_host, "this_user": this_user, "last_active": self._stamp(now),
            "validation_time": self._stamp(now), "auth_user_name": user, "originator": originator,
        })
        session = Session(ref, user, role, originator, now)
        self._sessions[ref] = session
        log.info("session opened for {user} ({role}) by {originator!r}", user=user, role=role, originator=originator)
        return session

    def touch(self, ref: Any) -> Session | None:
        """The live session named *ref*, its idle timer restarted; None when unknown/expired."""
        session = self._sessions.get(ref) if isinstance(ref, str) else None
        if session is None:
            return None
        now = self._clock()
        if now - session.last_active > self.idle_timeout:
            self.end(ref, "expired")
            return None
        if int(now) != int(session.last_active):
            self._store.update(ref, {"last_active": self._stamp(now)})
        session.last_active = now
        return session

    def get(self, ref: str) -> Session | None:
        return self._sessions.get(ref)

    def end(self, ref: str, why: str = "logout") -> None:
        """Close a session: its waiters are told, its object disappears."""
        session = self._sessions.pop(ref, None)
        if session is None:
            return
        if self._store.find(ref) is not None:
            self._store.remove(ref)
        for callback in list(session.ended.values()):
            callback()
        log.info("session of {user} closed ({why})", user=session.user, why=why)

    def sweep(self) -> None:
        """End every session idle for longer than the timeout."""
        now = self._clock()
        for ref in [r for r, s in self._sessions.items() if now - s.last_active > self.idle_timeout]:
            self.end(ref, "expired")

    def __len__(self) -> int:
        return len(self._sessions)
