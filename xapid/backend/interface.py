"""The driver boundary: what xapid asks of a hypervisor backend.

Drivers take and return the small immutable records defined here (named tuples for those the
metrics sampler reads by the thousand every tick, cheap to build); they never see API
references, store objects or wire values, and the API layer never sees a driver's
internals (ctypes objects, xenstore paths).  Every method may block: callers run them
through :class:`xapid.backend.runner.Runner` (a thread pool in the daemon, inline in tests).

Failures are raised as :class:`BackendError` subclasses; the API layer maps them to
Xen-API error codes in one place (:mod:`xapid.backend.errors`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

from zope.interface import Attribute, Interface

DomainState = Literal["running", "paused", "shutdown", "crashed", "dying"]
ShutdownReason = Literal["poweroff", "reboot", "suspend", "crash", "watchdog", ""]


@dataclass(frozen=True)
class HostInfo:
    """Static facts about the physical host."""

    hostname: str
    address: str
    total_memory: int  # bytes
    xen_version: str  # e.g. "4.17.3"
    capabilities: tuple[str, ...]  # e.g. ("xen-3.0-x86_64", "hvm-3.0-x86_32")
    sched_policy: str  # "credit", "credit2"
    cpu_count: int
    socket_count: int
    cores_per_socket: int
    threads_per_core: int
    cpu_vendor: str
    cpu_model_name: str
    cpu_speed_mhz: int
    cpu_family: int
    cpu_model: int
    cpu_stepping: int
    cpu_flags: str
    cpu_features: str
    bios_strings: dict[str, str] = field(default_factory=dict)


class PhysicalCPU(NamedTuple):
    """One physical CPU as the hypervisor reports it."""

    number: int
    idle_time_ns: int  # cumulative idle time


@dataclass(frozen=True)
class PhysicalNic:
    """A network interface of the host (``/sys/class/net`` on a real host)."""

    device: str  # e.g. "eth0"
    mac: str
    mtu: int
    carrier: bool
    speed: int  # Mbit/s
    duplex: bool
    vendor_name: str = ""
    device_name: str = ""
    pci_bus_path: str = ""


@dataclass(frozen=True)
class DiskSpec:
    """A disk given to a domain at build time or hot-plugged."""

    device: str  # guest name, e.g. "xvda"
    path: str  # file or block device in dom0; "" for an empty CD drive
    mode: Literal["r", "w"]
    kind: Literal["disk", "cdrom"] = "disk"
    format: Literal["raw", "qcow2"] = "raw"


@dataclass(frozen=True)
class NicSpec:
    """A network card given to a domain at build time or hot-plugged."""

    devid: int
    mac: str
    bridge: str
    mtu: int = 1500


@dataclass(frozen=True)
class DomainSpec:
    """Everything needed to build a domain; derived from a VM record by the API layer."""

    uuid: str  # the VM's uuid: the domain handle
    name: str
    domain_type: Literal["pv", "hvm", "pvh"]
    memory_static_max: int  # bytes
    memory_target: int  # bytes
    vcpus_max: int
    vcpus_at_startup: int
    kernel: str = ""
    ramdisk: str = ""
    cmdline: str = ""
    bootloader: str = ""
    bootloader_args: str = ""
    boot_order: str = ""  # HVM boot order, e.g. "cd"
    firmware: str = "bios"  # HVM firmware: "bios" or "uefi"
    platform: tuple[tuple[str, str], ...] = ()
    vcpu_weight: int = 256
    vcpu_cap: int = 0
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()


class DomainInfo(NamedTuple):
    """A domain as the hypervisor sees it right now."""

    domid: int
    uuid: str  # handle
    name: str
    state: DomainState
    shutdown_reason: ShutdownReason
    memory_actual: int  # bytes currently allocated
    memory_target: int  # bytes
    memory_max: int  # bytes
    vcpus: int  # online vCPUs
    vcpus_max: int
    cpu_time_ns: int  # cumulative, all vCPUs
    vcpu_time_ns: tuple[int, ...]  # cumulative per online vCPU
    vcpu_cpu: tuple[int, ...]  # physical CPU each vCPU last ran on
    start_time: float  # seconds since the epoch
    domain_type: str  # "pv", "hvm", "pvh"
    is_control_domain: bool = False


class DiskCounters(NamedTuple):
    """Cumulative I/O of one disk of a domain (reset when the domain is rebuilt)."""

    uuid: str  # the domain handle (VM uuid)
    device: str  # guest device name, e.g. "xvda"
    read_bytes: int
    write_bytes: int
    read_reqs: int
    write_reqs: int


class NicCounters(NamedTuple):
    """Cumulative traffic of one network card of a domain, seen from the guest (reset on rebuild)."""

    uuid: str  # the domain handle (VM uuid)
    devid: int
    rx_bytes: int
    tx_bytes: int


class PifCounters(NamedTuple):
    """Cumulative traffic of one physical network interface of the host."""

    device: str  # e.g. "eth0"
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class Counters:
    """One batch of raw counters for the metrics sampler, read in a single call.

    Every counter is cumulative; a counter may go back to zero (domain rebuilt) or wrap, which
    the sampler treats as one unknown step.
    """

    timestamp: float
    domains: tuple[DomainInfo, ...]
    pcpus: tuple[PhysicalCPU, ...]
    free_memory: int
    total_memory: int
    disks: tuple[DiskCounters, ...] = ()
    nics: tuple[NicCounters, ...] = ()
    pifs: tuple[PifCounters, ...] = ()


@dataclass(frozen=True)
class GuestData:
    """What a domain publishes about itself for the toolstack (xenstore on Xen).

    *agent* holds the guest agent's keys verbatim, relative to the domain's xenstore home, from
    the subtrees ``data/``, ``attr/``, ``control/``, ``feature/``, ``drivers/`` and
    ``xenserver/attr/`` (e.g. ``{"data/os_name": "Debian GNU/Linux 12", "attr/vif/0/ipv4/0":
    "10.0.0.2", "data/updated": "1"}``); the API layer maps them to ``VM_guest_metrics`` as xapi
    does.  Empty when no agent runs.  A driver bounds what a guest can make it return
    (:data:`GUEST_KEYS_MAX` keys, values cut to :data:`GUEST_VALUE_MAX` characters, control
    characters replaced).  *pv_drivers_detected*: a device frontend of the guest is connected.
    The console facts are "" / -1 when unknown: *tty* the dom0 pty of the guest's text console
    (``console/tty``), *vnc_port* and *vnc_listen* the device model's VNC server
    (``console/vnc-port``, ``console/vnc-listen``).
    """

    agent: dict[str, str] = field(default_factory=dict)
    pv_drivers_detected: bool = False
    tty: str = ""
    vnc_port: int = -1
    vnc_listen: str = ""


ConsoleKind = Literal["pty", "tcp", "sim"]
CONSOLE_PROTOCOLS = ("vt100", "rfb")


class HeldPty:
    """A pty slave the driver opened *before* checking who holds its master: while it stays open
    the kernel cannot give its number to another terminal, so what was checked is what the relay
    gets.  The relay :meth:`take`s the descriptor (once); one never taken is closed when the
    endpoint is dropped (a refused or abandoned console request)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def take(self) -> int:
        """The descriptor, now the caller's to close; OSError(EBADF) if taken or closed already."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            raise OSError(errno.EBADF, "the console pty was already handed over")
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class ConsoleEndpoint:
    """Where a running domain's console is served, for the relay of ``/console``.

    *protocol* ``vt100`` (the text console) or ``rfb`` (the device model's VNC server).
    *kind* ``pty``: the dom0 pty at *path* (xenconsoled's end of the guest's console), held open
    by the driver in *pty* (:class:`HeldPty`; the relay uses that descriptor, never the path);
    ``tcp``: a VNC server at *host*:*port* on this host; ``sim``: the simulator's own console,
    served in-process (:mod:`xapid.console`), naming the guest *name*.  *pty* is left out of
    comparisons: it is the device *path* named when the driver checked it.
    """

    protocol: str
    kind: ConsoleKind
    path: str = ""
    host: str = ""
    port: int = -1
    name: str = ""
    pty: HeldPty | None = field(default=None, compare=False)


#: The subtrees of a domain's xenstore home that a driver reports in :attr:`GuestData.agent`.
GUEST_SUBTREES = ("data", "attr", "control", "feature", "drivers", "xenserver/attr")
GUEST_KEYS_MAX = 512
GUEST_VALUE_MAX = 1024


_CONTROL = dict.fromkeys([*range(32), 127], "?")


def guest_text(value: bytes | str) -> str:
    """A guest-written value made safe for every wire: UTF-8 (errors replaced), control
    characters as ``?``, at most :data:`GUEST_VALUE_MAX` characters."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return text[:GUEST_VALUE_MAX].translate(_CONTROL)


class BackendError(Exception):
    """A driver refused or failed an operation.  ``code`` is a stable driver-level reason."""

    code = "BACKEND_FAILURE"
    #: the hypervisor toolstack's own words for the failure (libxl's error lines), if any
    diagnostics: tuple[str, ...] = ()

    def __init__(self, message: str, *details: str):
        super().__init__(message)
        self.message = message
        self.details = details


class NotSupported(BackendError):
    """The driver does not implement this operation."""

    code = "NOT_SUPPORTED"


class NoSuchDomain(BackendError):
    code = "NO_SUCH_DOMAIN"


class BadDomainState(BackendError):
    """The domain is not in a state that allows the operation (e.g. pausing a paused domain)."""

    code = "BAD_DOMAIN_STATE"


class NotEnoughMemory(BackendError):
    """The host cannot fit the domain.  details: (needed_bytes, available_bytes)."""

    code = "NOT_ENOUGH_MEMORY"


class InvalidSpec(BackendError):
    """The domain spec is refused (too many vCPUs, memory too low, bad device …)."""

    code = "INVALID_SPEC"


class ShutdownTimeout(BackendError):
    """The guest did not act on a clean shutdown/reboot/suspend request in time."""

    code = "SHUTDOWN_TIMEOUT"


class NoConsole(BackendError):
    """The domain has no console of the asked protocol (an HVM-only VNC on a PV guest, a
    device model without VNC, a pty not (yet) published)."""

    code = "NO_CONSOLE"


class HypervisorUnavailable(BackendError):
    """No hypervisor to talk to (raised by ``open``)."""

    code = "NO_HYPERVISOR"


class IBackend(Interface):
    """A hypervisor driver.  All methods may block; all may raise :class:`BackendError`."""

    name = Attribute("Short driver name: 'sim', 'xen'.")
    boot_policy = Attribute("The BootPolicy every build checks host paths against; the daemon sets it.")

    def open() -> None:
        """Connect to the hypervisor.  Raises HypervisorUnavailable with a one-line reason."""

    def close() -> None:
        """Release every handle; idempotent."""

    def host_info() -> HostInfo:
        """Static host facts."""

    def physical_cpus() -> list[PhysicalCPU]:
        """Every physical CPU with its cumulative idle time."""

    def physical_nics() -> list[PhysicalNic]:
        """The host's physical network interfaces."""

    def free_memory() -> int:
        """Bytes the hypervisor could give to a new domain now."""

    def list_domains() -> list[DomainInfo]:
        """Every domain that exists, dom0 included, ordered by domid."""

    def domain_info(uuid: str) -> DomainInfo:
        """One domain by handle; NoSuchDomain when it does not exist."""

    def create_domain(spec: DomainSpec, paused: bool) -> DomainInfo:
        """Build a domain from *spec*.  Left paused when *paused*, else running.

        NotEnoughMemory when it does not fit, InvalidSpec for a spec the hypervisor refuses.
        """

    def destroy_domain(uuid: str) -> None:
        """Tear the domain down immediately (hard shutdown)."""

    def pause_domain(uuid: str) -> None:
        """Pause a running domain; BadDomainState otherwise."""

    def unpause_domain(uuid: str) -> None:
        """Unpause a paused domain; BadDomainState otherwise."""

    def shutdown_domain(uuid: str, reason: str, timeout: float) -> None:
        """Ask the guest to shut down cleanly (*reason* 'poweroff' or 'reboot') and wait.

        For 'poweroff' the domain is gone on return; for 'reboot' it has been rebuilt and
        runs again.  ShutdownTimeout when the guest does not comply within *timeout* s.
        """

    def reboot_domain(uuid: str) -> DomainInfo:
        """Hard reboot: destroy and rebuild from the same spec, running."""

    def suspend_domain(uuid: str, path: str, timeout: float) -> None:
        """Save the domain's memory image to the file *path*, then destroy the domain."""

    def resume_domain(spec: DomainSpec, path: str, paused: bool) -> DomainInfo:
        """Rebuild a domain from the image at *path* (written by suspend_domain)."""

    def set_vcpus(uuid: str, count: int) -> None:
        """Set the number of online vCPUs of a running domain (1..vcpus_max)."""

    def set_memory_target(uuid: str, target: int) -> None:
        """Set the balloon target (bytes) of a running domain (≤ its maximum)."""

    def attach_disk(uuid: str, disk: DiskSpec) -> None:
        """Hot-plug a disk into a running domain."""

    def detach_disk(uuid: str, device: str) -> None:
        """Hot-unplug a disk from a running domain."""

    def attach_nic(uuid: str, nic: NicSpec) -> None:
        """Hot-plug a network card into a running domain."""

    def detach_nic(uuid: str, devid: int) -> None:
        """Hot-unplug a network card from a running domain."""

    def guest_data(uuid: str) -> GuestData:
        """What the domain publishes: its guest agent's keys and its console's location (NoSuchDomain
        when it does not exist).  Cheap enough to be polled every metrics period."""

    def console_endpoint(uuid: str, protocol: str) -> ConsoleEndpoint:
        """Where the running or paused domain's console of *protocol* (``vt100``/``rfb``) is
        served (NoSuchDomain, BadDomainState when it is not running, NoConsole when it has none).
        A driver checks what a guest could have written (paths, ports) before answering."""

    def read_counters() -> Counters:
        """One batch of raw counters: every domain, physical CPU, domain disk and nic, and PIF."""

    def watch_domains(reactor: object, listener: Callable[[str], object]) -> None:
        """Report every domain that shuts down, crashes or vanishes on its own (not through this
        driver's operations) by calling ``listener(uuid)`` in the reactor thread; the listener
        looks at :meth:`domain_info` to see what happened.  Does not block."""
