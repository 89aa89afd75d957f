"""State and shared helpers of the ``xen`` driver: connections, dom0 memory, build records, lookups."""

from __future__ import annotations

import ctypes
import errno
import json
import pathlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xapid.backend.interface import (
    BackendError,
    BadDomainState,
    DomainSpec,
    DomainState,
    HypervisorUnavailable,
    NoSuchDomain,
)
from xapid.backend.specs import BootPolicy, spec_from_json, spec_to_json
from xapid.backend.xen.libs import (
    PRIVCMD_PATHS,
    XenError,
    XenUnavailable,
    check_hypervisor,
)
from xapid.backend.xen.reaper import LibxlReaper
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
from xapid.constants import PAGE, KiB, MiB
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
PRIVCMD_LOST = frozenset({errno.EBADF, errno.ENODEV, errno.ENXIO, errno.EIO})


def state_of(info: XcDomainInfo) -> DomainState:
    if info.flags & XEN_DOMINF_dying:
        return "dying"
    if info.flags & XEN_DOMINF_shutdown:
        return "crashed" if info.shutdown_reason == "crash" else "shutdown"
    if info.flags & XEN_DOMINF_paused:
        return "paused"
    return "running"


def read_int(path: pathlib.Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class XenCore:
    """The driver's state and what every part of it uses: the connections (libxenctrl, xenstore,
    libxl and the log), dom0's memory, the build records, domain lookup and error mapping.
    """

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

    # -- lookup and errors -------------------------------------------------------------

    def free_memory(self) -> int:
        """Free host memory in bytes (``xc_physinfo``)."""
        return self._ctrl().physinfo().free_pages * PAGE

    def _raw_domains(self) -> list[XcDomainInfo]:
        return self._ctrl().domain_getinfolist()

    def _find(self, uuid: str) -> XcDomainInfo:
        for raw in self._raw_domains():
            if raw.uuid == uuid:
                return raw
        raise NoSuchDomain(f"no domain with handle {uuid}", uuid)

    def _guest(self, uuid: str, action: str) -> XcDomainInfo:
        raw = self._find(uuid)
        if raw.domain == 0:
            raise BadDomainState(f"cannot {action} the control domain", uuid)
        return raw

    @staticmethod
    def _require(raw: XcDomainInfo, wanted: str, action: str) -> None:
        state = state_of(raw)
        if state != wanted:
            raise BadDomainState(f"cannot {action} a {state} domain", raw.uuid, state)

    def _fail(self, exc: XenLightError | XenError, what: str) -> BackendError:
        """A BackendError for a failed libxl call, with the error lines libxl logged for it."""
        error = BackendError(f"{what}: {exc}", what)
        if isinstance(self._logger, FileLogger):
            error.diagnostics = tuple(self._logger.errors_since(getattr(self._tls, "mark", 0)))
        return error

    @contextmanager
    def _libxl(self, what: str) -> Iterator[None]:
        """XenLightError of the libxl calls inside as :meth:`_fail`'s BackendError for *what*
        (libxl's log lines as diagnostics, the libxl exception not chained); others pass through."""
        try:
            yield
        except XenLightError as exc:
            raise self._fail(exc, what) from None

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

    def _spec(self, uuid: str) -> DomainSpec:
        spec = self._record(uuid).get("spec")
        if not spec:
            raise BackendError(f"no build record for domain {uuid}: it was not built by xapid", uuid)
        return spec_from_json(spec)

    def _static_max(self, raw: XcDomainInfo) -> int:
        """The domain's static memory maximum (its build spec; the hypervisor ceiling otherwise)."""
        spec = self._record(raw.uuid).get("spec", {})
        return int(spec.get("memory_static_max") or raw.max_pages * PAGE)

    def _spec_update(self, uuid: str, change: Callable[[DomainSpec], DomainSpec]) -> None:
        record = self._record(uuid)
        if record:
            spec = change(spec_from_json(record["spec"]))
            self._save_record(spec, record.get("start_time", 0.0), record.get("cpu_offset", 0),
                              record.get("memory_target"))

    def _kind(self, raw: XcDomainInfo) -> str:
        spec = self._record(raw.uuid).get("spec", {})
        return spec.get("domain_type") or ("hvm" if raw.flags & XEN_DOMINF_hvm_guest else "pv")
