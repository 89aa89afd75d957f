"""The fake Xen host of the tests: C builds, the fake hypervisor library, a real xenstored,
fake guests, and xen drivers wired to them.

fake_xen.c + fake_xenlight.c are one shared object that plays the hypervisor (domain table,
memory, CPU time) and libxl's domain builder; the real C xenstored of xen-utils-4.17 runs
under it as an LD_PRELOAD shim, sharing the domain table through a file; the real
libxenlight (loaded after the fake, so it connects through it) parses every domain config.
:class:`FakeGuests` plays the guests' PV drivers.  The tests need the Xen 4.17 tools packages
and gcc; without them they fail (never skip) with the command to run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xapid.backend.xen import xenctrl
from xapid.backend.xen.xenstore import XenStore

HERE = Path(__file__).resolve().parent / "xen"
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


SHUTDOWN_CODES = {"poweroff": 0, "halt": 0, "reboot": 1, "suspend": 2, "crash": 3}
_GUEST_PATH = re.compile(r"^/local/domain/(\d+)/(control/shutdown|memory/target|cpu/\d+/availability)$")


class FakeGuests:
    """The guests' PV drivers on the fake host, in a thread: they act on ``control/shutdown``
    (acknowledge, then shut down with that reason), balloon to ``memory/target`` and bring
    vCPUs on- and offline per ``cpu/N/availability`` — unless paused or listed in
    :attr:`deaf` (a guest without PV drivers)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.deaf: set[int] = set()
        self.store = XenStore()
        self.store.watch("/local/domain", "guests")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-guests", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.store.close()

    def _run(self) -> None:
        fd = self.store.fileno()
        while not self._stop.is_set():
            select.select([fd], [], [], 0.05)
            while (event := self.store.check_watch()) is not None:
                match = _GUEST_PATH.match(event[0])
                if match:
                    self._act(int(match.group(1)), match.group(2))

    def _running(self, domid: int) -> bool:
        infos = (xenctrl.XcDomainInfo * 1)()
        found = self.lib.xc_domain_getinfolist(None, domid, 1, infos)
        flags = infos[0].flags
        return found == 1 and infos[0].domain == domid and not flags & (
            xenctrl.XEN_DOMINF_paused | xenctrl.XEN_DOMINF_shutdown | xenctrl.XEN_DOMINF_dying)

    def _act(self, domid: int, node: str) -> None:
        if domid in self.deaf or not self._running(domid):
            return
        base = f"/local/domain/{domid}"
        try:
            if node == "control/shutdown":
                request = self.store.read(f"{base}/{node}").decode()
                if request in SHUTDOWN_CODES:
                    self.store.write(f"{base}/{node}", "")
                    self.lib.xc_domain_shutdown(None, domid, SHUTDOWN_CODES[request])
            elif node == "memory/target":
                self.lib.fake_xen_balloon(domid, ctypes.c_uint64(int(self.store.read(f"{base}/{node}"))))
            else:
                online = sum(self.store.read(f"{base}/cpu/{cpu}/availability") == b"online"
                             for cpu in self.store.directory(f"{base}/cpu"))
                self.lib.fake_xen_set_online_vcpus(domid, online)
        except OSError:
            pass  # the domain went away meanwhile


def write_tree(root: Path, files: dict[str, str | int]) -> None:
    """Create *files* (relative path -> content) under *root*; a trailing "/" makes a directory."""
    for name, content in files.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{content}\n")


def fake_sysfs(root: Path) -> Path:
    """A /sys with one physical NIC (eth0), a bridge (not physical), DMI strings."""
    write_tree(root, {
        "class/net/eth0/device/": "", "class/net/eth0/address": "52:54:00:12:34:56", "class/net/eth0/mtu": 1500,
        "class/net/eth0/carrier": 1, "class/net/eth0/speed": 10000, "class/net/eth0/duplex": "full",
        "class/net/eth0/statistics/rx_bytes": 1000, "class/net/eth0/statistics/tx_bytes": 2000,
        "class/net/xenbr0/address": "52:54:00:12:34:56", "class/net/xenbr0/mtu": 1500,
        "class/dmi/id/bios_vendor": "SeaBIOS", "class/dmi/id/sys_vendor": "QEMU",
    })
    return root


class CompositeXenLight:
    """The real libxenlight with its hypervisor-bound operations replaced by the fakes."""

    FAKED = ("libxl_domain_create_new", "libxl_domain_create_restore", "libxl_domain_unpause",
             "libxl_domain_pause", "libxl_domain_destroy", "libxl_domain_suspend", "libxl_device_disk_add",
             "libxl_device_disk_remove", "libxl_device_nic_add", "libxl_device_nic_remove",
             "libxl_set_memory_target", "libxl_wait_for_memory_target", "libxl_get_free_memory")

    def __init__(self, real: ctypes.CDLL, fake: ctypes.CDLL) -> None:
        self._real = real
        self._fake = fake

    def __getattr__(self, name: str) -> Any:
        if name in self.FAKED:
            return getattr(self._fake, "fakexl_" + name[len("libxl_"):])
        return getattr(self._real, name)


class XenFakes:
    """A fake Xen host for one test: hypervisor (shared with the test xenstored), guests, libraries."""

    def __init__(self, so: Path, xenstored: Path, monkeypatch: pytest.MonkeyPatch, domids: str = "") -> None:
        monkeypatch.setenv("XENSTORED_PATH", str(xenstored))
        monkeypatch.setenv("FAKE_XEN_STATE", str(hypervisor_state(xenstored)))
        monkeypatch.setenv("FAKE_XEN_DOMIDS", domids)
        self.so = so
        # global, so that the real libxenlight loaded next reaches the hypervisor through the fake
        self.lib = ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL, use_errno=True)
        self.lib.fake_xen_advance.argtypes = [ctypes.c_uint64]
        self.lib.fake_xen_balloon.argtypes = [ctypes.c_uint32, ctypes.c_uint64]
        self.lib.fake_xen_reset()
        self.guests = FakeGuests(self.lib)
        self.privcmd = xenstored.parent / "privcmd"
        self.privcmd.touch()

    def xenctrl_lib(self) -> ctypes.CDLL:
        return xenctrl.bind(ctypes.CDLL(str(self.so), use_errno=True))

    def xenlight_lib(self) -> Any:
        from xapid.backend.xen import xenlight

        real = ctypes.CDLL(ctypes.util.find_library("xenlight"), use_errno=True)
        return xenlight.bind(CompositeXenLight(real, ctypes.CDLL(str(self.so), use_errno=True)))

    def advance(self, seconds: float) -> None:
        """Let hypervisor time pass (guests burn CPU)."""
        self.lib.fake_xen_advance(int(seconds * 1e9))

    def backend(self, state_dir: Path, clock: Any, **seams: Any) -> Any:
        """An unopened XenBackend on this fake host."""
        from xapid.backend.xen.driver import XenBackend

        return XenBackend(state_dir, clock, privcmd=[str(self.privcmd)], xenctrl_lib=self.xenctrl_lib,
                          xenlight_lib=self.xenlight_lib, **seams)

    def close(self) -> None:
        self.guests.stop()


@pytest.fixture
def xen_fakes(fake_xen_so: Path, xenstored: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[XenFakes]:
    """A fresh fake Xen host (dom0 only) with cooperative guests."""
    fakes = XenFakes(fake_xen_so, xenstored, monkeypatch)
    yield fakes
    fakes.close()
