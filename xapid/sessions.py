"""Sessions: unguessable refs, idle expiry on the injected clock, per-user bounds, revocation.

Each session is also a ``session`` object in the store (so the generic getters serve
``session.get_record`` and friends); the manager keeps the caller's role beside it.

Revocation: the manager compares the users file's table (re-read when the file changed) with
the one it last saw, at most once a second of the injected clock when a session is used, at
every :meth:`SessionManager.sweep` and before each new session.  A user deleted or whose
password changed loses every open session at once; a user whose role changed keeps its
sessions, which take the new role from their next call on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

from xapid.apitypes import utc
from xapid.store import Store
from xapid.auth.users import UsersError

log = Logger()

USERS_CHECK_INTERVAL = 1.0  # seconds of the injected clock between two looks at the users file


@dataclass
class Session:
    ref: str
    user: str
    role: str
    originator: str
    last_active: float
    ended: dict[object, Callable[[], None]] = field(default_factory=dict)  # key -> called when it ends
    local_superuser: bool = False  # opened by uid 0 over a UNIX socket (xapi's is_local_superuser)


class SessionManager:
    def __init__(self, store: Store, clock: Callable[[], float], idle_timeout: float, max_per_user: int = 500,
                 users: Any = None):
        self._store = store
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.max_per_user = max_per_user
        self._sessions: dict[str, Session] = {}
        self._users = users  # xapid.auth.users.UsersFile, watched for revocations (None: not watched)
        self._users_seen: dict[str, tuple[str, str]] = users.credentials() if users is not None else {}
        self._users_checked = float("-inf")
        #: role -> session.rbac_permissions (xapid.auth.rbac.Rbac.session_permissions; None: left empty)
        self.permissions: Callable[[str], list[str]] | None = None

    def create(self, user: str, role: str, originator: str, this_host: str, this_user: str,
               local_superuser: bool = False, auth_user_name: str | None = None) -> Session:
        """Open a session; the oldest of this user's sessions closes beyond the bound.

        A *local_superuser* session (xapi's ``is_local_superuser``: *user* is then a name no
        users-file entry can have) bypasses RBAC by its role, and has no ``rbac_permissions``, as
        in xapi; the others list their role's (:attr:`permissions`)."""
        self.check_users()  # a change the login just read must not end the session it opens
        seen = None if local_superuser else self._users_seen.get(user)
        if seen is not None:
            role = seen[0]
        now = self._clock()
        mine = sorted((s for s in self._sessions.values() if s.user == user), key=lambda s: s.last_active)
        for old in mine[: max(0, len(mine) - self.max_per_user + 1)]:
            self.end(old.ref, "evicted")
        ref = self._store.add("session", {
            "this_host": this_host, "this_user": this_user, "last_active": utc(now),
            "validation_time": utc(now), "originator": originator,
            "auth_user_name": user if auth_user_name is None else auth_user_name,
            "is_local_superuser": local_superuser,
            "rbac_permissions": [] if local_superuser or self.permissions is None else self.permissions(role),
        })
        session = Session(ref, user, role, originator, now, local_superuser=local_superuser)
        self._sessions[ref] = session
        log.info("session opened for {user} ({role}) by {originator!r}", user=user, role=role, originator=originator)
        return session

    def touch(self, ref: Any) -> Session | None:
        """The live session named *ref*, its idle timer restarted; None when unknown/expired."""
        now = self._clock()
        if now - self._users_checked >= USERS_CHECK_INTERVAL:
            self.check_users()
        session = self._sessions.get(ref) if isinstance(ref, str) else None
        if session is None:
            return None
        if now - session.last_active > self.idle_timeout:
            self.end(ref, "expired")
            return None
        if int(now) != int(session.last_active):
            self._store.update(ref, {"last_active": utc(now)})
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

    def check_users(self) -> None:
        """Apply the users file's changes to open sessions: a deleted user, or one whose password
        changed, loses them all; a role change applies to them.  One log line per user."""
        users = self._users
        if users is None:
            return
        self._users_checked = self._clock()
        try:
            users.reload_if_changed()
        except UsersError as error:  # a bad edit: the previous table stays in use
            log.error("users file not reloaded: {error}", error=str(error))
        current = users.credentials()
        seen, self._users_seen = self._users_seen, current
        if current == seen:
            return
        for name, (role, hashed) in seen.items():
            now = current.get(name)
            if now == (role, hashed):
                continue
            mine = [s for s in self._sessions.values() if s.user == name]
            if now is None or now[1] != hashed:
                reason = "user deleted" if now is None else "password changed"
                for session in mine:
                    self.end(session.ref, f"revoked: {reason}")
                if mine:
                    log.warn("revoked {count} session(s) of user {user}: {reason}", count=len(mine), user=name,
                             reason=reason)
            else:
                for session in mine:
                    session.role = now[0]
                    if self.permissions is not None:
                        self._store.update(session.ref, {"rbac_permissions": self.permissions(now[0])})
                if mine:
                    log.warn("role of user {user} changed from {old_role} to {new_role}: applied to {count} open "
                             "session(s)", user=name, old_role=role, new_role=now[0], count=len(mine))

    def sweep(self) -> None:
        """End every session idle for longer than the timeout (and apply users file changes)."""
        self.check_users()
        now = self._clock()
        for ref in [r for r, s in self._sessions.items() if now - s.last_active > self.idle_timeout]:
            self.end(ref, "expired")

    def __len__(self) -> int:
        return len(self._sessions)
