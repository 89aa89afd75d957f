"""Issue 14 driver fixes that need no hypervisor: SIGCHLD negotiation layout and call order,
libxl's diagnostics in errors, unexpected driver failures as INTERNAL_ERROR, the [xen] config
section.  What libxl itself does (the fork/reap path under a running reactor, scheduler
parameters under credit and credit2, libxl_set_memory_target) runs on the real libxenlight
below the privcmd-level fake in tests/xen/test_real_libxl.py."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from xapid.backend.interface import BackendError
from xapid.backend.proxy import Hypervisor, to_xenapi
from xapid.backend.xen import xenlight
from xapid.backend.xen.core import XenCore
from xapid.backend.xen.toollog import FileLogger
from xapid.config import ConfigError, parse_config
from xapid.errors import XenAPIError
from xapid.runner import InlineRunner


def test_childproc_hooks_layout() -> None:
    """libxl_childproc_hooks as libxl_event.h lays it out on x86-64: {int@0, fn@8, fn@16}, 24 B."""
    hooks = xenlight.ChildprocHooks
    assert ctypes.sizeof(hooks) == 24
    assert (hooks.chldowner.offset, hooks.fork_replacement.offset, hooks.reaped_callback.offset) == (0, 8, 16)
    assert xenlight.LIBXL_SIGCHLD_OWNER_MAINLOOP == 1


def test_context_negotiates_mainloop_sigchld_before_any_other_call() -> None:
    """Right after libxl_ctx_alloc, libxl_childproc_setmode(ctx, {mainloop}, NULL); the hooks
    outlive the call; sigchld_occurred reaches libxl with the context."""
    calls: list[tuple[str, Any]] = []

    class Lib:
        def libxl_ctx_alloc(self, ref: Any, version: int, flags: int, logger: int) -> int:
            ctypes.cast(ref, ctypes.POINTER(ctypes.c_void_p))[0] = 0x1234
            calls.append(("alloc", None))
            return 0

        def libxl_childproc_setmode(self, ctx: int, hooks: Any, user: Any) -> None:
            owner = ctypes.cast(hooks, ctypes.POINTER(xenlight.ChildprocHooks))[0].chldowner
            calls.append(("setmode", (ctx, owner, user)))

        def libxl_childproc_sigchld_occurred(self, ctx: int) -> None:
            calls.append(("sigchld", ctx))

        def libxl_ctx_free(self, ctx: int) -> int:
            calls.append(("free", ctx))
            return 0

    xl = xenlight.XenLight(Lib(), 1)
    assert calls == [("alloc", None), ("setmode", (0x1234, 1, None))]
    assert xl._hooks.chldowner == 1  # kept alive with the context
    xl.sigchld_occurred()
    xl.close()
    xl.sigchld_occurred()  # closed: nothing reaches libxl
    assert calls[2:] == [("sigchld", 0x1234), ("free", 0x1234)]


def test_libxl_log_file_and_error_lines(tmp_path: Path) -> None:
    """The file logger appends (0600), rotates by size keeping one old file, and returns the
    error lines written since a mark, without the date prefix."""
    logger = FileLogger(str(tmp_path / "log" / "libxl.log"), max_bytes=64)
    path = tmp_path / "log" / "libxl.log"
    assert path.stat().st_mode & 0o777 == 0o600
    mark = logger.mark()
    with open(path, "a") as out:
        out.write("2024-01-01 00:00:00 UTC [7] libxl: debug: x.c:1: chatter\n")
        out.write("2024-01-01 00:00:00 UTC [7] libxl: error: libxl_create.c:9: Illegal pool specified\n")
    assert logger.errors_since(mark) == ["libxl: error: libxl_create.c:9: Illegal pool specified"]
    logger.mark()  # over 64 bytes: rotated
    assert (tmp_path / "log" / "libxl.log.1").exists() and path.stat().st_size == 0
    logger.close()
    logger.close()


def test_diagnostics_become_error_parameters() -> None:
    error = BackendError("libxl could not build the domain: libxl_domain_create_new: ERROR_INVAL", "x")
    error.diagnostics = ("libxl: error: libxl_create.c:9: Illegal pool specified",)
    mapped = to_xenapi(error, "start")
    assert mapped.code == "INTERNAL_ERROR"
    assert mapped.params[-1] == "libxl: error: libxl_create.c:9: Illegal pool specified"


@pytest_twisted.ensureDeferred
async def test_unexpected_driver_failure_is_internal_error_with_incident() -> None:
    class Broken:
        def pause_domain(self, uuid: str) -> None:
            raise OSError(9, "Bad file descriptor")

    with pytest.raises(XenAPIError) as caught:
        await Hypervisor(Broken(), InlineRunner()).pause_domain("u")  # type: ignore[arg-type]
    assert caught.value.code == "INTERNAL_ERROR"
    assert "incident" in caught.value.params[0]


def test_xen_config_section() -> None:
    config = parse_config("[xen]\nautoballoon = off\nxenstored_timeout = 5\nlog_dir = /var/log/xapid\n", "t")
    assert (config.xen.autoballoon, config.xen.xenstored_timeout, config.xen.log_dir) == ("off", 5.0,
                                                                                         "/var/log/xapid")
    with pytest.raises(ConfigError, match="autoballoon"):
        parse_config("[xen]\nautoballoon = maybe\n", "t")
    with pytest.raises(ConfigError, match="xenstored_timeout"):
        parse_config("[xen]\nxenstored_timeout = 0\n", "t")


def test_libxl_failures_become_backend_errors(tmp_path: Path) -> None:
    """XenCore._libxl: a XenLightError inside → BackendError("<what>: <libxl's words>", what), with
    the error lines libxl logged since the call began, not chained; other exceptions pass unchanged."""
    core = XenCore(tmp_path, lambda: 0.0)
    core._logger = logger = FileLogger(str(tmp_path / "libxl.log"))
    core._tls.mark = logger.mark()
    with open(tmp_path / "libxl.log", "a") as out:
        out.write("2024-01-01 00:00:00 UTC [7] libxl: error: libxl_device.c:9: disk vdev=xvdb exists\n")
    with pytest.raises(BackendError) as caught, core._libxl("libxl could not attach xvdb"):
        raise xenlight.XenLightError("libxl_device_disk_add", -3)
    error = caught.value
    assert type(error) is BackendError
    assert error.args == ("libxl could not attach xvdb: libxl_device_disk_add: ERROR_FAIL",)
    assert error.details == ("libxl could not attach xvdb",)
    assert error.diagnostics == ("libxl: error: libxl_device.c:9: disk vdev=xvdb exists",)
    assert error.__cause__ is None and error.__suppress_context__
    with pytest.raises(OSError) as passed, core._libxl("libxl could not attach xvdb"):
        raise FileNotFoundError(2, "gone")
    assert type(passed.value) is FileNotFoundError
    with core._libxl("libxl could not attach xvdb"):
        pass
    logger.close()
