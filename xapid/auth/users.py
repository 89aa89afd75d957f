"""The users file: one ``name:role:bcrypt-hash`` per line; ``#`` comments and blank lines ignored.

Every change re-reads the file, edits the one line concerned (comments and order are kept)
and replaces the file atomically with mode 0600.  :meth:`UsersFile.verify` is slow on purpose
(bcrypt) and costs the same whether or not the user exists, so timing does not tell an
unknown name from a wrong password; the daemon calls it from its login threads (see
:mod:`xapid.auth.login`), so the table is guarded by a lock and the hash check runs outside it.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from passlib.hash import bcrypt as _bcrypt

from xapid.files import atomic_writer
from xapid.auth.roles import validate_role

DEFAULT_USERS_FILE = Path("/etc/xapid/users")
DEFAULT_ROUNDS = 10
MIN_ROUNDS, MAX_ROUNDS = 4, 31  # bcrypt's limits
MAX_PASSWORD_BYTES = 72  # bcrypt ignores (and bcrypt 5 refuses) anything longer
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_DUMMY_PASSWORD = "xapid: no such user"

_Signature = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


class UsersError(Exception):
    """A one-line problem with the users file or with a requested change."""


@dataclass(frozen=True)
class User:
    name: str
    role: str


@dataclass(frozen=True)
class _Entry:
    user: User
    hash: str
    line: int  # index into the file's lines


@dataclass
class _Contents:
    lines: list[str]
    entries: dict[str, _Entry]
    dummy_rounds: int  # the cost of the dearest hash in the file


class UsersFile:
    """The users file at *path*; new hashes use bcrypt cost *rounds*.  Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], rounds: int = DEFAULT_ROUNDS):
        if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
            raise UsersError(f"bcrypt rounds must be {MIN_ROUNDS}-{MAX_ROUNDS}, not {rounds}")
        self.path = Path(path)
        self.rounds = rounds
        self._hasher = _bcrypt.using(rounds=rounds)
        self._lock = threading.Lock()
        self._contents = _Contents([], {}, rounds)
        self._signature: _Signature | None = None

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the file; a missing file is an empty one."""
        with self._lock:
            self._signature, self._contents = self._read()

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since it was last read or written; True if it did.

        On a UsersError the previous table stays in use and the next call tries again.
        """
        with self._lock:
            try:
                current: _Signature | None = _signature_of(os.stat(self.path))
            except FileNotFoundError:
                current = None
            except OSError as exc:
                raise self._os_error("read", exc) from None
            if current == self._signature:
                return False
            self._signature, self._contents = self._read()
            return True

    def names(self) -> list[str]:
        """The user names, sorted."""
        with self._lock:
            return sorted(self._contents.entries)

    def get(self, name: str) -> User | None:
        with self._lock:
            entry = self._contents.entries.get(name)
        return entry.user if entry else None

    def list(self) -> list[User]:
        """Every user, sorted by name."""
        with self._lock:
            return [entry.user for _, entry in sorted(self._contents.entries.items())]

    def credentials(self) -> dict[str, tuple[str, str]]:
        """Every user's (role, password hash) in the loaded table: what revocation compares."""
        with self._lock:
            return {name: (entry.user.role, entry.hash) for name, entry in self._contents.entries.items()}

    def verify(self, name: str, password: str) -> User | None:
        """The user if *password* is theirs, else None; one bcrypt check either way."""
        with self._lock:
            entry = self._contents.entries.get(name)
            dummy_rounds = self._contents.dummy_rounds
        if entry is None or password_problem(password):
            _bcrypt.verify(_DUMMY_PASSWORD, _dummy_hash(dummy_rounds))
            return None
        return entry.user if _bcrypt.verify(password, entry.hash) else None

    # -- changing --------------------------------------------------------------------------

    def check_add(self, name: str, role: str) -> None:
        """Raise the UsersError :meth:`add` would for *name* and *role*, judged by the loaded table."""
        _check_name(name)
        _check_role(role)
        if self.get(name) is not None:
            raise UsersError(f"user {name} already exists in {self.path}")

    def add(self, name: str, role: str, password: str) -> None:
        """Add a user; UsersError if the name exists or the name, role or password is invalid."""
        _check_name(name)
        _check_role(role)
        line = f"{name}:{role}:{self._hash(password)}"

        def change(contents: _Contents) -> None:
            if name in contents.entries:
                raise UsersError(f"user {name} already exists in {self.path}")
            contents.lines.append(line)

        self._change(change)

    def delete(self, name: str) -> None:
        """Remove a user; UsersError if there is none of that name."""
        self._change(lambda contents: contents.lines.pop(self._entry(contents, name).line))

    def set_password(self, name: str, password: str) -> None:
        """Replace a user's password hash; UsersError if there is no such user or the password is invalid."""
        hashed = self._hash(password)

        def change(contents: _Contents) -> None:
            entry = self._entry(contents, name)
            contents.lines[entry.line] = f"{name}:{entry.user.role}:{hashed}"

        self._change(change)

    # -- internals -------------------------------------------------------------------------

    def _hash(self, password: str) -> str:
        problem = password_problem(password)
        if problem:
            raise UsersError(problem)
        return self._hasher.hash(password)

    def _entry(self, contents: _Contents, name: str) -> _Entry:
        entry = contents.entries.get(name)
        if entry is None:
            raise UsersError(f"no user {name} in {self.path}")
        return entry

    def _change(self, change: Callable[[_Contents], object]) -> None:
        """Apply *change* to the file's current lines and write the result atomically."""
        with self._lock:
            _, contents = self._read()
            change(contents)
            text = "".join(line + "\n" for line in contents.lines)
            signature = self._write(text)
            self._signature, self._contents = signature, self._parse(text)

    def _read(self) -> tuple[_Signature | None, _Contents]:
        try:
            with open(self.path, "rb") as f:
                signature = _signature_of(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            return None, _Contents([], {}, self.rounds)
        except OSError as exc:
            raise self._os_error("read", exc) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise UsersError(f"{self.path}:{line}: not UTF-8 text") from None
        return signature, self._parse(text)

    def _parse(self, text: str) -> _Contents:
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        entries: dict[str, _Entry] = {}
        costs: list[int] = []
        for index, raw in enumerate(lines):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{self.path}:{index + 1}"
            parts = line.split(":")
            if len(parts) != 3:
                raise UsersError(f"{where}: malformed line (expected name:role:bcrypt-hash)")
            name, role, hashed = parts
            try:
                _check_name(name)
                _check_role(role)
            except UsersError as exc:
                raise UsersError(f"{where}: {exc}") from None
            try:
                costs.append(_bcrypt.from_string(hashed).rounds)
            except ValueError:
                raise UsersError(f"{where}: the password of {name} is not a bcrypt hash") from None
            if name in entries:
                raise UsersError(f"{where}: user {name} is already on line {entries[name].line + 1}")
            entries[name] = _Entry(User(name, role), hashed, index)
        return _Contents(lines, entries, max(costs, default=self.rounds))

    def _write(self, text: str) -> _Signature:
        """Replace the file with *text* (mode 0600, same owner) via a fsynced temporary file."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                old = os.stat(self.path)
            except FileNotFoundError:
                old = None
            with atomic_writer(self.path, 0o600, temp=tmp) as out:
                if old is not None and os.geteuid() == 0:  # root editing the daemon user's file
                    os.fchown(out.fileno(), old.st_uid, old.st_gid)
                out.write(text.encode("utf-8"))
                out.flush()
                signature = _signature_of(os.fstat(out.fileno()))
        except OSError as exc:
            raise self._os_error("write", exc) from None
        return signature

    def _os_error(self, verb: str, exc: OSError) -> UsersError:
        return UsersError(f"cannot {verb} users file {self.path}: {exc.strerror or exc}")


def password_problem(password: object) -> str | None:
    """Why *password* cannot be stored, or None if it can."""
    if not isinstance(password, str):
        return "a password must be a string"
    if not password:
        return "empty passwords are not allowed"
    if "\n" in password:
        return "a password cannot contain a line break"
    if "\0" in password:
        return "a password cannot contain a NUL character"
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        return "a password must be valid Unicode text"
    if size > MAX_PASSWORD_BYTES:
        return f"a password cannot be longer than {MAX_PASSWORD_BYTES} bytes (bcrypt's limit)"
    return None


def _check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise UsersError(f"invalid user name {name!r} (1-64 of A-Z a-z 0-9 _ . @ -)")


def _check_role(role: str) -> None:
    try:
        validate_role(role)
    except ValueError as exc:
        raise UsersError(str(exc)) from None


def _signature_of(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.cache
def _dummy_hash(rounds: int) -> str:
    """A hash to check against for an unknown user, as costly as the real ones."""
    return _bcrypt.using(rounds=rounds).hash(_DUMMY_PASSWORD)
