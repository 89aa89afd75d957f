"""Concurrent transfer slots: how many disk/VM transfers run at once, per user and in total.

Usage (shared by the raw-VDI routes and the XVA export/import)::

    slots = TransferSlots(total=8, per_user=2)
    slot = slots.acquire(user)        # raises TransferLimitError (HTTP 503) when full
    try:
        ...                           # the transfer
    finally:
        slot.release()                # idempotent; or ``with slots.acquire(user): ...``

A slot is released exactly once however many times :meth:`Slot.release` is called, so a
transfer's success path and its abort path may both release it safely.  Everything runs in
the reactor thread (no locks needed; the counters are only touched there).
"""

from __future__ import annotations

from types import TracebackType

MAX_DISK = 64 << 40  # the largest disk an import creates (raw into an SR, or an XVA's VDI)


class TransferLimitError(Exception):
    """Refusal of a new transfer: HTTP *status* 503 with a one-line reason and ``Retry-After``."""

    status = 503

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers: tuple[tuple[bytes, bytes], ...] = ((b"Retry-After", b"5"),)


class Slot:
    """One running transfer's place; :meth:`release` gives it back (idempotent)."""

    __slots__ = ("_owner", "user", "_released")

    def __init__(self, owner: TransferSlots, user: str) -> None:
        self._owner = owner
        self.user = user
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self.user)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class TransferSlots:
    """At most *total* transfers at once, at most *per_user* of them by one user (0 = no per-user bound)."""

    def __init__(self, total: int = 8, per_user: int = 2) -> None:
        if total < 1:
            raise ValueError("total must be at least 1")
        if per_user < 0:
            raise ValueError("per_user must be >= 0")
        self.total = total
        self.per_user = per_user
        self._running = 0
        self._by_user: dict[str, int] = {}

    @property
    def running(self) -> int:
        """How many transfers hold a slot now."""
        return self._running

    def running_for(self, user: str) -> int:
        return self._by_user.get(user, 0)

    def acquire(self, user: str) -> Slot:
        """A slot for *user*, or :class:`TransferLimitError` when the total or the user's share is used up."""
        if self._running >= self.total:
            raise TransferLimitError(f"too many transfers in progress ({self.total}); try again later")
        mine = self._by_user.get(user, 0)
        if self.per_user and mine >= self.per_user:
            raise TransferLimitError(f"user {user} already has {mine} transfers in progress; try again later")
        self._running += 1
        self._by_user[user] = mine + 1
        return Slot(self, user)

    def _release(self, user: str) -> None:
        self._running -= 1
        left = self._by_user.get(user, 0) - 1
        if left > 0:
            self._by_user[user] = left
        else:
            self._by_user.pop(user, None)
