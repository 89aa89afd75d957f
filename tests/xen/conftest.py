"""Fixtures for the Xen binding tests (the fakes themselves are in ../xenfakes.py)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest
from xenfakes import FAKE_DOMIDS, abi_probe, hypervisor_state  # noqa: F401 - abi_probe is a fixture

from xapid.backend.xen import xenctrl
from xapid.backend.xen.xenstore import XenStore


@pytest.fixture
def fake_xc(fake_xen_so: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[xenctrl.XenCtrl]:
    """A XenCtrl on the fake library: dom0 and domains 1 and 2, Xen 4.17."""
    monkeypatch.setenv("FAKE_XEN_DOMIDS", "1,2")
    lib = xenctrl.bind(ctypes.CDLL(str(fake_xen_so), use_errno=True))
    lib.fake_xen_reset()
    xc = xenctrl.XenCtrl(lib, None)
    yield xc
    xc.close()


@pytest.fixture
def store(xenstored: Path, fake_xen_so: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[XenStore]:
    """A XenStore connected to the test xenstored (through $XENSTORED_PATH), whose hypervisor has
    domains FAKE_DOMIDS besides dom0."""
    monkeypatch.setenv("FAKE_XEN_STATE", str(hypervisor_state(xenstored)))
    monkeypatch.setenv("FAKE_XEN_DOMIDS", FAKE_DOMIDS)
    ctypes.CDLL(str(fake_xen_so)).fake_xen_reset()
    monkeypatch.setenv("XENSTORED_PATH", str(xenstored))
    xs = XenStore()
    yield xs
    xs.close()
