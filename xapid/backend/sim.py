"""The ``sim`` driver: a strict, persistent, deterministic simulated Xen host.

It refuses what a real hypervisor would refuse (see :func:`xapid.backend.specs.validate_spec` and the
per-operation state checks), keeps its domain table in ``<state_dir>/sim-state.json``
(rewritten atomically after every change, so domains "keep running" across daemon
restarts) and derives every counter from the injected clock, never from wall time.

Models, all documented where they are computed:

* memory: :func:`_xen_overhead` and :func:`_domain_overhead`; a domain uses its
  ``memory_actual`` (always equal to its target) plus its overhead;
* CPU time: each online vCPU of a running domain runs ``load`` of the time;
* physical CPU idle time: time since the simulated host booted minus the CPU time ever
  consumed by domains, spread evenly over the physical CPUs;
* disk and network I/O (:data:`IO_RATES`): while a domain runs, each of its disks reads and
  writes, and each of its network cards receives and sends, at a rate proportional to its
  ``load`` (or at the rate fixed by :meth:`SimBackend.set_io`); requests are
  :data:`IO_REQUEST_SIZE` bytes each.  Device counters restart from zero when the domain is
  rebuilt (reboot, resume) or the device is hot-plugged again;
* physical NICs: every PIF carries :data:`PIF_BASE_RATE` B/s each way; the first one also
  carries every guest's traffic (all that domains ever sent and received on this host).

Sim-only helpers for tests: :meth:`SimBackend.devices`, :meth:`SimBackend.set_load`,
:meth:`SimBackend.set_io`, :meth:`SimBackend.guest_shutdown`, :meth:`SimBackend.inject_fault`,
:meth:`SimBackend.clear_faults`, :meth:`SimBackend.set_guest_agent` (the simulated guest agent: by
default :func:`guest_agent_keys`).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import pathlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from zope.interface import implementer
from zope.interface.interface import Method

from xapid.backend.interface import (
    GUEST_KEYS_MAX,
    GUEST_SUBTREES,
    BackendError,
    BadDomainState,
    Counters,
    DiskCounters,
    DiskSpec,
    DomainInfo,
    DomainSpec,
    GuestData,
    HostInfo,
    HypervisorUnavailable,
    IBackend,
    InvalidSpec,
    NicCounters,
    NicSpec,
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
    check_limits,
    spec_to_json,
    validate_disk,
    validate_nic,
    validate_spec,
)
from xapid.constants import DOM0_UUID, PAGE, GiB, MiB
from xapid.files import write_atomically

NS = 1_000_000_000

STATE_FILE = "sim-state.json"
STATE_VERSION = 1
SUSPEND_MAGIC = "xapid-sim-suspend-v1"
GUEST_LOAD = 0.1
DOM0_LOAD = 0.05
#: Bytes per second of each device at load 1.0 (scaled by the domain's load unless set_io fixes it).
IO_RATES = {"disk_read": 4 * MiB, "disk_write": 2 * MiB, "net_rx": 1 * MiB, "net_tx": 512 * 1024}
IO_REQUEST_SIZE = 64 * 1024  # bytes per simulated disk request
PIF_BASE_RATE = 1000  # B/s of host traffic on every PIF, each way
_GUEST_PREFIXES = tuple(f"{tree}/" for tree in GUEST_SUBTREES)
NO_PV_DRIVERS = ["sim-no-pv-drivers", "true"]  # platform entry: the guest ignores requests


@functools.lru_cache(maxsize=4096)
def _placement(domid: int, vcpus: int, cpus: int) -> tuple[int, ...]:
    """The physical CPU each vCPU of a domain last ran on (round robin from the domid)."""
    return tuple((domid + i) % cpus for i in range(vcpus))


def _xen_overhead(total: int) -> int:
    """Memory Xen keeps for itself: 64 MiB plus 1 MiB per GiB of host memory."""
    return 64 * MiB + (total // GiB) * MiB


def _domain_overhead(vcpus_max: int, memory_max: int) -> int:
    """Per-domain overhead: 1 MiB per possible vCPU plus memory_max/256 (page tables), page-rounded."""
    page_tables = -(-memory_max // 256)
    return vcpus_max * MiB + -(-page_tables // PAGE) * PAGE


@dataclass
class _Domain:
    """One simulated domain, stored verbatim (its attributes) in the state file."""

    domid: int
    uuid: str
    name: str
    domain_type: str
    state: str  # "running", "paused", or "shutdown"/"crashed" after guest_shutdown
    memory_target: int  # memory_actual follows it immediately
    memory_max: int
    vcpus: int
    vcpus_max: int
    vcpu_time_ns: list[int]  # per possible vCPU, accumulated up to `since`
    since: float
    start_time: float
    load: float  # fraction of time each online vCPU runs while the domain runs
    cpu_base_ns: int  # CPU time brought in by a resume: not consumed on this host
    spec: dict[str, Any] | None  # None for dom0
    disks: list[dict[str, Any]]
    nics: list[dict[str, Any]]
    io: dict[str, float] = field(default_factory=dict)  # set_io overrides of IO_RATES (B/s per device)
    io_acc: dict[str, list[int]] = field(default_factory=dict)  # "vbd:<dev>"/"vif:<devid>" → bytes up to `since`
    shutdown_reason: str = ""  # why the guest shut down (state "shutdown"/"crashed")
    agent: dict[str, str] | None = None  # set_guest_agent's keys; None: the default agent (guest_agent_keys)

    def io_rate(self, kind: str) -> float:
        """Bytes per second of one device for *kind* (a key of IO_RATES) while running."""
        return self.io[kind] if kind in self.io else self.load * IO_RATES[kind]

    def io_counters(self, now: float) -> dict[str, list[int]]:
        """Cumulative bytes of every current device at *now*: ``{"vbd:xvda": [read, write], "vif:0": [rx, tx]}``."""
        disks, nics = self.device_counters(now)
        out = {f"vbd:{d.device}": [d.read_bytes, d.write_bytes] for d in disks}
        out.update((f"vif:{n.devid}", [n.rx_bytes, n.tx_bytes]) for n in nics)
        return out

    def device_counters(self, now: float) -> tuple[list[DiskCounters], list[NicCounters]]:
        """The counters of every current disk and network card at *now*, as the driver reports them."""
        if not (self.disks or self.nics):
            return [], []
        dt = max(0.0, now - self.since) if self.state == "running" else 0.0
        acc = self.io_acc
        io = self.io
        load = self.load
        uuid = self.uuid
        zero = (0, 0)
        disks = []
        if self.disks:
            rd = round((io["disk_read"] if "disk_read" in io else load * IO_RATES["disk_read"]) * dt)
            wr = round((io["disk_write"] if "disk_write" in io else load * IO_RATES["disk_write"]) * dt)
            for d in self.disks:
                device = d["device"]
                r, w = acc.get(f"vbd:{device}", zero)
                r, w = r + rd, w + wr
                disks.append(DiskCounters(uuid, device, r, w, r // IO_REQUEST_SIZE, w // IO_REQUEST_SIZE))
        nics = []
        if self.nics:
            rx = round((io["net_rx"] if "net_rx" in io else load * IO_RATES["net_rx"]) * dt)
            tx = round((io["net_tx"] if "net_tx" in io else load * IO_RATES["net_tx"]) * dt)
            for n in self.nics:
                devid = int(n["devid"])
                r, w = acc.get(f"vif:{devid}", zero)
                nics.append(NicCounters(uuid, devid, r + rx, w + tx))
        return disks, nics

    def net_totals(self, now: float) -> tuple[int, int]:
        """Bytes received and sent by all the domain's network cards (current devices only)."""
        counters = self.io_counters(now)
        vifs = [v for k, v in counters.items() if k.startswith("vif:")]
        return sum(v[0] for v in vifs), sum(v[1] for v in vifs)

    def vcpu_times(self, now: float) -> list[int]:
        """Cumulative time of every possible vCPU at *now*."""
        if self.state != "running":
            return list(self.vcpu_time_ns)
        growth = round(self.load * max(0.0, now - self.since) * NS)
        online = self.vcpus
        times = self.vcpu_time_ns
        return [t + growth for t in times[:online]] + times[online:]

    def cpu_time(self, now: float) -> int:
        """Cumulative CPU time of the whole domain at *now*."""
        return sum(self.vcpu_times(now))

    def checkpoint(self, now: float) -> None:
        """Fold the time run so far into the accumulators (before a rate changes)."""
        self.vcpu_time_ns = self.vcpu_times(now)
        self.io_acc = self.io_counters(now)
        self.since = now

    def usage(self) -> int:
        """Host memory this domain holds."""
        return self.memory_target + _domain_overhead(self.vcpus_max, self.memory_max)

    def ignores_requests(self) -> bool:
        """Whether the guest has no PV drivers to act on shutdown/suspend requests."""
        return self.spec is not None and NO_PV_DRIVERS in self.spec["platform"]

    def guest_data(self) -> GuestData:
        """What the guest publishes: the agent's keys (:func:`guest_agent_keys` unless set by
        :meth:`SimBackend.set_guest_agent`); a pty for every guest's text console, a VNC port for
        HVM guests; PV drivers unless the guest has none (``sim-no-pv-drivers``)."""
        if self.spec is None:  # dom0 runs no guest agent
            return GuestData()
        keys = guest_agent_keys(self) if self.agent is None else self.agent
        published = sorted((k, v) for k, v in keys.items() if k.startswith(_GUEST_PREFIXES))
        agent = {guest_text(k): guest_text(v) for k, v in published[:GUEST_KEYS_MAX]}
        hvm = self.domain_type == "hvm"
        return GuestData(agent=agent, pv_drivers_detected=not self.ignores_requests(), tty=f"/dev/pts/{self.domid}",
                         vnc_port=5900 + self.domid if hvm else -1, vnc_listen="127.0.0.1" if hvm else "")

    def info(self, now: float, cpus: int) -> DomainInfo:
        """The domain as the hypervisor reports it at *now*."""
        times = self.vcpu_times(now)
        online = self.vcpus
        return DomainInfo(  # positional: built for every domain on every metrics tick
            self.domid, self.uuid, self.name, self.state,  # type: ignore[arg-type]
            self.shutdown_reason,  # type: ignore[arg-type]
            self.memory_target,  # memory_actual follows the target at once
            self.memory_target, self.memory_max, online, self.vcpus_max, sum(times), tuple(times[:online]),
            _placement(self.domid, online, cpus), self.start_time, self.domain_type, self.domid == 0)


def guest_agent_keys(dom: _Domain) -> dict[str, str]:
    """The keys the sim's default guest agent publishes (as xe-guest-utilities does in xenstore).

    Every guest with PV drivers runs Debian 12 with the 8.4.0 agent, reports its memory (total:
    its target; free: half of it) and the control features of a Linux kernel, and has one IPv4
    address per network card, ``10.<mac[3]>.<mac[4]>.<mac[5] mod 254 + 1>`` (stable across
    reboots), plus the IPv6 link-local address of its MAC.  A guest without PV drivers
    (``sim-no-pv-drivers``) publishes nothing.
    """
    if dom.spec is None or dom.ignores_requests():
        return {}
    kib = dom.memory_target // 1024
    keys = {
        "data/os_name": "Debian GNU/Linux 12 (bookworm)", "data/os_uname": "6.1.0-18-amd64",
        "data/os_distro": "debian", "data/os_majorver": "12", "data/os_minorver": "5",
        "attr/PVAddons/MajorVersion": "8", "attr/PVAddons/MinorVersion": "4", "attr/PVAddons/MicroVersion": "0",
        "attr/PVAddons/BuildVersion": "1",
        "data/meminfo_total": str(kib), "data/meminfo_free": str(kib // 2),
        "control/feature-poweroff": "1", "control/feature-reboot": "1", "control/feature-suspend": "1",
        "data/updated": "1",
    }
    for nic in dom.nics:
        mac = [int(b, 16) for b in str(nic["mac"]).split(":")]
        devid = int(nic["devid"])
        keys[f"attr/vif/{devid}/ipv4/0"] = f"10.{mac[3]}.{mac[4]}.{mac[5] % 254 + 1}"
        eui = bytes([0xFE, 0x80, 0, 0, 0, 0, 0, 0, mac[0] ^ 2, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]])
        keys[f"attr/vif/{devid}/ipv6/0"] = str(ipaddress.IPv6Address(eui))
    return keys


@dataclass
class _State:
    """The whole simulated hypervisor state: what the state file holds."""

    boot_time: float
    next_domid: int
    retired_busy_ns: int  # CPU time consumed by domains that no longer exist
    domains: dict[str, _Domain]  # by uuid
    retired_net: list[int] = field(default_factory=lambda: [0, 0])  # guest rx/tx bytes of gone domains/devices

    def dumps(self) -> str:
        """The state file's text: canonical JSON (sorted keys), so equal states give equal text.

        The domains go to the C encoder as their attribute dicts, unconverted: the text is the
        deep snapshot (``dataclasses.asdict`` would deep-copy every domain first, ~50× slower)."""
        return json.dumps({
            "version": STATE_VERSION,
            "boot_time": self.boot_time,
            "next_domid": self.next_domid,
            "retired_busy_ns": self.retired_busy_ns,
            "retired_net": self.retired_net,
            "domains": [vars(d) for d in self.ordered()],
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        domains = [_Domain(**d) for d in data["domains"]]
        return cls(
            boot_time=float(data["boot_time"]),
            next_domid=int(data["next_domid"]),
            retired_busy_ns=int(data["retired_busy_ns"]),
            domains={d.uuid: d for d in domains},
            retired_net=[int(x) for x in data.get("retired_net", [0, 0])],
        )

    def ordered(self) -> list[_Domain]:
        return sorted(self.domains.values(), key=lambda d: d.domid)

    def take_domid(self) -> int:
        domid = self.next_domid
        self.next_domid += 1
        return domid

    def busy_ns(self, now: float) -> int:
        """CPU time consumed on this host since it booted."""
        live = sum(d.cpu_time(now) - d.cpu_base_ns for d in self.domains.values())
        return self.retired_busy_ns + live

    def remove(self, dom: _Domain, now: float) -> None:
        self.retired_busy_ns += dom.cpu_time(now) - dom.cpu_base_ns
        self.retire_net(dom, now)
        del self.domains[dom.uuid]

    def retire_net(self, dom: _Domain, now: float, devid: int | None = None) -> None:
        """Keep the traffic of a domain's nics (or of one nic) that is about to disappear."""
        for key, (rx, tx) in dom.io_counters(now).items():
            if key.startswith("vif:") and (devid is None or key == f"vif:{devid}"):
                self.retired_net[0] += rx
                self.retired_net[1] += tx

    def net_totals(self, now: float) -> tuple[int, int]:
        """Bytes every guest ever received and sent on this host."""
        rx, tx = self.retired_net
        for dom in self.domains.values():
            drx, dtx = dom.net_totals(now)
            rx, tx = rx + drx, tx + dtx
        return rx, tx


@implementer(IBackend)
class SimBackend:
    """A simulated Xen host persisted in *state_dir*, timed by *clock* (seconds).

    *shutdown_delay* is how long simulated guests take to act on a clean shutdown or
    suspend request: a request whose timeout is shorter fails with ShutdownTimeout
    (immediately: the sim never sleeps).
    """

    name = "sim"

    def __init__(
        self,
        state_dir: str | pathlib.Path,
        clock: Callable[[], float],
        *,
        cpus: int = 4,
        memory: int = 16 * GiB,
        dom0_memory: int = 1 * GiB,
        dom0_vcpus: int = 4,
        hostname: str = "xapid-sim",
        address: str = "127.0.0.1",
        shutdown_delay: float = 0.0,
        nics: int = 1,
    ) -> None:
        if cpus < 1 or dom0_vcpus < 1:
            raise ValueError("the simulated host needs at least one CPU and dom0 one vCPU")
        dom0_usage = dom0_memory + _domain_overhead(dom0_vcpus, dom0_memory)
        if dom0_usage > memory - _xen_overhead(memory):
            raise ValueError(f"dom0 ({dom0_usage} bytes) does not fit in {memory} bytes")
        self._dir = pathlib.Path(state_dir)
        self._clock = clock
        self.boot_policy = BootPolicy.default()  # the daemon sets the configured one ([security])
        self._listener: Callable[[str], Any] | None = None
        self._cpus = cpus
        self._memory = memory
        self._dom0_memory = dom0_memory
        self._dom0_vcpus = dom0_vcpus
        self._hostname = hostname
        self._address = address
        self._shutdown_delay = shutdown_delay
        self.nics = nics
        self._lock = threading.Lock()
        self._state: _State | None = None
        self._idle_floor_ns = 0
        self._faults: dict[str, tuple[BackendError, int]] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Load the state file, or boot a fresh host with only dom0; HypervisorUnavailable on failure."""
        with self._lock:
            self._take_fault("open")
            if self._state is not None:
                return
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                state = self._load() or self._boot()
                self._save(state.dumps())
            except OSError as e:
                raise HypervisorUnavailable(f"sim state directory {self._dir}: {e.strerror or e}") from e
            self._state = state
            self._idle_floor_ns = 0

    def close(self) -> None:
        """Forget the in-memory state (the state file stays); idempotent."""
        with self._lock:
            self._state = None

    def _load(self) -> _State | None:
        path = self._dir / STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return _State.from_json(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise HypervisorUnavailable(f"corrupt sim state file {path}: {e}") from e

    def _boot(self) -> _State:
        now = self._clock()
        dom0 = _Domain(
            domid=0,
            uuid=DOM0_UUID,
            name="Domain-0",
            domain_type="pv",
            state="running",
            memory_target=self._dom0_memory,
            memory_max=self._dom0_memory,
            vcpus=self._dom0_vcpus,
            vcpus_max=self._dom0_vcpus,
            vcpu_time_ns=[0] * self._dom0_vcpus,
            since=now,
            start_time=now,
            load=DOM0_LOAD,
            cpu_base_ns=0,
            spec=None,
            disks=[],
            nics=[],
        )
        return _State(boot_time=now, next_domid=1, retired_busy_ns=0, domains={DOM0_UUID: dom0})

    def _save(self, text: str) -> None:
        """Write the state file atomically (mode as ``open(path, "w")``)."""
        write_atomically(self._dir / STATE_FILE, text, mode=None)

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[_State]:
        """Run a call that only reads, under the lock (no snapshot, nothing to persist)."""
        with self._lock:
            self._take_fault(name)
            if self._state is None:
                raise HypervisorUnavailable("sim backend is not open")
            yield self._state

    @contextlib.contextmanager
    def _operation(self, name: str) -> Iterator[_State]:
        """Run one call under the lock as a transaction.

        Raises an injected fault first; refuses when closed; persists the state when the
        call changed it; restores it when the call (or the write) fails.
        """
        with self._lock:
            self._take_fault(name)
            if self._state is None:
                raise HypervisorUnavailable("sim backend is not open")
            before = self._state.dumps()
            try:
                yield self._state
            except BaseException:
                self._state = _State.from_json(json.loads(before))
                raise
            after = self._state.dumps()
            if after != before:
                try:
                    self._save(after)
                except OSError as e:
                    self._state = _State.from_json(json.loads(before))
                    raise BackendError(f"cannot write sim state: {e.strerror or e}") from e

    # -- fault injection (sim only) ----------------------------------------------------

    def inject_fault(self, operation: str, error: BackendError, count: int = 1) -> None:
        """Make the next *count* calls of the IBackend method *operation* raise *error*."""
        if not isinstance(IBackend.get(operation), Method) or count < 1:
            raise ValueError(f"cannot inject {count} faults into {operation!r}")
        with self._lock:
            self._faults[operation] = (error, count)

    def clear_faults(self) -> None:
        """Drop every pending injected fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, name: str) -> None:
        fault = self._faults.get(name)
        if fault is None:
            return
        error, count = fault
        if count > 1:
            self._faults[name] = (error, count - 1)
        else:
            del self._faults[name]
        raise error

    # -- host --------------------------------------------------------------------------

    def host_info(self) -> HostInfo:
        """Static facts of the simulated host."""
        with self._reading("host_info"):
            return HostInfo(
                hostname=self._hostname,
                address=self._address,
                total_memory=self._memory,
                xen_version="4.17.3",
                capabilities=("xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_32p", "hvm-3.0-x86_64"),
                sched_policy="credit",
                cpu_count=self._cpus,
                socket_count=1,
                cores_per_socket=self._cpus,
                threads_per_core=1,
                cpu_vendor="GenuineIntel",
                cpu_model_name="Simulated Xen CPU @ 2.40GHz",
                cpu_speed_mhz=2400,
                cpu_family=6,
                cpu_model=85,
                cpu_stepping=4,
                cpu_flags=(
                    "fpu de tsc msr pae mce cx8 apic sep mca cmov pat clflush acpi mmx fxsr sse sse2 "
                    "ht syscall nx lm constant_tsc nopl pni pclmulqdq vmx ssse3 fma cx16 sse4_1 "
                    "sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
                    "avx2 bmi1 bmi2 erms avx512f avx512dq"
                ),
                cpu_features="7ffefbff-bfebfbff-00000121-2c100800",
                bios_strings={
                    "bios-vendor": "xapid",
                    "system-manufacturer": "xapid",
                    "system-product-name": "sim",
                },
            )

    def physical_nics(self) -> list[PhysicalNic]:
        """Sim: one or more NICs with stable, locally administered MACs."""
        with self._reading("physical_nics"):
            return [PhysicalNic(device=f"eth{i}", mac=f"02:00:00:00:00:{i + 1:02x}", mtu=1500, carrier=True,
                                speed=10000, duplex=True, vendor_name="xapid", device_name="simulated NIC",
                                pci_bus_path=f"0000:00:{i + 3:02x}.0") for i in range(self.nics)]

    def physical_cpus(self) -> list[PhysicalCPU]:
        """Every physical CPU with its cumulative idle time."""
        with self._reading("physical_cpus") as state:
            return self._pcpus(state, self._clock())

    def free_memory(self) -> int:
        """Host memory minus Xen's overhead minus what every domain holds."""
        with self._reading("free_memory") as state:
            return self._free(state)

    def read_counters(self) -> Counters:
        """One consistent batch of counters at a single clock reading (each domain computed once)."""
        with self._reading("read_counters") as state:
            now = self._clock()
            disks: list[DiskCounters] = []
            nics: list[NicCounters] = []
            domains = []
            busy = state.retired_busy_ns
            rx, tx = state.retired_net
            used = 0
            for dom in state.domains.values():  # the order does not matter here: no sort per tick
                info = dom.info(now, self._cpus)
                domains.append(info)
                used += dom.usage()
                busy += info.cpu_time_ns - dom.cpu_base_ns
                dom_disks, dom_nics = dom.device_counters(now)
                disks += dom_disks
                for n in dom_nics:
                    nics.append(n)
                    rx, tx = rx + n.rx_bytes, tx + n.tx_bytes
            return Counters(
                timestamp=now,
                domains=tuple(domains),
                pcpus=tuple(self._pcpus(state, now, busy)),
                free_memory=self._memory - _xen_overhead(self._memory) - used,  # as _free, in the same pass
                total_memory=self._memory,
                disks=tuple(disks),
                nics=tuple(nics),
                pifs=tuple(self._pifs(state, now, (rx, tx))),
            )

    def _pifs(self, state: _State, now: float, totals: tuple[int, int] | None = None) -> list[PifCounters]:
        """Every PIF: a base rate each way since boot; eth0 also carries all guest traffic."""
        base = round(max(0.0, now - state.boot_time) * PIF_BASE_RATE)
        rx, tx = totals if totals is not None else state.net_totals(now)
        return [PifCounters(f"eth{i}", base + (rx if i == 0 else 0), base + (tx if i == 0 else 0))
                for i in range(self.nics)]

    def _free(self, state: _State) -> int:
        used = sum(d.usage() for d in state.domains.values())
        return self._memory - _xen_overhead(self._memory) - used

    def _pcpus(self, state: _State, now: float, busy: int | None = None) -> list[PhysicalCPU]:
        """Idle = time since boot − busy time / CPUs; held when overcommitted, so never decreasing."""
        elapsed = round(max(0.0, now - state.boot_time) * NS)
        busy = state.busy_ns(now) if busy is None else busy
        idle = max(self._idle_floor_ns, elapsed - busy // self._cpus)
        self._idle_floor_ns = idle
        return [PhysicalCPU(number=i, idle_time_ns=idle) for i in range(self._cpus)]

    def _check_fits(self, state: _State, needed: int, what: str) -> None:
        available = self._free(state)
        if needed > available:
            raise NotEnoughMemory(
                f"{what} needs {needed} bytes, {available} available", str(needed), str(available)
            )

    # -- domains -----------------------------------------------------------------------

    def list_domains(self) -> list[DomainInfo]:
        """Every domain, dom0 included, ordered by domid."""
        with self._reading("list_domains") as state:
            now = self._clock()
            return [d.info(now, self._cpus) for d in state.ordered()]

    def domain_info(self, uuid: str) -> DomainInfo:
        """One domain by handle; NoSuchDomain when absent."""
        with self._reading("domain_info") as state:
            return self._lookup(state, uuid).info(self._clock(), self._cpus)

    def devices(self, uuid: str) -> dict[str, tuple[Any, ...]]:
        """Sim only: the disks and nics a domain currently has, as ``{"disks": …, "nics": …}``."""
        with self._reading("devices") as state:
            dom = self._lookup(state, uuid)
            return {
                "disks": tuple(DiskSpec(**d) for d in dom.disks),
                "nics": tuple(NicSpec(**n) for n in dom.nics),
            }

    def set_load(self, uuid: str, load: float) -> None:
        """Sim only: the fraction of time each online vCPU of the domain runs (0..1)."""
        if not 0.0 <= load <= 1.0:
            raise ValueError(f"load {load} not in 0..1")
        with self._operation("set_load") as state:
            dom = self._lookup(state, uuid)
            dom.checkpoint(self._clock())
            dom.load = float(load)

    def set_io(self, uuid: str, **rates: float | None) -> None:
        """Sim only: fix the I/O rate (B/s per device) of a domain's devices.

        Keys: ``disk_read``, ``disk_write``, ``net_rx``, ``net_tx``; a value of None goes back to the
        load-proportional default (:data:`IO_RATES` × load).
        """
        for kind, rate in rates.items():
            if kind not in IO_RATES or (rate is not None and rate < 0):
                raise ValueError(f"bad I/O rate {kind}={rate!r}")
        with self._operation("set_io") as state:
            dom = self._lookup(state, uuid)
            dom.checkpoint(self._clock())
            for kind, rate in rates.items():
                if rate is None:
                    dom.io.pop(kind, None)
                else:
                    dom.io[kind] = float(rate)

    def guest_shutdown(self, uuid: str, reason: str) -> None:
        """Sim only: the guest shuts itself down (*reason* poweroff, reboot, crash, watchdog).

        The domain stays, shut down (``crashed`` for crash), until destroyed or rebuilt, and
        the listener given to :meth:`watch_domains` hears of it.
        """
        if reason not in ("poweroff", "reboot", "crash", "watchdog"):
            raise ValueError(f"unknown shutdown reason {reason!r}")
        with self._operation("guest_shutdown") as state:
            dom = self._guest(state, uuid, "shut down")
            self._require_state(dom, "running", "shut down")
            dom.checkpoint(self._clock())
            dom.state = "crashed" if reason == "crash" else "shutdown"
            dom.shutdown_reason = reason
        if self._listener is not None:
            self._listener(uuid)

    def set_guest_agent(self, uuid: str, keys: dict[str, str] | None) -> None:
        """Sim only: what the domain's guest agent publishes from now on — xenstore keys relative to
        the domain's home (``{"data/os_name": …, "attr/vif/0/ipv4/0": …, "data/updated": "1"}``),
        ``{}`` for no agent, None for the default agent (:func:`guest_agent_keys`).  Kept across
        reboots and daemon restarts, like the guest's software."""
        if keys is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
            raise ValueError("guest agent keys and values must be strings")
        with self._operation("set_guest_agent") as state:
            self._guest(state, uuid, "set the guest agent of").agent = None if keys is None else dict(keys)

    def guest_data(self, uuid: str) -> GuestData:
        """The agent's keys and the console's location (see :meth:`_Domain.guest_data`)."""
        with self._reading("guest_data") as state:
            return self._lookup(state, uuid).guest_data()

    def watch_domains(self, reactor: Any, listener: Callable[[str], Any]) -> None:
        """Report domains that change on their own (only :meth:`guest_shutdown` here) to *listener*."""
        self._listener = listener

    def create_domain(self, spec: DomainSpec, paused: bool) -> DomainInfo:
        """Build a domain from *spec*, paused or running."""
        with self._operation("create_domain") as state:
            self._check_buildable(state, spec)
            now = self._clock()
            dom = self._build(state, spec, now, paused, spec.memory_target, spec.vcpus_at_startup)
            return dom.info(now, self._cpus)

    def destroy_domain(self, uuid: str) -> None:
        """Remove a domain at once, in any state."""
        with self._operation("destroy_domain") as state:
            dom = self._guest(state, uuid, "destroy")
            state.remove(dom, self._clock())

    def pause_domain(self, uuid: str) -> None:
        """Pause a running domain."""
        with self._operation("pause_domain") as state:
            dom = self._guest(state, uuid, "pause")
            self._require_state(dom, "running", "pause")
            dom.checkpoint(self._clock())
            dom.state = "paused"

    def unpause_domain(self, uuid: str) -> None:
        """Unpause a paused domain."""
        with self._operation("unpause_domain") as state:
            dom = self._guest(state, uuid, "unpause")
            self._require_state(dom, "paused", "unpause")
            dom.since = self._clock()
            dom.state = "running"

    def shutdown_domain(self, uuid: str, reason: str, timeout: float) -> None:
        """Clean shutdown: 'poweroff' removes the domain, 'reboot' rebuilds it with a new domid."""
        if reason not in ("poweroff", "reboot"):
            raise BackendError(f"unknown shutdown reason {reason!r}", reason)
        with self._operation("shutdown_domain") as state:
            dom = self._guest(state, uuid, "shut down")
            self._require_state(dom, "running", f"{reason} cleanly")
            self._request_guest(dom, reason, timeout)
            now = self._clock()
            if reason == "poweroff":
                state.remove(dom, now)
            else:
                self._rebuild(state, dom, now)

    def reboot_domain(self, uuid: str) -> DomainInfo:
        """Hard reboot: rebuild at once with a new domid, running, CPU time reset."""
        with self._operation("reboot_domain") as state:
            dom = self._guest(state, uuid, "reboot")
            now = self._clock()
            self._rebuild(state, dom, now)
            return dom.info(now, self._cpus)

    def suspend_domain(self, uuid: str, path: str, timeout: float) -> None:
        """Write a running domain's image to the file *path*, then remove the domain."""
        with self._operation("suspend_domain") as state:
            dom = self._guest(state, uuid, "suspend")
            self._require_state(dom, "running", "suspend")
            self._request_guest(dom, "suspend", timeout)
            now = self._clock()
            image = {
                "magic": SUSPEND_MAGIC,
                "uuid": dom.uuid,
                "spec": dom.spec,
                "memory_target": dom.memory_target,
                "memory_max": dom.memory_max,
                "vcpus": dom.vcpus,
                "vcpu_time_ns": dom.vcpu_times(now),
                "cpu_time_ns": dom.cpu_time(now),
                "load": dom.load,
            }
            try:
                with open(path, "w") as f:
                    json.dump(image, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise BackendError(f"cannot write suspend image {path}: {e.strerror or e}", path) from e
            state.remove(dom, now)

    def resume_domain(self, spec: DomainSpec, path: str, paused: bool) -> DomainInfo:
        """Rebuild the domain of *spec* from its image at *path*; its CPU time continues."""
        with self._operation("resume_domain") as state:
            self._check_buildable(state, spec)
            image = self._read_image(spec, path)
            if image["memory_target"] > spec.memory_static_max or image["vcpus"] > spec.vcpus_max:
                raise InvalidSpec(f"suspend image {path} does not fit the spec's maxima")
            now = self._clock()
            dom = self._build(state, spec, now, paused, image["memory_target"], image["vcpus"])
            times = image["vcpu_time_ns"] + [0] * spec.vcpus_max
            dom.vcpu_time_ns = times[: spec.vcpus_max]
            dom.cpu_base_ns = sum(dom.vcpu_time_ns)
            dom.load = image["load"]
            return dom.info(now, self._cpus)

    def set_vcpus(self, uuid: str, count: int) -> None:
        """Set the online vCPUs (1..vcpus_max); offline vCPUs keep their time."""
        with self._operation("set_vcpus") as state:
            dom = self._lookup(state, uuid)
            if not 1 <= count <= dom.vcpus_max:
                raise InvalidSpec(f"vCPU count {count} not in 1..{dom.vcpus_max}")
            dom.checkpoint(self._clock())
            dom.vcpus = count

    def set_memory_target(self, uuid: str, target: int) -> None:
        """Set the balloon target; memory_actual follows at once, growth must fit free memory."""
        with self._operation("set_memory_target") as state:
            dom = self._lookup(state, uuid)
            if not MIN_DOMAIN_MEMORY <= target <= dom.memory_max:
                raise InvalidSpec(f"memory target {target} not in {MIN_DOMAIN_MEMORY}..{dom.memory_max}")
            if target > dom.memory_target:
                self._check_fits(state, target - dom.memory_target, f"domain {dom.domid}")
            dom.memory_target = target

    def attach_disk(self, uuid: str, disk: DiskSpec) -> None:
        """Hot-plug a disk; InvalidSpec when the device name is taken."""
        with self._operation("attach_disk") as state:
            dom = self._lookup(state, uuid)
            validate_disk(disk)
            if any(d["device"] == disk.device for d in dom.disks):
                raise InvalidSpec(f"domain {dom.domid} already has a disk {disk.device}")
            check_limits(dom.domain_type, len(dom.disks) + 1, 0)
            dom.checkpoint(self._clock())
            dom.io_acc.pop(f"vbd:{disk.device}", None)
            dom.disks.append(asdict(disk))

    def detach_disk(self, uuid: str, device: str) -> None:
        """Hot-unplug a disk; InvalidSpec when absent."""
        with self._operation("detach_disk") as state:
            dom = self._lookup(state, uuid)
            kept = [d for d in dom.disks if d["device"] != device]
            if len(kept) == len(dom.disks):
                raise InvalidSpec(f"domain {dom.domid} has no disk {device}")
            dom.checkpoint(self._clock())
            dom.io_acc.pop(f"vbd:{device}", None)
            dom.disks = kept

    def attach_nic(self, uuid: str, nic: NicSpec) -> None:
        """Hot-plug a network card; InvalidSpec when the devid is taken."""
        with self._operation("attach_nic") as state:
            dom = self._lookup(state, uuid)
            validate_nic(nic)
            if any(n["devid"] == nic.devid for n in dom.nics):
                raise InvalidSpec(f"domain {dom.domid} already has a nic {nic.devid}")
            check_limits(dom.domain_type, 0, len(dom.nics) + 1)
            dom.checkpoint(self._clock())
            dom.io_acc.pop(f"vif:{nic.devid}", None)
            dom.nics.append(asdict(nic))

    def detach_nic(self, uuid: str, devid: int) -> None:
        """Hot-unplug a network card; InvalidSpec when absent."""
        with self._operation("detach_nic") as state:
            dom = self._lookup(state, uuid)
            kept = [n for n in dom.nics if n["devid"] != devid]
            if len(kept) == len(dom.nics):
                raise InvalidSpec(f"domain {dom.domid} has no nic {devid}")
            now = self._clock()
            dom.checkpoint(now)
            state.retire_net(dom, now, devid)
            dom.io_acc.pop(f"vif:{devid}", None)
            dom.nics = kept

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _lookup(state: _State, uuid: str) -> _Domain:
        try:
            return state.domains[uuid]
        except KeyError:
            raise NoSuchDomain(f"no domain with handle {uuid}", uuid) from None

    @classmethod
    def _guest(cls, state: _State, uuid: str, action: str) -> _Domain:
        """The domain *uuid*, refusing the control domain."""
        dom = cls._lookup(state, uuid)
        if dom.domid == 0:
            raise BadDomainState(f"cannot {action} the control domain", "running")
        return dom

    @staticmethod
    def _require_state(dom: _Domain, wanted: str, action: str) -> None:
        if dom.state != wanted:
            raise BadDomainState(f"cannot {action} domain {dom.domid}: it is {dom.state}", dom.state)

    def _request_guest(self, dom: _Domain, request: str, timeout: float) -> None:
        """Ask the guest to act; ShutdownTimeout when it would not within *timeout*."""
        if dom.ignores_requests() or self._shutdown_delay > timeout:
            raise ShutdownTimeout(f"domain {dom.domid} did not {request} within {timeout}s")

    def _check_buildable(self, state: _State, spec: DomainSpec) -> None:
        """Refuse an invalid spec (host paths as the xen driver judges them) or one whose handle is taken."""
        validate_spec(spec, self.boot_policy)
        if spec.uuid in state.domains:
            raise InvalidSpec(f"a domain with handle {spec.uuid} already exists")

    def _build(
        self, state: _State, spec: DomainSpec, now: float, paused: bool, memory: int, vcpus: int
    ) -> _Domain:
        """Add a domain for *spec* with *memory* and *vcpus* online; NotEnoughMemory when it won't fit."""
        dom = _Domain(
            domid=0,  # assigned once it fits
            uuid=spec.uuid,
            name=spec.name,
            domain_type=spec.domain_type,
            state="paused" if paused else "running",
            memory_target=memory,
            memory_max=spec.memory_static_max,
            vcpus=vcpus,
            vcpus_max=spec.vcpus_max,
            vcpu_time_ns=[0] * spec.vcpus_max,
            since=now,
            start_time=now,
            load=GUEST_LOAD,
            cpu_base_ns=0,
            spec=spec_to_json(spec),
            disks=[asdict(d) for d in spec.disks],
            nics=[asdict(n) for n in spec.nics],
        )
        self._check_fits(state, dom.usage(), f"domain {spec.name!r}")
        dom.domid = state.take_domid()
        state.domains[dom.uuid] = dom
        return dom

    @staticmethod
    def _rebuild(state: _State, dom: _Domain, now: float) -> None:
        """Reboot in place: new domid, running, CPU time reset; configuration and devices kept."""
        state.remove(dom, now)
        dom.domid = state.take_domid()
        dom.state = "running"
        dom.shutdown_reason = ""
        dom.vcpu_time_ns = [0] * dom.vcpus_max
        dom.io_acc = {}
        dom.cpu_base_ns = 0
        dom.since = now
        dom.start_time = now
        state.domains[dom.uuid] = dom

    @staticmethod
    def _read_image(spec: DomainSpec, path: str) -> dict[str, Any]:
        """The suspend image at *path* for *spec*; BackendError naming what is wrong."""
        try:
            with open(path) as f:
                image = json.load(f)
        except OSError as e:
            raise BackendError(f"cannot read suspend image {path}: {e.strerror or e}", path) from e
        except ValueError as e:
            raise BackendError(f"corrupt suspend image {path}: {e}", path) from e
        if not isinstance(image, dict) or image.get("magic") != SUSPEND_MAGIC:
            raise BackendError(f"{path} is not a sim suspend image", path)
        if image.get("uuid") != spec.uuid:
            raise BackendError(f"suspend image {path} belongs to domain {image.get('uuid')}", path)
        fields = {"memory_target": int, "vcpus": int, "vcpu_time_ns": list, "load": float}
        if not all(isinstance(image.get(k), t) for k, t in fields.items()):
            raise BackendError(f"corrupt suspend image {path}: missing or bad fields", path)
        return image
