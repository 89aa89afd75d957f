"""The REAL libxenctrl / libxenlight on a fake hypervisor below /dev/xen/privcmd (issue 14).

Every test runs the real libraries in a subprocess (tests/xen/realxen_child.py) under
fake_privcmd.so, with the real C xenstored and xen-init-dom0; libxl may abort that process.
Each test runs for credit2 (stock Debian) and credit.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from xenhost import RealXenHost, fake_privcmd_so, pv_kernel, real_xen  # noqa: F401 - fixtures

NEGOTIATE = "application must negotiate with libxl about SIGCHLD"


def result(proc: Any) -> dict[str, Any]:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no result (rc {proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_libxenctrl_reaches_the_fake_host(real_xen: RealXenHost) -> None:
    """xc_interface_open succeeds on the real libxenctrl; xc_physinfo is the fake 4-CPU 4 GiB
    host; xc_domain_getinfolist lists dom0; xc_sched_id names the host's scheduler."""
    proc = real_xen.run_child("xc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = result(proc)
    assert (got["version"], got["extraversion"], got["sched"]) == ([4, 17], ".7-fake", real_xen.sched)
    assert (got["nr_cpus"], got["total_pages"]) == (4, 1 << 20)
    assert [domid for domid, _uuid, _flags in got["domains"]] == [0]
    assert real_xen.unknown_calls() == []


def test_libxl_builds_and_destroys_a_pv_domain(real_xen: RealXenHost) -> None:
    """libxl_domain_create_new of the driver's PV config (real libxenguest ELF loader and builder)
    reaches the fake: the domain is listed; libxl_domain_destroy (which forks) removes it.
    No SIGCHLD handler in the process: libxl's default mode works."""
    proc = real_xen.run_child("libxl", str(real_xen.kernel))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = result(proc)
    assert (got.get("create"), got.get("listed"), got.get("destroy"), got.get("listed_after")) == (0, True, 0, False), got
    assert real_xen.unknown_calls() == []


def test_libxl_aborts_when_the_process_owns_sigchld_and_did_not_negotiate(real_xen: RealXenHost) -> None:
    """Issue 14 finding #1, shown on the real libxl: with a Python SIGCHLD handler installed (as a
    running Twisted reactor installs one) and no libxl_childproc_setmode, the first libxl call
    that forks (libxl_domain_destroy's child) kills the process with SIGABRT."""
    proc = real_xen.run_child("libxl", str(real_xen.kernel), "--sigchld")
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert NEGOTIATE in proc.stderr


def test_libxl_in_mainloop_mode_works_while_the_process_owns_sigchld(real_xen: RealXenHost) -> None:
    """The negotiated mode of wave2-facts section 4: libxl_childproc_setmode(mainloop) right after
    libxl_ctx_alloc, libxl in a worker thread, the main loop calling
    libxl_childproc_sigchld_occurred on SIGCHLD: create and destroy (which forks) complete."""
    proc = real_xen.run_child("libxl", str(real_xen.kernel), "--sigchld", "--mainloop")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NEGOTIATE not in proc.stderr
    got = result(proc)
    assert (got.get("create"), got.get("listed"), got.get("destroy"), got.get("listed_after")) == (0, True, 0, False), got


def test_driver_creates_and_destroys_under_a_running_reactor(real_xen: RealXenHost, tmp_path: Any) -> None:
    """xapid's XenBackend on the real libraries under a running Twisted reactor (which owns
    SIGCHLD), as `xapid serve --backend xen` runs it: open, create_domain (paused=False) and
    destroy_domain all succeed, the daemon process survives, and the domain is gone afterwards.

    Fails until the driver negotiates SIGCHLD with libxl (issue 14 #1: SIGABRT at libxl's first
    fork) and stops calling xc_sched_credit_domain_set on credit2 (#2: EINVAL)."""
    proc = real_xen.run_child("driver", str(tmp_path / "state"), str(real_xen.kernel))
    assert proc.returncode == 0, (
        f"the driver's process died (rc {proc.returncode}); "
        f"{'libxl aborted: ' + NEGOTIATE if NEGOTIATE in proc.stderr else ''}\nstdout: {proc.stdout}\n"
        f"stderr tail:\n{proc.stderr[-2000:]}")
    got = result(proc)
    assert got == {"open": "ok", "create_domain": "ok", "state": "running", "listed": True, "destroy_domain": "ok",
                   "listed_after": False}, got


def test_driver_sched_params_and_memory_target_through_real_libxl(real_xen: RealXenHost, tmp_path: Any) -> None:
    """The real-libxl versions of test_driver_hardening's scheduler and memory-target tests: on
    credit2 and credit the spec's weight and cap reach the hypervisor through libxl's
    sched_params (no xc_sched_credit_domain_set by the driver), and set_memory_target goes through
    the real libxl_set_memory_target (/vm/<uuid>/memory in MiB, the driver's memory_target)."""
    proc = real_xen.run_child("driver", str(tmp_path / "state"), str(real_xen.kernel), "--checks")
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    got = result(proc)
    assert (got.get("create_domain"), got.get("sched")) == ("ok", [512, 50]), got
    assert (got.get("set_memory_target"), got.get("vm_memory"), got.get("memory_target")) == (
        "ok", "48", 48 * 2**20), got
    assert got.get("destroy_domain") == "ok", got
