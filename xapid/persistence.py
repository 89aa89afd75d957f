"""Durability of the object store: the SQLite file behind it and the group committer.

:class:`Database` keeps one row per object, the record as JSON, in a WAL-mode SQLite file with
``synchronous=FULL``.  The :class:`Committer` makes the store's writes durable in batches (one
transaction each, run by a :class:`~xapid.runner.Runner` off the reactor); the store records
every written object with it and asks it to :meth:`~Committer.flush`.

Mirrored sets (a field declared as the ``inverse`` of ref fields of another class, e.g.
``SR.VDIs``) are not stored: they follow from the other side's ref fields, and the store
rebuilds them when it loads.  A row's size, and so a write's cost, is therefore that of the
object itself, not of the inventory it belongs to (issue 20).

A commit that fails (disk full, I/O error) is handed back to the store, which puts every
object with an uncommitted write back as last committed (:meth:`xapid.store.Store._rollback`);
every waiting flush fails with :func:`commit_error`.
"""

from __future__ import annotations

import errno
import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid.apitypes import format_datetime
from xapid.errors import XenAPIError, internal_error_with_id
from xapid.runner import Runner

if TYPE_CHECKING:
    from xapid.store import Store

log = Logger()

COMMIT_DELAY = 0.05  # s: a write not followed by a flush is committed this soon on its own

DISK_FULL = ("the disk holding xapid's state database is full (no space left on device): the change was not "
             "saved and has been undone; free some space and try again")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether *exc* (from SQLite or the OS) means the file system is full."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def commit_error(exc: BaseException) -> XenAPIError:
    """What a caller whose writes could not be committed is told: INTERNAL_ERROR saying the disk is
    full, or an INTERNAL_ERROR with a short id that the log line repeats (never the exception text)."""
    if isinstance(exc, XenAPIError):
        return exc
    if is_disk_full(exc):
        return XenAPIError("INTERNAL_ERROR", DISK_FULL)
    incident, error = internal_error_with_id()
    log.error("the state database could not be written (internal error id {incident}): {error}",
              incident=incident, error=repr(exc))
    return error



def _dump(fields: dict[str, Any], skip: frozenset[str] = frozenset()) -> str:
    """The stored JSON of a record: every field but those in *skip* (mirrored sets)."""
    if skip:
        fields = {k: v for k, v in fields.items() if k not in skip}
    return json.dumps(fields, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return format_datetime(value)
    raise TypeError(f"cannot store {type(value).__name__}")


class Database:
    """The SQLite file behind the store: one row per object, the record as JSON."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.closed = False
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS objects (ref TEXT PRIMARY KEY, cls TEXT NOT NULL, data TEXT NOT NULL)")
        from xapid.statedir import stamp  # the state dir's format version (xapid/statedir.py)

        stamp(self._conn)

    def read_all(self) -> list[tuple[str, str, dict[str, Any]]]:
        rows = self._conn.execute("SELECT cls, ref, data FROM objects ORDER BY rowid").fetchall()
        return [(cls, ref, json.loads(data)) for cls, ref, data in rows]

    def write(self, batch: dict[str, tuple[str, str | None]]) -> None:
        """Apply ``ref -> (cls, json or None for delete)`` in one durable transaction."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for ref, (cls, data) in batch.items():
                if data is None:
                    cur.execute("DELETE FROM objects WHERE ref = ?", (ref,))
                else:
                    cur.execute("INSERT INTO objects(ref, cls, data) VALUES (?, ?, ?) "
                                "ON CONFLICT(ref) DO UPDATE SET data = excluded.data", (ref, cls, data))
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite has already rolled back after e.g. SQLITE_FULL
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one to report
            raise

    def close(self) -> None:
        self.closed = True
        self._conn.close()


class Committer:
    """Group commit: writes recorded in the reactor thread, committed by *runner* in batches.

    Only one batch is in flight at a time; writes arriving meanwhile form the next batch.
    Writes inside a store transaction are held back until it ends, so a batch never holds
    half of a transaction.  With *clock* (the reactor), a flush is scheduled *delay* seconds
    after any write, so writes that no call flushes are committed all the same.

    ``before`` keeps, for every object with an uncommitted write, its last committed image
    (filled by the store before each write); a failed commit hands them to the store's
    ``_rollback`` and fails every waiting flush with :func:`commit_error`.  Nothing of a failed
    batch is retried.  Images leave mirrored sets out (they would make a write cost the size of
    the set): ``undo`` logs instead, for the same objects, each in-place change of such a set
    since that image (``(field, index, member, added)``, or ``(None, 0, sets, False)`` when the
    object was removed with those sets), which the rollback plays backwards.
    """

    def __init__(self, database: Database, runner: Runner, clock: Any = None, delay: float = COMMIT_DELAY):
        self.database = database
        self._runner = runner
        self._clock = clock
        self._delay = delay
        self._scheduled: Any = None
        self.store: Store | None = None  # set by the Store it serves
        self.before: dict[str, tuple[str, str, Any]] = {}
        self.undo: dict[str, list[tuple[Any, ...]]] = {}
        self.skip: dict[str, frozenset[str]] = {}  # class -> fields not stored (mirrored sets; set by the Store)
        # ref -> (class, the live fields or None when deleted); serialised when a batch is taken,
        # so an object changed many times between commits is encoded once
        self._held: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._ready: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._ready_waiters: list[Deferred[Any]] = []
        self._inflight_waiters: list[Deferred[Any]] | None = None
        self.failed: BaseException | None = None

    def record(self, cls: str, ref: str, fields: dict[str, Any] | None) -> None:
        self._held[ref] = (cls, fields)

    def release(self) -> None:
        """Move held writes to the next batch (the end of a transaction)."""
        if self._held:
            self._ready.update(self._held)
            self._held = {}
        if self._ready and self._clock is not None and self._scheduled is None:
            self._scheduled = self._clock.callLater(self._delay, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        """The store's own commit of writes no call flushed (a failure is logged and rolled back)."""
        self._scheduled = None
        if not self.database.closed:
            self.flush().addErrback(lambda _: None)

    def flush(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._ready:
            self._ready_waiters.append(d)
            self._kick()
        elif self._inflight_waiters is not None:
            self._inflight_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _kick(self) -> None:
        if self._inflight_waiters is not None or not self._ready:
            return
        taken, self._ready = self._ready, {}  # no transaction is open here: fields are consistent
        skip, no_skip = self.skip, frozenset[str]()
        batch = {ref: (cls, None if fields is None else _dump(fields, skip.get(cls, no_skip)))
                 for ref, (cls, fields) in taken.items()}
        undo = self.undo
        marks = {ref: len(undo[ref]) for ref in batch if ref in undo}  # set changes the batch holds
        waiters, self._ready_waiters = self._ready_waiters, []
        self._inflight_waiters = waiters

        def done(_: Any) -> None:
            for ref, (cls, data) in batch.items():
                if ref in self._ready or ref in self._held:  # written again meanwhile: this is its committed image
                    self.before[ref] = (cls, "json", data)
                    if ref in marks:
                        del self.undo[ref][:marks[ref]]  # the changes made since stay to undo
                else:
                    self.before.pop(ref, None)
                    self.undo.pop(ref, None)
            finished, self._inflight_waiters = self._inflight_waiters or [], None
            for w in finished:
                w.callback(None)
            self._kick()

        def failed(failure: Any) -> None:
            self.failed = failure.value
            if is_disk_full(failure.value):
                log.error("committing {count} objects to {path} failed: the disk is full ({error}); "
                          "rolling back", count=len(batch), path=str(self.database.path), error=str(failure.value))
            else:
                log.failure("committing {count} objects to {path} failed; rolling back", failure, count=len(batch),
                            path=str(self.database.path))
            error = commit_error(failure.value)
            # everything not committed is undone: this batch and the writes made since, whose
            # waiters fail too (they may build on what was refused)
            images, self.before = self.before, {}
            undone, self.undo = self.undo, {}
            self._ready, self._held = {}, {}
            waiters = (self._inflight_waiters or []) + self._ready_waiters
            self._inflight_waiters, self._ready_waiters = None, []
            if self.store is not None:
                self.store._rollback(images, error, undone)
            for w in waiters:
                w.errback(error)

        self._runner.run(self.database.write, batch).addCallbacks(done, failed)
