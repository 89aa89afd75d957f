"""Driver calls from the API layer: run off the reactor, driver failures mapped to Xen-API
errors in this one place."""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from xapid.backend.interface import (
    BackendError, BadDomainState, HypervisorUnavailable, IBackend, InvalidSpec, NoSuchDomain, NotEnoughMemory,
    NotSupported, ShutdownTimeout,
)
from xapid.errors import XenAPIError
from xapid.runner import Runner

log = Logger()


def to_xenapi(error: BackendError, operation: str, vm: str = "", host: str = "", timeout: float = 0) -> XenAPIError:
    """The Xen-API failure a caller sees for a driver refusal."""
    if isinstance(error, NotEnoughMemory):
        needed, available = (list(error.details) + ["0", "0"])[:2]
        return XenAPIError("HOST_NOT_ENOUGH_FREE_MEMORY", needed, available)
    if isinstance(error, ShutdownTimeout):
        return XenAPIError("VM_SHUTDOWN_TIMEOUT", vm, f"{timeout:g}")
    if isinstance(error, NotSupported):
        return XenAPIError("NOT_IMPLEMENTED", operation)
    if isinstance(error, InvalidSpec):
        return XenAPIError("VALUE_NOT_SUPPORTED", operation, vm, error.message)
    if isinstance(error, (BadDomainState, NoSuchDomain)):
        return XenAPIError("OPERATION_NOT_ALLOWED", f"{operation}: {error.message}")
    if isinstance(error, HypervisorUnavailable):
        return XenAPIError("HOST_OFFLINE", host)
    return XenAPIError("INTERNAL_ERROR", f"{operation}: {error.message}", *error.diagnostics)


class Hypervisor:
    """The driver seen from handlers: ``await hv.call("pause_domain", uuid, vm=ref)``."""

    def __init__(self, driver: IBackend, runner: Runner):
        self.driver = driver
        self.runner = runner

    async def call(self, method: str, *args: Any, vm: str = "", timeout: float = 0) -> Any:
        try:
            return await self.runner.run(getattr(self.driver, method), *args)
        except BackendError as error:
            log.info("driver refused {method}: {error}", method=method, error=error.message)
            raise to_xenapi(error, method, vm=vm, timeout=timeout) from None
        except (XenAPIError, CancelledError):
            raise
        except Exception:  # noqa: BLE001 - a driver bug: never a traceback to the client
            incident = secrets.token_hex(4)
            log.failure("driver call {method} failed unexpectedly (incident {incident})", method=method,
                        incident=incident)
            raise XenAPIError("INTERNAL_ERROR", f"{method}: unexpected driver failure, incident {incident} "
                              f"in the xapid log") from None
