"""The whole daemon on the fake hypervisor below /dev/xen/privcmd (issue 14), end to end.

``xapid serve --backend xen`` runs as a subprocess under :meth:`RealXenHost.env`: the real
libxenctrl, libxenguest and libxenlight (forking their children under a running reactor), the
real C xenstored and xen-init-dom0, fake_privcmd.so as the hypervisor.  The official XenAPI SDK
is the client.  What a guest or another program does behind the daemon's back (a guest powering
off, rebooting or crashing: SCHEDOP_shutdown; a domain destroyed by someone else) is done by
hypercalls through the real libxenctrl in another process (:meth:`RealXenHost.xc`); refusals of
the hypervisor are injected with :meth:`RealXenHost.refuse`; xenstored is killed and restarted
with :meth:`RealXenHost.restart_xenstored`.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import XenAPI
from support import PASSWORD, RealDaemon, vm_record
from xenhost import RealXenHost, fake_privcmd_so, pv_kernel, real_xen, real_xen_credit2  # noqa: F401 - fixtures

from xapid.backend.xen.xenctrl import XEN_DOMINF_paused, XEN_DOMINF_shutdown
from xapid.backend.xen.xenstore import XenStore

MiB = 2**20
DOMCTL_PAUSEDOMAIN = 3  # xen/domctl.h
DOMCTL_SETVCPUCONTEXT = 12  # the domain builder's last step: a start fails half-built
DOMCTL_GET_ADDRESS_SIZE = 36  # libxc's save asks the guest's width first, before the guest suspends
POWEROFF, REBOOT, CRASH = 0, 1, 3  # SHUTDOWN_* of xen/sched.h
NEGOTIATE = "application must negotiate with libxl about SIGCHLD"


class XenDaemon:
    """``xapid serve --backend xen`` on *host*, and an SDK session to it."""

    def __init__(self, host: RealXenHost, tmp: Path, config: str = "") -> None:
        self.host = host
        self.daemon = RealDaemon(tmp, extra=["--backend", "xen"], env=host.env(),
                                 config=f"[security]\nkernel_dirs = {host.kernel.parent}\n{config}")
        self.session = XenAPI.Session(self.daemon.url)
        try:
            self.session.login_with_password("admin", PASSWORD, "1.0", "xapid-e2e")
        except BaseException:
            self.daemon.stop()
            raise
        self.x: Any = self.session.xenapi

    @property
    def log(self) -> str:
        return self.daemon.log.read_text()

    def alive(self) -> bool:
        return self.daemon.proc.poll() is None

    def new_vm(self, name: str = "e2e", **fields: str) -> str:
        record = vm_record(name_label=name, PV_kernel=str(self.host.kernel), memory_static_max=str(64 * MiB),
                           memory_dynamic_max=str(64 * MiB), memory_dynamic_min=str(64 * MiB),
                           memory_static_min=str(32 * MiB))
        record.update(fields)
        return self.x.VM.create(record)

    def started(self, name: str = "e2e", **fields: str) -> tuple[str, int]:
        """A new VM started: its ref and domid."""
        vm = self.new_vm(name, **fields)
        self.x.VM.start(vm, False, False)
        assert self.x.VM.get_power_state(vm) == "Running"
        return vm, int(self.x.VM.get_domid(vm))

    def domains(self) -> dict[str, tuple[int, int]]:
        """The fake hypervisor's table: uuid -> (domid, flags)."""
        return {uuid: (domid, flags) for domid, uuid, flags in self.host.xc("list")}  # type: ignore[attr-defined]

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.alive(), f"the daemon died (rc {self.daemon.proc.returncode}) waiting for {what}:\n" \
                                 f"{self.log[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}; daemon log tail:\n{self.log[-3000:]}"
            time.sleep(0.05)

    def wait_state(self, vm: str, state: str, timeout: float = 10) -> None:
        self.wait(f"VM power state {state}", lambda: self.x.VM.get_power_state(vm) == state, timeout)

    def zombies(self) -> list[str]:
        """The daemon's children that exited and were never reaped."""
        pid = self.daemon.proc.pid
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                stat = Path(f"/proc/{child}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    found.append(stat)
        return found

    def stop(self) -> int:
        with contextlib.suppress(Exception):  # the daemon may be gone already
            self.session.logout()
        return self.daemon.stop()


def failure(call: Callable[..., Any], *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        call(*args)
    return info.value.details


@pytest.fixture
def xend(real_xen_credit2: RealXenHost, tmp_path: Path) -> Iterator[XenDaemon]:
    """The daemon on a fresh credit2 host (stock Debian's scheduler)."""
    d = XenDaemon(real_xen_credit2, tmp_path / "daemon")
    yield d
    d.stop()
    assert NEGOTIATE not in d.log


def test_start_and_stop_on_each_scheduler(real_xen: RealXenHost, tmp_path: Path) -> None:
    """On credit2 and credit: the daemon starts on the fake host, reconciles dom0 as the control
    domain, shows the host; a PV VM starts (the domain is in the hypervisor's table, running,
    carrying the VM's uuid), shuts down hard (the domain is gone), and starts again."""
    d = XenDaemon(real_xen, tmp_path / "daemon")
    try:
        assert "listening on" in d.log
        x = d.x
        host = x.host.get_record(x.host.get_all()[0])
        assert host["software_version"]["xen"].startswith("4.17")
        assert host["sched_policy"] == real_xen.sched
        assert len(host["host_CPUs"]) == 4
        dom0 = [r for r in x.VM.get_all_records().values() if r["is_control_domain"]]
        assert [(r["domid"], r["power_state"]) for r in dom0] == [("0", "Running")]

        vm, domid = d.started()
        uuid = x.VM.get_uuid(vm)
        assert domid > 0
        assert d.domains()[uuid][0] == domid
        assert not d.domains()[uuid][1] & (XEN_DOMINF_paused | XEN_DOMINF_shutdown)
        x.VM.hard_shutdown(vm)
        assert x.VM.get_power_state(vm) == "Halted"
        assert uuid not in d.domains()
        x.VM.start(vm, False, False)
        assert x.VM.get_power_state(vm) == "Running"
        assert d.domains()[uuid][0] == int(x.VM.get_domid(vm))
        assert d.alive()
    finally:
        d.stop()
    assert NEGOTIATE not in d.log
    assert real_xen.unknown_calls() == []


def test_guest_power_off_halts_the_vm_and_the_daemon_lives(xend: XenDaemon) -> None:
    """The guest powers off (SCHEDOP_shutdown poweroff): @releaseDomain, actions_after_shutdown
    = destroy: libxl destroys the domain (it forks: the SIGABRT crash loop of issue 14 #1), the
    VM is Halted, the daemon lives and starts the VM again."""
    vm, domid = xend.started(actions_after_shutdown="destroy")
    uuid = xend.x.VM.get_uuid(vm)
    xend.host.xc(f"shutdown:{domid}:{POWEROFF}")
    xend.wait_state(vm, "Halted")
    xend.wait("the domain destroyed", lambda: uuid not in xend.domains())
    assert xend.alive()
    xend.x.VM.start(vm, False, False)
    assert xend.x.VM.get_power_state(vm) == "Running"


def test_guest_reboot_restarts_the_vm_with_a_new_domain(xend: XenDaemon) -> None:
    """The guest reboots: actions_after_reboot = restart rebuilds it, Running with a new domid."""
    vm, domid = xend.started(actions_after_reboot="restart")
    uuid = xend.x.VM.get_uuid(vm)
    xend.host.xc(f"shutdown:{domid}:{REBOOT}")
    xend.wait("a new domid", lambda: xend.x.VM.get_domid(vm) not in ("-1", str(domid)))
    assert xend.x.VM.get_power_state(vm) == "Running"
    new = int(xend.x.VM.get_domid(vm))
    assert xend.domains()[uuid][0] == new
    assert not xend.domains()[uuid][1] & (XEN_DOMINF_paused | XEN_DOMINF_shutdown)


def test_guest_crash_preserve_then_destroy(xend: XenDaemon) -> None:
    """The guest crashes: actions_after_crash = preserve keeps the crashed domain and shows the
    VM Paused (hard_shutdown then removes it); with destroy the VM is Halted, the domain gone."""
    vm, domid = xend.started(actions_after_crash="preserve")
    uuid = xend.x.VM.get_uuid(vm)
    xend.host.xc(f"shutdown:{domid}:{CRASH}")
    xend.wait_state(vm, "Paused")
    assert xend.domains()[uuid] == (domid, xend.domains()[uuid][1])
    assert xend.domains()[uuid][1] & XEN_DOMINF_shutdown
    xend.x.VM.hard_shutdown(vm)
    assert xend.x.VM.get_power_state(vm) == "Halted"
    assert uuid not in xend.domains()

    xend.x.VM.set_actions_after_crash(vm, "destroy")
    xend.x.VM.start(vm, False, False)
    domid = int(xend.x.VM.get_domid(vm))
    xend.host.xc(f"shutdown:{domid}:{CRASH}")
    xend.wait_state(vm, "Halted")
    xend.wait("the crashed domain destroyed", lambda: uuid not in xend.domains())
    assert xend.alive()


def test_failed_start_leaves_no_domain_and_says_why(xend: XenDaemon) -> None:
    """The hypervisor refuses the builder's last step: VM.start fails with a Xen-API error whose
    parameters carry libxl's error lines; no half-built domain with the VM's uuid is left; the
    daemon lives and, the refusal gone, the VM starts."""
    vm = xend.new_vm()
    uuid = xend.x.VM.get_uuid(vm)
    xend.host.refuse("domctl", DOMCTL_SETVCPUCONTEXT, errno.EINVAL)
    details = failure(xend.x.VM.start, vm, False, False)
    assert details[0] == "INTERNAL_ERROR", details
    assert "libxl could not build the domain" in details[1], details
    assert any("xc_dom_boot_image failed" in line for line in details[2:]), details  # libxl's own words
    assert xend.x.VM.get_power_state(vm) == "Halted"
    assert uuid not in xend.domains(), "a half-built domain was left behind"
    assert [domid for domid, _flags in xend.domains().values()] == [0]
    assert xend.alive()
    xend.host.accept_all()
    xend.x.VM.start(vm, False, False)
    assert xend.x.VM.get_power_state(vm) == "Running"


def test_pause_refused_by_the_hypervisor_is_a_xenapi_error(xend: XenDaemon) -> None:
    """pausedomain fails (EPERM): VM.pause answers a Xen-API error naming the refusal, not an
    unexpected-failure incident with a traceback in the log; the VM stays Running."""
    vm, _domid = xend.started()
    xend.host.refuse("domctl", DOMCTL_PAUSEDOMAIN, errno.EPERM)
    details = failure(xend.x.VM.pause, vm)
    assert details[0] in ("INTERNAL_ERROR", "OPERATION_NOT_ALLOWED", "VM_BAD_POWER_STATE"), details
    assert "pause" in details[1] and "Operation not permitted" in details[1], details
    assert "unexpected driver failure" not in " ".join(details)
    assert "Traceback" not in xend.log
    assert xend.x.VM.get_power_state(vm) == "Running"
    xend.host.accept_all()
    xend.x.VM.pause(vm)
    assert xend.x.VM.get_power_state(vm) == "Paused"


def test_vanished_domain_halts_the_vm(xend: XenDaemon) -> None:
    """Another program destroys the domain behind the daemon's back: the VM becomes Halted."""
    vm, domid = xend.started()
    xend.host.xc(f"destroy:{domid}")
    xend.wait_state(vm, "Halted")
    assert xend.alive()


def test_xenstored_restart_mid_run(xend: XenDaemon) -> None:
    """xenstored dies and comes back (empty tree, same socket): the daemon logs the loss,
    reconnects, re-arms its @releaseDomain watch and keeps serving: a VM started afterwards runs,
    and its power-off is noticed (the new watch) and halts it; so is the power-off of a VM built
    before the restart, which the new xenstored no longer knows (the health tick's comparison)."""
    vm, old_domid = xend.started("before")
    xend.host.kill_xenstored()
    xend.wait("the loss logged", lambda: "lost the connection to xenstored" in xend.log)
    xend.host.restart_xenstored()
    xend.wait("the reconnection", lambda: "reconnected to xenstored" in xend.log, timeout=15)
    assert xend.x.VM.get_power_state(vm) == "Running"
    after, domid = xend.started("after")
    xend.host.xc(f"shutdown:{domid}:{POWEROFF}")
    xend.wait_state(after, "Halted")
    xend.host.xc(f"shutdown:{old_domid}:{POWEROFF}")
    xend.wait_state(vm, "Halted")
    assert xend.alive()


def test_xenstored_gone_for_good_exits_non_zero(real_xen_credit2: RealXenHost, tmp_path: Path) -> None:
    """xenstored stays away longer than [xen] xenstored_timeout: the daemon exits non-zero with
    one line naming the cause, for the service manager to restart it."""
    d = XenDaemon(real_xen_credit2, tmp_path / "daemon", config="[xen]\nxenstored_timeout = 2\n")
    try:
        real_xen_credit2.kill_xenstored()
        d.daemon.proc.wait(20)
        assert d.daemon.proc.returncode == 2, d.log[-2000:]  # as a start-up failure: systemd restarts it
        last = d.log.strip().splitlines()[-1]
        assert last.startswith("xapid: xenstored unreachable for more than 2 s"), d.log[-2000:]
    finally:
        d.stop()
        real_xen_credit2.restart_xenstored()  # for the fixture's teardown


def test_suspend_resume_round_trip(xend: XenDaemon) -> None:
    """VM.suspend: libxl forks libxl-save-helper under the running reactor (issue 14 #1: it used to
    abort the daemon), asks the guest through ``control/shutdown`` (the fake guest acknowledges
    and shuts down for suspend), and saves it: libxc maps the M2P, walks the p2m tree the guest
    published in shared_info, reads the vCPU context and the page types, copies every page.  The
    VM is Suspended, its image in libxl's stream format, the domain gone.  VM.resume rebuilds it
    through libxl's restore path from that image: Running on a new domain carrying the VM's uuid,
    whose memory is the saved guest's (its kernel at 1 MiB), the image removed.  Twice, so the
    restored domain is itself saveable (the guest republished its p2m after the restore)."""
    vm, domid = xend.started()
    uuid = xend.x.VM.get_uuid(vm)
    image = xend.daemon.state / "suspend" / f"{uuid}.img"
    for _ in range(2):
        xend.x.VM.suspend(vm)
        assert xend.x.VM.get_power_state(vm) == "Suspended"
        assert uuid not in xend.domains()
        with open(image, "rb") as stream:
            head = stream.read(64)
        assert head.startswith(b"LibxlFmt") and b"XENF" in head, head  # libxl's stream, libxc's inside
        assert image.stat().st_size > 64 * MiB  # every page of the guest's 64 MiB
        assert not list(xend.daemon.state.rglob("*.partial"))
        xend.wait("the save helper reaped", lambda: not xend.zombies(), timeout=5)

        xend.x.VM.resume(vm, False, False)
        assert xend.x.VM.get_power_state(vm) == "Running"
        new = int(xend.x.VM.get_domid(vm))
        assert new != domid
        assert xend.domains()[uuid][0] == new
        assert not xend.domains()[uuid][1] & (XEN_DOMINF_paused | XEN_DOMINF_shutdown)
        memory = Path(f"{xend.host.state}.mem{new}")  # fake_privcmd.c's file of the new domain's frames
        with open(memory, "rb") as frames:
            frames.seek(0x100000)
            assert frames.read(3) == b"\xf4\xeb\xfd"  # fake_pv_kernel.S's "hlt; jmp _start", restored
        assert not image.exists()
        domid = new
    xend.wait("the restore helper reaped", lambda: not xend.zombies(), timeout=5)
    assert xend.alive()
    assert "Traceback" not in xend.log
    assert xend.host.unknown_calls() == []


def test_resume_from_a_corrupt_image_fails_cleanly(xend: XenDaemon) -> None:
    """The image is damaged inside libxc's stream: VM.resume fails with libxc's/libxl's lines, no
    half-built domain is left, the VM stays Suspended and the daemon lives."""
    vm, _domid = xend.started()
    uuid = xend.x.VM.get_uuid(vm)
    xend.x.VM.suspend(vm)
    image = xend.daemon.state / "suspend" / f"{uuid}.img"
    with open(image, "r+b") as stream:
        stream.seek(0x200)
        stream.write(b"\xa5" * 0x10000)
    details = failure(xend.x.VM.resume, vm, False, False)
    assert details[0] == "INTERNAL_ERROR" and "libxl could not build the domain" in details[1], details
    assert any("xc: error" in line for line in details[2:]), details
    assert xend.x.VM.get_power_state(vm) == "Suspended"
    assert uuid not in xend.domains()
    xend.wait("the restore helper reaped", lambda: not xend.zombies(), timeout=5)
    assert xend.alive()


def test_suspend_refused_by_the_hypervisor_fails_cleanly(xend: XenDaemon) -> None:
    """The save fails before the guest is asked to suspend (the hypervisor refuses the guest
    width query): a Xen-API error with libxc's/libxl's lines, the VM still Running on its
    domain, no image left, the helper reaped, the daemon alive; the refusal gone, it suspends."""
    vm, domid = xend.started()
    uuid = xend.x.VM.get_uuid(vm)
    xend.host.refuse("domctl", DOMCTL_GET_ADDRESS_SIZE, errno.EPERM)
    details = failure(xend.x.VM.suspend, vm)
    assert details[0] == "INTERNAL_ERROR" and "suspend" in details[1], details
    assert any("xc: error" in line or "libxl: error" in line for line in details[2:]), details
    assert xend.x.VM.get_power_state(vm) == "Running"
    assert xend.domains()[uuid][0] == domid
    assert not xend.domains()[uuid][1] & (XEN_DOMINF_paused | XEN_DOMINF_shutdown)
    assert not list(xend.daemon.state.rglob("*.partial"))
    assert not list(xend.daemon.state.rglob("*.img"))
    xend.wait("the save helper reaped", lambda: not xend.zombies(), timeout=5)
    assert xend.alive()
    assert "Traceback" not in xend.log
    xend.host.accept_all()
    xend.x.VM.suspend(vm)
    assert xend.x.VM.get_power_state(vm) == "Suspended"


def test_autoballoon_frees_dom0_memory_for_a_start(real_xen_credit2: RealXenHost, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """dom0 holds all but 48 MiB of the host (as a default install without dom0_mem=), autoballoon
    on: VM.start asks libxl to lower dom0's ``memory/target`` (libxl_set_memory_target), dom0's
    balloon driver gives the pages back, libxl_wait_for_memory_target sees it, the VM starts."""
    host = real_xen_credit2
    host_kib = 4 * 1024 * 1024
    host.xc(f"setmaxmem:0:{host_kib}", f"balloon:0:{host_kib - 48 * 1024}")
    d = XenDaemon(host, tmp_path / "daemon", config="[xen]\nautoballoon = on\n")
    try:
        before = d.x.host.compute_free_memory(d.x.host.get_all()[0])
        assert int(before) < 64 * MiB
        vm, domid = d.started()
        assert domid > 0
        assert d.x.VM.get_power_state(vm) == "Running"
        monkeypatch.setenv("XENSTORED_PATH", str(host.socket))
        store = XenStore()
        try:
            target = int(store.read("/local/domain/0/memory/target"))
        finally:
            store.close()
        assert target < host_kib - 48 * 1024 - 16 * 1024  # dom0 gave back at least the VM's share
        assert d.alive()
    finally:
        d.stop()
    assert NEGOTIATE not in d.log
