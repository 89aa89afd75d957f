"""libxenlight bindings: discovery, declarations, and never calling libxl on a NULL context."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from xapid.backend.xen import xenlight
from xapid.backend.xen.libs import UnsupportedAbi
from xapid.backend.xen.toollog import QuietLogger
from xenfakes import XenFakes

NO_HYPERVISOR = """
from xapid.backend.xen import xenlight
from xapid.backend.xen.toollog import QuietLogger
logger = QuietLogger()
try:
    xenlight.XenLight(xenlight.load_xenlight(), logger.pointer)
except xenlight.XenLightError as exc:
    print(exc.name)
"""


def test_real_library_exports_every_bound_function() -> None:
    """bind() declares every prototype on the installed 4.17 libxenlight, found by name."""
    lib = xenlight.load_xenlight()
    for name, (restype, argtypes) in xenlight._PROTOTYPES.items():
        assert (getattr(lib, name).restype, getattr(lib, name).argtypes) == (restype, argtypes), name


def test_library_of_another_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """libxenlight is not ABI-stable: a soname of another Xen release is refused before loading."""
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libxenlight.so.4.18")
    with pytest.raises(UnsupportedAbi, match=r"^unsupported Xen ABI: libxenlight\.so\.4\.18 found"):
        xenlight.load_xenlight()


def test_context_without_hypervisor_fails_quietly() -> None:
    """Without Xen, opening a context is ERROR_FAIL with nothing on stderr (run apart: no fake loaded)."""
    result = subprocess.run([sys.executable, "-c", NO_HYPERVISOR], capture_output=True, text=True, timeout=60,
                            check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ERROR_FAIL\n", "")


def test_no_logger_is_refused_before_libxl() -> None:
    """libxl_ctx_alloc crashes without a logger, so XenLight refuses to call it without one."""
    with pytest.raises(xenlight.XenLightError) as caught:
        xenlight.XenLight(xenlight.load_xenlight(), None)
    assert caught.value.name == "ERROR_INVAL"


def test_closed_context_is_never_passed_to_libxl(xen_fakes: XenFakes) -> None:
    """A real context opens through the fake host; after close (idempotent) calls raise instead."""
    logger = QuietLogger()
    xl = xenlight.XenLight(xenlight.load_xenlight(), logger.pointer)
    assert '"name": "x"' in xl.validate('{"c_info": {"type": "pv", "name": "x"}}')
    xl.close()
    xl.close()
    with pytest.raises(xenlight.XenLightError):
        xl.validate('{"c_info": {"type": "pv", "name": "x"}}')
    with pytest.raises(xenlight.XenLightError):
        xl.destroy(1)
    logger.close()
