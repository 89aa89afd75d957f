"""The sd_notify protocol (readiness, status, stopping, watchdog) and socket activation glue.

No dependency on libsystemd or a running systemd: a notification is one datagram of
newline-separated ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace).  :func:`take_environment` reads ``NOTIFY_SOCKET`` and ``WATCHDOG_*`` once and
removes them from ``os.environ``, so no child the daemon spawns (libxl helpers, qemu-img,
plugins) talks to systemd in its name.

The watchdog (:class:`Notifier.start_watchdog`) is a LoopingCall in the reactor: it pings every
``WATCHDOG_USEC / 2`` only while the reactor turns and the daemon reports itself healthy, so a
blocked reactor stops the pings and systemd restarts the service.

Test hook: when ``XAPID_DEBUG_BLOCK_SECONDS`` is set in the daemon's environment, SIGUSR2 makes
the reactor thread sleep that many seconds (a reactor blocked on purpose; tests/test_systemd.py).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # the abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not used on dom0


class Notifier:
    """Sends sd_notify messages; does nothing when the daemon was not started by systemd."""

    def __init__(self, socket_path: str | None = None, watchdog_usec: int | None = None):
        self.address = _address(socket_path) if socket_path else None
        self.watchdog_usec = watchdog_usec
        self.healthy: Callable[[], bool] = lambda: True
        self._watchdog: Any = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: Any) -> bool:
        """Send ``KEY=VALUE`` lines (``notify(READY=1, STATUS="…")``); False when not sent."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode())
        except OSError as exc:
            log.warn("cannot notify the service manager ({address}): {reason}", address=self.address,
                     reason=exc.strerror or str(exc))
            return False
        return True

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two pings (half the timeout), or None without a watchdog."""
        if self.address is None or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def start_watchdog(self, reactor: Any) -> None:
        """Ping from the reactor every ``WATCHDOG_USEC/2`` while ``healthy()``."""
        interval = self.watchdog_interval
        if interval is None or self._watchdog is not None:
            return
        from twisted.internet.task import LoopingCall

        self._watchdog = LoopingCall(self._ping)
        self._watchdog.clock = reactor
        self._watchdog.start(interval, now=True)

    def _ping(self) -> None:
        try:
            ok = self.healthy()
        except Exception:  # noqa: BLE001 - an unhealthy probe is no ping
            log.failure("health check failed")
            ok = False
        if ok:
            self.notify(WATCHDOG=1)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None


def take_environment(environ: Any = None) -> Notifier:
    """The notifier for this process, built from (and removing) NOTIFY_SOCKET and WATCHDOG_*."""
    environ = os.environ if environ is None else environ
    socket_path = environ.get("NOTIFY_SOCKET") or None
    usec: int | None = None
    pid = environ.get("WATCHDOG_PID")
    if environ.get("WATCHDOG_USEC") and (not pid or pid == str(os.getpid())):
        try:
            usec = int(environ["WATCHDOG_USEC"]) or None
        except ValueError:
            usec = None
    for name in _NOTIFY_VARS:
        environ.pop(name, None)
    return Notifier(socket_path, usec)


def prepare_listen_fds(environ: Any = None) -> int:
    """Make fds passed by systemd visible to Twisted's ``systemd:`` endpoints; returns their count.

    Twisted reads ``LISTEN_FDS`` when ``twisted.internet.endpoints`` is first imported and sees no fd
    at all unless ``LISTEN_FDNAMES`` is set too (``systemd-socket-activate`` without ``--fdname``,
    units without ``FileDescriptorName=``): name them ``unknown`` then, so ``index=N`` works.  Call this
    before that import.  Fds meant for another process (``LISTEN_PID`` not ours) are ignored.
    """
    environ = os.environ if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return 0
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return 0
    if count > 0 and not environ.get("LISTEN_FDNAMES"):
        environ["LISTEN_FDNAMES"] = ":".join(["unknown"] * count)
    return count


def forget_listen_fds(environ: Any = None) -> None:
    """Remove what is left of the socket activation variables (after the endpoints read them)."""
    environ = os.environ if environ is None else environ
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)


def install_block_hook(reactor: Any, environ: Any = None) -> bool:
    """Test-only: with XAPID_DEBUG_BLOCK_SECONDS set, SIGUSR2 blocks the reactor that long."""
    environ = os.environ if environ is None else environ
    value = environ.pop("XAPID_DEBUG_BLOCK_SECONDS", "")
    if not value:
        return False
    import signal
    import time

    seconds = float(value)

    def block() -> None:
        log.warn("blocking the reactor for {seconds} s (XAPID_DEBUG_BLOCK_SECONDS)", seconds=seconds)
        time.sleep(seconds)

    signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(block))
    return True
