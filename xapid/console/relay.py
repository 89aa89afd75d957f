"""Console relays: a client connection (raw after CONNECT, or WebSocket) joined to a console
backend (:class:`~xapid.backend.interface.ConsoleEndpoint`).

Backends, behind :class:`Link`:

* ``sim``: the simulator's consoles, in process (:mod:`xapid.console.serial`,
  :mod:`xapid.console.rfb`);
* ``pty``: the dom0 end of a guest's text console, the descriptor the driver opened and checked
  (:attr:`~xapid.backend.interface.ConsoleEndpoint.pty`, never the path reopened), set raw, read
  and written by the reactor (no thread);
* ``tcp``: the device model's VNC server, connected by the reactor.

Flow control: each side's transport is the producer of the other's, so a slow reader on
either side stops the reading of the other (the simulator's answers stop the reading of the
client itself); pings from a client that reads nothing get one pong, once it reads.  A session without a byte either way for ``idle_timeout`` seconds is closed;
:class:`ConsoleLimits` counts sessions per VM, per user and in total.
"""

from __future__ import annotations

import errno
import os
import stat
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import abstract, fdesc
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xapid.backend.interface import ConsoleEndpoint
from xapid.console import websocket as ws
from xapid.console.rfb import RfbError, RfbServer
from xapid.console.serial import SerialConsole

log = Logger()

MAX_WS_FRAME = 1 << 20
MAX_WS_MESSAGE = 4 << 20


# --------------------------------------------------------------------------- limits


@dataclass
class ConsoleLimits:
    """Console sessions at once: at most *total*, *per_vm* on one VM and *per_user* of one user
    (so that one operator cannot hold every session by spreading them over VMs).  *open* counts
    sessions by VM, *by_user* by user name ("" for callers without one, who share a count)."""

    total: int = 64
    per_vm: int = 4
    idle_timeout: float = 1800.0
    per_user: int = 16
    open: dict[str, int] = field(default_factory=dict)
    by_user: dict[str, int] = field(default_factory=dict)

    def full(self, vm: str, user: str | None = "") -> str:
        """Why one more session on *vm* for *user* is refused ("" when it is not); *user* None:
        not counted per user (a pool-admin)."""
        if sum(self.open.values()) >= self.total:
            return f"too many console sessions ({self.total} at most)"
        if self.open.get(vm, 0) >= self.per_vm:
            return f"too many console sessions on this VM ({self.per_vm} at most)"
        if user is not None and self.by_user.get(user, 0) >= self.per_user:
            return f"too many console sessions of this user ({self.per_user} at most)"
        return ""

    def take(self, vm: str, user: str | None = "") -> bool:
        if self.full(vm, user):
            return False
        self.open[vm] = self.open.get(vm, 0) + 1
        if user is not None:
            self.by_user[user] = self.by_user.get(user, 0) + 1
        return True

    def release(self, vm: str, user: str | None = "") -> None:
        _decrement(self.open, vm)
        if user is not None:
            _decrement(self.by_user, user)


def _decrement(counts: dict[str, int], key: str) -> None:
    """One less under *key*; the key goes at zero (the maps hold only what is open)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


# --------------------------------------------------------------------------- backends


class Link:
    """A console backend: bytes in with :meth:`write`, out through *deliver*, ``closed`` once."""

    transport: Any = None  # the backend's transport, when it has one (flow control)

    def __init__(self, deliver: Callable[[bytes], None], closed: Callable[[str], None]) -> None:
        self.deliver = deliver
        self.closed = closed

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SimLink(Link):
    """The simulator's console of *endpoint*, answering in the caller's turn."""

    def __init__(self, endpoint: ConsoleEndpoint, deliver: Callable[[bytes], None],
                 closed: Callable[[str], None]) -> None:
        super().__init__(deliver, closed)
        self.machine: SerialConsole | RfbServer = (RfbServer(endpoint.name) if endpoint.protocol == "rfb"
                                                   else SerialConsole(endpoint.name))
        self._open = True

    def start(self) -> None:
        self.deliver(self.machine.start())

    def write(self, data: bytes) -> None:
        if not self._open:
            return
        try:
            answer = self.machine.feed(data)
        except RfbError as exc:
            self._open = False
            self.closed(f"the client broke the RFB protocol: {exc}")
            return
        if answer:
            self.deliver(answer)

    def close(self) -> None:
        self._open = False


class _Backend(Protocol):
    """The backend side of a pty or TCP link."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def dataReceived(self, data: bytes) -> None:
        self.link.deliver(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.link.transport = None
        self.link.closed("the console closed")


class StreamLink(Link):
    """A backend reached through a reactor transport (pty or TCP)."""

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class PtyTransport(abstract.FileDescriptor):
    """A pty's file descriptor read and written by the reactor (non-blocking)."""

    def __init__(self, fd: int, protocol: Protocol, reactor: Any) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.protocol = protocol
        self.connected = 1
        protocol.makeConnection(self)
        self.startReading()

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self.fd, self.protocol.dataReceived)

    def writeSomeData(self, data: bytes) -> Any:
        return fdesc.writeToFD(self.fd, data)

    def connectionLost(self, reason: Failure) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        self.protocol.connectionLost(reason)

    def getPeer(self) -> str:
        return "pty"

    def getHost(self) -> str:
        return "pty"


def open_pty(endpoint: ConsoleEndpoint) -> int:
    """The pty the driver checked and holds (:class:`~xapid.backend.interface.HeldPty`; the path
    is never reopened, it may name another terminal by now), set raw; OSError when there is none
    or it is not a character device (then nothing of it is changed)."""
    if endpoint.pty is None:
        raise OSError(errno.ENXIO, "the driver holds no checked pty for this console", endpoint.path)
    fd = endpoint.pty.take()
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTTY, "not a terminal", endpoint.path)
        tty.setraw(fd, termios.TCSANOW)
    except (termios.error, OSError) as exc:
        os.close(fd)
        raise OSError(errno.ENOTTY, "not a terminal", endpoint.path) from exc
    return fd


def connect(endpoint: ConsoleEndpoint, reactor: Any, deliver: Callable[[bytes], None],
            closed: Callable[[str], None]) -> Deferred[Link]:
    """A Link to *endpoint*, connected (OSError-like failures when it cannot be reached)."""
    if endpoint.kind == "sim":
        sim = SimLink(endpoint, deliver, closed)
        sim.start()
        return succeed(sim)
    link = StreamLink(deliver, closed)
    proto = _Backend(link)
    if endpoint.kind == "pty":
        try:
            fd = open_pty(endpoint)
        except OSError as exc:
            return fail(exc)
        link.transport = PtyTransport(fd, proto, reactor)
        return succeed(link)
    if endpoint.kind == "tcp":
        d = connectProtocol(TCP4ClientEndpoint(reactor, endpoint.host, endpoint.port, timeout=10), proto)

        def connected(p: _Backend) -> Link:
            link.transport = p.transport
            return link

        return d.addCallback(connected)
    return fail(ValueError(f"unknown console kind {endpoint.kind!r}"))


# --------------------------------------------------------------------------- client side


@implementer(IPushProducer)
class _ClientBacklog:
    """The producer of the client's transport when the backend is a transport: a full client
    pauses the backend, and the session holds pongs back until the client drains (the client's
    own reading is paused by the backend's transport, not here)."""

    def __init__(self, session: ConsoleSession, backend: Any) -> None:
        self.session = session
        self.backend = backend

    def pauseProducing(self) -> None:
        self.session.client_full = True
        self.backend.pauseProducing()

    def resumeProducing(self) -> None:
        self.backend.resumeProducing()
        self.session._client_drained()

    def stopProducing(self) -> None:
        self.backend.stopProducing()


class ConsoleSession(Protocol):
    """The client's side of a console, after the connection was taken over from HTTP.

    *websocket*: the client speaks WebSocket frames (binary out; binary or text in), else
    raw bytes (after CONNECT).  The backend link is opened when the connection is handed over;
    the session slot (*limits*, *vm*, *user*) is taken then and released when either side closes.
    """

    def __init__(self, endpoint: ConsoleEndpoint, reactor: Any, limits: ConsoleLimits, vm: str,
                 websocket: bool = False, label: str = "", user: str | None = "") -> None:
        self.endpoint = endpoint
        self.reactor = reactor
        self.limits = limits
        self.vm = vm
        self.user = user
        self.websocket = websocket
        self.label = label
        self.link: Link | None = None
        self.parser = ws.FrameParser(MAX_WS_FRAME, MAX_WS_MESSAGE) if websocket else None
        self.pending: list[bytes] = []  # client input before the backend is connected (bounded)
        self.pending_size = 0
        self.ending = False
        self.slot = False
        self.client_full = False  # the client's transport is full (a pong waits in pong_due)
        self.pong_due: bytes | None = None
        self.last = 0.0
        self._timer: Any = None

    # -- connection

    def connectionMade(self) -> None:
        if not self.limits.take(self.vm, self.user):
            self._fail(ws.GOING_AWAY, "too many console sessions")
            return
        self.slot = True
        self.last = self.reactor.seconds()
        self._timer = self.reactor.callLater(self.limits.idle_timeout, self._idle)
        d = connect(self.endpoint, self.reactor, self._from_console, self._console_closed)
        d.addCallbacks(self._linked, self._unreachable)

    def _linked(self, link: Link) -> None:
        if self.ending:
            link.close()
            return
        self.link = link
        log.info("console {label}: {protocol} relay open", label=self.label, protocol=self.endpoint.protocol)
        self._flow(link)
        pending, self.pending, self.pending_size = self.pending, [], 0
        for data in pending:
            link.write(data)

    def _flow(self, link: Link) -> None:
        """Each side's transport produces for the other's (the sim's answers: the client's own).
        The backend is paused through :class:`_ClientBacklog`, which also holds back pongs."""
        transport: Any = self.transport
        try:
            if link.transport is not None:
                transport.registerProducer(_ClientBacklog(self, link.transport), True)
                link.transport.registerProducer(transport, True)
            else:
                transport.registerProducer(transport, True)
        except (RuntimeError, AttributeError) as exc:  # a producer is registered already
            log.debug("console {label}: no flow control: {error}", label=self.label, error=str(exc))

    def _unreachable(self, failure: Failure) -> None:
        log.warn("console {label}: cannot reach the {protocol} console: {error}", label=self.label,
                 protocol=self.endpoint.protocol, error=failure.getErrorMessage())
        self._fail(ws.GOING_AWAY, "the console cannot be reached")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.ending = True
        self._stop_timer()
        if self.slot:
            self.slot = False
            self.limits.release(self.vm, self.user)
        if self.link is not None:
            link, self.link = self.link, None
            link.close()
        if self.endpoint.pty is not None:  # refused before the relay took it: closed now, not when collected
            self.endpoint.pty.close()
        log.info("console {label}: closed", label=self.label)

    # -- client → console

    def dataReceived(self, data: bytes) -> None:
        if self.ending:
            return
        self.last = self.reactor.seconds()
        if self.parser is None:
            self._to_console(data)
            return
        try:
            messages = self.parser.feed(data)
        except ws.ProtocolError as exc:
            log.info("console {label}: WebSocket refused: {reason}", label=self.label, reason=str(exc))
            self._fail(exc.code, str(exc))
            return
        for message in messages:
            if self.ending:
                return
            if message.opcode in (ws.BINARY, ws.TEXT):
                self._to_console(message.payload)
            elif message.opcode == ws.PING:
                self._pong(message.payload)
            elif message.opcode == ws.CLOSE:
                self._fail(ws.close_code(message.payload), "")
            # PONG: nothing to do

    def _to_console(self, data: bytes) -> None:
        if not data:
            return
        if self.link is None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > MAX_WS_MESSAGE:
                self._fail(ws.TOO_BIG, "too much input before the console is connected")
            return
        self.link.write(data)

    def _pong(self, payload: bytes) -> None:
        """Answer a ping, or, while the client is not reading, keep only the latest one to answer
        later (RFC 6455 §5.5.3): pings never pile pongs up in the daemon."""
        if self.client_full:
            self.pong_due = payload
        elif self.transport is not None:
            self.transport.write(ws.frame(ws.PONG, payload))

    def _client_drained(self) -> None:
        self.client_full = False
        due, self.pong_due = self.pong_due, None
        if due is not None and not self.ending:
            self._pong(due)

    # -- console → client

    def _from_console(self, data: bytes) -> None:
        if self.ending or self.transport is None:
            return
        self.last = self.reactor.seconds()
        self.transport.write(ws.frame(ws.BINARY, data) if self.websocket else data)

    def _console_closed(self, why: str) -> None:
        if not self.ending:
            log.info("console {label}: {why}", label=self.label, why=why)
            self._fail(ws.NORMAL, why)

    # -- ending

    def _fail(self, code: int, reason: str) -> None:
        """End the session: a close frame first for a WebSocket client."""
        if self.ending:
            return
        self.ending = True
        if self.websocket and self.transport is not None:
            self.transport.write(ws.close_frame(code, reason))
        if self.link is not None:
            link, self.link = self.link, None
            link.close()
        if self.transport is not None:
            self.transport.loseConnection()

    def _idle(self) -> None:
        self._timer = None
        if self.ending:
            return
        quiet = self.reactor.seconds() - self.last
        if quiet >= self.limits.idle_timeout:
            log.info("console {label}: closed after {seconds:.0f} s without a byte", label=self.label, seconds=quiet)
            self._fail(ws.GOING_AWAY, "idle timeout")
            return
        self._timer = self.reactor.callLater(self.limits.idle_timeout - quiet, self._idle)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
