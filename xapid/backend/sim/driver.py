"""The ``sim`` driver: :class:`SimBackend`, the :class:`~xapid.backend.interface.IBackend` of a strict,
persistent, deterministic simulated Xen host (its model: :mod:`xapid.backend.sim.model`).

It refuses what a real hypervisor would refuse (see :func:`xapid.backend.specs.validate_spec` and the
per-operation state checks), keeps its domain table in ``<state_dir>/sim-state.json``
(rewritten atomically after every change, so domains "keep running" across daemon
restarts) and derives every counter from the injected clock, never from wall time.  Every call
runs under one lock; a call that changes the state is a transaction (see :meth:`SimBackend._operation`).

Sim-only helpers for tests: :meth:`SimBackend.devices`, :meth:`SimBackend.set_load`,
:meth:`SimBackend.set_io`, :meth:`SimBackend.guest_shutdown`, :meth:`SimBackend.inject_fault`,
:meth:`SimBackend.clear_faults`, :meth:`SimBackend.set_guest_agent` (the simulated guest agent: by
default :func:`~xapid.backend.sim.model.guest_agent_keys`).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from zope.interface import implementer
from zope.interface.interface import Method

from xapid.backend.interface import (
    BackendError,
    BadDomainState,
    ConsoleEndpoint,
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
    NoConsole,
    NotEnoughMemory,
    PhysicalCPU,
    PhysicalNic,
    PifCounters,
    ShutdownTimeout,
)
from xapid.backend.sim.counters import CounterFrame
from xapid.backend.sim.model import (
    IO_RATES,
    NS,
    PIF_BASE_RATE,
    STATE_FILE,
    SimDomain,
    SimState,
    domain_overhead,
    host_facts,
    read_suspend_image,
    write_suspend_image,
    xen_overhead,
)
from xapid.backend.specs import (
    MIN_DOMAIN_MEMORY,
    BootPolicy,
    check_limits,
    validate_disk,
    validate_nic,
    validate_spec,
)
from xapid.constants import GiB
from xapid.files import write_atomically


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
        dom0_usage = dom0_memory + domain_overhead(dom0_vcpus, dom0_memory)
        if dom0_usage > memory - xen_overhead(memory):
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
        self._state: SimState | None = None
        self._idle_floor_ns = 0
        self._frames: dict[str, CounterFrame] = {}  # per domain uuid, for read_counters
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
                state = self._load() or SimState.boot(self._clock(), self._dom0_memory, self._dom0_vcpus)
                self._save(state.dumps())
            except OSError as e:
                raise HypervisorUnavailable(f"sim state directory {self._dir}: {e.strerror or e}") from e
            self._state = state
            self._idle_floor_ns = 0

    def close(self) -> None:
        """Forget the in-memory state (the state file stays); idempotent."""
        with self._lock:
            self._state = None

    def _load(self) -> SimState | None:
        path = self._dir / STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return SimState.from_json(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise HypervisorUnavailable(f"corrupt sim state file {path}: {e}") from e

    def _save(self, text: str) -> None:
        """Write the state file atomically (mode as ``open(path, "w")``)."""
        write_atomically(self._dir / STATE_FILE, text, mode=None)

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[SimState]:
        """Run a call that only reads, under the lock (no snapshot, nothing to persist)."""
        with self._lock:
            self._take_fault(name)
            if self._state is None:
                raise HypervisorUnavailable("sim backend is not open")
            yield self._state

    @contextlib.contextmanager
    def _operation(self, name: str) -> Iterator[SimState]:
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
                self._state = SimState.from_json(json.loads(before))
                raise
            after = self._state.dumps()
            if after != before:
                try:
                    self._save(after)
                except OSError as e:
                    self._state = SimState.from_json(json.loads(before))
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
            return host_facts(self._hostname, self._address, self._memory, self._cpus)

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
        """One consistent batch of counters at a single clock reading (each domain computed once,
        from its :class:`CounterFrame`: what does not depend on the time is computed only when
        the domain changes)."""
        with self._reading("read_counters") as state:
            now = self._clock()
            disks: list[DiskCounters] = []
            nics: list[NicCounters] = []
            domains: list[DomainInfo] = []
            cpus = self._cpus
            busy = state.retired_busy_ns
            rx, tx = state.retired_net
            used = 0
            frames = self._frames
            if len(frames) > len(state.domains):  # domains gone: drop their frames
                self._frames = frames = {u: f for u, f in frames.items() if u in state.domains}
            for uuid, dom in state.domains.items():  # the order does not matter here: no sort per tick
                frame = frames.get(uuid)
                if frame is None or not frame.current(dom, cpus):  # a load change rebuilds only the rates
                    frame = frames[uuid] = CounterFrame(dom, cpus)
                info = frame.into(now, domains, disks, nics)
                used += frame.usage
                busy += info[10] - frame.cpu_base_ns  # cpu_time_ns
            rx += sum([n[2] for n in nics])  # rx_bytes
            tx += sum([n[3] for n in nics])  # tx_bytes
            return Counters(
                timestamp=now,
                domains=tuple(domains),
                pcpus=tuple(self._pcpus(state, now, busy)),
                free_memory=self._memory - xen_overhead(self._memory) - used,  # as _free, in the same pass
                total_memory=self._memory,
                disks=tuple(disks),
                nics=tuple(nics),
                pifs=tuple(self._pifs(state, now, (rx, tx))),
            )

    def _pifs(self, state: SimState, now: float, totals: tuple[int, int] | None = None) -> list[PifCounters]:
        """Every PIF: a base rate each way since boot; eth0 also carries all guest traffic."""
        base = round(max(0.0, now - state.boot_time) * PIF_BASE_RATE)
        rx, tx = totals if totals is not None else state.net_totals(now)
        return [PifCounters(f"eth{i}", base + (rx if i == 0 else 0), base + (tx if i == 0 else 0))
                for i in range(self.nics)]

    def _free(self, state: SimState) -> int:
        used = sum(d.usage() for d in state.domains.values())
        return self._memory - xen_overhead(self._memory) - used

    def _pcpus(self, state: SimState, now: float, busy: int | None = None) -> list[PhysicalCPU]:
        """Idle = time since boot − busy time / CPUs; held when overcommitted, so never decreasing."""
        elapsed = round(max(0.0, now - state.boot_time) * NS)
        busy = state.busy_ns(now) if busy is None else busy
        idle = max(self._idle_floor_ns, elapsed - busy // self._cpus)
        self._idle_floor_ns = idle
        return [PhysicalCPU(number=i, idle_time_ns=idle) for i in range(self._cpus)]

    def _check_fits(self, state: SimState, needed: int, what: str) -> None:
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
            return state.lookup(uuid).info(self._clock(), self._cpus)

    def devices(self, uuid: str) -> dict[str, tuple[Any, ...]]:
        """Sim only: the disks and nics a domain currently has, as ``{"disks": …, "nics": …}``."""
        with self._reading("devices") as state:
            dom = state.lookup(uuid)
            return {
                "disks": tuple(DiskSpec(**d) for d in dom.disks),
                "nics": tuple(NicSpec(**n) for n in dom.nics),
            }

    def set_load(self, uuid: str, load: float) -> None:
        """Sim only: the fraction of time each online vCPU of the domain runs (0..1)."""
        if not 0.0 <= load <= 1.0:
            raise ValueError(f"load {load} not in 0..1")
        with self._operation("set_load") as state:
            dom = state.lookup(uuid)
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
            dom = state.lookup(uuid)
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
            dom = state.guest(uuid, "shut down")
            dom.require_state("running", "shut down")
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
            state.guest(uuid, "set the guest agent of").agent = None if keys is None else dict(keys)

    def guest_data(self, uuid: str) -> GuestData:
        """The agent's keys and the console's location (see :meth:`SimDomain.guest_data`)."""
        with self._reading("guest_data") as state:
            return state.lookup(uuid).guest_data()

    def console_endpoint(self, uuid: str, protocol: str) -> ConsoleEndpoint:
        """The simulated console (served in-process by :mod:`xapid.console`): a ``vt100`` serial
        console for every running or paused domain, an ``rfb`` one for HVM guests only."""
        with self._reading("console_endpoint") as state:
            dom = state.lookup(uuid)
            if dom.state not in ("running", "paused"):
                raise BadDomainState(f"domain {uuid} is {dom.state}: it has no console", dom.state)
            if protocol not in ("vt100", "rfb") or (protocol == "rfb" and dom.domain_type != "hvm"):
                raise NoConsole(f"domain {uuid} has no {protocol} console", uuid, protocol)
            return ConsoleEndpoint(protocol, "sim", name=dom.name)

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
            dom = state.guest(uuid, "destroy")
            state.remove(dom, self._clock())

    def pause_domain(self, uuid: str) -> None:
        """Pause a running domain."""
        with self._operation("pause_domain") as state:
            dom = state.guest(uuid, "pause")
            dom.require_state("running", "pause")
            dom.checkpoint(self._clock())
            dom.state = "paused"

    def unpause_domain(self, uuid: str) -> None:
        """Unpause a paused domain."""
        with self._operation("unpause_domain") as state:
            dom = state.guest(uuid, "unpause")
            dom.require_state("paused", "unpause")
            dom.since = self._clock()
            dom.state = "running"

    def shutdown_domain(self, uuid: str, reason: str, timeout: float) -> None:
        """Clean shutdown: 'poweroff' removes the domain, 'reboot' rebuilds it with a new domid."""
        if reason not in ("poweroff", "reboot"):
            raise BackendError(f"unknown shutdown reason {reason!r}", reason)
        with self._operation("shutdown_domain") as state:
            dom = state.guest(uuid, "shut down")
            dom.require_state("running", f"{reason} cleanly")
            self._request_guest(dom, reason, timeout)
            now = self._clock()
            if reason == "poweroff":
                state.remove(dom, now)
            else:
                state.rebuild(dom, now)

    def reboot_domain(self, uuid: str) -> DomainInfo:
        """Hard reboot: rebuild at once with a new domid, running, CPU time reset."""
        with self._operation("reboot_domain") as state:
            dom = state.guest(uuid, "reboot")
            now = self._clock()
            state.rebuild(dom, now)
            return dom.info(now, self._cpus)

    def suspend_domain(self, uuid: str, path: str, timeout: float) -> None:
        """Write a running domain's image to the file *path*, then remove the domain."""
        with self._operation("suspend_domain") as state:
            dom = state.guest(uuid, "suspend")
            dom.require_state("running", "suspend")
            self._request_guest(dom, "suspend", timeout)
            now = self._clock()
            write_suspend_image(dom, now, path)
            state.remove(dom, now)

    def resume_domain(self, spec: DomainSpec, path: str, paused: bool) -> DomainInfo:
        """Rebuild the domain of *spec* from its image at *path*; its CPU time continues."""
        with self._operation("resume_domain") as state:
            self._check_buildable(state, spec)
            image = read_suspend_image(spec, path)
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
            dom = state.lookup(uuid)
            if not 1 <= count <= dom.vcpus_max:
                raise InvalidSpec(f"vCPU count {count} not in 1..{dom.vcpus_max}")
            dom.checkpoint(self._clock())
            dom.vcpus = count

    def set_memory_target(self, uuid: str, target: int) -> None:
        """Set the balloon target; memory_actual follows at once, growth must fit free memory."""
        with self._operation("set_memory_target") as state:
            dom = state.lookup(uuid)
            if not MIN_DOMAIN_MEMORY <= target <= dom.memory_max:
                raise InvalidSpec(f"memory target {target} not in {MIN_DOMAIN_MEMORY}..{dom.memory_max}")
            if target > dom.memory_target:
                self._check_fits(state, target - dom.memory_target, f"domain {dom.domid}")
            dom.memory_target = target

    def attach_disk(self, uuid: str, disk: DiskSpec) -> None:
        """Hot-plug a disk; InvalidSpec when the device name is taken."""
        with self._operation("attach_disk") as state:
            dom = state.lookup(uuid)
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
            dom = state.lookup(uuid)
            kept = [d for d in dom.disks if d["device"] != device]
            if len(kept) == len(dom.disks):
                raise InvalidSpec(f"domain {dom.domid} has no disk {device}")
            dom.checkpoint(self._clock())
            dom.io_acc.pop(f"vbd:{device}", None)
            dom.disks = kept

    def attach_nic(self, uuid: str, nic: NicSpec) -> None:
        """Hot-plug a network card; InvalidSpec when the devid is taken."""
        with self._operation("attach_nic") as state:
            dom = state.lookup(uuid)
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
            dom = state.lookup(uuid)
            kept = [n for n in dom.nics if n["devid"] != devid]
            if len(kept) == len(dom.nics):
                raise InvalidSpec(f"domain {dom.domid} has no nic {devid}")
            now = self._clock()
            dom.checkpoint(now)
            state.retire_net(dom, now, devid)
            dom.io_acc.pop(f"vif:{devid}", None)
            dom.nics = kept

    # -- helpers -----------------------------------------------------------------------

    def _request_guest(self, dom: SimDomain, request: str, timeout: float) -> None:
        """Ask the guest to act; ShutdownTimeout when it would not within *timeout*."""
        if dom.ignores_requests() or self._shutdown_delay > timeout:
            raise ShutdownTimeout(f"domain {dom.domid} did not {request} within {timeout}s")

    def _check_buildable(self, state: SimState, spec: DomainSpec) -> None:
        """Refuse an invalid spec (host paths as the xen driver judges them) or one whose handle is taken."""
        validate_spec(spec, self.boot_policy)
        if spec.uuid in state.domains:
            raise InvalidSpec(f"a domain with handle {spec.uuid} already exists")

    def _build(
        self, state: SimState, spec: DomainSpec, now: float, paused: bool, memory: int, vcpus: int
    ) -> SimDomain:
        """Add a domain for *spec* with *memory* and *vcpus* online; NotEnoughMemory when it won't fit."""
        dom = SimDomain.from_spec(spec, now, paused, memory, vcpus)
        self._check_fits(state, dom.usage(), f"domain {spec.name!r}")
        state.admit(dom)
        return dom
