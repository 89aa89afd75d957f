"""Password checks that hold against guessing floods: one :class:`PasswordChecker` for every login.

Both ``session.login_with_password`` (and ``slave_local_login_with_password``) and HTTP Basic on
the metrics exports check passwords here, so both re-read the users file the same way and share
the same limits.  A check goes through three gates, all in the reactor thread:

1. **A token bucket per source address** (:func:`source_key`: the IPv4 address, the /64 of an
   IPv6 address, ``"unix"`` for a local socket, ``"local"`` for in-process calls).  A source
   holds at most ``burst`` tokens and gets one back every ``interval`` seconds of the injected
   clock.  A failed check spends a token; a right password costs nothing, so many users (or one
   tool opening many sessions) logging in at once from one address are never throttled.  A
   source may have at most as many checks running as it has tokens, so checks in flight cannot
   overdraw the bucket.  A source with no token left is answered "failed" at once (its waiting
   checks too): bcrypt does not run, even for the right password.  One warning is logged when a
   source starts being throttled, not one per try.
2. **A bounded queue per source**: at most ``queue_per_source`` checks waiting; more are
   answered "failed" at once.
3. **Fair queueing**: at most ``threads`` checks run at once, on a runner of their own (the
   daemon's ``xapid-login`` thread pool, never the storage and driver pool).  Waiting sources
   take turns in rounds: each source with checks waiting gets one check started per round, and
   a source that has not been served this round goes before every source that has.  A flood
   from one address therefore delays another address by at most one check per flooding source.
   A source with a clean record (full bucket, nothing queued or running: no recent failure)
   goes first, ahead of the rounds, for that one check: a user logging in from an address of
   their own waits for the checks already running, not for the flood's queue.  An attacker
   gets that once per address, as its first failure makes the address an ordinary one.

The table of sources is bounded: a source is forgotten once its bucket is full again and it has
nothing queued or running (when a check of it ends, and in :meth:`PasswordChecker.sweep`), and
beyond ``max_sources`` the least recently seen idle source is evicted to make room (or, if every
tracked source is busy, the new one is refused at once).

**Remembered credentials** (``check(..., remembered=True)``, what HTTP Basic asks for: a scraper
sends the same password on every request).  A right password is remembered for ``remember_ttl``
seconds (default 60) under an HMAC-SHA256 of the name and password with a key drawn at random
when the checker is made (neither the password nor an unkeyed hash of it is ever held), so the
next request with the same credentials is answered without bcrypt.  Only successes are
remembered; a remembered answer is used only when the source is not throttled (gate 1 comes
first) and only while the users file is unchanged: every lookup compares the file's signature
(device, inode, size, mtime) with the one taken before the check that filled the entry, and any
change (an edit, ``xapid user passwd``, a role change, a deletion) drops every entry at once.  At
most ``remember_max`` entries are held, the least recently used evicted first.  The RPC login
(``session.login_with_password``) always runs bcrypt, as xapi's does.

The caller turns every unsuccessful :class:`Outcome` into the same answer (after the usual
``auth_failure_delay``), whatever the reason: wrong password, unknown user, throttled or queue
full all look alike to the client.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid.auth.users import User, UsersError, _Signature as _FileSignature, _signature_of

log = Logger()

OK, FAILED, THROTTLED, BUSY = "ok", "failed", "throttled", "busy"
MAX_SOURCES = 4096
REMEMBER_TTL = 60.0  # s: how long a right password given with remembered=True skips bcrypt
REMEMBER_MAX = 1024  # remembered credentials held at most

_Signature = _FileSignature | None  # the users file's (dev, ino, size, mtime_ns); None: no file


@dataclass(frozen=True)
class Outcome:
    """The result of one check: the user when the password was right, else None and why."""

    user: User | None
    reason: str  # OK, FAILED (bcrypt said no), THROTTLED (no token left), BUSY (queue full)
    source: str  # the source key the check was counted against

    @property
    def checked(self) -> bool:
        """Whether bcrypt ran (the answer was not refused up front)."""
        return self.reason in (OK, FAILED)


def source_key(address: str | None) -> str:
    """The source a check is counted against: IPv4 address, IPv6 /64, ``"unix"`` or ``"local"``."""
    if not address:
        return "local"
    if address == "unix":
        return "unix"
    text = address.strip("[]").split("%", 1)[0]  # no brackets, no IPv6 zone
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Source:
    __slots__ = ("key", "tokens", "stamp", "queue", "running", "served_round", "scheduled", "throttled")

    def __init__(self, key: str, tokens: float, now: float):
        self.key = key
        self.tokens = tokens
        self.stamp = now
        self.queue: deque[_Job] = deque()
        self.running = 0
        self.served_round = -1
        self.scheduled = False  # in one of the round deques
        self.throttled = False  # warned about; reset when the source is forgotten

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running


@dataclass
class _Job:
    source: _Source
    name: str
    password: str
    deferred: Deferred
    remember: bytes | None = None  # the credentials' keyed hash, to remember a success under


@dataclass
class CheckerStats:
    """Counts since start: checks that ran bcrypt, failed ones, the two kinds of refusal, and
    successes answered from remembered credentials."""

    checked: int = 0
    failed: int = 0
    throttled: int = 0
    busy: int = 0
    remembered: int = 0  # right passwords answered from the remembered credentials, without bcrypt


class PasswordChecker:
    """Checks passwords against *users* on *runner*, throttled and queued fairly per source.

    *reactor* supplies the clock (``seconds()``).  *runner* runs the blocking bcrypt checks: a
    :class:`~xapid.runner.ThreadRunner` on a pool of at least *threads* threads in the daemon,
    an :class:`~xapid.runner.InlineRunner` in tests (then each check runs as soon as it is
    started, deterministically).
    """

    def __init__(self, users: Any, reactor: Any, runner: Any, *, threads: int = 2, burst: int = 10,
                 interval: float = 6.0, queue_per_source: int = 16, max_sources: int = MAX_SOURCES,
                 remember_ttl: float = REMEMBER_TTL, remember_max: int = REMEMBER_MAX):
        if threads < 1 or burst < 1 or interval <= 0 or queue_per_source < 1 or max_sources < 1:
            raise ValueError("threads, burst, interval, queue_per_source and max_sources must be positive")
        if remember_ttl < 0 or remember_max < 0:
            raise ValueError("remember_ttl and remember_max must not be negative")
        self.users = users
        self.reactor = reactor
        self.runner = runner
        self.threads = threads
        self.burst = burst
        self.interval = interval
        self.queue_per_source = queue_per_source
        self.max_sources = max_sources
        self.stats = CheckerStats()
        self._sources: OrderedDict[str, _Source] = OrderedDict()  # least recently seen first
        self._clean: deque[_Source] = deque()  # sources with a clean record: served first, one check
        self._current: deque[_Source] = deque()  # sources with checks waiting, not served this round
        self._next: deque[_Source] = deque()  # sources with checks waiting, served this round
        self._round = 0
        self._running = 0
        self._pumping = False
        self.remember_ttl = remember_ttl
        self.remember_max = remember_max
        self._key = secrets.token_bytes(32)  # this process's only: the hashes mean nothing elsewhere
        # keyed hash -> (expiry on the reactor clock, the user, the users file's signature before the check)
        self._remembered: OrderedDict[bytes, tuple[float, User, _Signature]] = OrderedDict()

    # -- the one entry point -----------------------------------------------------------------

    def check(self, address: str | None, name: str, password: str, *, remembered: bool = False) -> Deferred:
        """A Deferred firing with the :class:`Outcome` of checking *name*'s *password* for a
        caller at *address* (text IP, ``"unix"``, or ``""``/None for an in-process caller).

        With *remembered*, a right password given (with *remembered*) in the last ``remember_ttl``
        seconds, the users file unchanged since, is answered at once without bcrypt; throttled
        sources are refused first all the same."""
        key = source_key(address)
        source = self._source(key)
        if source is None:
            self.stats.busy += 1
            return _now(Outcome(None, BUSY, key))
        self._refill(source)
        clean = source.idle and source.tokens >= self.burst
        if source.tokens < 1:
            self.stats.throttled += 1
            self._throttle(source)
            return _now(Outcome(None, THROTTLED, key))
        digest = None
        if remembered and self.remember_ttl > 0 and self.remember_max > 0:
            digest = self._digest(name, password)
            user = self._recall(digest)
            if user is not None:
                self.stats.remembered += 1
                self._forget_if_idle(source)
                return _now(Outcome(user, OK, key))
        if len(source.queue) >= self.queue_per_source:
            self.stats.busy += 1
            return _now(Outcome(None, BUSY, key))
        job = _Job(source, name, password, Deferred(lambda d: self._cancel(job)), digest)
        source.queue.append(job)
        self._schedule(source, clean)
        self._pump()
        return job.deferred

    def _schedule(self, source: _Source, clean: bool = False) -> None:
        """Put *source* (with checks waiting) in its turn, unless it is there already."""
        if source.scheduled or not source.queue:
            return
        source.scheduled = True
        if clean:
            self._clean.append(source)
        else:
            (self._next if source.served_round == self._round else self._current).append(source)

    def _throttle(self, source: _Source) -> None:
        if not source.throttled:
            source.throttled = True
            log.warn("login throttled for source {source}: more than {burst} failed logins; "
                     "one more allowed every {interval} s, until then every login from it fails "
                     "without a password check", source=source.key, burst=self.burst, interval=self.interval)

    @property
    def tracked_sources(self) -> int:
        """How many sources the table holds now (bounded by *max_sources*)."""
        return len(self._sources)

    # -- remembered credentials ------------------------------------------------------------

    def _digest(self, name: str, password: str) -> bytes:
        """The keyed hash of *name* and *password* (length-prefixed name, so no two pairs collide)."""
        raw_name = name.encode("utf-8", "surrogatepass")
        message = len(raw_name).to_bytes(4, "big") + raw_name + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _recall(self, digest: bytes) -> User | None:
        """The user remembered under *digest*, if the entry has not expired and the users file
        is unchanged since (any change drops every entry)."""
        entry = self._remembered.get(digest)
        if entry is None:
            return None
        expiry, user, signature = entry
        if self.reactor.seconds() >= expiry:
            del self._remembered[digest]
            return None
        if self._users_signature() != signature:
            self.forget_remembered()
            return None
        self._remembered.move_to_end(digest)
        return user

    def _remember(self, digest: bytes, user: User, signature: _Signature) -> None:
        """Remember *user* under *digest* with the file's *signature* from before the check: a change
        racing the check is seen at the first recall (:meth:`_recall` compares), no stat needed here."""
        self._remembered[digest] = (self.reactor.seconds() + self.remember_ttl, user, signature)
        self._remembered.move_to_end(digest)
        while len(self._remembered) > self.remember_max:
            self._remembered.popitem(last=False)

    def forget_remembered(self) -> None:
        """Drop every remembered credential (the next check of each runs bcrypt)."""
        self._remembered.clear()

    @property
    def remembered_count(self) -> int:
        """How many credentials are remembered now (bounded by *remember_max*)."""
        return len(self._remembered)

    def _users_signature(self) -> _Signature:
        """The users file's signature now (one stat; None when there is no file to stat)."""
        path = getattr(self.users, "path", None)
        if path is None:
            return None
        try:
            return _signature_of(os.stat(path))
        except OSError:
            return None

    # -- the buckets ------------------------------------------------------------------------

    def _source(self, key: str) -> _Source | None:
        source = self._sources.get(key)
        if source is not None:
            self._sources.move_to_end(key)
            return source
        if len(self._sources) >= self.max_sources and not self._make_room():
            return None
        source = self._sources[key] = _Source(key, float(self.burst), self.reactor.seconds())
        return source

    def sweep(self) -> None:
        """Forget every source whose bucket is full again and that has nothing queued or running,
        and every expired remembered credential (the daemon calls this from its housekeeping timer)."""
        for source in list(self._sources.values()):
            self._forget_if_idle(source)
        now = self.reactor.seconds()
        for digest in [d for d, (expiry, _, _) in self._remembered.items() if now >= expiry]:
            del self._remembered[digest]

    def _make_room(self) -> bool:
        """Evict the least recently seen idle source (the one most likely full); False if all are busy."""
        for key, source in self._sources.items():
            if source.idle:
                del self._sources[key]
                return True
        return False

    def _refill(self, source: _Source) -> None:
        now = self.reactor.seconds()
        if now > source.stamp:
            source.tokens = min(float(self.burst), source.tokens + (now - source.stamp) / self.interval)
        source.stamp = now

    def _forget_if_idle(self, source: _Source) -> None:
        """Drop *source* once its bucket is full and it has nothing queued or running."""
        if source.idle:
            self._refill(source)
            if source.tokens >= self.burst and self._sources.get(source.key) is source:
                del self._sources[source.key]

    # -- fair queueing ----------------------------------------------------------------------

    def _pop(self) -> _Job | None:
        """The next check to start: a clean source's, else round-robin, one check per source per
        round.  A source with as many checks running as it has tokens sits out (unscheduled)
        until one of them ends."""
        while True:
            if self._clean:
                source = self._clean.popleft()
            elif not self._current:
                if not self._next:
                    return None
                self._current, self._next = self._next, self._current
                self._round += 1
                source = self._current.popleft()
            else:
                source = self._current.popleft()
            if source.tokens - source.running >= 1:
                break
            source.scheduled = False  # rescheduled when one of its running checks ends
        job = source.queue.popleft()
        source.served_round = self._round
        if source.queue:
            self._next.append(source)
        else:
            source.scheduled = False
        return job

    def _pump(self) -> None:
        """Start waiting checks while fewer than *threads* run (a loop, never re-entered)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._running < self.threads:
                job = self._pop()
                if job is None:
                    break
                self._running += 1
                job.source.running += 1
                self.stats.checked += 1
                self.runner.run(self._verify, job.name, job.password, job.remember is not None).addBoth(
                    self._finished, job)
        finally:
            self._pumping = False

    def _finished(self, result: Any, job: _Job) -> None:
        self._running -= 1
        source = job.source
        source.running -= 1
        if isinstance(result, tuple):  # a success to remember: (user, the file's signature before)
            user, signature = result
            if job.remember is not None:
                self._remember(job.remember, user, signature)
            result = user
        if isinstance(result, User):
            outcome: Any = Outcome(result, OK, source.key)  # successes cost nothing
        elif result is None:
            self.stats.failed += 1
            self._refill(source)
            source.tokens = max(0.0, source.tokens - 1)
            outcome = Outcome(None, FAILED, source.key)
        else:  # a Failure: an unexpected error in the check; the caller reports it
            outcome = result
        if source.tokens < 1 and source.queue:  # out of budget: what waits is refused unchecked
            self._throttle(source)
            waiting, source.queue = list(source.queue), deque()
            self.stats.throttled += len(waiting)
            for other in waiting:
                other.deferred.callback(Outcome(None, THROTTLED, source.key))
        self._schedule(source)
        self._forget_if_idle(source)
        if job.deferred.called:  # cancelled meanwhile (the client went away): nobody waits for it
            if not isinstance(outcome, Outcome):
                log.failure("password check failed", outcome)
        elif isinstance(outcome, Outcome):
            job.deferred.callback(outcome)
        else:
            job.deferred.errback(outcome)
        self._pump()

    def _cancel(self, job: _Job) -> None:
        """The caller went away: a check still waiting is dropped."""
        source = job.source
        try:
            source.queue.remove(job)
        except ValueError:
            return  # already running: it finishes, its answer is dropped
        if not source.queue and source.scheduled:
            for rotation in (self._clean, self._current, self._next):
                if source in rotation:
                    rotation.remove(source)
            source.scheduled = False
        self._forget_if_idle(source)

    # -- the blocking part (in the login runner) --------------------------------------------

    def _verify(self, name: str, password: str, remember: bool = False) -> User | tuple[User, _Signature] | None:
        """The user, or None; with *remember*, a success comes as (user, the users file's
        signature taken before the table was reloaded), so a change racing the check is seen."""
        users = self.users
        signature = self._users_signature() if remember else None
        try:
            users.reload_if_changed()
        except UsersError as error:  # a bad edit of the file: keep serving the previous table
            log.error("users file not reloaded: {error}", error=str(error))
            remember = False  # the table in use is not the file's: nothing remembered from it
        user = users.verify(name, password)
        if user is not None and remember:
            return user, signature
        return user


def _now(outcome: Outcome) -> Deferred:
    d: Deferred = Deferred()
    d.callback(outcome)
    return d
