"""The state dir across versions and processes: its format version, migrations, the daemon's
lock, and online backup / offline restore of ``xapid.db``.

The format version is SQLite's ``PRAGMA user_version`` of ``xapid.db``, so a backup carries the
version of what it holds.  0 is a database written before the version was recorded (format 1).
At start (:func:`check_format`):

- a newer format than :data:`FORMAT` is refused with one line;
- an older one is migrated: first a backup copy in ``<state_dir>/backups/`` (SQLite backup API),
  then the migration steps run on a copy ``xapid.db.migrating``, which replaces ``xapid.db`` in one
  rename; a crash at any point leaves the old database, or the new one, never half of each.

A running daemon holds ``<state_dir>/xapid.lock`` (``flock``): a second daemon on the same state
dir, and ``xapid db restore``, are refused while it runs.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

from xapid.files import fsync_directory

#: the state dir format this xapid writes
FORMAT = 2
DB_FILE = "xapid.db"
LOCK_FILE = "xapid.lock"
BACKUP_DIR = "backups"


class StateDirError(Exception):
    """One line for the user."""


def _format_1_to_2(conn: sqlite3.Connection) -> None:
    """Format 1 (before the version was recorded) holds the same objects table: only the version
    number changes (set by :func:`_migrate` after every step)."""
    conn.execute("CREATE TABLE IF NOT EXISTS objects (ref TEXT PRIMARY KEY, cls TEXT NOT NULL, data TEXT NOT NULL)")


#: step from format N to N+1, run on the copy being migrated
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _format_1_to_2}


def db_format(path: Path) -> int:
    """The format of the database at *path* (0: no database there yet)."""
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
                if not tables:
                    return 0  # an empty file: as good as none
                if ("objects",) not in tables:
                    raise StateDirError(f"{path} is not an xapid database (no objects table)")
                return 1
            return int(version)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StateDirError(f"{path} is not a usable SQLite database: {exc}") from None


def _copy(source: Path, target: Path) -> None:
    """*source* copied to *target* through SQLite's backup API (consistent while others write)."""
    for leftover in (target, Path(f"{target}-wal"), Path(f"{target}-shm"), Path(f"{target}-journal")):
        leftover.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(str(target))
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            dst.close()
    finally:
        src.close()
    _fsync(target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)


def _checkpoint(path: Path) -> None:
    """Fold the WAL into the database file and remove it, so the file alone is the database."""
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()


def _install(new: Path, db: Path) -> None:
    """Switch *db* to the complete file *new* in one rename (no stale WAL may follow it)."""
    for stale in (Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
        stale.unlink(missing_ok=True)
    os.replace(new, db)
    _fsync(db)


def check_format(state_dir: Path, log: Callable[[str], None] = lambda line: None) -> int:
    """Refuse a newer format, migrate an older one; returns the format found (0: new state dir)."""
    found = check_readable_format(state_dir)
    if 0 < found < FORMAT:
        _migrate(state_dir, found, log)
    return found


def _migrate(state_dir: Path, found: int, log: Callable[[str], None]) -> None:
    db = state_dir / DB_FILE
    _checkpoint(db)
    backups = state_dir / BACKUP_DIR
    backups.mkdir(mode=0o700, exist_ok=True)
    backup = backups / f"{DB_FILE}.format{found}.{time.strftime('%Y%m%d-%H%M%S')}"
    _copy(db, backup)
    log(f"state dir {state_dir}: format {found} is older than {FORMAT}; backup copy {backup}")
    work = state_dir / f"{DB_FILE}.migrating"
    _copy(db, work)
    conn = sqlite3.connect(str(work), isolation_level=None)
    try:
        for version in range(found, FORMAT):
            conn.execute("BEGIN IMMEDIATE")
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
    finally:
        conn.close()
    _install(work, db)
    log(f"state dir {state_dir}: migrated from format {found} to {FORMAT}")


def stamp(conn: sqlite3.Connection) -> None:
    """Record the current format in a database this xapid has just created."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
        conn.execute(f"PRAGMA user_version = {FORMAT}")


class StateLock:
    """``flock`` on ``<state_dir>/xapid.lock``, held by a running daemon."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def backup(state_dir: Path, target: Path) -> None:
    """An online copy of the database into *target* (written whole, then renamed into place)."""
    db = Path(state_dir) / DB_FILE
    if not db.exists():
        raise StateDirError(f"no database to back up: {db} does not exist")
    partial = target.with_name(target.name + ".partial")
    old = os.umask(0o077)
    try:
        _copy(db, partial)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise StateDirError(f"backup of {db} failed: {exc}") from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StateDirError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.replace(partial, target)


def restore(state_dir: Path, source: Path) -> int:
    """Replace the database with *source* (no daemon may run on *state_dir*); returns its format."""
    state_dir = Path(state_dir)
    if not source.is_file():
        raise StateDirError(f"cannot restore {source}: no such file")
    found = db_format(source)
    if found == 0:
        raise StateDirError(f"cannot restore {source}: it holds no xapid database")
    if found > FORMAT:
        raise StateDirError(f"cannot restore {source}: format {found} is newer than this xapid understands ({FORMAT})")
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StateDirError(f"state dir {state_dir} is unusable: {exc.strerror or exc}") from None
    lock = StateLock(state_dir)
    if not lock.acquire():
        raise StateDirError(f"an xapid daemon is running on {state_dir} (pid {lock.holder() or '?'}): "
                            f"stop it first (systemctl stop xapid)")
    try:
        work = state_dir / f"{DB_FILE}.restoring"
        old = os.umask(0o077)
        try:
            _copy(source, work)
        finally:
            os.umask(old)
        _install(work, state_dir / DB_FILE)
    finally:
        lock.release()
    return found


def check_readable_format(state_dir: Path) -> int:
    """The format of the state dir's database, refusing a newer one (nothing is changed)."""
    db = Path(state_dir) / DB_FILE
    found = db_format(db)
    if found > FORMAT:
        raise StateDirError(f"state dir {state_dir} has format {found}, newer than this xapid understands "
                            f"({FORMAT}): run a newer xapid, or restore a backup with `xapid db restore`")
    return found
