"""The IBackend contract: behaviour every driver must share.

Each entry of DRIVERS builds an unopened driver from a state directory, a fake clock and the
pytest request (for fixtures such as the fake Xen host).  ``xen`` runs on the fake Xen host of
tests/xenfakes.py: fake hypervisor and libxl builder, the real libxenlight parsing every
config, the real C xenstored, cooperative fake guests; the clock advances hypervisor time too.
Tests use only IBackend methods and the clock's ``advance``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from xapid.backend.interface import (
    GUEST_KEYS_MAX,
    GUEST_VALUE_MAX,
    BackendError,
    BadDomainState,
    DiskSpec,
    DomainSpec,
    IBackend,
    InvalidSpec,
    NicSpec,
    NoSuchDomain,
    NotEnoughMemory,
)
from xapid.backend.sim import SimBackend

MiB = 2**20
DOM0 = "00000000-0000-0000-0000-000000000000"


class FakeClock:
    """A manually advanced clock (seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now

    def advance(self, amount: float) -> None:
        self.now += amount


def _xen(path: pathlib.Path, clock: FakeClock, request: pytest.FixtureRequest) -> Any:
    fakes = request.getfixturevalue("xen_fakes")
    advance = clock.advance

    def advance_both(amount: float) -> None:
        advance(amount)
        fakes.advance(amount)

    clock.advance = advance_both  # type: ignore[method-assign]
    return fakes.backend(path / "state", clock.seconds)


DRIVERS: dict[str, Callable[[pathlib.Path, FakeClock, pytest.FixtureRequest], Any]] = {
    "sim": lambda path, clock, request: SimBackend(path / "state", clock.seconds),
    "xen": _xen,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(DRIVERS))
def driver(request: pytest.FixtureRequest, tmp_path: pathlib.Path, clock: FakeClock) -> Iterator[Any]:
    backend = DRIVERS[request.param](tmp_path, clock, request)
    backend.open()
    yield backend
    backend.close()


def make_spec(**changes: Any) -> DomainSpec:
    """A small valid PV spec with a fresh handle, with *changes* applied."""
    spec = DomainSpec(
        uuid=str(uuid.uuid4()),
        name="guest",
        domain_type="pv",
        memory_static_max=512 * MiB,
        memory_target=256 * MiB,
        vcpus_max=4,
        vcpus_at_startup=2,
        kernel="/var/lib/xcp/guest/vmlinuz",
        disks=(DiskSpec(device="xvda", path="/dev/vg/guest", mode="w"),),
        nics=(NicSpec(devid=0, mac="00:16:3e:00:00:01", bridge="xenbr0"),),
    )
    return dataclasses.replace(spec, **changes)


def test_driver_provides_interface(driver: Any) -> None:
    """The driver fully provides IBackend."""
    assert verifyObject(IBackend, driver)


def test_dom0_is_listed_first_as_control_domain(driver: Any) -> None:
    """dom0 exists at domid 0, running, as the control domain."""
    dom0 = driver.list_domains()[0]
    assert (dom0.domid, dom0.uuid, dom0.state, dom0.is_control_domain) == (0, DOM0, "running", True)
    assert driver.domain_info(DOM0) == dom0


def test_host_info_and_memory_are_consistent(driver: Any) -> None:
    """Host facts agree with physical CPUs and counters."""
    host = driver.host_info()
    assert len(driver.physical_cpus()) == host.cpu_count
    counters = driver.read_counters()
    assert counters.total_memory == host.total_memory
    assert 0 < counters.free_memory == driver.free_memory() < host.total_memory
    assert [d.domid for d in counters.domains] == [d.domid for d in driver.list_domains()]


def test_create_lists_running_domains_with_increasing_domids(driver: Any) -> None:
    """Created domains run and get increasing domids, listed in domid order."""
    first = driver.create_domain(make_spec(), paused=False)
    second = driver.create_domain(make_spec(), paused=False)
    assert 0 < first.domid < second.domid
    assert (first.state, first.vcpus, first.memory_target) == ("running", 2, 256 * MiB)
    assert first.is_control_domain is False
    listed = driver.list_domains()
    assert [d.domid for d in listed] == sorted(d.domid for d in listed)
    assert {first.uuid, second.uuid} <= {d.uuid for d in listed}


def test_create_takes_memory(driver: Any) -> None:
    """A new domain takes at least its target from free memory."""
    free = driver.free_memory()
    driver.create_domain(make_spec(), paused=False)
    assert driver.free_memory() <= free - 256 * MiB


def test_create_paused(driver: Any) -> None:
    """A domain created paused stays paused."""
    info = driver.create_domain(make_spec(), paused=True)
    assert driver.domain_info(info.uuid).state == "paused"


def test_pause_and_unpause(driver: Any) -> None:
    """pause/unpause toggle the state and refuse the wrong starting state."""
    uuid_ = driver.create_domain(make_spec(), paused=False).uuid
    with pytest.raises(BadDomainState):
        driver.unpause_domain(uuid_)
    driver.pause_domain(uuid_)
    assert driver.domain_info(uuid_).state == "paused"
    with pytest.raises(BadDomainState):
        driver.pause_domain(uuid_)
    driver.unpause_domain(uuid_)
    assert driver.domain_info(uuid_).state == "running"


def test_destroy_removes_domain(driver: Any) -> None:
    """A destroyed domain is gone and its memory returns."""
    free = driver.free_memory()
    uuid_ = driver.create_domain(make_spec(), paused=True).uuid
    driver.destroy_domain(uuid_)
    assert uuid_ not in {d.uuid for d in driver.list_domains()}
    assert driver.free_memory() == free


def test_clean_poweroff_removes_domain(driver: Any) -> None:
    """A clean poweroff leaves no domain behind."""
    uuid_ = driver.create_domain(make_spec(), paused=False).uuid
    driver.shutdown_domain(uuid_, "poweroff", 30.0)
    with pytest.raises(NoSuchDomain):
        driver.domain_info(uuid_)


def test_clean_reboot_gets_new_domid(driver: Any) -> None:
    """A clean reboot rebuilds the same domain, running, under a new domid."""
    before = driver.create_domain(make_spec(), paused=False)
    driver.shutdown_domain(before.uuid, "reboot", 30.0)
    after = driver.domain_info(before.uuid)
    assert after.domid > before.domid
    assert after.state == "running"


def test_paused_domain_cannot_shut_down_cleanly(driver: Any) -> None:
    """A paused guest cannot act on a clean shutdown request."""
    uuid_ = driver.create_domain(make_spec(), paused=True).uuid
    with pytest.raises(BadDomainState):
        driver.shutdown_domain(uuid_, "poweroff", 30.0)
    assert driver.domain_info(uuid_).state == "paused"


@pytest.mark.parametrize("paused", [False, True])
def test_hard_reboot(driver: Any, paused: bool) -> None:
    """A hard reboot from running or paused yields a running domain with a new domid."""
    before = driver.create_domain(make_spec(), paused=paused)
    after = driver.reboot_domain(before.uuid)
    assert after.uuid == before.uuid
    assert after.domid > before.domid
    assert after.state == "running"
    assert driver.domain_info(before.uuid) == after


@pytest.mark.parametrize("paused", [False, True])
def test_suspend_then_resume(driver: Any, clock: FakeClock, tmp_path: pathlib.Path, paused: bool) -> None:
    """Suspend writes a real image and removes the domain; resume rebuilds it, CPU time kept."""
    spec = make_spec()
    before = driver.create_domain(spec, paused=False)
    clock.advance(10)
    cpu = driver.domain_info(spec.uuid).cpu_time_ns
    image = tmp_path / "image"
    driver.suspend_domain(spec.uuid, str(image), 30.0)
    assert image.is_file() and image.stat().st_size > 0
    with pytest.raises(NoSuchDomain):
        driver.domain_info(spec.uuid)
    after = driver.resume_domain(spec, str(image), paused=paused)
    assert after.domid > before.domid
    assert after.state == ("paused" if paused else "running")
    assert after.cpu_time_ns >= cpu > 0
    assert after.vcpus == before.vcpus


def test_suspend_needs_running_domain(driver: Any, tmp_path: pathlib.Path) -> None:
    """Only a running domain can be suspended."""
    uuid_ = driver.create_domain(make_spec(), paused=True).uuid
    with pytest.raises(BadDomainState):
        driver.suspend_domain(uuid_, str(tmp_path / "image"), 30.0)
    assert driver.domain_info(uuid_).state == "paused"


def test_resume_missing_image(driver: Any, tmp_path: pathlib.Path) -> None:
    """Resuming from a missing image fails and builds nothing."""
    spec = make_spec()
    with pytest.raises(BackendError):
        driver.resume_domain(spec, str(tmp_path / "absent"), paused=False)
    with pytest.raises(NoSuchDomain):
        driver.domain_info(spec.uuid)


def test_not_enough_memory(driver: Any) -> None:
    """A domain bigger than free memory is refused with needed/available details."""
    free = driver.free_memory()
    size = free + 1024 * MiB
    spec = make_spec(memory_static_max=size, memory_target=size)
    with pytest.raises(NotEnoughMemory) as caught:
        driver.create_domain(spec, paused=False)
    needed, available = (int(v) for v in caught.value.details)
    assert needed >= size > available == free
    assert driver.free_memory() == free
    with pytest.raises(NoSuchDomain):
        driver.domain_info(spec.uuid)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"vcpus_max": 0, "vcpus_at_startup": 0}, id="no-vcpus"),
        pytest.param({"vcpus_max": 513, "vcpus_at_startup": 1}, id="too-many-vcpus"),
        pytest.param({"vcpus_at_startup": 0}, id="none-at-startup"),
        pytest.param({"vcpus_at_startup": 5}, id="startup-above-max"),
        pytest.param({"memory_target": 1024 * MiB}, id="target-above-max"),
        pytest.param({"memory_static_max": 8 * MiB, "memory_target": 8 * MiB}, id="too-little-memory"),
        pytest.param({"kernel": "", "bootloader": ""}, id="pv-without-kernel"),
        pytest.param({"domain_type": "hvm-ish"}, id="unknown-type"),
        pytest.param({"uuid": "not-a-uuid"}, id="bad-handle"),
        pytest.param({"domain_type": "hvm", "firmware": "coreboot"}, id="unknown-firmware"),
        pytest.param({"on_crash": "explode"}, id="unknown-crash-action"),
        pytest.param(
            {"disks": (DiskSpec("xvda", "/a", "w"), DiskSpec("xvda", "/b", "w"))}, id="duplicate-disk"
        ),
        pytest.param(
            {"nics": (NicSpec(0, "00:16:3e:00:00:01", "br"), NicSpec(0, "00:16:3e:00:00:02", "br"))},
            id="duplicate-nic",
        ),
    ],
)
def test_invalid_spec(driver: Any, changes: dict[str, Any]) -> None:
    """Specs a hypervisor would refuse raise InvalidSpec and build nothing."""
    count = len(driver.list_domains())
    with pytest.raises(InvalidSpec):
        driver.create_domain(make_spec(**changes), paused=False)
    assert len(driver.list_domains()) == count


def test_hvm_needs_no_kernel(driver: Any) -> None:
    """An HVM domain builds without kernel or bootloader."""
    info = driver.create_domain(make_spec(domain_type="hvm", kernel=""), paused=False)
    assert info.domain_type == "hvm"


def test_duplicate_handle_is_refused(driver: Any) -> None:
    """A second domain with an existing handle is refused, dom0's included."""
    spec = make_spec()
    driver.create_domain(spec, paused=False)
    for uuid_ in (spec.uuid, DOM0):
        with pytest.raises(InvalidSpec):
            driver.create_domain(make_spec(uuid=uuid_), paused=False)


def test_set_vcpus_bounds(driver: Any) -> None:
    """Online vCPUs can be set within 1..vcpus_max only."""
    uuid_ = driver.create_domain(make_spec(), paused=False).uuid
    driver.set_vcpus(uuid_, 4)
    assert driver.domain_info(uuid_).vcpus == 4
    for count in (0, 5):
        with pytest.raises(InvalidSpec):
            driver.set_vcpus(uuid_, count)
    assert driver.domain_info(uuid_).vcpus == 4


def test_set_memory_target_bounds(driver: Any) -> None:
    """The memory target can be set up to memory_max only."""
    uuid_ = driver.create_domain(make_spec(), paused=False).uuid
    driver.set_memory_target(uuid_, 128 * MiB)
    assert driver.domain_info(uuid_).memory_target == 128 * MiB
    with pytest.raises(InvalidSpec):
        driver.set_memory_target(uuid_, 512 * MiB + 1)
    assert driver.domain_info(uuid_).memory_target == 128 * MiB


def test_device_hotplug_refusals(driver: Any) -> None:
    """Attaching a taken device or detaching an absent one is refused."""
    uuid_ = driver.create_domain(make_spec(), paused=False).uuid
    with pytest.raises(InvalidSpec):
        driver.attach_disk(uuid_, DiskSpec(device="xvda", path="/dev/vg/other", mode="w"))
    with pytest.raises(InvalidSpec):
        driver.attach_nic(uuid_, NicSpec(devid=0, mac="00:16:3e:00:00:02", bridge="xenbr0"))
    driver.attach_disk(uuid_, DiskSpec(device="xvdb", path="/dev/vg/data", mode="r"))
    driver.attach_nic(uuid_, NicSpec(devid=1, mac="00:16:3e:00:00:02", bridge="xenbr0"))
    driver.detach_disk(uuid_, "xvdb")
    driver.detach_nic(uuid_, 1)
    with pytest.raises(InvalidSpec):
        driver.detach_disk(uuid_, "xvdb")
    with pytest.raises(InvalidSpec):
        driver.detach_nic(uuid_, 1)


def publish(driver: Any, uuid_: str, keys: dict[str, str]) -> None:
    """The guest agent of the domain writes *keys* (relative to its xenstore home): through the sim's
    simulated agent, or into the real xenstored of the fake Xen host."""
    if driver.name == "sim":
        driver.set_guest_agent(uuid_, keys)
        return
    from xapid.backend.xen.xenstore import XenStore

    xs = XenStore()
    try:
        for key, value in keys.items():
            xs.write(f"/local/domain/{driver.domain_info(uuid_).domid}/{key}", value)
    finally:
        xs.close()


AGENT = {
    "data/os_name": "Debian GNU/Linux 12 (bookworm)", "data/os_uname": "6.1.0-18-amd64",
    "attr/PVAddons/MajorVersion": "8", "attr/vif/0/ipv4/0": "10.0.0.2", "attr/vif/0/ipv6/0": "fe80::1",
    "control/feature-poweroff": "1", "feature/hotplug/vif": "1", "data/updated": "1",
}


def test_guest_data_reports_the_agents_keys(driver: Any) -> None:
    """What the guest agent writes under data/, attr/, control/, feature/ is reported verbatim;
    the console facts have their types ("" / -1 when unknown)."""
    uuid_ = driver.create_domain(make_spec(), paused=False).uuid
    publish(driver, uuid_, {**AGENT, "private/note": "not the agent's"})
    data = driver.guest_data(uuid_)
    assert {k: data.agent[k] for k in AGENT if k in data.agent} == AGENT
    assert "private/note" not in data.agent
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in data.agent.items())
    assert isinstance(data.pv_drivers_detected, bool)
    assert isinstance(data.tty, str) and isinstance(data.vnc_listen, str)
    assert data.vnc_port == -1 or 0 < data.vnc_port < 65536
    publish(driver, uuid_, {**AGENT, "attr/vif/0/ipv4/0": "10.0.0.3"})  # the agent's next report
    assert driver.guest_data(uuid_).agent["attr/vif/0/ipv4/0"] == "10.0.0.3"


def test_guest_data_is_bounded_and_clean(driver: Any) -> None:
    """A guest cannot make the driver return unbounded data or control characters."""
    uuid_ = driver.create_domain(make_spec(), paused=False).uuid
    keys = {f"data/junk/{i}": "x" for i in range(GUEST_KEYS_MAX + 8)}
    keys["data/os_name"] = "evil\x01\x00name" + "y" * (2 * GUEST_VALUE_MAX)
    publish(driver, uuid_, keys)
    agent = driver.guest_data(uuid_).agent
    assert len(agent) <= GUEST_KEYS_MAX
    for value in agent.values():
        assert len(value) <= GUEST_VALUE_MAX and not any(ord(c) < 32 for c in value)
    if "data/os_name" in agent:
        assert agent["data/os_name"].startswith("evil??name")


UNKNOWN = "11111111-2222-3333-4444-555555555555"
BY_HANDLE: dict[str, Callable[[Any, pathlib.Path], object]] = {
    "domain_info": lambda d, p: d.domain_info(UNKNOWN),
    "destroy_domain": lambda d, p: d.destroy_domain(UNKNOWN),
    "pause_domain": lambda d, p: d.pause_domain(UNKNOWN),
    "unpause_domain": lambda d, p: d.unpause_domain(UNKNOWN),
    "shutdown_domain": lambda d, p: d.shutdown_domain(UNKNOWN, "poweroff", 1.0),
    "reboot_domain": lambda d, p: d.reboot_domain(UNKNOWN),
    "suspend_domain": lambda d, p: d.suspend_domain(UNKNOWN, str(p / "image"), 1.0),
    "set_vcpus": lambda d, p: d.set_vcpus(UNKNOWN, 1),
    "set_memory_target": lambda d, p: d.set_memory_target(UNKNOWN, 64 * MiB),
    "attach_disk": lambda d, p: d.attach_disk(UNKNOWN, DiskSpec("xvdb", "/dev/x", "w")),
    "detach_disk": lambda d, p: d.detach_disk(UNKNOWN, "xvda"),
    "attach_nic": lambda d, p: d.attach_nic(UNKNOWN, NicSpec(1, "00:16:3e:00:00:09", "br")),
    "detach_nic": lambda d, p: d.detach_nic(UNKNOWN, 0),
    "guest_data": lambda d, p: d.guest_data(UNKNOWN),
}


@pytest.mark.parametrize("operation", sorted(BY_HANDLE))
def test_unknown_handle(driver: Any, tmp_path: pathlib.Path, operation: str) -> None:
    """Every per-domain operation raises NoSuchDomain for an unknown handle."""
    with pytest.raises(NoSuchDomain):
        BY_HANDLE[operation](driver, tmp_path)


DOM0_REFUSED: dict[str, Callable[[Any, pathlib.Path], object]] = {
    "destroy_domain": lambda d, p: d.destroy_domain(DOM0),
    "pause_domain": lambda d, p: d.pause_domain(DOM0),
    "shutdown_domain": lambda d, p: d.shutdown_domain(DOM0, "poweroff", 1.0),
    "reboot_domain": lambda d, p: d.reboot_domain(DOM0),
    "suspend_domain": lambda d, p: d.suspend_domain(DOM0, str(p / "image"), 1.0),
}


@pytest.mark.parametrize("operation", sorted(DOM0_REFUSED))
def test_dom0_refusals(driver: Any, tmp_path: pathlib.Path, operation: str) -> None:
    """dom0 cannot be destroyed, paused, shut down, rebooted or suspended."""
    with pytest.raises(BadDomainState):
        DOM0_REFUSED[operation](driver, tmp_path)
    dom0 = driver.domain_info(DOM0)
    assert (dom0.domid, dom0.state) == (0, "running")
