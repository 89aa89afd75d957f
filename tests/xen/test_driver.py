"""The xen driver skeleton: refusing to open without Xen, and opening on the fakes."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from xapid.backend.interface import HypervisorUnavailable, IBackend, NotSupported
from xapid.backend.xen import xenctrl
from xapid.backend.xen.driver import XenBackend


def clock() -> float:
    return 1_700_000_000.0


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


def test_open_on_fakes(
    tmp_path: Path, fake_xen_so: Path, xenstored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the fake libxenctrl and the test xenstored, open succeeds and host counters decode."""
    privcmd = tmp_path / "privcmd"
    privcmd.touch()
    monkeypatch.setenv("XENSTORED_PATH", str(xenstored))
    lib = lambda: xenctrl.bind(ctypes.CDLL(str(fake_xen_so), use_errno=True))  # noqa: E731
    backend = XenBackend(tmp_path, clock, privcmd=[str(privcmd)], xenctrl_lib=lib)
    backend.open()
    try:
        assert backend.xen_version == "4.17.7-fake"
        assert backend.free_memory() == 3 << 30
        assert [(c.number, c.idle_time_ns) for c in backend.physical_cpus()][:2] == [(0, 10**9), (1, 2 * 10**9)]
        with pytest.raises(NotSupported):
            backend.list_domains()
    finally:
        backend.close()
        backend.close()


def test_unsupported_hypervisor_refused(
    tmp_path: Path, fake_xen_so: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hypervisor of another release is refused at open with a clear message."""
    privcmd = tmp_path / "privcmd"
    privcmd.touch()
    monkeypatch.setenv("FAKE_XEN_VERSION", "4.19")
    lib = lambda: xenctrl.bind(ctypes.CDLL(str(fake_xen_so), use_errno=True))  # noqa: E731
    backend = XenBackend(tmp_path, clock, privcmd=[str(privcmd)], xenctrl_lib=lib)
    with pytest.raises(HypervisorUnavailable, match="^unsupported Xen hypervisor 4.19: xapid supports Xen 4.17$"):
        backend.open()
