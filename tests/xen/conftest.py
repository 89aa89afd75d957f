"""Fixtures for the Xen driver tests: C builds, the fake hypervisor library, a real xenstored.

The tests need the Xen 4.17 tools packages and gcc; without them they fail (never skip)
with the command to run.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xapid.backend.xen import xenctrl
from xapid.backend.xen.xenstore import XenStore

HERE = Path(__file__).resolve().parent
XENSTORED = Path("/usr/lib/xen-4.17/bin/xenstored")
INSTALL = "apt-get install -y --no-install-recommends libxen-dev xen-utils-4.17 xenstore-utils gcc libc6-dev"
FAKE_DOMIDS = "1,2,3,4,5"


def require(ok: bool, what: str) -> None:
    """Fail the test with the install command unless *ok*."""
    if not ok:
        pytest.fail(f"{what} missing; install the Xen test prerequisites: {INSTALL}", pytrace=False)


def compile_c(source: Path, output: Path, *flags: str) -> Path:
    """Build *source* with gcc against the installed Xen headers into *output*."""
    require(shutil.which("gcc") is not None, "gcc")
    require(Path("/usr/include/xenctrl.h").exists(), "the Xen headers (/usr/include/xenctrl.h)")
    result = subprocess.run(
        ["gcc", "-Wall", "-Werror", "-Wno-unused-parameter", "-o", str(output), str(source), *flags],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"gcc failed on {source.name}:\n{result.stderr}"
    return output


@pytest.fixture(scope="session")
def fake_xen_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fake_xen.c and fake_xenlight.c built as one shared object (LD_PRELOAD shim, fake libxenctrl,
    fake libxenlight operations)."""
    out = tmp_path_factory.mktemp("fake_xen") / "fake_xen.so"
    return compile_c(HERE / "fake_xen.c", out, str(HERE / "fake_xenlight.c"), "-shared", "-fPIC", "-ldl", "-lxenstore")


@pytest.fixture(scope="session")
def abi_probe(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """abi_probe.c compiled and run; its output lines split on '|'."""
    probe = compile_c(HERE / "abi_probe.c", tmp_path_factory.mktemp("abi") / "abi_probe")
    output = subprocess.run([str(probe)], capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in output.splitlines()]


@pytest.fixture
def fake_xc(fake_xen_so: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[xenctrl.XenCtrl]:
    """A XenCtrl on the fake library: dom0 and domains 1 and 2, Xen 4.17."""
    monkeypatch.setenv("FAKE_XEN_DOMIDS", "1,2")
    lib = xenctrl.bind(ctypes.CDLL(str(fake_xen_so), use_errno=True))
    lib.fake_xen_reset()
    xc = xenctrl.XenCtrl(lib, None)
    yield xc
    xc.close()


@pytest.fixture(scope="session")
def xenstored(fake_xen_so: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real C xenstored (xen-utils-4.17) run by the shim in a temp run dir; yields its socket.

    Its fake hypervisor state is the file ``hypervisor`` beside the socket: a process that sets
    FAKE_XEN_STATE to it (see :func:`hypervisor_state`) shares the domain table with it."""
    require(XENSTORED.exists(), str(XENSTORED))
    rundir = tmp_path_factory.mktemp("xenstored")
    env = dict(os.environ, XENSTORED_RUNDIR=str(rundir), LD_PRELOAD=str(fake_xen_so), FAKE_XEN_DOMIDS=FAKE_DOMIDS,
               FAKE_XEN_STATE=str(rundir / "hypervisor"))
    with open(rundir / "xenstored.log", "wb") as log:
        proc = subprocess.Popen(
            [str(XENSTORED), "-N", "-F", str(rundir / "xenstored.pid"), "-T", str(rundir / "trace.log")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    socket = rundir / "socket"
    deadline = time.monotonic() + 10
    while not socket.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert socket.exists(), f"xenstored did not start: {(rundir / 'xenstored.log').read_text()}"
        yield socket
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hypervisor_state(xenstored: Path) -> Path:
    """The file holding the fake hypervisor the test xenstored sees."""
    return xenstored.parent / "hypervisor"


@pytest.fixture
def store(xenstored: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[XenStore]:
    """A XenStore connected to the test xenstored (through $XENSTORED_PATH)."""
    monkeypatch.setenv("XENSTORED_PATH", str(xenstored))
    xs = XenStore()
    yield xs
    xs.close()
