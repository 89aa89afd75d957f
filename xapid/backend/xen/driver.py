"""The ``xen`` driver: :class:`IBackend` on libxenctrl, libxenstore and libxenlight.

How it acts, as a toolstack does:

* domains are listed with one ``xc_domain_getinfolist``; a domain's handle is its VM uuid;
* a build turns the :class:`DomainSpec` into libxl's JSON domain config
  (:mod:`xapid.backend.xen.domconfig`), has libxl build it paused (libxl applies the
  ``sched_params`` for whichever scheduler runs: credit, credit2, rtds, null) and unpauses it
  unless asked to keep it paused; when memory is short dom0 is ballooned down first, as xl's
  autoballoon does (``[xen] autoballoon``);
* clean shutdown, reboot and suspend are requests written to the guest's
  ``control/shutdown`` (suspend through libxl, which does the same and saves the image);
  the driver then waits for the hypervisor to report the domain shut down, woken by the
  ``@releaseDomain`` watch, and gives up with :class:`ShutdownTimeout`;
* the memory target is set by ``libxl_set_memory_target`` (``memory/target``, video RAM, PoD
  target, ``/vm/<uuid>/memory``), vCPU hot-plug writes the ``cpu/N/availability`` nodes;
* libxl runs children (hotplug scripts, bootloader, save helper, device model): the libxl
  context is put in ``libxl_sigchld_owner_mainloop`` mode, and the reactor tells libxl about
  every SIGCHLD (:class:`LibxlReaper`), with a 1 s poll as a safety net;
* libxl's and libxc's diagnostics go to a log file (rotated by size); the error lines of a
  failed call become the ``diagnostics`` of the :class:`BackendError` (the Xen-API error's
  parameters);
* xenstored and privcmd are probed every second; a lost connection is reopened with backoff
  (watch re-armed, domains compared again); down longer than ``xenstored_timeout`` is fatal
  (``on_fatal`` with one line: the daemon exits non-zero for systemd to restart it);
* domains that shut down, crash or vanish on their own are reported to the listener given
  to :meth:`XenBackend.watch_domains`, from the ``@releaseDomain`` watch read in the reactor.

What the driver keeps itself (``<state_dir>/domains/<uuid>.json``, rewritten atomically):
each running domain's spec (to rebuild it on reboot), build time and the CPU time it had
before a suspend.  :meth:`XenBackend.open` refuses with :class:`HypervisorUnavailable` (one
line) when there is no hypervisor, the libraries are missing or not Xen 4.17, or a
connection cannot be made.  Every other method may block: the API layer runs them in a
thread pool.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pathlib
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from xapid.backend.interface import (
    GUEST_KEYS_MAX,
    GUEST_SUBTREES,
    BackendError,
    BadDomainState,
    ConsoleEndpoint,
    Counters,
    DiskCounters,
    DiskSpec,
    DomainInfo,
    DomainSpec,
    DomainState,
    GuestData,
    HostInfo,
    HypervisorUnavailable,
    IBackend,
    InvalidSpec,
    NicCounters,
    NicSpec,
    NoConsole,
    NoSuchDomain,
    NotEnoughMemory,
    PhysicalCPU,
    PhysicalNic,
    PifCounters,
    ShutdownTimeout,
    guest_text,
)
from xapid.backend.specs import (
    MIN_DOMAIN_MEMORY,
    BootPolicy,
    check_boot,
    check_limits,
    spec_from_json,
    spec_to_json,
    validate_disk,
    validate_nic,
    validate_spec,
)
from xapid.backend.xen import domconfig
from xapid.backend.xen.libs import (
    PRIVCMD_PATHS,
    XenError,
    XenUnavailable,
    check_hypervisor,
)
from xapid.backend.xen.toollog import FileLogger, QuietLogger
from xapid.backend.xen.watches import WatchReader
from xapid.backend.xen.xenctrl import (
    XcDomainInfo,
    XEN_DOMINF_dying,
    XEN_DOMINF_hvm_guest,
    XEN_DOMINF_paused,
    XEN_DOMINF_shutdown,
    XenCtrl,
    load_xenctrl,
)
from xapid.backend.xen.xenlight import XenLight, XenLightError, load_xenlight
from xapid.backend.xen.xenstore import CONNECTION_LOST, XenStore
from xapid.constants import DOM0_UUID, PAGE, KiB, MiB
from xapid.files import write_atomically

log = Logger()

RELEASE = "@releaseDomain"
STATE_VERSION = 1
VCPU_SETTLE = 2.0  # seconds a guest gets to act on vCPU hot-plug before the call returns
POLL = 0.5  # seconds between domain-table checks while waiting (the watch usually wakes us first)
HEALTH_INTERVAL = 1.0  # seconds between probes of xenstored and privcmd (and libxl child reaping)
BACKOFF_MAX = 10.0  # longest wait between reconnection attempts
AUTOBALLOON_ATTEMPTS = 3  # as xl's freemem()
AUTOBALLOON_WAIT = 10  # seconds dom0 may stall on its way to a lower target (libxl_wait_for_memory_target)
DOM0_ADVICE_FREE = 256 * MiB  # below this much free memory with autoballoon off, start-up logs advice
REAPER_KEY = "xapid-libxl-children"  # our entry in Twisted's reap registry (never a pid)
PRIVCMD_LOST = frozenset({errno.EBADF, errno.ENODEV, errno.ENXIO, errno.EIO})


class LibxlReaper:
    """SIGCHLD → ``libxl_childproc_sigchld_occurred``, in the reactor thread.

    Twisted owns SIGCHLD: its reactor installs a no-op handler with ``set_wakeup_fd`` and, when
    woken, calls ``reapProcess()`` on every entry of ``twisted.internet.process.reapProcessHandlers``
    (``_SIGCHLDWaker.doRead`` → ``reapAllProcesses``); each Twisted process reaps only its own
    pid.  This object sits in that registry under a key that is no pid, so every SIGCHLD the
    reactor sees also reaches libxl, which reaps only its own children (main-loop mode): both
    sides reap selectively and Twisted's children are still reaped by Twisted.  The registry is
    Twisted's (not public API); the driver's 1 s health tick calls :meth:`reapProcess` too, so a
    reactor without signal handlers, or a change in Twisted, costs latency, not a hang.
    """

    def __init__(self, reap: Callable[[], None]) -> None:
        self._reap = reap

    def reapProcess(self) -> None:  # noqa: N802 - Twisted's name
        try:
            self._reap()
        except Exception:  # noqa: BLE001 - never break Twisted's own reaping loop
            log.failure("libxl child reaping failed")

    def install(self) -> None:
        _reap_handlers()[REAPER_KEY] = self

    def uninstall(self) -> None:
        handlers = _reap_handlers()
        if handlers.get(REAPER_KEY) is self:
            del handlers[REAPER_KEY]


def _reap_handlers() -> dict[object, object]:
    """Twisted's reap registry, typed ``dict[int, _BaseProcess]``: our entry's key is no pid and
    its value only has the ``reapProcess()`` that ``reapAllProcesses`` calls."""
    from twisted.internet import process

    return cast("dict[object, object]", process.reapProcessHandlers)


_PTS = re.compile(r"/dev/pts/[0-9]{1,9}")


def _is_pty_slave(path: str) -> bool:
    """Whether *path* is a Unix98 pty slave (character device, major 136-143)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and 136 <= os.major(st.st_rdev) <= 143


def _state_of(info: XcDomainInfo) -> DomainState:
    if info.flags & XEN_DOMINF_dying:
        return "dying"
    if info.flags & XEN_DOMINF_shutdown:
        return "crashed" if info.shutdown_reason == "crash" else "shutdown"
    if info.flags & XEN_DOMINF_paused:
        return "paused"
    return "running"


def _overhead(spec: DomainSpec) -> int:
    """Memory a domain costs beyond its RAM: 1 MiB per possible vCPU, page tables (1/256)."""
    return spec.vcpus_max * MiB + -(-spec.memory_static_max // 256)


def disk_devid(vdev: str) -> int:
    """Linux's device number of a guest disk name, as blkback names its statistics directory."""
    letters = vdev[3:] if vdev.startswith("xvd") else vdev[2:]
    index = 0
    for char in letters:
        if not "a" <= char <= "z":
            return -1
        index = index * 26 + ord(char) - ord("a") + 1
    index -= 1
    if index < 0:
        return -1
    if vdev.startswith("xvd"):
        return (202 << 8) | (index << 4) if index < 16 else (1 << 28) | (index << 8)
    if vdev.startswith("hd") and index < 4:
        return ((3 if index < 2 else 22) << 8) | ((index & 1) << 6)
    if vdev.startswith("sd") and index < 16:
        return (8 << 8) | (index << 4)
    return -1


def _read_int(path: pathlib.Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@implementer(IBackend)
class XenBackend:
    """Drives the local Xen hypervisor.

    *xenctrl_lib*, *xenlight_lib*, *privcmd*, *sysfs* and *procfs* are seams for tests (fake
    libraries, a fake ``/sys`` tree).
    """

    name = "xen"

    def __init__(
        self,
        state_dir: pathlib.Path,
        clock: Callable[[], float],
        *,
        privcmd: Sequence[str] = PRIVCMD_PATHS,
        xenctrl_lib: Callable[[], ctypes.CDLL] = load_xenctrl,
        xenlight_lib: Callable[[], Any] = load_xenlight,
        sysfs: pathlib.Path = pathlib.Path("/sys"),
        procfs: pathlib.Path = pathlib.Path("/proc"),
        log_path: pathlib.Path | None = None,
        log_max_bytes: int = 10 << 20,
        autoballoon: str = "auto",
        xenstored_timeout: float = 60.0,
    ) -> None:
        self._state_dir = state_dir
        self._clock = clock
        self.boot_policy = BootPolicy.default()  # the daemon sets the configured one ([security])
        self._privcmd = privcmd
        self._xenctrl_lib = xenctrl_lib
        self._xenlight_lib = xenlight_lib
        self._sysfs = sysfs
        self._procfs = procfs
        self._logger: FileLogger | QuietLogger | None = None
        self._log_path = log_path or state_dir / "libxl.log"
        self._log_max = log_max_bytes
        self.autoballoon = autoballoon  # "auto" (on unless Xen's command line sets dom0_mem), "on", "off"
        self._ballooning = False
        self.xenstored_timeout = xenstored_timeout
        #: called in the reactor thread with one line when xenstored or privcmd stays lost
        #: longer than *xenstored_timeout* (the daemon stops non-zero); default: exit status 1
        self.on_fatal: Callable[[str], Any] | None = None
        self._tls = threading.local()  # the libxl log position before this thread's last libxl call
        self._retired: list[Any] = []  # handles replaced after a reconnection: closed by close()
        self._reaper = LibxlReaper(self._reap)
        self._health: LoopingCall | None = None
        self._probing = False
        self._lost: dict[str, float] = {}  # "xenstored"/"privcmd" -> monotonic time it was lost
        self._next_attempt = 0.0
        self._backoff = HEALTH_INTERVAL
        self._primed = False
        self._xc: XenCtrl | None = None
        self._xs: XenStore | None = None
        self._xl: XenLight | None = None
        self._watch_xs: XenStore | None = None
        self._reader: WatchReader | None = None
        self._listener: Callable[[str], Any] | None = None
        self._reactor: Any = None
        self._known: dict[str, tuple[int, DomainState]] = {}  # uuid -> (domid, state) as last reported
        self._busy: set[str] = set()  # handles with an operation in flight: not reported
        self._records: dict[str, dict[str, Any]] = {}  # build records by handle (cache of the files)
        self._lock = threading.RLock()
        self.xen_version = ""

    # -- connection --------------------------------------------------------------------

    def open(self) -> None:
        """Check for a hypervisor, load the libraries, open libxenctrl, xenstore and libxl, check the version."""
        try:
            check_hypervisor(self._privcmd)
            lib = self._xenctrl_lib()
            self._logger = QuietLogger()
            self._xc = XenCtrl(lib, self._logger.pointer)
            self.xen_version = self._xc.check_abi()
            self._xs = XenStore()
            (self._state_dir / "domains").mkdir(parents=True, exist_ok=True, mode=0o700)
            quiet, self._logger = self._logger, FileLogger(str(self._log_path), self._log_max)
            self._xc.close()  # reopened on the file logger: libxc's errors go to the log too
            quiet.close()
            self._xc = XenCtrl(lib, self._logger.pointer)
            self._xl = XenLight(self._xenlight_lib(), self._logger.pointer)
            self._reaper.install()  # from here on every SIGCHLD the reactor sees reaches libxl
            self._memory_policy()
        except XenUnavailable as exc:
            self.close()
            raise HypervisorUnavailable(str(exc)) from None
        except (XenError, XenLightError) as exc:
            self.close()
            raise HypervisorUnavailable(f"cannot connect to Xen: {exc.strerror or exc}") from None
        except OSError as exc:
            self.close()
            raise HypervisorUnavailable(f"cannot use {self._state_dir}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Stop watching, close libxl, xenstore, libxenctrl and the logger; idempotent."""
        if self._health is not None and self._health.running:
            self._health.stop()
        self._health = None
        self._reaper.uninstall()
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        for handle in (self._watch_xs, self._xl, self._xs, self._xc, *self._retired, self._logger):
            if handle is not None:
                handle.close()
        self._watch_xs = self._xl = self._xs = self._xc = self._logger = None
        self._retired = []

    def _ctrl(self) -> XenCtrl:
        if self._xc is None:
            raise HypervisorUnavailable("the xen driver is not open")
        return self._xc

    def _store(self) -> XenStore:
        if self._xs is None:
            raise HypervisorUnavailable("the xen driver is not open")
        return self._xs

    def _light(self) -> XenLight:
        """The libxl context, for one call: the log position is noted for :meth:`_fail`."""
        if self._xl is None:
            raise HypervisorUnavailable("the xen driver is not open")
        if isinstance(self._logger, FileLogger):
            self._tls.mark = self._logger.mark()
        return self._xl

    def _reap(self) -> None:
        """Let libxl reap its exited children (every libxl context still open)."""
        for xl in (self._xl, *self._retired):
            if isinstance(xl, XenLight):
                xl.sigchld_occurred()

    # -- dom0 memory ------------------------------------------------------------------

    def _autoballoon_on(self) -> bool:
        """xl's rule for ``auto``: balloon dom0 unless Xen's command line fixes its size (dom0_mem=)."""
        if self.autoballoon != "auto":
            return self.autoballoon == "on"
        try:
            return "dom0_mem=" not in self._ctrl().commandline()
        except XenError:
            return True

    def _memory_policy(self) -> None:
        """At open: decide on autoballooning; say what to do when dom0 holds (nearly) all memory."""
        self._ballooning = self._autoballoon_on()
        phys = self._ctrl().physinfo()
        free = phys.free_pages * PAGE
        log.info("dom0 memory: {free} MiB of {total} MiB free, autoballoon {mode} ({state})",
                 free=free // MiB, total=phys.total_pages * PAGE // MiB, mode=self.autoballoon,
                 state="on" if self._ballooning else "off")
        if not self._ballooning and free < DOM0_ADVICE_FREE:
            log.warn("dom0 holds all but {free} MiB of the host's memory and autoballoon is off: no VM can "
                     "start; give dom0 a fixed size on the Xen command line (e.g. dom0_mem=2048M,max:2048M) "
                     "or set [xen] autoballoon = on", free=free // MiB)

    def _make_room(self, needed: int) -> int:
        """Balloon dom0 down until *needed* bytes are free (xl's freemem); the bytes free at the end."""
        available = self.free_memory()
        if not self._ballooning:
            return available
        for _ in range(AUTOBALLOON_ATTEMPTS):
            if available >= needed:
                break
            xl = self._light()
            try:
                xl.set_memory_target(0, -((needed - available + KiB - 1) // KiB), relative=True, enforce=False)
                xl.wait_for_memory_target(0, AUTOBALLOON_WAIT)
            except XenLightError as exc:
                log.warn("autoballoon: dom0 could not free {needed} bytes: {error}", needed=needed - available,
                         error=str(exc))
                break
            available = self.free_memory()
        return available

    # -- domain death ------------------------------------------------------------------

    def watch_domains(self, reactor: Any, listener: Callable[[str], Any]) -> None:
        """Report domains that shut down, crash or vanish on their own to *listener(uuid)*.

        The ``@releaseDomain`` watch is read in *reactor*; the domain table is then compared
        in a reactor pool thread (hypercalls), and the listener called back in the reactor
        thread.  Operations of this driver in flight are not reported (their caller sees the
        outcome).
        """
        self._listener = listener
        self._reactor = reactor
        try:
            self._watch_xs = XenStore()
            self._watch_xs.watch(RELEASE, "xapid")
        except XenError as exc:
            raise BackendError(f"cannot watch {RELEASE}: {exc.strerror}") from None
        self._reader = WatchReader(self._watch_xs, self._on_release)
        self._reader.start(reactor)
        # the first table is read in a pool thread (hypercalls stay off the reactor): it is the
        # baseline, merged under what operations recorded since (see _compare)
        if hasattr(reactor, "callInThread"):  # a test clock has no threads: the first event primes
            reactor.callInThread(self._compare)
        self._health = LoopingCall(self._tick)
        self._health.clock = reactor
        self._health.start(HEALTH_INTERVAL, now=False)

    def _on_release(self, path: str, token: str) -> None:
        if path == RELEASE and self._listener is not None:
            self._reactor.callInThread(self._compare)

    def _compare(self) -> None:
        """In a pool thread: the domains that stopped or vanished since the last look, reported."""
        with self._lock:
            try:  # one getinfolist: cheap enough for every health tick
                now = {raw.uuid: (raw.domain, _state_of(raw)) for raw in self._raw_domains()}
            except (BackendError, XenError) as exc:
                log.warn("cannot list domains after {watch}: {error}", watch=RELEASE, error=str(exc))
                return
            if not self._primed:  # the baseline: what this driver's own operations recorded wins
                for uuid, seen in now.items():
                    self._known.setdefault(uuid, seen)
                self._primed = True
            changed = [u for u, (domid, state) in now.items()
                       if state in ("shutdown", "crashed") and self._known.get(u) != (domid, state)]
            changed += [u for u in self._known if u not in now]
            self._known = now
            changed = [u for u in changed if u not in self._busy]
        for uuid in changed:
            log.info("domain {uuid} changed on its own: {state}", uuid=uuid, state=now.get(uuid, (0, "gone"))[1])
            self._reactor.callFromThread(self._listener, uuid)

    @contextmanager
    def _operating(self, uuid: str, keeps: bool = True) -> Iterator[None]:
        """Mark *uuid* busy (its changes are the caller's news, not the listener's) during an
        operation.  After a successful operation that leaves the domain in place (*keeps*), its
        state is looked at once more: a domain that vanished, shut down or crashed meanwhile is
        reported to the listener (the @releaseDomain of that moment was skipped as busy)."""
        with self._lock:
            self._busy.add(uuid)
        ok = False
        try:
            yield
            ok = True
        finally:
            raw = None
            if ok and keeps:
                try:
                    raw = next((r for r in self._raw_domains() if r.uuid == uuid), None)
                except (BackendError, XenError):
                    raw = None
            with self._lock:
                self._busy.discard(uuid)
                if raw is not None:
                    self._known[uuid] = (raw.domain, _state_of(raw))
                else:
                    self._known.pop(uuid, None)  # what the operation did is not news
            if ok and keeps and (raw is None or _state_of(raw) in ("shutdown", "crashed")):
                state = "gone" if raw is None else _state_of(raw)
                log.info("domain {uuid} changed right after an operation: {state}", uuid=uuid, state=state)
                if self._listener is not None and self._reactor is not None:
                    self._reactor.callFromThread(self._listener, uuid)

    # -- connection health --------------------------------------------------------------

    def _tick(self) -> None:
        """Every HEALTH_INTERVAL in the reactor: reap libxl's children, probe in a pool thread."""
        self._reaper.reapProcess()
        if not self._probing and hasattr(self._reactor, "callInThread"):
            self._probing = True
            self._reactor.callInThread(self._probe)

    def _probe(self) -> None:
        """In a pool thread: check xenstored and privcmd, reconnect what is lost, give up in time."""
        try:
            self._check_links()
            if self._lost and time.monotonic() >= self._next_attempt:
                self._reconnect()
            if "privcmd" not in self._lost and self._listener is not None and self._primed:
                # domains that stopped without a @releaseDomain reaching us (a restarted xenstored
                # forgot the registrations of domains built before it) are still noticed
                self._compare()
            for what, since in list(self._lost.items()):
                if time.monotonic() - since > self.xenstored_timeout:
                    line = (f"{what} unreachable for more than {self.xenstored_timeout:g} s "
                            f"([xen] xenstored_timeout): exiting so that the service manager restarts xapid")
                    self._reactor.callFromThread(self._fatal, line)
                    break
        except Exception:  # noqa: BLE001 - the probe must keep running
            log.failure("xen driver health probe failed")
        finally:
            self._probing = False

    def _check_links(self) -> None:
        if "xenstored" not in self._lost:
            try:
                watch = self._watch_xs
                if watch is not None:
                    while (event := watch.check_watch()) is not None:  # a dead connection: EINVAL
                        self._reactor.callFromThread(self._on_release, *event)
                self._store().read("/local/domain/0/domid")
            except XenError as exc:
                if exc.errno in CONNECTION_LOST:
                    self._mark_lost("xenstored", exc)
        if "privcmd" not in self._lost:
            try:
                self._ctrl().version()
            except XenError as exc:
                if exc.errno in PRIVCMD_LOST:
                    self._mark_lost("privcmd", exc)

    def _mark_lost(self, what: str, exc: Exception) -> None:
        if what not in self._lost:
            log.warn("lost the connection to {what} ({error}); reconnecting for up to {timeout} s",
                     what=what, error=str(exc), timeout=self.xenstored_timeout)
            self._lost[what] = time.monotonic()
            self._next_attempt = 0.0
            self._backoff = HEALTH_INTERVAL

    def _reconnect(self) -> None:
        """Open new handles for what was lost (libxl's context holds both kinds); old ones retire."""
        logger = self._logger
        if logger is None:  # closed while the probe ran: nothing to reconnect
            return
        try:
            xc = XenCtrl(self._xenctrl_lib(), logger.pointer) if "privcmd" in self._lost else None
            if xc is not None:
                xc.version()
            xs = watch = None
            if "xenstored" in self._lost:
                xs, watch = XenStore(), XenStore()
                watch.watch(RELEASE, "xapid")
            xl = XenLight(self._xenlight_lib(), logger.pointer)
        except (XenError, XenLightError, XenUnavailable) as exc:
            self._next_attempt = time.monotonic() + self._backoff
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)
            log.info("reconnection failed: {error}; next attempt in {delay:g} s", error=str(exc),
                     delay=self._backoff)
            return
        with self._lock:
            if xc is not None:
                self._retired.append(self._xc)
                self._xc = xc
            if xs is not None:
                self._retired += [self._xs, self._watch_xs]
                self._xs, self._watch_xs = xs, watch
            self._retired.append(self._xl)
            self._xl = xl
            lost, self._lost = sorted(self._lost), {}
        log.info("reconnected to {what}; comparing the domain table again", what=" and ".join(lost))
        if watch is not None:
            self._reactor.callFromThread(self._rearm, watch)
        self._compare()

    def _rearm(self, watch: XenStore) -> None:
        """In the reactor: read the new watch connection instead of the dead one."""
        if self._reader is not None:
            self._reader.stop()
        self._reader = WatchReader(watch, self._on_release)
        self._reader.start(self._reactor)

    def _fatal(self, line: str) -> None:
        log.critical("{line}", line=line)
        if self.on_fatal is not None:
            self.on_fatal(line)
            return
        import sys

        sys.stderr.write(f"xapid: {line}\n")
        sys.stderr.flush()
        os._exit(1)

    # -- bookkeeping -------------------------------------------------------------------

    def _record_path(self, uuid: str) -> pathlib.Path:
        return self._state_dir / "domains" / f"{uuid}.json"

    def _record(self, uuid: str) -> dict[str, Any]:
        """The build record of domain *uuid* ({} for a domain xapid did not build), cached."""
        cached = self._records.get(uuid)
        if cached is not None:
            return cached
        try:
            data = json.loads(self._record_path(uuid).read_text())
        except (OSError, ValueError):
            data = {}
        if not (isinstance(data, dict) and data.get("version") == STATE_VERSION):
            data = {}
        self._records[uuid] = data
        return data

    def _save_record(self, spec: DomainSpec, start_time: float, cpu_offset: int,
                     memory_target: int | None = None) -> None:
        data = {"version": STATE_VERSION, "spec": spec_to_json(spec), "start_time": start_time,
                "cpu_offset": cpu_offset,
                "memory_target": spec.memory_target if memory_target is None else memory_target}
        write_atomically(self._record_path(spec.uuid), json.dumps(data), mode=None)
        self._records[spec.uuid] = data

    def _forget(self, uuid: str) -> None:
        self._record_path(uuid).unlink(missing_ok=True)
        self._records.pop(uuid, None)

    # -- host --------------------------------------------------------------------------

    def free_memory(self) -> int:
        """Free host memory in bytes (``xc_physinfo``)."""
        return self._ctrl().physinfo().free_pages * PAGE

    def physical_cpus(self) -> list[PhysicalCPU]:
        """Every physical CPU with its cumulative idle time (``xc_getcpuinfo``)."""
        return self._pcpus(self._ctrl().physinfo())

    def _pcpus(self, phys: Any) -> list[PhysicalCPU]:
        """``xc_getcpuinfo`` over CPU ids 0..max_cpu_id: entry *i* is CPU *i* as the hypervisor
        numbers it (ids may have holes: ``nr_cpus`` counts CPUs, it is no bound on their ids)."""
        ids = max(phys.nr_cpus, phys.max_cpu_id + 1)
        return [PhysicalCPU(n, idle) for n, idle in enumerate(self._ctrl().cpu_idle_times(ids))]

    def host_info(self) -> HostInfo:
        """Host facts from ``xc_physinfo``/``xc_version``, ``/proc/cpuinfo`` and the DMI tables."""
        xc = self._ctrl()
        phys = xc.physinfo()
        cpu = self._cpuinfo()
        sockets = max(1, phys.nr_cpus // max(1, phys.cores_per_socket * phys.threads_per_core))
        dmi = self._sysfs / "class" / "dmi" / "id"
        bios = {key: value for key, name in (("bios-vendor", "bios_vendor"), ("bios-version", "bios_version"),
                                             ("system-manufacturer", "sys_vendor"),
                                             ("system-product-name", "product_name"),
                                             ("system-serial-number", "product_serial"))
                if (value := self._text(dmi / name))}
        return HostInfo(
            hostname=socket.gethostname(),
            address=self._address(),
            total_memory=phys.total_pages * PAGE,
            xen_version=self.xen_version,
            capabilities=tuple(xc.capabilities().split()),
            sched_policy=xc.sched_id(),
            cpu_count=phys.nr_cpus,
            socket_count=sockets,
            cores_per_socket=phys.cores_per_socket,
            threads_per_core=phys.threads_per_core,
            cpu_vendor=cpu.get("vendor_id", ""),
            cpu_model_name=cpu.get("model name", ""),
            cpu_speed_mhz=phys.cpu_khz // 1000,
            cpu_family=int(cpu.get("cpu family", "0") or 0),
            cpu_model=int(cpu.get("model", "0") or 0),
            cpu_stepping=int(cpu.get("stepping", "0") or 0),
            cpu_flags=cpu.get("flags", ""),
            cpu_features=" ".join(f"{word:08x}" for word in phys.hw_cap),
            bios_strings=bios,
        )

    def _cpuinfo(self) -> dict[str, str]:
        """The first processor's entries of ``/proc/cpuinfo``."""
        facts: dict[str, str] = {}
        for line in self._text(self._procfs / "cpuinfo").splitlines():
            if not line.strip():
                if facts:
                    break
                continue
            key, _, value = line.partition(":")
            facts.setdefault(key.strip(), value.strip())
        return facts

    @staticmethod
    def _text(path: pathlib.Path) -> str:
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    @staticmethod
    def _address() -> str:
        """The address of the interface holding the default route (no packet is sent)."""
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("192.0.2.1", 9))
                return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"

    def physical_nics(self) -> list[PhysicalNic]:
        """Interfaces under ``/sys/class/net`` backed by a device (not bridges, vifs or loopback)."""
        nics = []
        base = self._sysfs / "class" / "net"
        for entry in sorted(base.iterdir()) if base.is_dir() else []:
            if not (entry / "device").exists():
                continue
            speed = _read_int(entry / "speed")
            nics.append(PhysicalNic(
                device=entry.name, mac=self._text(entry / "address"), mtu=_read_int(entry / "mtu"),
                carrier=_read_int(entry / "carrier") == 1, speed=max(0, speed),
                duplex=self._text(entry / "duplex") == "full",
                pci_bus_path=os.path.basename(os.path.realpath(entry / "device")),
            ))
        return nics

    # -- domains -----------------------------------------------------------------------

    def _info(self, raw: XcDomainInfo) -> DomainInfo:
        xc = self._ctrl()
        domid = raw.domain
        uuid = raw.uuid
        record = self._record(uuid) if domid else {}
        spec = record.get("spec", {})
        online = raw.nr_online_vcpus
        vcpu_times, vcpu_cpus = [], []
        for vcpu in range(raw.max_vcpu_id + 1):
            try:
                info = xc.vcpu_getinfo(domid, vcpu)
            except XenError:
                continue
            if info.online:
                vcpu_times.append(info.cpu_time)
                vcpu_cpus.append(info.cpu)
        target = record.get("memory_target") or raw.tot_pages * PAGE
        name = spec.get("name", "")
        xs = self._store()
        if not record:  # a domain xapid did not build (or dom0): ask xenstore
            try:
                target = int(xs.read(f"/local/domain/{domid}/memory/target")) * KiB
            except (XenError, ValueError):
                pass
        if not name:
            try:
                name = xs.read(f"/local/domain/{domid}/name").decode(errors="replace")
            except XenError:
                name = "Domain-0" if domid == 0 else ""
        kind = spec.get("domain_type") or ("hvm" if raw.flags & XEN_DOMINF_hvm_guest else "pv")
        return DomainInfo(
            domid=domid, uuid=uuid, name=name, state=_state_of(raw),
            shutdown_reason=raw.shutdown_reason if raw.flags & XEN_DOMINF_shutdown else "",  # type: ignore[arg-type]  # a code newer than Xen 4.17's comes as its number
            memory_actual=raw.tot_pages * PAGE, memory_target=target,
            memory_max=int(spec.get("memory_static_max") or self._unbuilt_max(raw)),
            vcpus=online, vcpus_max=raw.max_vcpu_id + 1, cpu_time_ns=raw.cpu_time + record.get("cpu_offset", 0),
            vcpu_time_ns=tuple(vcpu_times), vcpu_cpu=tuple(vcpu_cpus),
            start_time=record.get("start_time", 0.0), domain_type=kind, is_control_domain=domid == 0,
        )

    def _unbuilt_max(self, raw: XcDomainInfo) -> int:
        """The static maximum (bytes) of a domain xapid did not build, dom0 above all: xenstore's
        ``memory/static-max`` (KiB), else the hypervisor ceiling — which for a dom0 without
        ``dom0_mem=…,max:`` is "unlimited" (~0 pages), so never above the host's memory."""
        try:
            return int(self._store().read(f"/local/domain/{raw.domain}/memory/static-max")) * KiB
        except (XenError, ValueError, BackendError):
            pass
        try:
            total = self._ctrl().physinfo().total_pages
        except XenError:
            total = raw.max_pages
        return min(raw.max_pages, total) * PAGE

    def _raw_domains(self) -> list[XcDomainInfo]:
        return self._ctrl().domain_getinfolist()

    def _find(self, uuid: str) -> XcDomainInfo:
        for raw in self._raw_domains():
            if raw.uuid == uuid:
                return raw
        raise NoSuchDomain(f"no domain with handle {uuid}", uuid)

    def list_domains(self) -> list[DomainInfo]:
        """Every domain, dom0 included, ordered by domid (one ``xc_domain_getinfolist``)."""
        return [self._info(raw) for raw in self._raw_domains()]

    def domain_info(self, uuid: str) -> DomainInfo:
        """One domain by handle; NoSuchDomain when absent."""
        return self._info(self._find(uuid))

    def _guest(self, uuid: str, action: str) -> XcDomainInfo:
        raw = self._find(uuid)
        if raw.domain == 0:
            raise BadDomainState(f"cannot {action} the control domain", uuid)
        return raw

    @staticmethod
    def _require(raw: XcDomainInfo, wanted: str, action: str) -> None:
        state = _state_of(raw)
        if state != wanted:
            raise BadDomainState(f"cannot {action} a {state} domain", raw.uuid, state)

    def _fail(self, exc: XenLightError | XenError, what: str) -> BackendError:
        """A BackendError for a failed libxl call, with the error lines libxl logged for it."""
        error = BackendError(f"{what}: {exc}", what)
        if isinstance(self._logger, FileLogger):
            error.diagnostics = tuple(self._logger.errors_since(getattr(self._tls, "mark", 0)))
        return error

    @contextmanager
    def _hypercall(self, what: str, uuid: str) -> Iterator[None]:
        """XenError of libxenctrl/libxenstore as the driver's errors: ESRCH → NoSuchDomain, a lost
        connection → HypervisorUnavailable (and a reconnection), anything else → BackendError."""
        try:
            yield
        except XenError as exc:
            if exc.errno == errno.ESRCH:
                raise NoSuchDomain(f"cannot {what}: the domain is gone", uuid) from None
            if exc.errno in CONNECTION_LOST or exc.errno in PRIVCMD_LOST:
                raise HypervisorUnavailable(f"cannot {what}: {exc.strerror}", uuid) from None
            raise BackendError(f"cannot {what}: {exc.strerror}", uuid) from None

    def create_domain(self, spec: DomainSpec, paused: bool) -> DomainInfo:
        """Validate, build through libxl (paused), set the scheduler, unpause unless *paused*."""
        validate_spec(spec, self.boot_policy)
        with self._operating(spec.uuid):
            self._check_buildable(spec)
            self._build(spec, paused, self._clock(), 0)
            return self.domain_info(spec.uuid)

    def _check_buildable(self, spec: DomainSpec) -> None:
        if spec.uuid == DOM0_UUID or any(raw.uuid == spec.uuid for raw in self._raw_domains()):
            raise InvalidSpec(f"a domain with handle {spec.uuid} exists", spec.uuid)
        needed = spec.memory_target + _overhead(spec)
        available = self._make_room(needed)
        if needed > available:
            raise NotEnoughMemory(f"domain needs {needed} bytes, {available} available", str(needed), str(available))

    def _build(self, spec: DomainSpec, paused: bool, start_time: float, cpu_offset: int,
               image: pathlib.Path | None = None) -> int:
        # libxl gets the resolved paths: a symlink swapped after the check cannot redirect it
        config = domconfig.domain_config_json(check_boot(spec, self.boot_policy))
        xl = self._light()
        try:
            if image is None:
                domid = xl.create(config)
            else:
                with open(image, "rb") as stream:
                    domid = xl.restore(config, stream.fileno())
        except XenLightError as exc:
            raise self._fail(exc, "libxl could not build the domain") from None
        except OSError as exc:
            raise BackendError(f"cannot read the image {image}: {exc.strerror}", str(image)) from None
        try:
            self._save_record(spec, start_time, cpu_offset)  # sched_params were applied by libxl
            if not paused:
                xl.unpause(domid)
        except (XenError, XenLightError, OSError) as exc:
            self._destroy(domid, spec.uuid)
            raise BackendError(f"could not start domain {domid}: {exc}", spec.uuid) from None
        return domid

    def _destroy(self, domid: int, uuid: str) -> None:
        try:
            self._light().destroy(domid)
        except XenLightError as exc:
            raise self._fail(exc, f"libxl could not destroy domain {domid}") from None

    def destroy_domain(self, uuid: str) -> None:
        """Tear the domain down at once, in any state."""
        with self._operating(uuid, keeps=False):
            raw = self._guest(uuid, "destroy")
            self._destroy(raw.domain, uuid)
            self._forget(uuid)

    def pause_domain(self, uuid: str) -> None:
        """Pause a running domain."""
        raw = self._guest(uuid, "pause")
        self._require(raw, "running", "pause")
        with self._hypercall(f"pause domain {raw.domain}", uuid):
            self._ctrl().domain_pause(raw.domain)

    def unpause_domain(self, uuid: str) -> None:
        """Unpause a paused domain."""
        raw = self._guest(uuid, "unpause")
        self._require(raw, "paused", "unpause")
        with self._hypercall(f"unpause domain {raw.domain}", uuid):
            self._ctrl().domain_unpause(raw.domain)

    def _spec(self, uuid: str) -> DomainSpec:
        spec = self._record(uuid).get("spec")
        if not spec:
            raise BackendError(f"no build record for domain {uuid}: it was not built by xapid", uuid)
        return spec_from_json(spec)

    def _wait_shutdown(self, uuid: str, domid: int, timeout: float) -> XcDomainInfo | None:
        """Wait until domain *domid* has shut down (returned) or vanished (None); ShutdownTimeout."""
        watcher = XenStore()
        try:
            watcher.watch(RELEASE, "wait")
            deadline = time.monotonic() + timeout
            while True:
                raw = next((r for r in self._raw_domains() if r.domain == domid), None)
                if raw is None or raw.flags & (XEN_DOMINF_shutdown | XEN_DOMINF_dying):
                    return raw
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ShutdownTimeout(f"domain {domid} did not shut down within {timeout:g} s", uuid)
                select.select([watcher.fileno()], [], [], min(left, POLL))
                while watcher.check_watch() is not None:
                    pass
        finally:
            watcher.close()

    def _request(self, raw: XcDomainInfo, request: str) -> None:
        path = f"/local/domain/{raw.domain}/control/shutdown"
        try:
            self._store().write(path, request)
        except XenError as exc:
            raise BackendError(f"cannot ask domain {raw.domain} to {request}: {exc.strerror}", raw.uuid) from None

    def shutdown_domain(self, uuid: str, reason: str, timeout: float) -> None:
        """Write *reason* to ``control/shutdown``, wait for the guest, destroy; rebuild for 'reboot'."""
        if reason not in ("poweroff", "reboot"):
            raise BackendError(f"unknown shutdown reason {reason!r}", reason)
        with self._operating(uuid, keeps=reason == "reboot"):
            raw = self._guest(uuid, "shut down")
            self._require(raw, "running", f"{reason} cleanly")
            spec = self._spec(uuid) if reason == "reboot" else None
            self._request(raw, reason)
            try:
                self._wait_shutdown(uuid, raw.domain, timeout)
            except ShutdownTimeout:
                try:
                    self._store().write(f"/local/domain/{raw.domain}/control/shutdown", "")
                except XenError:
                    pass
                raise
            self._destroy(raw.domain, uuid)
            if spec is None:
                self._forget(uuid)
            else:
                self._build(spec, False, self._clock(), 0)

    def reboot_domain(self, uuid: str) -> DomainInfo:
        """Hard reboot: destroy and rebuild from the same spec, running, CPU time reset."""
        with self._operating(uuid):
            raw = self._guest(uuid, "reboot")
            spec = self._spec(uuid)
            self._destroy(raw.domain, uuid)
            self._build(spec, False, self._clock(), 0)
            return self.domain_info(uuid)

    def suspend_domain(self, uuid: str, path: str, timeout: float) -> None:
        """Save a running domain through libxl to the file *path* (written then renamed), destroy it."""
        with self._operating(uuid, keeps=False):
            raw = self._guest(uuid, "suspend")
            self._require(raw, "running", "suspend")
            record = self._record(uuid)
            partial = f"{path}.partial"
            try:
                with open(partial, "wb") as out:
                    self._light().suspend(raw.domain, out.fileno())
                    out.flush()
                    os.fsync(out.fileno())
                done = self._wait_shutdown(uuid, raw.domain, timeout)
                if done is not None and done.shutdown_reason != "suspend":
                    raise BackendError(f"domain {raw.domain} shut down ({done.shutdown_reason}) while suspending", uuid)
                os.replace(partial, path)
            except XenLightError as exc:
                raise self._fail(exc, f"libxl could not suspend domain {raw.domain}") from None
            except OSError as exc:
                raise BackendError(f"cannot write the image {path}: {exc.strerror}", path) from None
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
            cpu = raw.cpu_time + record.get("cpu_offset", 0)
            self._destroy(raw.domain, uuid)
            if record:
                spec = spec_from_json(record["spec"])
                self._save_record(spec, record.get("start_time", 0.0), cpu)

    def resume_domain(self, spec: DomainSpec, path: str, paused: bool) -> DomainInfo:
        """Rebuild a suspended domain from the image at *path*, keeping its CPU time."""
        validate_spec(spec, self.boot_policy)
        if not os.path.isfile(path):
            raise BackendError(f"no suspend image at {path}", path)
        with self._operating(spec.uuid):
            self._check_buildable(spec)
            record = self._record(spec.uuid)
            self._build(spec, paused, self._clock(), record.get("cpu_offset", 0), image=pathlib.Path(path))
            return self.domain_info(spec.uuid)

    def set_vcpus(self, uuid: str, count: int) -> None:
        """Bring vCPUs 0..count-1 online and the rest offline (``cpu/N/availability``)."""
        raw = self._guest(uuid, "change the vCPUs of")
        maximum = raw.max_vcpu_id + 1
        if not 1 <= count <= maximum:
            raise InvalidSpec(f"{count} vCPUs not in 1..{maximum}", uuid)
        base = f"/local/domain/{raw.domain}/cpu"

        def write(t: int) -> None:
            for vcpu in range(maximum):
                self._store().write(f"{base}/{vcpu}/availability", "online" if vcpu < count else "offline", t)

        with self._hypercall(f"change the vCPUs of domain {raw.domain}", uuid):
            self._store().transact(write)
        deadline = time.monotonic() + VCPU_SETTLE
        while self._find(uuid).nr_online_vcpus != count and time.monotonic() < deadline:
            time.sleep(0.01)

    def set_memory_target(self, uuid: str, target: int) -> None:
        """Set the balloon target, at most the static maximum, through ``libxl_set_memory_target``
        (enforced: the hypervisor ceiling follows, video RAM and the PoD target included)."""
        raw = self._guest(uuid, "set the memory of")
        maximum = self._static_max(raw)
        if not MIN_DOMAIN_MEMORY <= target <= maximum:
            raise InvalidSpec(f"memory target {target} not in {MIN_DOMAIN_MEMORY}..{maximum}", uuid)
        try:
            self._light().set_memory_target(raw.domain, target // KiB, relative=False, enforce=True)
        except XenLightError as exc:
            raise self._fail(exc, f"libxl could not set the memory target of domain {raw.domain}") from None
        try:
            record = self._record(uuid)
            if record:
                self._save_record(spec_from_json(record["spec"]), record.get("start_time", 0.0),
                                  record.get("cpu_offset", 0), target)
        except OSError as exc:
            raise BackendError(f"cannot record the memory target of domain {raw.domain}: {exc.strerror}",
                               uuid) from None

    def _static_max(self, raw: XcDomainInfo) -> int:
        """The domain's static memory maximum (its build spec; the hypervisor ceiling otherwise)."""
        spec = self._record(raw.uuid).get("spec", {})
        return int(spec.get("memory_static_max") or raw.max_pages * PAGE)

    # -- devices -----------------------------------------------------------------------

    def _backends(self, domid: int, kind: str) -> dict[str, str]:
        """The domain's devices of *kind* (``vbd``/``vif``): devid -> backend path."""
        base = f"/local/domain/0/backend/{kind}/{domid}"
        try:
            return {devid: f"{base}/{devid}" for devid in self._store().directory(base)}
        except XenError as exc:
            if exc.errno == errno.ENOENT:
                return {}
            raise

    def _disks(self, domid: int) -> dict[str, str]:
        """The domain's disks: guest device name -> devid."""
        disks = {}
        for devid, path in self._backends(domid, "vbd").items():
            try:
                disks[self._store().read(f"{path}/dev").decode()] = devid
            except XenError:
                continue
        return disks

    def _spec_update(self, uuid: str, change: Callable[[DomainSpec], DomainSpec]) -> None:
        record = self._record(uuid)
        if record:
            spec = change(spec_from_json(record["spec"]))
            self._save_record(spec, record.get("start_time", 0.0), record.get("cpu_offset", 0),
                              record.get("memory_target"))

    def attach_disk(self, uuid: str, disk: DiskSpec) -> None:
        """Hot-plug a disk (libxl device add)."""
        raw = self._guest(uuid, "attach a disk to")
        validate_disk(disk)
        disks = self._disks(raw.domain)
        if disk.device in disks:
            raise InvalidSpec(f"disk {disk.device} already attached", uuid)
        check_limits(self._kind(raw), len(disks) + 1, 0)
        try:
            self._light().disk_add(raw.domain, domconfig.disk_json(disk))
        except XenLightError as exc:
            raise self._fail(exc, f"libxl could not attach {disk.device}") from None
        self._spec_update(uuid, lambda s: replace(s, disks=(*s.disks, disk)))

    def detach_disk(self, uuid: str, device: str) -> None:
        """Hot-unplug a disk."""
        raw = self._guest(uuid, "detach a disk from")
        if device not in self._disks(raw.domain):
            raise InvalidSpec(f"no disk {device}", uuid)
        try:
            self._light().disk_remove(raw.domain, domconfig.disk_json(DiskSpec(device=device, path="", mode="r",
                                                                              kind="cdrom")))
        except XenLightError as exc:
            raise self._fail(exc, f"libxl could not detach {device}") from None
        self._spec_update(uuid, lambda s: replace(s, disks=tuple(d for d in s.disks if d.device != device)))

    def attach_nic(self, uuid: str, nic: NicSpec) -> None:
        """Hot-plug a network card."""
        raw = self._guest(uuid, "attach a network card to")
        validate_nic(nic)
        nics = self._backends(raw.domain, "vif")
        if str(nic.devid) in nics:
            raise InvalidSpec(f"network card {nic.devid} already attached", uuid)
        check_limits(self._kind(raw), 0, len(nics) + 1)
        try:
            self._light().nic_add(raw.domain, domconfig.nic_json(nic))
        except XenLightError as exc:
            raise self._fail(exc, f"libxl could not attach network card {nic.devid}") from None
        self._spec_update(uuid, lambda s: replace(s, nics=(*s.nics, nic)))

    def detach_nic(self, uuid: str, devid: int) -> None:
        """Hot-unplug a network card."""
        raw = self._guest(uuid, "detach a network card from")
        if str(devid) not in self._backends(raw.domain, "vif"):
            raise InvalidSpec(f"no network card {devid}", uuid)
        try:
            self._light().nic_remove(raw.domain, domconfig.nic_json(NicSpec(devid=devid, mac="00:00:00:00:00:00",
                                                                            bridge="")))
        except XenLightError as exc:
            raise self._fail(exc, f"libxl could not detach network card {devid}") from None
        self._spec_update(uuid, lambda s: replace(s, nics=tuple(n for n in s.nics if n.devid != devid)))

    def _device_ids(self, dom: DomainInfo) -> dict[str, str]:
        """Disk name -> devid: from the build record without asking xenstore, else from xenstore."""
        spec = self._record(dom.uuid).get("spec")
        if spec is None:
            return self._disks(dom.domid)
        return {d["device"]: str(disk_devid(d["device"])) for d in spec.get("disks", ())}

    def _nic_ids(self, dom: DomainInfo) -> list[str]:
        spec = self._record(dom.uuid).get("spec")
        if spec is None:
            return list(self._backends(dom.domid, "vif"))
        return [str(n["devid"]) for n in spec.get("nics", ())]

    def _kind(self, raw: XcDomainInfo) -> str:
        spec = self._record(raw.uuid).get("spec", {})
        return spec.get("domain_type") or ("hvm" if raw.flags & XEN_DOMINF_hvm_guest else "pv")

    # -- guest data --------------------------------------------------------------------

    def guest_data(self, uuid: str) -> GuestData:
        """What the guest and the tools publish under ``/local/domain/<domid>``.

        * the agent's keys: the :data:`GUEST_SUBTREES` walked breadth first, every node with a
          value or without children, at most :data:`GUEST_KEYS_MAX` of them (2 × that many nodes
          looked at: a guest owns its subtrees and could fill them);
        * PV drivers: a ``device/vif`` or ``device/vbd`` frontend in XenbusStateConnected (4);
        * the console: ``console/tty`` (xenconsoled's pty; an HVM guest's serial
          ``serial/0/tty`` otherwise), ``console/vnc-port``/``vnc-listen`` (written by libxl
          from qemu's answer when the device model serves VNC).
        """
        raw = self._find(uuid)
        home = f"/local/domain/{raw.domain}"
        xs = self._store()

        def read(rel: str) -> bytes | None:
            try:
                return xs.read(f"{home}/{rel}")
            except XenError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES):
                    return None
                raise

        def children(rel: str) -> list[str]:
            try:
                return xs.directory(f"{home}/{rel}")
            except XenError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES):
                    return []
                raise

        with self._hypercall("read the guest's xenstore data", uuid):
            agent: dict[str, str] = {}
            pending = [f"{tree}/{name}" for tree in GUEST_SUBTREES for name in children(tree)]
            looked = 0
            while looked < len(pending) and len(agent) < GUEST_KEYS_MAX and looked < 2 * GUEST_KEYS_MAX:
                rel = pending[looked]
                looked += 1
                below = children(rel)
                value = read(rel)
                if value is not None and (value or not below):
                    agent[guest_text(rel)] = guest_text(value)
                pending += [f"{rel}/{name}" for name in below]
            connected = any(read(f"device/{kind}/{devid}/state") == b"4"
                            for kind in ("vif", "vbd") for devid in children(f"device/{kind}"))
            tty = read("console/tty") or read("serial/0/tty") or b""
            port = (read("console/vnc-port") or b"").decode(errors="replace").strip()
            listen = read("console/vnc-listen") or b""
        return GuestData(agent=agent, pv_drivers_detected=connected, tty=guest_text(tty),
                         vnc_port=int(port) if port.isdigit() and int(port) < 65536 else -1,
                         vnc_listen=guest_text(listen))

    # -- consoles ----------------------------------------------------------------------

    def console_endpoint(self, uuid: str, protocol: str) -> ConsoleEndpoint:
        """The domain's console as published in xenstore, checked, since a guest may write
        under its own ``console/`` node:

        * ``vt100``: ``console/tty`` (``serial/0/tty`` for an HVM guest without a PV console)
          must be ``/dev/pts/<n>`` and a pty slave character device (majors 136-143);
        * ``rfb``: ``console/vnc-port`` must be a TCP port on which this domain's own device
          model (the process with ``-xen-domid <domid>``) listens; reached on 127.0.0.1, where
          :mod:`xapid.backend.xen.domconfig` has qemu listen, whatever ``vnc-listen`` says.
        """
        raw = self._find(uuid)
        state = _state_of(raw)
        if state not in ("running", "paused"):
            raise BadDomainState(f"domain {uuid} is {state}: it has no console", uuid, state)
        if protocol not in ("vt100", "rfb"):
            raise NoConsole(f"no {protocol} console", uuid, protocol)
        home = f"/local/domain/{raw.domain}"
        xs = self._store()

        def read(rel: str) -> str:
            try:
                return xs.read(f"{home}/{rel}").decode("ascii", "replace").strip()
            except XenError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES):
                    return ""
                raise

        with self._hypercall("read the console's location", uuid):
            if protocol == "vt100":
                path = read("console/tty") or read("serial/0/tty")
            else:
                port_text = read("console/vnc-port")
        if protocol == "vt100":
            if not _PTS.fullmatch(path) or not _is_pty_slave(path):
                raise NoConsole(f"domain {uuid} publishes no usable console pty", uuid, protocol)
            return ConsoleEndpoint("vt100", "pty", path=path)
        port = int(port_text) if port_text.isdigit() and len(port_text) <= 5 else -1
        if not 0 < port < 65536 or not self._device_model_listens(raw.domain, port):
            raise NoConsole(f"domain {uuid} has no VNC server of its device model", uuid, protocol)
        return ConsoleEndpoint("rfb", "tcp", host="127.0.0.1", port=port)

    def _device_model_listens(self, domid: int, port: int) -> bool:
        """Whether a process started with ``-xen-domid <domid>`` holds a socket listening on *port*."""
        inodes: set[str] = set()
        for table in ("net/tcp", "net/tcp6"):
            try:
                lines = (self._procfs / table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[1].rpartition(":")[2] == f"{port:04X}":
                    inodes.add(f"socket:[{fields[9]}]")
        if not inodes:
            return False
        want = str(domid).encode()
        for proc in self._procfs.iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if not any(a == b"-xen-domid" and b == want for a, b in zip(argv, argv[1:])):
                    continue
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return True
            except OSError:
                continue
        return False

    # -- counters ----------------------------------------------------------------------

    def read_counters(self) -> Counters:
        """One ``xc_domain_getinfolist`` for every domain, plus pCPU idle times, blkback and netback statistics."""
        xc = self._ctrl()
        phys = xc.physinfo()
        domains = []
        for raw in xc.domain_getinfolist():  # one domain that cannot be read is skipped, not the tick
            try:
                domains.append(self._info(raw))
            except (BackendError, XenError, OSError) as exc:
                log.debug("counters: skipping domain {domid}: {error}", domid=raw.domain, error=str(exc))
        disks: list[DiskCounters] = []
        nics: list[NicCounters] = []
        devices = self._sysfs / "bus" / "xen-backend" / "devices"
        net = self._sysfs / "class" / "net"
        for dom in domains:
            if dom.domid == 0:
                continue
            try:
                devices_of = self._device_ids(dom)
                nic_ids = self._nic_ids(dom)
            except (BackendError, XenError, OSError) as exc:
                log.debug("counters: no devices of domain {domid}: {error}", domid=dom.domid, error=str(exc))
                continue
            for device, devid in devices_of.items():
                stats = devices / f"vbd-{dom.domid}-{devid}" / "statistics"
                disks.append(DiskCounters(dom.uuid, device, _read_int(stats / "rd_sect") * 512,
                                          _read_int(stats / "wr_sect") * 512, _read_int(stats / "rd_req"),
                                          _read_int(stats / "wr_req")))
            for devid in nic_ids:
                stats = net / f"vif{dom.domid}.{devid}" / "statistics"
                # the backend's transmit is the guest's receive
                nics.append(NicCounters(dom.uuid, int(devid), _read_int(stats / "tx_bytes"),
                                        _read_int(stats / "rx_bytes")))
        try:
            pifs = [PifCounters(nic.device, _read_int(net / nic.device / "statistics" / "rx_bytes"),
                                _read_int(net / nic.device / "statistics" / "tx_bytes"))
                    for nic in self.physical_nics()]
        except OSError as exc:
            log.debug("counters: no physical interfaces: {error}", error=str(exc))
            pifs = []
        try:
            pcpus = self._pcpus(phys)
        except XenError as exc:
            log.debug("counters: no physical CPU times: {error}", error=str(exc))
            pcpus = []
        return Counters(
            timestamp=self._clock(), domains=tuple(domains),
            pcpus=tuple(pcpus),
            free_memory=phys.free_pages * PAGE, total_memory=phys.total_pages * PAGE,
            disks=tuple(disks), nics=tuple(nics), pifs=tuple(pifs),
        )


def hypervisor_present(privcmd: Sequence[str] = PRIVCMD_PATHS) -> bool:
    """Whether this machine runs on Xen with a hypercall interface (``--backend auto``)."""
    try:
        check_hypervisor(privcmd)
    except XenUnavailable:
        return False
    return True

