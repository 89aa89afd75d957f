"""The simulated host's model: its domains, their devices and counters, and the rules it enforces.

Everything here is pure state and arithmetic on the injected clock's readings (never wall time);
:mod:`xapid.backend.sim.driver` runs it behind :class:`~xapid.backend.interface.IBackend`.

Models, all documented where they are computed:

* memory: :func:`xen_overhead` and :func:`domain_overhead`; a domain uses its
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
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from xapid.backend.interface import (
    GUEST_KEYS_MAX,
    GUEST_SUBTREES,
    BackendError,
    BadDomainState,
    DiskCounters,
    DomainInfo,
    DomainSpec,
    GuestData,
    HostInfo,
    NicCounters,
    NoSuchDomain,
    guest_text,
)
from xapid.backend.specs import spec_to_json
from xapid.constants import DOM0_UUID, PAGE, GiB, MiB

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
def placement(domid: int, vcpus: int, cpus: int) -> tuple[int, ...]:
    """The physical CPU each vCPU of a domain last ran on (round robin from the domid)."""
    return tuple((domid + i) % cpus for i in range(vcpus))


def xen_overhead(total: int) -> int:
    """Memory Xen keeps for itself: 64 MiB plus 1 MiB per GiB of host memory."""
    return 64 * MiB + (total // GiB) * MiB


def domain_overhead(vcpus_max: int, memory_max: int) -> int:
    """Per-domain overhead: 1 MiB per possible vCPU plus memory_max/256 (page tables), page-rounded."""
    page_tables = -(-memory_max // 256)
    return vcpus_max * MiB + -(-page_tables // PAGE) * PAGE


def host_facts(hostname: str, address: str, memory: int, cpus: int) -> HostInfo:
    """The static facts of a simulated host with *memory* bytes and *cpus* CPUs (one socket)."""
    return HostInfo(
        hostname=hostname,
        address=address,
        total_memory=memory,
        xen_version="4.17.3",
        capabilities=("xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_32p", "hvm-3.0-x86_64"),
        sched_policy="credit",
        cpu_count=cpus,
        socket_count=1,
        cores_per_socket=cpus,
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


@dataclass
class SimDomain:
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

    @classmethod
    def from_spec(cls, spec: DomainSpec, now: float, paused: bool, memory: int, vcpus: int) -> SimDomain:
        """A new guest domain for *spec* with *memory* and *vcpus* online (domid 0 until admitted)."""
        return cls(
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

    @classmethod
    def dom0(cls, now: float, memory: int, vcpus: int) -> SimDomain:
        """The control domain of a freshly booted host."""
        return cls(
            domid=0,
            uuid=DOM0_UUID,
            name="Domain-0",
            domain_type="pv",
            state="running",
            memory_target=memory,
            memory_max=memory,
            vcpus=vcpus,
            vcpus_max=vcpus,
            vcpu_time_ns=[0] * vcpus,
            since=now,
            start_time=now,
            load=DOM0_LOAD,
            cpu_base_ns=0,
            spec=None,
            disks=[],
            nics=[],
        )

    def require_state(self, wanted: str, action: str) -> None:
        """BadDomainState unless the domain is in state *wanted* (*action* names the refused call)."""
        if self.state != wanted:
            raise BadDomainState(f"cannot {action} domain {self.domid}: it is {self.state}", self.state)

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
        uuid = self.uuid
        zero = (0, 0)
        disks = []
        if self.disks:
            rd, wr = round(self.io_rate("disk_read") * dt), round(self.io_rate("disk_write") * dt)
            for d in self.disks:
                device = d["device"]
                r, w = acc.get(f"vbd:{device}", zero)
                r, w = r + rd, w + wr
                disks.append(DiskCounters(uuid, device, r, w, r // IO_REQUEST_SIZE, w // IO_REQUEST_SIZE))
        nics = []
        if self.nics:
            rx, tx = round(self.io_rate("net_rx") * dt), round(self.io_rate("net_tx") * dt)
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
        return self.memory_target + domain_overhead(self.vcpus_max, self.memory_max)

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
            self.domid, self.uuid, self.name, self.state,  # type: ignore[arg-type]  # str of the Literal's values
            self.shutdown_reason,  # type: ignore[arg-type]  # str of the Literal's values (state file)
            self.memory_target,  # memory_actual follows the target at once
            self.memory_target, self.memory_max, online, self.vcpus_max, sum(times), tuple(times[:online]),
            placement(self.domid, online, cpus), self.start_time, self.domain_type, self.domid == 0)


def guest_agent_keys(dom: SimDomain) -> dict[str, str]:
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
class SimState:
    """The whole simulated hypervisor state: what the state file holds."""

    boot_time: float
    next_domid: int
    retired_busy_ns: int  # CPU time consumed by domains that no longer exist
    domains: dict[str, SimDomain]  # by uuid
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
    def from_json(cls, data: dict[str, Any]) -> SimState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        domains = [SimDomain(**d) for d in data["domains"]]
        return cls(
            boot_time=float(data["boot_time"]),
            next_domid=int(data["next_domid"]),
            retired_busy_ns=int(data["retired_busy_ns"]),
            domains={d.uuid: d for d in domains},
            retired_net=[int(x) for x in data.get("retired_net", [0, 0])],
        )

    def ordered(self) -> list[SimDomain]:
        return sorted(self.domains.values(), key=lambda d: d.domid)

    def take_domid(self) -> int:
        domid = self.next_domid
        self.next_domid += 1
        return domid

    def busy_ns(self, now: float) -> int:
        """CPU time consumed on this host since it booted."""
        live = sum(d.cpu_time(now) - d.cpu_base_ns for d in self.domains.values())
        return self.retired_busy_ns + live

    def remove(self, dom: SimDomain, now: float) -> None:
        self.retired_busy_ns += dom.cpu_time(now) - dom.cpu_base_ns
        self.retire_net(dom, now)
        del self.domains[dom.uuid]

    def retire_net(self, dom: SimDomain, now: float, devid: int | None = None) -> None:
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

    @classmethod
    def boot(cls, now: float, dom0_memory: int, dom0_vcpus: int) -> SimState:
        """A freshly booted host with only dom0."""
        return cls(boot_time=now, next_domid=1, retired_busy_ns=0,
                   domains={DOM0_UUID: SimDomain.dom0(now, dom0_memory, dom0_vcpus)})

    def lookup(self, uuid: str) -> SimDomain:
        """The domain *uuid*; NoSuchDomain when absent."""
        try:
            return self.domains[uuid]
        except KeyError:
            raise NoSuchDomain(f"no domain with handle {uuid}", uuid) from None

    def guest(self, uuid: str, action: str) -> SimDomain:
        """The domain *uuid*, refusing the control domain."""
        dom = self.lookup(uuid)
        if dom.domid == 0:
            raise BadDomainState(f"cannot {action} the control domain", "running")
        return dom

    def admit(self, dom: SimDomain) -> None:
        """Give a new domain (one that fits) its domid and add it."""
        dom.domid = self.take_domid()
        self.domains[dom.uuid] = dom

    def rebuild(self, dom: SimDomain, now: float) -> None:
        """Reboot in place: new domid, running, CPU time reset; configuration and devices kept."""
        self.remove(dom, now)
        dom.domid = self.take_domid()
        dom.state = "running"
        dom.shutdown_reason = ""
        dom.vcpu_time_ns = [0] * dom.vcpus_max
        dom.io_acc = {}
        dom.cpu_base_ns = 0
        dom.since = now
        dom.start_time = now
        self.domains[dom.uuid] = dom


def write_suspend_image(dom: SimDomain, now: float, path: str) -> None:
    """Write the image of *dom* at *now* to the file *path* (fsynced); BackendError when it cannot."""
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


def read_suspend_image(spec: DomainSpec, path: str) -> dict[str, Any]:
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
