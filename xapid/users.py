"""The users file: ``name:role:bcrypt-hash`` per line, written atomically with mode 600.

Verification costs the same whether or not the user exists, so timing does not tell an
unknown name from a wrong password.  Hashing is slow on purpose: the daemon calls
:meth:`UsersFile.verify` from its thread pool.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from passlib.hash import bcrypt

from xapid.roles import validate_role

DEFAULT_USERS_FILE = "/etc/xapid/users"
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class UsersError(Exception):
    """A one-line problem with the users file or a request to change it."""


@dataclass(frozen=True)
class User:
    name: str
    role: str


class UsersFile:
    def __init__(self, path: str | Path, rounds: int = 10):
        self.path = Path(path)
        self.rounds = rounds
        self._lock = threading.Lock()
        self._users: dict[str, tuple[str, str]] = {}
        self._stamp: tuple[int, int] | None = None
        self._dummy = bcrypt.using(rounds=rounds).hash("xapid-dummy-password")

    # -- reading -------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsersError(f"cannot read users file {self.path}: {exc.strerror}") from None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> None:
        """Read the file (a missing file is an empty one)."""
        stamp = self._file_stamp()
        users: dict[str, tuple[str, str]] = {}
        if stamp is not None:
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise UsersError(f"cannot read users file {self.path}: {reason}") from None
            for number, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split(":", 2)
                if len(parts) != 3 or not NAME.fullmatch(parts[0]) or not parts[2].startswith("$2"):
                    raise UsersError(f"{self.path}:{number}: malformed line (expected name:role:bcrypt-hash)")
                try:
                    validate_role(parts[1])
                except ValueError as exc:
                    raise UsersError(f"{self.path}:{number}: {exc}") from None
                users[parts[0]] = (parts[1], parts[2])
        with self._lock:
            self._users, self._stamp = users, stamp

    def reload_if_changed(self) -> bool:
        """Re-read the file when another process changed it; True when it did."""
        if self._file_stamp() == self._stamp:
            return False
        self.load()
        return True

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._users)

    def get(self, name: str) -> User | None:
        with self._lock:
            entry = self._users.get(name)
        return User(name, entry[0]) if entry else None

    def list(self) -> list[User]:
        with self._lock:
            return [User(n, r) for n, (r, _) in sorted(self._users.items())]

    def verify(self, name: str, password: str) -> User | None:
        """The user when *password* is theirs; None otherwise, at the same cost."""
        with self._lock:
            entry = self._users.get(name)
        hashed = entry[1] if entry else self._dummy
        try:
            ok = bcrypt.verify(password, hashed)
        except (ValueError, TypeError):
            ok = False
        return User(name, entry[0]) if ok and entry else None

    # -- writing -------------------------------------------------------------------------

    def add(self, name: str, role: str, password: str) -> None:
        if not NAME.fullmatch(name):
            raise UsersError(f"invalid user name {name!r} (1-64 of A-Z a-z 0-9 _ . @ -)")
        try:
            validate_role(role)
        except ValueError as exc:
            raise UsersError(str(exc)) from None
        self.load()
        if name in self._users:
            raise UsersError(f"user {name} already exists in {self.path}")
        self._users[name] = (role, self._hash(password))
        self._save()

    def delete(self, name: str) -> None:
        self.load()
        if name not in self._users:
            raise UsersError(f"no user {name} in {self.path}")
        del self._users[name]
        self._save()

    def set_password(self, name: str, password: str) -> None:
        self.load()
        if name not in self._users:
            raise UsersError(f"no user {name} in {self.path}")
        self._users[name] = (self._users[name][0], self._hash(password))
        self._save()

    def _hash(self, password: str) -> str:
        if not password:
            raise UsersError("empty passwords are not allowed")
        if "\n" in password:
            raise UsersError("a password cannot contain a line break")
        return bcrypt.using(rounds=self.rounds).hash(password)

    def _save(self) -> None:
        lines = "".join(f"{n}:{r}:{h}\n" for n, (r, h) in sorted(self._users.items()))
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write("# xapid users: name:role:bcrypt-hash (managed by `xapid user`)\n" + lines)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UsersError(f"cannot write users file {self.path}: {exc.strerror}") from None
        self._stamp = self._file_stamp()
