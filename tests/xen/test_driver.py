"""The xen driver end to end through ctypes: refusing without Xen, and on the fake Xen host
(fake hypervisor and libxl builder, real libxenlight config parsing, real C xenstored,
cooperative fake guests)."""

from __future__ import annotations

import ctypes
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import ApiEnv, vm_record
from twisted.internet import reactor
from twisted.internet.task import deferLater
from xenfakes import XenFakes, fake_sysfs, write_tree
from zope.interface.verify import verifyObject

from xapid.backend.interface import (
    BadDomainState,
    DiskSpec,
    DomainSpec,
    HypervisorUnavailable,
    IBackend,
    NicSpec,
    NoSuchDomain,
    ShutdownTimeout,
)
from xapid.backend.xen import xenctrl
from xapid.backend.xen.driver import XenBackend
from xapid.backend.xen.xenstore import XenStore

MiB = 2**20


def clock() -> float:
    return 1_700_000_000.0


def spec(**changes: Any) -> DomainSpec:
    fields: dict[str, Any] = dict(
        uuid=str(uuidlib.uuid4()), name="guest", domain_type="pv", memory_static_max=512 * MiB,
        memory_target=256 * MiB, vcpus_max=4, vcpus_at_startup=2, kernel="/var/lib/xcp/guest/vmlinuz", cmdline="root=/dev/xvda1",
        vcpu_weight=512, vcpu_cap=50,
        disks=(DiskSpec("xvda", "/srv/disks/guest.img", "w"), DiskSpec("xvdd", "", "r", kind="cdrom")),
        nics=(NicSpec(0, "00:16:3e:00:00:01", "xenbr0"),),
    )
    fields.update(changes)
    return DomainSpec(**fields)


@pytest.fixture
def xen(xen_fakes: XenFakes, tmp_path: Path) -> Any:
    backend = xen_fakes.backend(tmp_path / "state", clock, sysfs=fake_sysfs(tmp_path / "sys"))
    backend.open()
    yield backend
    backend.close()


def test_open_without_hypervisor_names_privcmd(tmp_path: Path) -> None:
    """With no /dev/xen/privcmd, open raises HypervisorUnavailable with the one-line message."""
    backend = XenBackend(tmp_path, clock)
    verifyObject(IBackend, backend)
    with pytest.raises(HypervisorUnavailable) as caught:
        backend.open()
    assert caught.value.message == "no Xen hypervisor: /dev/xen/privcmd not found (is this dom0 of a Xen host?)"
    backend.close()


def test_open_when_libxenctrl_cannot_connect(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A privcmd path that exists but a real libxenctrl that cannot open gives one quiet line."""
    privcmd = tmp_path / "privcmd"
    privcmd.touch()
    backend = XenBackend(tmp_path, clock, privcmd=[str(privcmd)])
    message = "^cannot connect to Xen: xc_interface_open: No such file or directory$"
    with pytest.raises(HypervisorUnavailable, match=message):
        backend.open()
    assert capfd.readouterr() == ("", "")


def test_unsupported_hypervisor_refused(
    tmp_path: Path, fake_xen_so: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hypervisor of another release is refused at open with a clear message."""
    privcmd = tmp_path / "privcmd"
    privcmd.touch()
    monkeypatch.setenv("FAKE_XEN_VERSION", "4.19")
    lib = lambda: xenctrl.bind(ctypes.CDLL(str(fake_xen_so), use_errno=True))
    backend = XenBackend(tmp_path, clock, privcmd=[str(privcmd)], xenctrl_lib=lib)
    with pytest.raises(HypervisorUnavailable, match="^unsupported Xen hypervisor 4.19: xapid supports Xen 4.17$"):
        backend.open()


def test_host_facts(xen: Any) -> None:
    """Host facts come from xc_physinfo/xc_version and sysfs; only devices with a `device` are physical NICs."""
    verifyObject(IBackend, xen)
    host = xen.host_info()
    assert (host.cpu_count, host.cores_per_socket, host.threads_per_core, host.socket_count) == (4, 2, 2, 1)
    assert (host.total_memory, host.xen_version, host.sched_policy) == (4 << 30, "4.17.7-fake", "credit")
    assert "hvm-3.0-x86_64" in host.capabilities and host.cpu_speed_mhz == 2400
    assert host.bios_strings == {"bios-vendor": "SeaBIOS", "system-manufacturer": "QEMU"}
    assert [(n.device, n.mac, n.mtu, n.carrier, n.speed, n.duplex) for n in xen.physical_nics()] == [
        ("eth0", "52:54:00:12:34:56", 1500, True, 10000, True)]
    assert xen.free_memory() == 3 << 30  # dom0 holds 1 GiB
    dom0 = xen.list_domains()[0]
    assert (dom0.domid, dom0.uuid, dom0.is_control_domain, dom0.state) == (0, str(uuidlib.UUID(int=0)), True, "running")


def test_build_writes_xenstore_and_applies_spec(xen: Any, xen_fakes: XenFakes) -> None:
    """A build goes through libxl (config parsed by the real libxenlight): memory, vCPUs, scheduler,
    devices and the guest's xenstore area all follow the spec."""
    s = spec()
    info = xen.create_domain(s, paused=False)
    assert (info.uuid, info.state, info.vcpus, info.vcpus_max) == (s.uuid, "running", 2, 4)
    assert (info.memory_actual, info.memory_target, info.memory_max) == (256 * MiB, 256 * MiB, 512 * MiB)
    xc = xenctrl.XenCtrl(xen_fakes.xenctrl_lib(), None)
    assert xc.sched_credit_get(info.domid) == (512, 50)
    xc.close()
    xs = XenStore()
    try:
        base = f"/local/domain/{info.domid}"
        assert xs.read(f"{base}/name") == b"guest"
        assert xs.read(f"{base}/vm") == f"/vm/{s.uuid}".encode()
        assert xs.get_permissions(f"{base}/control/shutdown")[0] == (info.domid, 0)  # the guest owns it
        disks = {xs.read(f"/local/domain/0/backend/vbd/{info.domid}/{d}/dev"):
                 xs.read(f"/local/domain/0/backend/vbd/{info.domid}/{d}/params")
                 for d in xs.directory(f"/local/domain/0/backend/vbd/{info.domid}")}
        assert disks == {b"xvda": b"/srv/disks/guest.img", b"xvdd": b""}
        assert xs.read(f"/local/domain/0/backend/vif/{info.domid}/0/mac") == b"00:16:3e:00:00:01"
        assert xs.read(f"/local/domain/0/backend/vif/{info.domid}/0/bridge") == b"xenbr0"
        assert xs.is_domain_introduced(info.domid)
    finally:
        xs.close()


def test_clean_shutdown_through_control_node(xen: Any) -> None:
    """poweroff is written to control/shutdown; the guest acts, the domain is destroyed, its memory back."""
    free = xen.free_memory()
    s = spec()
    xen.create_domain(s, paused=False)
    xen.shutdown_domain(s.uuid, "poweroff", 10.0)
    with pytest.raises(NoSuchDomain):
        xen.domain_info(s.uuid)
    assert xen.free_memory() == free


def test_guest_without_pv_drivers_times_out(xen: Any, xen_fakes: XenFakes) -> None:
    """A guest that ignores control/shutdown makes a clean shutdown time out; the domain keeps running."""
    s = spec()
    info = xen.create_domain(s, paused=False)
    xen_fakes.guests.deaf.add(info.domid)
    started = time.monotonic()
    with pytest.raises(ShutdownTimeout):
        xen.shutdown_domain(s.uuid, "poweroff", 0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert xen.domain_info(s.uuid).state == "running"
    xen.destroy_domain(s.uuid)


def test_clean_reboot_rebuilds_from_the_spec(xen: Any) -> None:
    """A clean reboot rebuilds the domain from its recorded spec under a new domid, devices included."""
    s = spec()
    before = xen.create_domain(s, paused=False)
    xen.shutdown_domain(s.uuid, "reboot", 10.0)
    after = xen.domain_info(s.uuid)
    assert after.domid > before.domid and after.state == "running" and after.vcpus == 2
    xs = XenStore()
    try:
        assert len(xs.directory(f"/local/domain/0/backend/vbd/{after.domid}")) == 2
    finally:
        xs.close()


def test_suspend_resume_keeps_cpu_time(xen: Any, xen_fakes: XenFakes, tmp_path: Path) -> None:
    """Suspend saves through libxl into the image (renamed into place), resume restores; CPU time carries over."""
    s = spec()
    xen.create_domain(s, paused=False)
    xen_fakes.advance(10)
    cpu = xen.domain_info(s.uuid).cpu_time_ns
    assert cpu == 2 * 10**9  # two vCPUs busy 10% of 10 s
    image = tmp_path / "image"
    xen.suspend_domain(s.uuid, str(image), 10.0)
    assert image.stat().st_size > 0 and not (tmp_path / "image.partial").exists()
    with pytest.raises(NoSuchDomain):
        xen.domain_info(s.uuid)
    resumed = xen.resume_domain(s, str(image), paused=True)
    assert (resumed.state, resumed.cpu_time_ns) == ("paused", cpu)


def test_memory_target_and_vcpus_reach_the_guest(xen: Any, xen_fakes: XenFakes) -> None:
    """memory/target and cpu/N/availability are written; the guest balloons and hot-plugs."""
    s = spec()
    xen.create_domain(s, paused=False)
    xen.set_memory_target(s.uuid, 128 * MiB)
    xen.set_vcpus(s.uuid, 3)
    deadline = time.monotonic() + 5
    while xen.domain_info(s.uuid).memory_actual != 128 * MiB and time.monotonic() < deadline:
        time.sleep(0.01)
    info = xen.domain_info(s.uuid)
    assert (info.memory_target, info.memory_actual, info.vcpus) == (128 * MiB, 128 * MiB, 3)
    xc = xenctrl.XenCtrl(xen_fakes.xenctrl_lib(), None)
    try:
        assert xc.domain_getinfo(info.domid).max_pages * 4 == 128 * 1024 + 1024  # ceiling: target + slack
        xen.set_memory_target(s.uuid, 512 * MiB)  # back up to the static maximum: ceiling raised first
        assert xc.domain_getinfo(info.domid).max_pages * 4 == 512 * 1024 + 1024
    finally:
        xc.close()


def test_counters_in_one_batch(xen: Any, xen_fakes: XenFakes, tmp_path: Path) -> None:
    """read_counters: every domain, pCPU idle times, blkback sectors, netback bytes (as the guest sees them)."""
    s = spec()
    info = xen.create_domain(s, paused=False)
    xen_fakes.advance(1)
    write_tree(tmp_path / "sys", {
        f"bus/xen-backend/devices/vbd-{info.domid}-51712/statistics/rd_sect": 8,
        f"bus/xen-backend/devices/vbd-{info.domid}-51712/statistics/wr_sect": 16,
        f"bus/xen-backend/devices/vbd-{info.domid}-51712/statistics/rd_req": 1,
        f"bus/xen-backend/devices/vbd-{info.domid}-51712/statistics/wr_req": 2,
        f"class/net/vif{info.domid}.0/statistics/rx_bytes": 300,
        f"class/net/vif{info.domid}.0/statistics/tx_bytes": 700,
    })
    counters = xen.read_counters()
    assert [d.domid for d in counters.domains] == [0, info.domid]
    assert counters.domains[1].cpu_time_ns == 2 * 10**8
    assert (counters.total_memory, counters.free_memory) == (4 << 30, xen.free_memory())
    assert len(counters.pcpus) == 4 and counters.pcpus[0].idle_time_ns > 10**9
    disks = {(d.device, d.read_bytes, d.write_bytes, d.read_reqs, d.write_reqs) for d in counters.disks}
    assert disks == {("xvda", 4096, 8192, 1, 2), ("xvdd", 0, 0, 0, 0)}
    assert [(n.devid, n.rx_bytes, n.tx_bytes) for n in counters.nics] == [(0, 700, 300)]
    assert [(p.device, p.rx_bytes, p.tx_bytes) for p in counters.pifs] == [("eth0", 1000, 2000)]


def test_refusals_match_the_hypervisor(xen: Any) -> None:
    """dom0 is protected; wrong states and unknown handles are refused before anything is sent."""
    dom0 = str(uuidlib.UUID(int=0))
    with pytest.raises(BadDomainState):
        xen.destroy_domain(dom0)
    s = spec()
    xen.create_domain(s, paused=True)
    with pytest.raises(BadDomainState):
        xen.shutdown_domain(s.uuid, "poweroff", 1.0)
    with pytest.raises(BadDomainState):
        xen.suspend_domain(s.uuid, "/nonexistent/image", 1.0)
    with pytest.raises(NoSuchDomain):
        xen.pause_domain(str(uuidlib.uuid4()))


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_release_domain_watch_reports_guest_crash(xen: Any, xen_fakes: XenFakes) -> None:
    """A guest crash reaches xenstored as VIRQ_DOM_EXC; its @releaseDomain, read in the reactor,
    reports the domain to the listener — and a destroy by the driver itself is not reported."""
    heard: list[str] = []
    xen.watch_domains(reactor, heard.append)
    first, second = spec(), spec()
    xen.create_domain(first, paused=False)
    info = xen.create_domain(second, paused=False)
    xen.destroy_domain(first.uuid)
    xen_fakes.lib.xc_domain_shutdown(None, info.domid, 3)  # the guest crashes
    await _until(lambda: heard)
    assert heard == [second.uuid]
    assert xen.domain_info(second.uuid).state == "crashed"


def test_reconciliation_adopts_and_halts(xen_fakes: XenFakes, tmp_path: Path) -> None:
    """At start, domains are matched to VMs by handle and adopted, VMs whose domain vanished become
    Halted, and unknown domains are left running."""
    from twisted.internet.task import Clock

    class FakeReactor(Clock):
        """Fake time; xenstore watches are registered but not read (not what this test is about)."""

        def addReader(self, reader: Any) -> None:
            pass

        def removeReader(self, reader: Any) -> None:
            pass

    fake_clock = FakeReactor()
    fake_clock.advance(1_700_000_000)
    sysfs = fake_sysfs(tmp_path / "sys")
    env = ApiEnv(tmp_path, fake_clock, driver=lambda: xen_fakes.backend(tmp_path / "state" / "xen",
                                                                          fake_clock.seconds, sysfs=sysfs))
    admin = env.login()
    kept, lost = (admin("VM.create", vm_record(name_label=n)) for n in ("kept", "lost"))
    admin("VM.start", kept, False, False)
    admin("VM.start", lost, False, False)
    domid = admin("VM.get_domid", kept)
    stranger = spec()
    driver = env.api.hypervisor.driver
    driver.create_domain(stranger, paused=False)
    driver.destroy_domain(admin("VM.get_uuid", lost))
    env.restart()
    admin = env.login()
    assert (admin("VM.get_power_state", kept), admin("VM.get_domid", kept)) == ("Running", domid)
    assert admin("VM.get_power_state", lost) == "Halted"
    assert stranger.uuid in {d.uuid for d in env.api.hypervisor.driver.list_domains()}
    assert admin("host.get_cpu_info", env.api.host_ref)["cpu_count"] == "4"
    assert [admin("PIF.get_device", p) for p in admin("PIF.get_all")] == ["eth0"]
    env.api.hypervisor.driver.close()


@pytest.mark.parametrize(("vdev", "devid"), [("xvda", 51712), ("xvdd", 51760), ("xvdp", 51952),
                                             ("xvdq", (1 << 28) | (16 << 8)), ("hda", 768), ("hdd", 5696),
                                             ("sdb", 2064), ("xvd", -1), ("eth0", -1)])
def test_disk_devid(vdev: str, devid: int) -> None:
    """Guest disk names map to Linux's device numbers (blkback's vbd-<domid>-<devid>)."""
    from xapid.backend.xen.driver import disk_devid

    assert disk_devid(vdev) == devid
