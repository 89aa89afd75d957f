"""A fake Xen host BELOW the privcmd device: the real libxenctrl, libxencall, libxenguest and
libxenlight run, against fake_privcmd.c (an LD_PRELOAD hypervisor), with the real C xenstored.

:class:`RealXenHost` is one such host: its own xenstored (run under fake_xen.so as its shim,
sharing the domain table file with fake_privcmd.so), xen-init-dom0 run once as on a real
dom0, a fake xenconsoled, a guest kernel, and :meth:`RealXenHost.env` — the environment under
which a subprocess gets the real libraries on this host.  libxl may abort the process that
calls it, so the tests run libxl in subprocesses (tests/xen/realxen_child.py).  Without gcc or
the Xen 4.17 packages the fixtures fail (never skip) with the install command.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from xenfakes import HERE, INSTALL, XENSTORED, compile_c, require

from xapid.backend.xen.xenstore import XenStore

XEN_INIT_DOM0 = Path("/usr/lib/xen-4.17/bin/xen-init-dom0")
CHILD = HERE / "realxen_child.py"
ROOT = HERE.parent.parent
_CONSOLE = re.compile(r"^/local/domain/(\d+)/console/ring-ref$")
SHUTDOWN_SUSPEND = 2  # xen/sched.h
_DOM0_TARGET = "/local/domain/0/memory/target"
_CONTROL = re.compile(r"^/local/domain/(\d+)/control/shutdown$")


@pytest.fixture(scope="session")
def fake_privcmd_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fake_privcmd.c built as an LD_PRELOAD object."""
    out = tmp_path_factory.mktemp("fake_privcmd") / "fake_privcmd.so"
    return compile_c(HERE / "fake_privcmd.c", out, "-shared", "-fPIC", "-ldl")


@pytest.fixture(scope="session")
def pv_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest PV kernel libxenguest loads (fake_pv_kernel.S), in a directory of its own."""
    out = tmp_path_factory.mktemp("kernels") / "vmlinuz-fake"
    return compile_c(HERE / "fake_pv_kernel.S", out, "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
                     f"-Wl,-T,{HERE / 'fake_pv_kernel.ld'}")


class FakeConsoled:
    """xenconsoled's part libxl waits for: each new console gets a ``tty`` node.  With
    *on_suspend*, also the guests' side of a suspend request: ``control/shutdown`` = "suspend"
    is acknowledged (cleared, as a PV kernel does) and ``on_suspend(domid)`` makes the guest's
    SCHEDOP_shutdown(suspend).  With *on_dom0_target*, dom0's balloon driver: a new
    ``memory/target`` of dom0 is passed on as ``on_dom0_target(kib)``."""

    def __init__(self, on_suspend: Callable[[int], None] | None = None,
                 on_dom0_target: Callable[[int], None] | None = None) -> None:
        self.on_suspend = on_suspend
        self.on_dom0_target = on_dom0_target
        self.store = XenStore()  # on $XENSTORED_PATH
        self.store.watch("/local/domain", "consoled")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-xenconsoled", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self.store.fileno()
        while not self._stop.is_set():
            select.select([fd], [], [], 0.05)
            while (event := self.store.check_watch()) is not None:
                match = _CONSOLE.match(event[0])
                if match:
                    try:
                        self.store.write(f"/local/domain/{match.group(1)}/console/tty", "/dev/null")
                    except OSError:
                        pass
                if event[0] == _DOM0_TARGET and self.on_dom0_target is not None:
                    try:
                        self.on_dom0_target(int(self.store.read(event[0])))
                    except (OSError, ValueError):
                        pass
                control = _CONTROL.match(event[0])
                if control and self.on_suspend is not None:
                    try:
                        if self.store.read(event[0]) != b"suspend":
                            continue
                        self.store.write(event[0], "")
                    except OSError:
                        continue
                    self.on_suspend(int(control.group(1)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.store.close()


class RealXenHost:
    """One fake Xen host below privcmd in *root* (see the module docstring)."""

    def __init__(self, root: Path, privcmd_so: Path, shim_so: Path, kernel: Path, sched: str = "credit2") -> None:
        require(XENSTORED.exists(), str(XENSTORED))
        require(XEN_INIT_DOM0.exists(), str(XEN_INIT_DOM0))
        self.root = root
        self.privcmd_so = privcmd_so
        self.kernel = kernel
        self.sched = sched
        self.rundir = root / "xenstored"
        self.state = root / "hypervisor"
        self.log = root / "privcmd.log"  # what the fake hypervisor does not know
        for sub in ("var/run/xen", "var/lib/xen", "var/log/xen"):
            (root / "fs" / sub).mkdir(parents=True, exist_ok=True)
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.socket = self.rundir / "socket"
        self.shim_so = shim_so
        self.refusals = root / "refusals"  # FAKE_PRIVCMD_FAIL: see refuse()
        self._start_xenstored()

    def _start_xenstored(self) -> None:
        """The real xenstored under the shim, xen-init-dom0 as on boot, the fake xenconsoled."""
        env = dict(os.environ, XENSTORED_RUNDIR=str(self.rundir), LD_PRELOAD=str(self.shim_so), FAKE_XEN_DOMIDS="",
                   FAKE_XEN_STATE=str(self.state))
        with open(self.rundir / "xenstored.log", "ab") as log:
            self.xenstored = subprocess.Popen(
                [str(XENSTORED), "-N", "-F", str(self.rundir / "xenstored.pid"), "-T", str(self.rundir / "trace.log")],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 10
        while not self.socket.exists() and self.xenstored.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.socket.exists(), f"xenstored did not start: {(self.rundir / 'xenstored.log').read_text()}"
        # what xen-init-dom0.service does on a real dom0 (Domain-0's name, Pool-0), by the real tool
        init = subprocess.run([str(XEN_INIT_DOM0)], env=self.env(), capture_output=True, text=True, timeout=30)
        assert init.returncode == 0, f"xen-init-dom0 failed: {init.stdout}{init.stderr}"
        old = os.environ.get("XENSTORED_PATH")
        os.environ["XENSTORED_PATH"] = str(self.socket)
        try:
            self.consoled = FakeConsoled(self._guest_suspends, self._dom0_balloons)
        finally:
            if old is None:
                del os.environ["XENSTORED_PATH"]
            else:
                os.environ["XENSTORED_PATH"] = old

    def _guest_suspends(self, domid: int) -> None:
        """The guest's answer to a suspend request (fake_privcmd.c's fake guest then names its
        start_info frame in vCPU 0's rdx, as a PV kernel's suspend hypercall does)."""
        try:
            self.xc(f"shutdown:{domid}:{SHUTDOWN_SUSPEND}")
        except (AssertionError, subprocess.SubprocessError, ValueError):
            pass  # the domain went away meanwhile: libxl reports it

    def _dom0_balloons(self, kib: int) -> None:
        """dom0's balloon driver follows its ``memory/target``."""
        try:
            self.xc(f"balloon:0:{kib}")
        except (AssertionError, subprocess.SubprocessError, ValueError):
            pass  # libxl_wait_for_memory_target reports a balloon that does not move

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that runs the real Xen libraries on this host."""
        env = dict(os.environ)
        for name in ("XENSTORED_RUNDIR", "FAKE_XEN_DOMIDS"):
            env.pop(name, None)
        env.update(LD_PRELOAD=str(self.privcmd_so), FAKE_XEN_STATE=str(self.state), XENSTORED_PATH=str(self.socket),
                   FAKE_XEN_ROOT=str(self.root / "fs"), FAKE_XEN_SCHED=self.sched, FAKE_PRIVCMD_LOG=str(self.log),
                   FAKE_PRIVCMD_FAIL=str(self.refusals),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
        env.update(extra)
        return env

    def run_child(self, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        """tests/xen/realxen_child.py *args* on this host."""
        return subprocess.run([sys.executable, str(CHILD), *args], env=self.env(**extra), capture_output=True,
                              text=True, timeout=timeout, cwd=str(ROOT))

    def unknown_calls(self) -> list[str]:
        """The hypercalls/commands the fake answered ENOSYS/ENOTTY to, so far."""
        return self.log.read_text().splitlines() if self.log.exists() else []

    def refuse(self, kind: str, cmd: int, err: int) -> None:
        """From now on the hypervisor fails *kind* ("domctl"/"sysctl") command *cmd* with *err*."""
        with open(self.refusals, "a") as out:
            out.write(f"{kind} {cmd} {err}\n")

    def accept_all(self) -> None:
        """Forget every refusal given to :meth:`refuse`."""
        self.refusals.write_text("")

    def xc(self, *ops: str) -> object:
        """Hypercalls through the real libxenctrl in a child process, as another program (a guest,
        another toolstack) makes them behind the daemon's back: each op is ``list``,
        ``shutdown:DOMID:REASON`` (SCHEDOP_shutdown's codes: 0 poweroff, 1 reboot, 2 suspend,
        3 crash), ``destroy:DOMID``, ``setmaxmem:DOMID:KIB`` or ``balloon:DOMID:KIB`` (a balloon
        driver: the domain's reservation grows or shrinks to KIB).  Returns the last ``list``:
        [(domid, uuid, state flags)]."""
        script = (
            "import ctypes, json, sys\n"
            "from xapid.backend.xen.xenctrl import XenCtrl, load_xenctrl\n"
            "xc = XenCtrl(load_xenctrl(), None)\n"
            "listed = None\n"
            "for op in sys.argv[1:]:\n"
            "    name, *args = op.split(':')\n"
            "    if name == 'list':\n"
            "        listed = [(d.domain, d.uuid, d.flags) for d in xc.domain_getinfolist()]\n"
            "    elif name == 'shutdown':\n"
            "        xc.domain_shutdown(int(args[0]), int(args[1]))\n"
            "    elif name == 'destroy':\n"
            "        xc.domain_destroy(int(args[0]))\n"
            "    elif name == 'setmaxmem':\n"
            "        assert xc._lib.xc_domain_setmaxmem(\n"
            "            ctypes.c_void_p(xc._h()), int(args[0]), ctypes.c_uint64(int(args[1]))) == 0\n"
            "    elif name == 'balloon':\n"
            "        info = next(d for d in xc.domain_getinfolist() if d.domain == int(args[0]))\n"
            "        delta = int(args[1]) // 4 - info.tot_pages\n"
            "        frames = (ctypes.c_uint64 * max(abs(delta), 1))()\n"
            "        if delta > 0:\n"
            "            assert xc._lib.xc_domain_increase_reservation_exact(\n"
            "                ctypes.c_void_p(xc._h()), int(args[0]), ctypes.c_ulong(delta), 0, 0, frames) == 0\n"
            "        elif delta < 0:\n"
            "            assert xc._lib.xc_domain_decrease_reservation_exact(\n"
            "                ctypes.c_void_p(xc._h()), int(args[0]), ctypes.c_ulong(-delta), 0, frames) == 0\n"
            "print(json.dumps(listed))\n")
        proc = subprocess.run([sys.executable, "-c", script, *ops], env=self.env(), capture_output=True, text=True,
                              timeout=30, cwd=str(ROOT), check=False)
        assert proc.returncode == 0, f"xc {ops} failed: {proc.stderr[-2000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def kill_xenstored(self) -> None:
        """xenstored dies (SIGKILL: no goodbye to its clients); the fake xenconsoled goes with it."""
        self.consoled.stop()
        self.xenstored.kill()
        self.xenstored.wait()

    def restart_xenstored(self) -> None:
        """A new xenstored on the same socket, over the same hypervisor (its tree starts empty, as a
        real xenstored restarted without live update), xen-init-dom0 and xenconsoled again."""
        if self.xenstored.poll() is None:
            self.kill_xenstored()
        self.socket.unlink(missing_ok=True)
        self._start_xenstored()

    def close(self) -> None:
        self.consoled.stop()
        self.xenstored.send_signal(signal.SIGTERM)
        try:
            self.xenstored.wait(5)
        except subprocess.TimeoutExpired:
            self.xenstored.kill()
            self.xenstored.wait()


@pytest.fixture(params=["credit2", "credit"])
def real_xen(request: pytest.FixtureRequest, tmp_path: Path, fake_privcmd_so: Path, fake_xen_so: Path,
             pv_kernel: Path) -> Iterator[RealXenHost]:
    """A fresh host below privcmd per test, for each scheduler (credit2 is stock Debian's)."""
    require(Path("/usr/include/libxl.h").exists(), f"libxl.h ({INSTALL})")
    host = RealXenHost(tmp_path / "host", fake_privcmd_so, fake_xen_so, pv_kernel, sched=request.param)
    yield host
    host.close()


@pytest.fixture
def real_xen_credit2(tmp_path: Path, fake_privcmd_so: Path, fake_xen_so: Path, pv_kernel: Path
                     ) -> Iterator[RealXenHost]:
    """A fresh host below privcmd running credit2 only."""
    host = RealXenHost(tmp_path / "host", fake_privcmd_so, fake_xen_so, pv_kernel)
    yield host
    host.close()
