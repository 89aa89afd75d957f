"""libxenctrl/libxentoollog bindings: library discovery, no-hypervisor behaviour, and every
call marshalled through ctypes against the fake library built from fake_xen.c."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
from pathlib import Path

import pytest

from xapid.backend.xen import libs, xenctrl, xenstore
from xapid.backend.xen.libs import UnsupportedAbi, XenError, XenUnavailable
from xapid.backend.xen.toollog import QuietLogger
from xapid.backend.xen.xenctrl import XEN_DOMINF_paused, XEN_DOMINF_running, XEN_DOMINF_shutdown, XenCtrl


def test_real_libraries_export_every_bound_function() -> None:
    """bind() declares every prototype on the installed 4.17 libraries, found by name."""
    for module, lib in ((xenctrl, xenctrl.load_xenctrl()), (xenstore, xenstore.bind(libs.load("xenstore")))):
        for name, (restype, argtypes) in module._PROTOTYPES.items():
            assert (getattr(lib, name).restype, getattr(lib, name).argtypes) == (restype, argtypes), name


def test_open_without_hypervisor_is_quiet_enoent(capfd: pytest.CaptureFixture[str]) -> None:
    """xc_interface_open with the quiet logger raises XenError(ENOENT) and prints nothing."""
    logger = QuietLogger()
    try:
        with pytest.raises(XenError) as caught:
            XenCtrl(xenctrl.load_xenctrl(), logger.pointer)
    finally:
        logger.close()
        logger.close()
    assert caught.value.errno == errno.ENOENT
    assert capfd.readouterr() == ("", "")


def test_library_of_another_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libxenctrl whose soname carries another Xen release is refused before loading."""
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libxenctrl.so.4.18")
    message = r"^unsupported Xen ABI: libxenctrl\.so\.4\.18 found, xapid supports Xen 4\.17$"
    with pytest.raises(UnsupportedAbi, match=message):
        xenctrl.load_xenctrl()


def test_missing_library_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library the linker cannot find gives a one-line message naming the package."""
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(XenUnavailable, match=r"^libxenctrl not found \(install libxenmisc4\.17\)$"):
        xenctrl.load_xenctrl()


def test_check_hypervisor(tmp_path: Path) -> None:
    """check_hypervisor accepts any existing privcmd path and otherwise names the first one."""
    present = tmp_path / "privcmd"
    present.touch()
    libs.check_hypervisor([str(tmp_path / "missing"), str(present)])
    with pytest.raises(XenUnavailable) as caught:
        libs.check_hypervisor()
    assert str(caught.value) == "no Xen hypervisor: /dev/xen/privcmd not found (is this dom0 of a Xen host?)"


def test_version_and_abi_check(fake_xc: XenCtrl, monkeypatch: pytest.MonkeyPatch) -> None:
    """xc_version strings decode; check_abi returns the full version and refuses another release."""
    assert fake_xc.version() == (4, 17)
    assert fake_xc.check_abi() == "4.17.7-fake"
    assert fake_xc.capabilities().split() == ["xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_64"]
    assert fake_xc.changeset() == "fake"
    assert fake_xc.compile_info().compile_by == b"xapid"
    monkeypatch.setenv("FAKE_XEN_VERSION", "4.18")
    with pytest.raises(UnsupportedAbi, match="unsupported Xen hypervisor 4.18"):
        fake_xc.check_abi()


def test_domain_list_decoding(fake_xc: XenCtrl) -> None:
    """xc_domain_getinfolist fills xc_domaininfo_t entries that decode to domids, handles and pages."""
    doms = fake_xc.domain_getinfolist()
    assert [d.domain for d in doms] == [0, 1, 2]
    dom1 = fake_xc.domain_getinfo(1)
    assert dom1.uuid == "00000000-0000-0000-0000-000000000001"
    assert dom1.tot_pages == 65536 and dom1.nr_online_vcpus == 2 and dom1.flags & XEN_DOMINF_running
    assert [d.domain for d in fake_xc.domain_getinfolist(1, 1)] == [1]
    with pytest.raises(XenError) as caught:
        fake_xc.domain_getinfo(9)
    assert caught.value.errno == errno.ESRCH


def test_host_information(fake_xc: XenCtrl) -> None:
    """physinfo, max_cpus, cpu_idle_times, sched_id and vcpu_getinfo decode their out-structs."""
    info = fake_xc.physinfo()
    # 4 GiB host; dom0 holds 1 GiB and domains 1 and 2 256 MiB each
    assert (info.nr_cpus, info.threads_per_core, info.total_pages, info.free_pages) == (4, 2, 1 << 20, 10 << 16)
    assert fake_xc.max_cpus() == 4
    assert fake_xc.cpu_idle_times(8) == [1_000_000_000, 2_000_000_000, 3_000_000_000, 4_000_000_000]
    assert fake_xc.sched_id() == "credit"
    vcpu = fake_xc.vcpu_getinfo(1, 1)
    assert (vcpu.vcpu, vcpu.online, vcpu.cpu_time, vcpu.cpu) == (1, 1, 1_000_000_000, 1)  # 2 s over 2 vCPUs
    with pytest.raises(XenError) as caught:
        fake_xc.vcpu_getinfo(1, 5)
    assert caught.value.errno == errno.EINVAL


def test_domain_control(fake_xc: XenCtrl) -> None:
    """pause/unpause/shutdown/setmaxmem/max_vcpus/destroy reach the library with their arguments."""
    fake_xc.domain_pause(1)
    assert fake_xc.domain_getinfo(1).flags & XEN_DOMINF_paused
    fake_xc.domain_unpause(1)
    assert not fake_xc.domain_getinfo(1).flags & XEN_DOMINF_paused
    fake_xc.domain_setmaxmem(1, 524288)
    fake_xc.domain_max_vcpus(1, 3)
    dom1 = fake_xc.domain_getinfo(1)
    assert (dom1.max_pages, dom1.nr_online_vcpus) == (131072, 3)
    fake_xc.domain_shutdown(2, 3)
    dom2 = fake_xc.domain_getinfo(2)
    assert dom2.flags & XEN_DOMINF_shutdown and dom2.shutdown_reason == "crash"
    fake_xc.domain_destroy(2)
    assert [d.domain for d in fake_xc.domain_getinfolist()] == [0, 1]
    with pytest.raises(XenError) as caught:
        fake_xc.domain_pause(2)
    assert caught.value.errno == errno.ESRCH


def test_credit_scheduler(fake_xc: XenCtrl) -> None:
    """Credit weight/cap round-trip; credit2 calls surface the library's errno."""
    assert fake_xc.sched_credit_get(1) == (256, 0)
    fake_xc.sched_credit_set(1, 512, 50)
    assert fake_xc.sched_credit_get(1) == (512, 50)
    with pytest.raises(XenError) as caught:
        fake_xc.sched_credit_get(1, credit2=True)
    assert caught.value.errno == errno.EINVAL


def test_closed_handle_never_reaches_library(fake_xc: XenCtrl) -> None:
    """After close every call raises EBADF instead of passing NULL to libxenctrl."""
    fake_xc.close()
    fake_xc.close()
    with pytest.raises(XenError) as caught:
        fake_xc.domain_getinfolist()
    assert caught.value.errno == errno.EBADF
