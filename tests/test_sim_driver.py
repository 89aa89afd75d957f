"""Sim-only behaviour: exact counters, persistence, fault injection, failure modes."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from xapid.backend.interface import (
    BackendError,
    BadDomainState,
    DiskSpec,
    DomainSpec,
    HypervisorUnavailable,
    NicSpec,
    NotEnoughMemory,
    ShutdownTimeout,
)
from xapid.backend.sim import SimBackend

MiB = 2**20
GiB = 2**30
S = 1_000_000_000  # one second in ns
DOM0 = "00000000-0000-0000-0000-000000000000"
NO_PV_DRIVERS = (("sim-no-pv-drivers", "true"),)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "state"


@pytest.fixture
def sim(state_dir: pathlib.Path, clock: Clock) -> Iterator[SimBackend]:
    backend = SimBackend(state_dir, clock.seconds)
    backend.open()
    yield backend
    backend.close()


def make_spec(**changes: Any) -> DomainSpec:
    """A 2-vCPU HVM spec (256 MiB of 512 MiB) with one disk and one nic, with *changes*."""
    spec = DomainSpec(
        uuid=str(uuid.uuid4()),
        name="guest",
        domain_type="hvm",
        memory_static_max=512 * MiB,
        memory_target=256 * MiB,
        vcpus_max=2,
        vcpus_at_startup=2,
        disks=(DiskSpec(device="xvda", path="/dev/vg/guest", mode="w"),),
        nics=(NicSpec(devid=0, mac="00:16:3e:00:00:01", bridge="xenbr0"),),
    )
    return dataclasses.replace(spec, **changes)


def state_files(state_dir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir())


def test_cpu_time_is_exact(sim: SimBackend, clock: Clock) -> None:
    """Each online vCPU runs load × elapsed time, changed loads apply from the change on."""
    uuid_ = sim.create_domain(make_spec(), paused=False).uuid
    clock.advance(10)
    info = sim.domain_info(uuid_)
    assert (info.cpu_time_ns, info.vcpu_time_ns) == (2 * S, (S, S))
    sim.set_load(uuid_, 0.5)
    clock.advance(2)
    assert sim.domain_info(uuid_).vcpu_time_ns == (2 * S, 2 * S)


def test_dom0_cpu_time(sim: SimBackend, clock: Clock) -> None:
    """dom0 runs its 4 vCPUs at load 0.05 from boot."""
    clock.advance(10)
    assert sim.domain_info(DOM0).vcpu_time_ns == (S // 2,) * 4


def test_paused_domain_does_not_accumulate(sim: SimBackend, clock: Clock) -> None:
    """CPU time grows only while the domain runs."""
    uuid_ = sim.create_domain(make_spec(), paused=True).uuid
    clock.advance(10)
    assert sim.domain_info(uuid_).cpu_time_ns == 0
    sim.unpause_domain(uuid_)
    clock.advance(5)
    sim.pause_domain(uuid_)
    clock.advance(100)
    assert sim.domain_info(uuid_).cpu_time_ns == S


def test_offline_vcpus_keep_their_time(sim: SimBackend, clock: Clock) -> None:
    """Taking a vCPU offline stops its clock but keeps its time in the domain total."""
    uuid_ = sim.create_domain(make_spec(), paused=False).uuid
    clock.advance(10)
    sim.set_vcpus(uuid_, 1)
    clock.advance(10)
    info = sim.domain_info(uuid_)
    assert (info.vcpus, info.vcpu_time_ns, info.cpu_time_ns) == (1, (2 * S,), 3 * S)


def test_memory_accounting_is_exact(sim: SimBackend) -> None:
    """Free memory = total − Xen overhead − Σ(target + 1 MiB/vCPU + max/256)."""
    dom0_usage = GiB + 4 * MiB + 4 * MiB
    assert sim.free_memory() == 16 * GiB - 80 * MiB - dom0_usage
    free = sim.free_memory()
    sim.create_domain(make_spec(), paused=False)
    assert sim.free_memory() == free - (256 * MiB + 2 * MiB + 2 * MiB)


def test_not_enough_memory_details_are_exact(sim: SimBackend) -> None:
    """NotEnoughMemory carries the domain's full usage and the free memory."""
    free = sim.free_memory()
    spec = make_spec(memory_static_max=free, memory_target=free)
    with pytest.raises(NotEnoughMemory) as caught:
        sim.create_domain(spec, paused=False)
    page_tables = -(-(free // 256) // 4096) * 4096
    assert caught.value.details == (str(free + 2 * MiB + page_tables), str(free))


def test_memory_target_growth_must_fit(sim: SimBackend) -> None:
    """Raising a target needs free memory for the growth; memory_actual follows at once."""
    uuid_ = sim.create_domain(make_spec(memory_static_max=15 * GiB), paused=False).uuid
    free = sim.free_memory()
    with pytest.raises(NotEnoughMemory) as caught:
        sim.set_memory_target(uuid_, 15 * GiB)
    assert caught.value.details == (str(15 * GiB - 256 * MiB), str(free))
    sim.set_memory_target(uuid_, 256 * MiB + free)
    info = sim.domain_info(uuid_)
    assert info.memory_actual == info.memory_target == 256 * MiB + free
    assert sim.free_memory() == 0


def test_restart_keeps_domains(state_dir: pathlib.Path, clock: Clock) -> None:
    """A new backend on the same state dir sees the same domains, domids and CPU time."""
    first = SimBackend(state_dir, clock.seconds)
    first.open()
    kept = first.create_domain(make_spec(), paused=False).uuid
    first.destroy_domain(first.create_domain(make_spec(), paused=False).uuid)
    paused = first.create_domain(make_spec(), paused=True).uuid
    first.attach_disk(kept, DiskSpec(device="xvdb", path="/dev/vg/data", mode="r"))
    clock.advance(10)
    listed, devices = first.list_domains(), first.devices(kept)
    first.close()

    second = SimBackend(state_dir, clock.seconds)
    second.open()
    assert second.list_domains() == listed
    assert second.devices(kept) == devices
    clock.advance(10)
    assert second.domain_info(kept).cpu_time_ns == 4 * S
    assert second.domain_info(paused).cpu_time_ns == 0
    assert second.create_domain(make_spec(), paused=False).domid == 4


def test_state_file_is_written_atomically(sim: SimBackend, state_dir: pathlib.Path) -> None:
    """Every change rewrites sim-state.json through a temporary file that does not linger."""
    uuid_ = sim.create_domain(make_spec(), paused=False).uuid
    sim.attach_nic(uuid_, NicSpec(devid=1, mac="00:16:3e:00:00:02", bridge="xenbr1"))
    sim.pause_domain(uuid_)
    assert state_files(state_dir) == ["sim-state.json"]
    data = json.loads((state_dir / "sim-state.json").read_text())
    (domain,) = [d for d in data["domains"] if d["uuid"] == uuid_]
    assert (domain["state"], [n["devid"] for n in domain["nics"]]) == ("paused", [0, 1])
    assert data["next_domid"] == 2


def test_reads_do_not_rewrite_state(sim: SimBackend, state_dir: pathlib.Path, clock: Clock) -> None:
    """Queries leave the state file alone."""
    before = (state_dir / "sim-state.json").stat().st_ino
    clock.advance(10)
    sim.list_domains()
    sim.read_counters()
    assert (state_dir / "sim-state.json").stat().st_ino == before


def test_state_write_failure_rolls_back(sim: SimBackend, state_dir: pathlib.Path) -> None:
    """A change that cannot be persisted fails and is undone in memory."""
    shutil.rmtree(state_dir)
    state_dir.write_text("")
    with pytest.raises(BackendError, match="cannot write sim state"):
        sim.create_domain(make_spec(), paused=False)
    assert [d.domid for d in sim.list_domains()] == [0]


def test_fault_injection_leaves_state_untouched(sim: SimBackend, state_dir: pathlib.Path) -> None:
    """An injected fault is raised for the next N calls without touching state."""
    error = NotEnoughMemory("injected", "1", "0")
    sim.inject_fault("create_domain", error, count=2)
    before = (state_dir / "sim-state.json").read_bytes()
    for _ in range(2):
        with pytest.raises(NotEnoughMemory) as caught:
            sim.create_domain(make_spec(), paused=False)
        assert caught.value is error
    assert (state_dir / "sim-state.json").read_bytes() == before
    assert [d.domid for d in sim.list_domains()] == [0]
    assert sim.create_domain(make_spec(), paused=False).domid == 1


def test_clear_faults(sim: SimBackend) -> None:
    """clear_faults drops pending faults; unknown operations are rejected."""
    uuid_ = sim.create_domain(make_spec(), paused=False).uuid
    sim.inject_fault("pause_domain", BadDomainState("injected"))
    sim.clear_faults()
    sim.pause_domain(uuid_)
    with pytest.raises(ValueError):
        sim.inject_fault("no_such_method", BackendError("x"))


def test_fault_on_open(state_dir: pathlib.Path, clock: Clock) -> None:
    """A fault injected into open fails it once."""
    backend = SimBackend(state_dir, clock.seconds)
    backend.inject_fault("open", HypervisorUnavailable("injected"))
    with pytest.raises(HypervisorUnavailable):
        backend.open()
    backend.open()
    assert len(backend.list_domains()) == 1


def test_guest_without_pv_drivers_ignores_requests(sim: SimBackend, tmp_path: pathlib.Path) -> None:
    """With the sim-no-pv-drivers flag clean shutdown, reboot and suspend time out."""
    before = sim.create_domain(make_spec(platform=NO_PV_DRIVERS), paused=False)
    for reason in ("poweroff", "reboot"):
        with pytest.raises(ShutdownTimeout):
            sim.shutdown_domain(before.uuid, reason, 5.0)
    with pytest.raises(ShutdownTimeout):
        sim.suspend_domain(before.uuid, str(tmp_path / "image"), 5.0)
    assert not (tmp_path / "image").exists()
    assert sim.domain_info(before.uuid) == before


def test_slow_guest_times_out(state_dir: pathlib.Path, clock: Clock) -> None:
    """A guest slower than the timeout (shutdown_delay) times out; a longer timeout succeeds."""
    sim = SimBackend(state_dir, clock.seconds, shutdown_delay=5.0)
    sim.open()
    uuid_ = sim.create_domain(make_spec(), paused=False).uuid
    with pytest.raises(ShutdownTimeout):
        sim.shutdown_domain(uuid_, "poweroff", 1.0)
    sim.shutdown_domain(uuid_, "poweroff", 10.0)
    assert [d.domid for d in sim.list_domains()] == [0]


def test_idle_time_is_exact_and_monotonic(sim: SimBackend, clock: Clock) -> None:
    """Idle = elapsed − busy/CPUs; it never drops on destroy or overcommit."""
    clock.advance(10)
    assert {p.idle_time_ns for p in sim.physical_cpus()} == {10 * S - S // 2}
    uuid_ = sim.create_domain(make_spec(), paused=False).uuid
    sim.set_load(uuid_, 1.0)
    clock.advance(10)
    idle = 20 * S - (4 * S + 20 * S) // 4
    assert sim.physical_cpus()[0].idle_time_ns == idle
    sim.destroy_domain(uuid_)
    assert sim.physical_cpus()[0].idle_time_ns == idle
    hog = sim.create_domain(make_spec(vcpus_max=8, vcpus_at_startup=8), paused=False).uuid
    sim.set_load(hog, 1.0)
    clock.advance(10)
    assert sim.physical_cpus()[0].idle_time_ns == idle


def test_reboot_resets_cpu_and_keeps_configuration(sim: SimBackend, clock: Clock) -> None:
    """A clean reboot restarts CPU time and start time but keeps memory, vCPUs and devices."""
    uuid_ = sim.create_domain(make_spec(), paused=False).uuid
    sim.set_memory_target(uuid_, 128 * MiB)
    sim.set_vcpus(uuid_, 1)
    sim.attach_disk(uuid_, DiskSpec(device="xvdb", path="/dev/vg/data", mode="r"))
    devices = sim.devices(uuid_)
    clock.advance(10)
    sim.shutdown_domain(uuid_, "reboot", 30.0)
    info = sim.domain_info(uuid_)
    assert (info.domid, info.cpu_time_ns, info.start_time) == (2, 0, 10.0)
    assert (info.memory_target, info.vcpus) == (128 * MiB, 1)
    assert sim.devices(uuid_) == devices


def test_suspend_image_and_exact_resume(sim: SimBackend, clock: Clock, tmp_path: pathlib.Path) -> None:
    """The image is real JSON; resumed CPU time continues exactly, host idle never drops."""
    spec = make_spec()
    sim.create_domain(spec, paused=False)
    clock.advance(10)
    image = tmp_path / "image"
    sim.suspend_domain(spec.uuid, str(image), 30.0)
    data = json.loads(image.read_text())
    assert (data["magic"], data["uuid"], data["cpu_time_ns"]) == ("xapid-sim-suspend-v1", spec.uuid, 2 * S)
    clock.advance(100)
    idle = sim.physical_cpus()[0].idle_time_ns
    sim.resume_domain(spec, str(image), paused=False)
    assert sim.physical_cpus()[0].idle_time_ns == idle
    clock.advance(10)
    assert sim.domain_info(spec.uuid).cpu_time_ns == 4 * S


def test_resume_refuses_bad_images(sim: SimBackend, tmp_path: pathlib.Path) -> None:
    """Missing, corrupt and foreign images are refused, naming the problem."""
    other = make_spec()
    sim.create_domain(other, paused=False)
    sim.suspend_domain(other.uuid, str(tmp_path / "other"), 30.0)
    (tmp_path / "corrupt").write_text("{not json")
    spec = make_spec()
    for name, problem in (("absent", "cannot read"), ("corrupt", "corrupt"), ("other", "belongs to")):
        with pytest.raises(BackendError, match=problem):
            sim.resume_domain(spec, str(tmp_path / name), paused=False)
    assert [d.domid for d in sim.list_domains()] == [0]


def test_suspend_into_missing_directory(sim: SimBackend, tmp_path: pathlib.Path) -> None:
    """A suspend image that cannot be written fails and leaves the domain running."""
    before = sim.create_domain(make_spec(), paused=False)
    with pytest.raises(BackendError, match="cannot write suspend image"):
        sim.suspend_domain(before.uuid, str(tmp_path / "missing" / "image"), 30.0)
    assert sim.domain_info(before.uuid) == before


def test_devices_are_tracked(sim: SimBackend) -> None:
    """Build-time devices and hot-plugs show up in devices()."""
    spec = make_spec()
    sim.create_domain(spec, paused=True)
    disk = DiskSpec(device="xvdd", path="", mode="r", kind="cdrom")
    sim.attach_disk(spec.uuid, disk)
    sim.detach_nic(spec.uuid, 0)
    assert sim.devices(spec.uuid) == {"disks": (spec.disks[0], disk), "nics": ()}


def test_counters_are_one_batch(sim: SimBackend, clock: Clock) -> None:
    """read_counters reports every domain and pCPU at one clock reading."""
    sim.create_domain(make_spec(), paused=False)
    clock.advance(3)
    counters = sim.read_counters()
    assert counters.timestamp == 3.0
    assert [d.domid for d in counters.domains] == [0, 1]
    assert [p.number for p in counters.pcpus] == [0, 1, 2, 3]
    assert (counters.free_memory, counters.total_memory) == (sim.free_memory(), 16 * GiB)


def test_io_counters_follow_load(sim: SimBackend, clock: Clock) -> None:
    """Disk and nic counters grow at IO_RATES × load while running, requests are 64 KiB each."""
    spec = make_spec()
    sim.create_domain(spec, paused=False)  # load 0.1
    clock.advance(10)
    counters = sim.read_counters()
    (disk,) = counters.disks
    assert (disk.uuid, disk.device) == (spec.uuid, "xvda")
    assert (disk.read_bytes, disk.write_bytes) == (round(0.1 * 4 * MiB * 10), round(0.1 * 2 * MiB * 10))
    assert (disk.read_reqs, disk.write_reqs) == (disk.read_bytes // 65536, disk.write_bytes // 65536)
    (nic,) = counters.nics
    assert (nic.uuid, nic.devid, nic.rx_bytes, nic.tx_bytes) == (spec.uuid, 0, round(0.1 * MiB * 10), round(0.1 * 512 * 1024 * 10))
    sim.pause_domain(spec.uuid)
    clock.advance(50)
    assert sim.read_counters().disks == counters.disks


def test_set_io_fixes_rates(sim: SimBackend, clock: Clock) -> None:
    """set_io fixes a device rate from the call on; None goes back to the load-proportional rate."""
    spec = make_spec()
    sim.create_domain(spec, paused=False)
    sim.set_load(spec.uuid, 0.0)
    sim.set_io(spec.uuid, disk_read=1000, net_tx=500)
    clock.advance(4)
    counters = sim.read_counters()
    assert (counters.disks[0].read_bytes, counters.disks[0].write_bytes) == (4000, 0)
    assert (counters.nics[0].rx_bytes, counters.nics[0].tx_bytes) == (0, 2000)
    sim.set_io(spec.uuid, disk_read=None)
    clock.advance(4)
    assert sim.read_counters().disks[0].read_bytes == 4000
    with pytest.raises(ValueError):
        sim.set_io(spec.uuid, disk_rd=1)


def test_io_counters_reset_on_reboot(sim: SimBackend, clock: Clock) -> None:
    """A rebuilt domain's device counters start again from zero."""
    spec = make_spec()
    sim.create_domain(spec, paused=False)
    clock.advance(10)
    sim.reboot_domain(spec.uuid)
    clock.advance(1)
    assert sim.read_counters().disks[0].read_bytes == round(0.1 * 4 * MiB)


def test_pif_counters_are_monotonic(sim: SimBackend, clock: Clock) -> None:
    """eth0 carries a base rate plus every guest's traffic, kept when a domain goes away."""
    spec = make_spec()
    sim.set_io(DOM0, net_rx=0)  # dom0 has no nics: no effect
    sim.create_domain(spec, paused=False)
    sim.set_io(spec.uuid, net_rx=100, net_tx=10)
    clock.advance(10)
    (pif,) = sim.read_counters().pifs
    assert (pif.device, pif.rx_bytes, pif.tx_bytes) == ("eth0", 10 * 1000 + 1000, 10 * 1000 + 100)
    sim.destroy_domain(spec.uuid)
    clock.advance(1)
    (pif,) = sim.read_counters().pifs
    assert (pif.rx_bytes, pif.tx_bytes) == (11 * 1000 + 1000, 11 * 1000 + 100)


def test_io_counters_survive_restart(state_dir: pathlib.Path, clock: Clock) -> None:
    """Device counters and overrides are part of the persisted state."""
    sim = SimBackend(state_dir, clock.seconds)
    sim.open()
    spec = make_spec()
    sim.create_domain(spec, paused=False)
    sim.set_io(spec.uuid, disk_write=100)
    clock.advance(5)
    before = sim.read_counters()
    sim.close()
    again = SimBackend(state_dir, clock.seconds)
    again.open()
    assert again.read_counters() == before
    clock.advance(1)
    assert again.read_counters().disks[0].write_bytes == 600


def test_host_info(sim: SimBackend) -> None:
    """Host facts come from the constructor and the fixed simulated CPU."""
    host = sim.host_info()
    assert (host.hostname, host.xen_version, host.cpu_count, host.sched_policy) == (
        "xapid-sim",
        "4.17.3",
        4,
        "credit",
    )
    assert host.bios_strings["system-product-name"] == "sim"


def test_concurrent_creates_get_unique_domids(sim: SimBackend) -> None:
    """Creates from several threads get distinct, gap-free domids."""
    threads = [
        threading.Thread(target=lambda: [sim.create_domain(make_spec(), paused=True) for _ in range(5)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [d.domid for d in sim.list_domains()] == list(range(21))


def test_unusable_state_dir(tmp_path: pathlib.Path, clock: Clock) -> None:
    """A state dir under a regular file makes open raise HypervisorUnavailable."""
    (tmp_path / "file").write_text("")
    backend = SimBackend(tmp_path / "file" / "state", clock.seconds)
    with pytest.raises(HypervisorUnavailable, match="sim state directory"):
        backend.open()


def test_corrupt_state_file(state_dir: pathlib.Path, clock: Clock) -> None:
    """A corrupt state file makes open raise HypervisorUnavailable."""
    state_dir.mkdir()
    (state_dir / "sim-state.json").write_text('{"version": 1}')
    with pytest.raises(HypervisorUnavailable, match="corrupt"):
        SimBackend(state_dir, clock.seconds).open()


def test_calls_need_open(state_dir: pathlib.Path, clock: Clock) -> None:
    """Calls before open or after close raise HypervisorUnavailable; close is idempotent."""
    backend = SimBackend(state_dir, clock.seconds)
    with pytest.raises(HypervisorUnavailable):
        backend.list_domains()
    backend.open()
    backend.close()
    backend.close()
    with pytest.raises(HypervisorUnavailable):
        backend.free_memory()


def test_dom0_must_fit(state_dir: pathlib.Path, clock: Clock) -> None:
    """A host too small for its dom0 is a configuration error."""
    with pytest.raises(ValueError):
        SimBackend(state_dir, clock.seconds, memory=GiB, dom0_memory=GiB)
