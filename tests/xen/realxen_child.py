"""Run in a subprocess by tests/xen/test_real_libxl.py, under the fake hypervisor below privcmd
(LD_PRELOAD=fake_privcmd.so, see tests/xenhost.py): the REAL libxenctrl/libxenlight code, so a
libxl abort kills only this process.  Prints one JSON line on stdout; libxl's debug log goes
to stderr.

    realxen_child.py xc
        xc_interface_open, xc_physinfo, xc_domain_getinfolist, xc_sched_id
    realxen_child.py libxl KERNEL [--sigchld] [--mainloop]
        libxl_ctx_alloc, libxl_domain_create_new of a small PV domain, libxl_domain_destroy.
        --sigchld: a Python SIGCHLD handler is installed first (the process owns SIGCHLD, as
        under a running Twisted reactor).  --mainloop: libxl_childproc_setmode(mainloop) right
        after libxl_ctx_alloc; libxl runs in a worker thread and the main thread tells libxl
        about SIGCHLD with libxl_childproc_sigchld_occurred (wave2-facts section 4).
    realxen_child.py driver STATE_DIR KERNEL
        xapid's XenBackend under a running Twisted reactor: open, create_domain, destroy_domain,
        each in a reactor pool thread as the daemon runs them.
        --checks: also the domain's (weight, cap) as the hypervisor holds them, and
        set_memory_target (libxl_set_memory_target) with /vm/<uuid>/memory and domain_info.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys
import threading
import time
import uuid as uuidlib
from ctypes import POINTER, Structure, c_char_p, c_int, c_uint, c_uint32, c_void_p

MiB = 2**20
XTL_DEBUG = 1
LIBXL_SIGCHLD_OWNER_MAINLOOP = 1


def out(**result: object) -> None:
    print(json.dumps(result), flush=True)


def spec_json(kernel: str, name: str = "realxen") -> tuple[str, str]:
    """A small PV domain as the driver would send it (domconfig), without devices."""
    from xapid.backend.interface import DomainSpec
    from xapid.backend.xen import domconfig

    spec = DomainSpec(uuid=str(uuidlib.uuid4()), name=name, domain_type="pv", memory_static_max=64 * MiB,
                      memory_target=64 * MiB, vcpus_max=2, vcpus_at_startup=1, kernel=kernel, cmdline="console=hvc0")
    return spec.uuid, domconfig.domain_config_json(spec)


def xc_scenario() -> None:
    from xapid.backend.xen import xenctrl

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fdopen.restype = c_void_p
    tl = ctypes.CDLL(ctypes.util.find_library("xentoollog"))
    tl.xtl_createlogger_stdiostream.restype = c_void_p
    tl.xtl_createlogger_stdiostream.argtypes = [c_void_p, c_int, c_uint]
    logger = tl.xtl_createlogger_stdiostream(libc.fdopen(2, b"w"), XTL_DEBUG, 0)
    xc = xenctrl.XenCtrl(xenctrl.load_xenctrl(), logger)
    phys = xc.physinfo()
    out(version=list(xc.version()), extraversion=xc.extraversion(), sched=xc.sched_id(),
        nr_cpus=phys.nr_cpus, total_pages=phys.total_pages, free_pages=phys.free_pages,
        domains=[(d.domain, d.uuid, d.flags) for d in xc.domain_getinfolist()])
    xc.close()


class ChildprocHooks(Structure):
    _fields_ = [("chldowner", c_int), ("fork_replacement", c_void_p), ("reaped_callback", c_void_p)]


def libxl_scenario(kernel: str, own_sigchld: bool, mainloop: bool) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fdopen.restype = c_void_p
    tl = ctypes.CDLL(ctypes.util.find_library("xentoollog"))
    tl.xtl_createlogger_stdiostream.restype = c_void_p
    tl.xtl_createlogger_stdiostream.argtypes = [c_void_p, c_int, c_uint]
    xl = ctypes.CDLL(ctypes.util.find_library("xenlight"), use_errno=True)
    xl.libxl_ctx_alloc.argtypes = [POINTER(c_void_p), c_int, c_uint, c_void_p]
    xl.libxl_childproc_setmode.argtypes = [c_void_p, POINTER(ChildprocHooks), c_void_p]
    xl.libxl_childproc_setmode.restype = None
    xl.libxl_childproc_sigchld_occurred.argtypes = [c_void_p]
    xl.libxl_childproc_sigchld_occurred.restype = None
    xl.libxl_domain_config_init.argtypes = [c_void_p]
    xl.libxl_domain_config_from_json.argtypes = [c_void_p, c_void_p, c_char_p]
    xl.libxl_domain_create_new.argtypes = [c_void_p, c_void_p, POINTER(c_uint32), c_void_p, c_void_p]
    xl.libxl_domain_destroy.argtypes = [c_void_p, c_uint32, c_void_p]
    xl.libxl_domain_info.argtypes = [c_void_p, c_void_p, c_uint32]

    sigchld = threading.Event()
    if own_sigchld or mainloop:
        signal.signal(signal.SIGCHLD, lambda signum, frame: sigchld.set())
        signal.siginterrupt(signal.SIGCHLD, False)
    logger = tl.xtl_createlogger_stdiostream(libc.fdopen(2, b"w"), XTL_DEBUG, 0)
    ctx = c_void_p()
    rc = xl.libxl_ctx_alloc(ctypes.byref(ctx), 0, 0, logger)
    if rc:
        out(step="libxl_ctx_alloc", rc=rc)
        return
    hooks = ChildprocHooks(LIBXL_SIGCHLD_OWNER_MAINLOOP, None, None)  # must outlive the ctx
    if mainloop:
        xl.libxl_childproc_setmode(ctx, ctypes.byref(hooks), None)
    uuid, config_json = spec_json(kernel)
    result: dict[str, object] = {"uuid": uuid}

    def work() -> None:
        config = ctypes.create_string_buffer(4096)
        xl.libxl_domain_config_init(config)
        rc = xl.libxl_domain_config_from_json(ctx, config, config_json.encode())
        if rc:
            result.update(step="libxl_domain_config_from_json", rc=rc)
            return
        domid = c_uint32(0)
        rc = xl.libxl_domain_create_new(ctx, config, ctypes.byref(domid), None, None)
        result.update(create=rc, domid=domid.value)
        if rc:
            return
        info = ctypes.create_string_buffer(1024)
        result["listed"] = xl.libxl_domain_info(ctx, info, domid.value) == 0
        result["destroy"] = xl.libxl_domain_destroy(ctx, domid.value, None)
        result["listed_after"] = xl.libxl_domain_info(ctx, info, domid.value) == 0

    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        if sigchld.wait(0.02) and mainloop:
            sigchld.clear()
            xl.libxl_childproc_sigchld_occurred(ctx)  # from the main loop, never the signal handler
    worker.join()
    out(**result)


def driver_scenario(state_dir: str, kernel: str, checks: bool = False) -> None:
    from twisted.internet import reactor, threads

    from xapid.backend.interface import DomainSpec
    from xapid.backend.xen.driver import XenBackend

    result: dict[str, object] = {}
    backend = XenBackend(__import__("pathlib").Path(state_dir), time.time)
    try:  # the kernel's directory allowed, where the driver checks boot paths
        from xapid.backend.specs import BootPolicy

        backend.boot_policy = BootPolicy.build((), (os.path.dirname(os.path.realpath(kernel)),))
    except ImportError:
        pass
    spec = DomainSpec(uuid=str(uuidlib.uuid4()), name="realxen-driver", domain_type="pv",
                      memory_static_max=64 * MiB, memory_target=64 * MiB, vcpus_max=2, vcpus_at_startup=1,
                      kernel=kernel, cmdline="console=hvc0", vcpu_weight=512, vcpu_cap=50)

    def step(name: str, call: object, *args: object) -> object:
        def ok(value: object) -> object:
            result[name] = "ok"
            return value

        def failed(failure: object) -> None:
            result[name] = f"{type(failure.value).__name__}: {failure.value}"  # type: ignore[attr-defined]
            raise failure.value  # type: ignore[attr-defined]

        return threads.deferToThread(call, *args).addCallbacks(ok, failed)  # type: ignore[arg-type]

    def sched_of(domid: int) -> tuple[int, int]:
        from xapid.backend.xen.xenctrl import XenCtrl, load_xenctrl

        xc = XenCtrl(load_xenctrl(), None)
        try:
            return xc.sched_credit_get(domid, credit2=xc.sched_id() == "credit2")
        finally:
            xc.close()

    def vm_memory() -> str:
        from xapid.backend.xen.xenstore import XenStore

        xs = XenStore()
        try:
            return xs.read(f"/vm/{spec.uuid}/memory").decode()
        finally:
            xs.close()

    def listed() -> bool:
        return any(d.uuid == spec.uuid for d in backend.list_domains())

    async def run() -> None:
        try:
            await step("open", backend.open)
            info = await step("create_domain", backend.create_domain, spec, False)
            result["state"] = info.state  # type: ignore[attr-defined]
            result["listed"] = await threads.deferToThread(listed)
            if checks:  # --checks: libxl applied sched_params; libxl_set_memory_target
                result["sched"] = list(await threads.deferToThread(sched_of, info.domid))  # type: ignore[attr-defined]
                await step("set_memory_target", backend.set_memory_target, spec.uuid, 48 * MiB)
                result["vm_memory"] = await threads.deferToThread(vm_memory)
                result["memory_target"] = (await threads.deferToThread(
                    backend.domain_info, spec.uuid)).memory_target  # type: ignore[attr-defined]
            await step("destroy_domain", backend.destroy_domain, spec.uuid)
            result["listed_after"] = await threads.deferToThread(listed)
        except Exception:
            pass
        finally:
            backend.close()
            out(**result)
            reactor.stop()

    from twisted.internet.defer import ensureDeferred

    reactor.callWhenRunning(lambda: ensureDeferred(run()))
    reactor.run()  # installs Twisted's SIGCHLD handler, as `xapid serve` does


def main(argv: list[str]) -> None:
    scenario = argv[1]
    if scenario == "xc":
        xc_scenario()
    elif scenario == "libxl":
        libxl_scenario(argv[2], "--sigchld" in argv, "--mainloop" in argv)
    elif scenario == "driver":
        driver_scenario(argv[2], argv[3], "--checks" in argv)
    else:
        raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main(sys.argv)
