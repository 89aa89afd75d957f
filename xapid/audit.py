"""The audit log: one JSON line per call that writes, per login and per failed login.

``<state_dir>/audit.log`` (mode 0600), as xapi keeps one.  A line holds ``time`` (ISO 8601
UTC), ``user``, ``role``, ``originator`` (of the caller's session), ``peer`` (the source
address; null for calls made inside the daemon), ``method``, ``args`` (by parameter name,
secrets redacted, long values shortened) and ``outcome`` (``success`` or the error code);
an ``Async.`` call's line also names its ``task``.  Session refs (bearer tokens) are never
written.

What is audited (:func:`audited`): every message whose schema role is above read-only (what
the dispatcher makes durable), every generic setter (``set_*``, ``add_*``, ``remove_*``) and
the explicit read-only handlers that change state (logins, logout, tasks, ``event.inject``…).
Calls that show no valid session are not audited (they changed nothing and name no one),
except logins, whose failures are; HTTP Basic failures on the GET exports are too.  A local
superuser login (uid 0 on a UNIX socket, no password checked) is marked ``"local_superuser":
true``, its ``user`` is the session's ``(local superuser)`` and ``login_name`` the name given.

Writing never blocks the reactor for long and never fails a call: each line is one
``write(2)`` on a descriptor opened ``O_APPEND`` (no buffer to lose in a crash); an error is
logged once (and once more when writing works again).  The file rotates by size
(``[limits] audit_log_bytes``): ``audit.log`` → ``audit.log.1`` … ``audit.log.<keep>``.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid.apitypes import utc
from xapid.schema import READ_ONLY, MessageSpec

log = Logger()

AUDIT_FILE = "audit.log"
KEEP = 5
REDACTED = "(redacted)"
MAX_TEXT = 1024  # characters of one string argument kept in a line
MAX_ITEMS = 64  # items of one list or map argument kept in a line

# explicit handlers of read-only role that change state (all others of that role only read)
READ_ONLY_WRITERS = frozenset({
    "session.login_with_password", "session.slave_local_login_with_password", "session.logout",
    "session.local_logout", "task.create", "task.destroy", "task.cancel", "event.inject", "event.register",
    "event.unregister", "VM.update_allowed_operations",
})
LOGINS = frozenset({"session.login_with_password", "session.slave_local_login_with_password"})

_SECRET_NAME = re.compile(r"pwd|passw|secret", re.IGNORECASE)
_SECRET_KEY = re.compile(r"password|secret", re.IGNORECASE)


def audited(spec: MessageSpec) -> bool:
    """Whether calls of *spec* are written to the audit log."""
    if spec.role != READ_ONLY:
        return True
    if spec.explicit:
        return spec.wire_name in READ_ONLY_WRITERS
    return not spec.kind.startswith("get")


def timestamp(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``: fixed width, so text order is time order."""
    return utc(seconds, exact=True).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _clean(value: Any) -> Any:
    """*value* made JSON-safe and bounded: map values under secret-like keys redacted."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else f"{value[:MAX_TEXT]}…(+{len(value) - MAX_TEXT} chars)"
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) < 1 << 64 else "(a very large integer)"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):  # only the kept items are visited, not a copy of the whole
        out = {str(k)[:MAX_TEXT]: REDACTED if _SECRET_KEY.search(str(k)) else _clean(v)
               for k, v in islice(value.items(), MAX_ITEMS)}
        if len(value) > MAX_ITEMS:
            out["…"] = f"+{len(value) - MAX_ITEMS} more"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        out_list = [_clean(v) for v in islice(value, MAX_ITEMS)]
        if len(value) > MAX_ITEMS:
            out_list.append(f"…(+{len(value) - MAX_ITEMS} more)")
        return out_list
    inner = getattr(value, "value", None)  # a wire value wrapper
    if inner is not None and inner is not value:
        return _clean(inner)
    return _clean(str(value))


def redact(names: list[str], values: list[Any], secret: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The arguments by name, made safe for the log: a parameter named like a password or secret
    (or in *secret*) is redacted, so is a map value under such a key, and the ``value`` that
    goes with a ``key`` naming one (``add_to_other_config(ref, "password", …)``)."""
    args: dict[str, Any] = {}
    secret_key = any(n == "key" and isinstance(v, str) and _SECRET_KEY.search(v) for n, v in zip(names, values))
    for name, value in zip(names, values):
        if name in secret or _SECRET_NAME.search(name) or (secret_key and name == "value"):
            args[name] = REDACTED
        else:
            args[name] = _clean(value)
    if len(values) > len(names):
        args["(extra)"] = _clean(list(values[len(names):]))
    return args


class AuditLog:
    """Appends audit lines to *path* (created 0600), rotated beyond *max_bytes*."""

    def __init__(self, path: Path, max_bytes: int = 10 << 20, keep: int = KEEP,
                 clock: Callable[[], float] | None = None):
        import time

        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.clock = clock or time.time
        self._fd: int | None = None
        self._size = 0
        self._broken = False

    # -- writing (reactor thread; one write(2) per line) ----------------------------------------

    def record(self, *, method: str, user: str | None, role: str | None, originator: str | None,
               peer: str | None, args: dict[str, Any], outcome: str, **extra: Any) -> None:
        entry = {"time": timestamp(self.clock()), "user": _clean(user), "role": role,
                 "originator": _clean(originator),
                 "peer": peer, "method": method, "args": args, "outcome": outcome, **extra}
        try:
            line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()
        except (TypeError, ValueError):  # never expected: _clean made every value plain
            line = (json.dumps({**entry, "args": "(not encodable)"}, default=str) + "\n").encode()
        self._write(line)

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stat = os.fstat(fd)
        if stat.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        self._size = stat.st_size
        return fd

    def _write(self, line: bytes) -> None:
        try:
            if self._fd is None:
                self._fd = self._open()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            written = os.write(self._fd, line)
            self._size += written
        except OSError as exc:
            if not self._broken:
                self._broken = True
                log.error("cannot write the audit log {path}: {reason} (calls go on; lines are lost until it "
                          "works again)", path=str(self.path), reason=exc.strerror or str(exc))
            self.close()
            return
        if self._broken:
            self._broken = False
            log.info("the audit log {path} is written again", path=str(self.path))

    def _rotate(self) -> None:
        self.close()
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.keep >= 1:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            os.unlink(self.path)
        self._fd = self._open()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    # -- reading (blocking: in a runner thread) -------------------------------------------------

    def read(self, since: str | None = None) -> bytes:
        """The current file's lines, those at or after *since* (a :func:`timestamp`) when given."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return b""
        if since is None:
            return data
        kept = []
        for line in data.splitlines(keepends=True):
            try:
                when = json.loads(line).get("time", "")
            except ValueError:
                continue
            if isinstance(when, str) and when >= since:
                kept.append(line)
        return b"".join(kept)


def parse_since(text: str) -> str:
    """*text* (ISO 8601; no zone means UTC; or Unix seconds) as a :func:`timestamp`; ValueError if neither."""
    try:
        seconds = float(text)
    except ValueError:
        when = datetime.fromisoformat(text.strip())
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp()
    if not math.isfinite(seconds):
        raise ValueError(text)
    return timestamp(seconds)


class CallAudit:
    """One audited call's line, written when the call's outcome is known."""

    __slots__ = ("log", "sessions", "spec", "method", "user", "role", "originator", "peer", "args", "login")

    def __init__(self, audit_log: AuditLog, sessions: Any, spec: MessageSpec, method: str, params: list[Any],
                 client: Any) -> None:
        self.log = audit_log
        self.sessions = sessions
        self.spec = spec
        self.method = method
        self.peer = getattr(client, "address", None) if client is not None else None
        self.login = spec.wire_name in LOGINS
        args = list(params[1:] if spec.session else params)
        sessions_refs = frozenset(p.name for p in spec.params  # session refs are bearer tokens
                                  if p.type.kind == "ref" and p.type.name == "session")
        self.args = redact([p.name for p in spec.params], args, sessions_refs)
        self.user = self.role = self.originator = None
        if self.login:
            self.user = args[0] if args and isinstance(args[0], str) else None
            self.originator = args[3] if len(args) > 3 and isinstance(args[3], str) else None

    @classmethod
    def begin(cls, audit_log: Any, schema: Any, sessions: Any, method: str, params: list[Any],
              client: Any) -> CallAudit | None:
        """The audit of a call to *method*, or None when it is not audited (reads, unknown
        methods, calls without a live session)."""
        if audit_log is None:
            return None
        spec = schema.messages.get(method[6:] if method.startswith("Async.") else method)
        if spec is None or not audited(spec):
            return None
        session = None
        if spec.session:  # looked up first: a caller without a live session costs no redaction
            session = sessions.get(params[0]) if params and isinstance(params[0], str) else None
            if session is None:
                return None
        note = cls(audit_log, sessions, spec, method, params, client)
        if session is not None:
            note.user, note.role, note.originator = session.user, session.role, session.originator
        return note

    def finish(self, outcome: Any) -> Any:
        """Write the line for *outcome* (a value or a Failure) and pass it on; never raises."""
        try:
            extra: dict[str, Any] = {}
            if isinstance(outcome, Failure):
                error = outcome.value
                result = getattr(error, "code", None) or ("CANCELLED" if outcome.check(CancelledError)
                                                          else "INTERNAL_ERROR")
            else:
                result = "success"
                if self.login and isinstance(outcome, str):
                    session = self.sessions.get(outcome)
                    if session is not None:
                        self.role, self.originator = session.role, session.originator
                        if getattr(session, "local_superuser", False):  # uid 0 on a UNIX socket, no password
                            extra.update(local_superuser=True, login_name=self.user)
                            self.user = session.user
                elif self.method.startswith("Async.") and isinstance(outcome, str):
                    extra["task"] = outcome
            self.log.record(method=self.method, user=self.user, role=self.role, originator=self.originator,
                            peer=self.peer, args=self.args, outcome=result, **extra)
        except Exception:  # noqa: BLE001 - the audit never fails a call
            log.failure("writing an audit line failed")
        return outcome

