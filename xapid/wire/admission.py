"""Connection caps shared by every listener, as libvirtd's ``max_clients`` and
``max_anonymous_clients``: no client can exhaust the daemon's file descriptors, and
connections that have not authenticated can never crowd out those that have.

* At most ``max_anonymous`` connections have not authenticated, and at most ``max_clients``
  are open.  When a new connection passes a cap, the unauthenticated connections idle the
  longest (none of their request in progress) are closed to make room, shortly after (a
  tenth of a second: time for the newcomers' own requests to be read).  A flood of idle
  sockets therefore cannot lock a new client out (a real client sends its login at once, is
  busy, and then authenticated), and a fleet of real clients reconnecting at once is not
  cut down while its requests are in flight.
* Connections in a call are never closed for another.  Above ``max_clients + slack`` a new
  connection gets 503 and is closed; far beyond it (``slack`` more, while refusals are being
  written) the socket is closed as soon as it is accepted, so descriptors stay free for the
  database and the driver even under a flood.

:func:`descriptor_budget` raises the soft ``RLIMIT_NOFILE`` to the hard limit at start and
sizes the caps to fit it.
"""

from __future__ import annotations

import resource
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

log = Logger()

TRIM_DELAY = 0.1  # seconds between a cap being passed and idle connections being closed
LOG_INTERVAL = 60.0  # seconds between two warnings about the caps


class Admission:
    """Which connections may stay: see the module docstring.  Channels must offer ``busy``
    (a call in progress) and ``evict()`` (close at once)."""

    def __init__(self, max_clients: int, max_anonymous: int, clock: Any, slack: int = 64) -> None:
        self.max_clients = max_clients
        self.max_anonymous = min(max_anonymous, max_clients)
        self.clock = clock
        self.slack = slack
        self._open: set[Any] = set()
        self._anonymous: OrderedDict[Any, None] = OrderedDict()  # least recently active first
        self._refused: set[Any] = set()
        self._trim_call: Any = None
        self._evicted = 0
        self._refusals = 0
        self._last_log = float("-inf")

    @property
    def open(self) -> int:
        return len(self._open)

    @property
    def anonymous(self) -> int:
        return len(self._anonymous)

    def room(self) -> bool:
        """Whether a new socket may get a protocol at all (else it is closed unanswered)."""
        return len(self._open) + len(self._refused) < self.max_clients + 2 * self.slack

    def admit(self, channel: Any) -> str:
        """Take *channel* in (returns "") or say why it is refused (it then answers 503)."""
        if len(self._open) >= self.max_clients + self.slack:
            self._trim()
            if len(self._open) >= self.max_clients + self.slack:
                self._refused.add(channel)
                self._refusals += 1
                self._report()
                return f"too many connections (at most {self.max_clients})"
        self._open.add(channel)
        self._anonymous[channel] = None
        if self._over() and self._trim_call is None:
            self._trim_call = self.clock.callLater(TRIM_DELAY, self._trim)
        return ""

    def authenticated(self, channel: Any) -> None:
        """*channel* has shown credentials: it no longer counts against the anonymous cap."""
        self._anonymous.pop(channel, None)

    def touched(self, channel: Any) -> None:
        """*channel* finished a request: it is the most recently active one."""
        if channel in self._anonymous:
            self._anonymous.move_to_end(channel)

    def release(self, channel: Any) -> None:
        """*channel* is closed."""
        self._open.discard(channel)
        self._anonymous.pop(channel, None)
        self._refused.discard(channel)

    def _over(self) -> bool:
        return len(self._anonymous) > self.max_anonymous or len(self._open) > self.max_clients

    def _trim(self) -> None:
        """Close idle unauthenticated connections, least recently active first, until both caps
        hold or none is left idle; each one is looked at once."""
        if self._trim_call is not None and self._trim_call.active():
            self._trim_call.cancel()
        self._trim_call = None
        busy = []
        anonymous_over = len(self._anonymous) - self.max_anonymous
        open_over = len(self._open) - self.max_clients
        while (anonymous_over > 0 or open_over > 0) and self._anonymous:
            channel, _ = self._anonymous.popitem(last=False)
            if channel.busy:
                busy.append(channel)
                continue
            self._open.discard(channel)
            channel.evict()
            self._evicted += 1
            anonymous_over -= 1
            open_over -= 1
        for channel in reversed(busy):  # back at the front, in their order
            self._anonymous[channel] = None
            self._anonymous.move_to_end(channel, last=False)
        if self._evicted:
            self._report()

    def _report(self) -> None:
        now = self.clock.seconds()
        if now - self._last_log < LOG_INTERVAL:
            return
        self._last_log = now
        log.warn("connection caps reached: {open} open (at most {max_clients}), {anonymous} unauthenticated "
                 "(at most {max_anonymous}); {evicted} idle unauthenticated connections closed and "
                 "{refused} refused so far", open=len(self._open), max_clients=self.max_clients,
                 anonymous=len(self._anonymous), max_anonymous=self.max_anonymous, evicted=self._evicted,
                 refused=self._refusals)


@dataclass(frozen=True)
class Budget:
    """The caps that fit the process's open-file limit."""

    max_clients: int
    max_anonymous: int
    soft_before: int
    soft: int


def descriptor_budget(max_clients: int, max_anonymous: int, slack: int = 64) -> Budget:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the connection caps lowered to fit it.

    A reserve (an eighth of the limit, at least 128 descriptors) stays for the database, the
    driver, logs and listening sockets, plus twice *slack* for connections over the cap.  When the
    client cap had to be lowered, unauthenticated connections get at most half of it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY:
        target = soft = 1 << 20
    raised = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            raised = target
        except (ValueError, OSError):
            raised = soft
    usable = raised - max(128, raised // 8) - 2 * slack
    clients = max(1, min(max_clients, usable))
    # lowered to fit: unauthenticated connections keep at most half of what is left
    anonymous = min(max_anonymous, clients if clients == max_clients else max(1, clients // 2))
    return Budget(clients, anonymous, soft, raised)
