"""Driver calls from the API layer: a typed facade (:class:`Hypervisor`), every call run off the
reactor, driver failures mapped to Xen-API errors in this one place."""

from __future__ import annotations

import secrets
from typing import Any, Callable, cast

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from xapid.backend.interface import (
    BackendError, BadDomainState, ConsoleEndpoint, Counters, DiskSpec, DomainInfo, DomainSpec, GuestData, HostInfo,
    HypervisorUnavailable, IBackend, InvalidSpec, NicSpec, NoSuchDomain, NotEnoughMemory, NotSupported,
    PhysicalCPU, PhysicalNic, ShutdownTimeout,
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
    """The driver seen from handlers and watchers: the only way they reach it.

    One ``async`` method per :class:`IBackend` operation, with the driver's own parameters and
    records.  Each runs the blocking driver call through the runner (a thread pool in the daemon)
    and maps a driver failure to a :class:`XenAPIError` here, in one place (:func:`to_xenapi`).
    The keyword-only *vm* (the VM's ref) is context for the error a client sees; a *timeout*
    the driver is given is also the one named in ``VM_SHUTDOWN_TIMEOUT``.

    Per-domain operations are also reachable through :meth:`domain`, a view that binds the
    domain's uuid and the VM ref once: ``await hv.domain(uuid, vm=ref).pause()``.

    The daemon's lifecycle operations (:meth:`open`, :meth:`close`, :meth:`watch_domains`) are
    the exception: their failures go to the daemon, not to a client, so they are not mapped.

    ``driver`` stays readable for tests (fault injection, the simulator's guest); code under
    ``xapid/`` uses the methods (``tests/test_hypervisor_facade.py`` checks both).
    """

    def __init__(self, driver: IBackend, runner: Runner):
        self.driver: Any = driver  # Any: mypy cannot type a zope interface's methods
        self.runner = runner

    async def _call(self, method: str, *args: Any, vm: str = "", timeout: float = 0, missing_ok: bool = False) -> Any:
        """Run the driver's *method* in the runner; *vm*, *timeout* name the context in a mapped error."""
        try:
            return await self.runner.run(getattr(self.driver, method), *args)
        except BackendError as error:
            if missing_ok and isinstance(error, NoSuchDomain):
                return None
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

    def domain(self, uuid: str, *, vm: str = "") -> Domain:
        """The operations on one domain (handle *uuid*, the VM's ref *vm*), context given once."""
        return Domain(self, uuid, vm)

    # -- lifecycle (daemon only; driver errors are not mapped) ------------------------------

    async def open(self) -> None:
        """Connect to the hypervisor off the reactor; :class:`HypervisorUnavailable` as the driver raises it."""
        await self.runner.run(self.driver.open)

    def close(self) -> None:
        """Release the driver's handles, in the calling thread (the daemon has stopped the pool by then)."""
        self.driver.close()

    def watch_domains(self, reactor: object, listener: Callable[[str], object]) -> None:
        """Have ``listener(uuid)`` called in the reactor thread for domains that change on their own."""
        self.driver.watch_domains(reactor, listener)

    # -- host -------------------------------------------------------------------------------

    async def host_info(self) -> HostInfo:
        return cast("HostInfo", await self._call("host_info"))

    async def physical_cpus(self) -> list[PhysicalCPU]:
        return cast("list[PhysicalCPU]", await self._call("physical_cpus"))

    async def physical_nics(self) -> list[PhysicalNic]:
        return cast("list[PhysicalNic]", await self._call("physical_nics"))

    async def free_memory(self) -> int:
        return cast("int", await self._call("free_memory"))

    async def list_domains(self, *, vm: str = "") -> list[DomainInfo]:
        return cast("list[DomainInfo]", await self._call("list_domains", vm=vm))

    async def read_counters(self) -> Counters:
        return cast("Counters", await self._call("read_counters"))

    # -- domains ----------------------------------------------------------------------------

    async def domain_info(self, uuid: str, *, vm: str = "") -> DomainInfo:
        return cast("DomainInfo", await self._call("domain_info", uuid, vm=vm))

    async def find_domain(self, uuid: str, *, vm: str = "") -> DomainInfo | None:
        """:meth:`domain_info`, or None when the domain does not exist (not an error)."""
        return cast("DomainInfo | None", await self._call("domain_info", uuid, vm=vm, missing_ok=True))

    async def create_domain(self, spec: DomainSpec, paused: bool, *, vm: str = "") -> DomainInfo:
        return cast("DomainInfo", await self._call("create_domain", spec, paused, vm=vm))

    async def destroy_domain(self, uuid: str, *, vm: str = "") -> None:
        await self._call("destroy_domain", uuid, vm=vm)

    async def pause_domain(self, uuid: str, *, vm: str = "") -> None:
        await self._call("pause_domain", uuid, vm=vm)

    async def unpause_domain(self, uuid: str, *, vm: str = "") -> None:
        await self._call("unpause_domain", uuid, vm=vm)

    async def shutdown_domain(self, uuid: str, reason: str, timeout: float, *, vm: str = "") -> None:
        await self._call("shutdown_domain", uuid, reason, timeout, vm=vm, timeout=timeout)

    async def reboot_domain(self, uuid: str, *, vm: str = "") -> DomainInfo:
        return cast("DomainInfo", await self._call("reboot_domain", uuid, vm=vm))

    async def suspend_domain(self, uuid: str, path: str, timeout: float, *, vm: str = "") -> None:
        await self._call("suspend_domain", uuid, path, timeout, vm=vm, timeout=timeout)

    async def resume_domain(self, spec: DomainSpec, path: str, paused: bool, *, vm: str = "") -> DomainInfo:
        return cast("DomainInfo", await self._call("resume_domain", spec, path, paused, vm=vm))

    async def set_vcpus(self, uuid: str, count: int, *, vm: str = "") -> None:
        await self._call("set_vcpus", uuid, count, vm=vm)

    async def set_memory_target(self, uuid: str, target: int, *, vm: str = "") -> None:
        await self._call("set_memory_target", uuid, target, vm=vm)

    async def attach_disk(self, uuid: str, disk: DiskSpec, *, vm: str = "") -> None:
        await self._call("attach_disk", uuid, disk, vm=vm)

    async def detach_disk(self, uuid: str, device: str, *, vm: str = "") -> None:
        await self._call("detach_disk", uuid, device, vm=vm)

    async def attach_nic(self, uuid: str, nic: NicSpec, *, vm: str = "") -> None:
        await self._call("attach_nic", uuid, nic, vm=vm)

    async def detach_nic(self, uuid: str, devid: int, *, vm: str = "") -> None:
        await self._call("detach_nic", uuid, devid, vm=vm)

    async def guest_data(self, uuid: str, *, vm: str = "") -> GuestData:
        return cast("GuestData", await self._call("guest_data", uuid, vm=vm))

    async def console_endpoint(self, uuid: str, protocol: str, *, vm: str = "") -> ConsoleEndpoint:
        """Where the domain's console of *protocol* is served (driver errors left unmapped:
        the console handler answers HTTP statuses, not Xen-API errors)."""
        return cast("ConsoleEndpoint", await self.runner.run(self.driver.console_endpoint, uuid, protocol))


class Domain:
    """One domain's operations, its uuid and VM ref bound once (from :meth:`Hypervisor.domain`).

    Each method is the :class:`Hypervisor` operation of the same name without ``domain``
    (``pause`` is ``pause_domain``, ``info`` is ``domain_info``), minus the uuid.
    """

    __slots__ = ("hypervisor", "uuid", "vm")

    def __init__(self, hypervisor: Hypervisor, uuid: str, vm: str = ""):
        self.hypervisor = hypervisor
        self.uuid = uuid
        self.vm = vm

    async def info(self) -> DomainInfo:
        return await self.hypervisor.domain_info(self.uuid, vm=self.vm)

    async def destroy(self) -> None:
        await self.hypervisor.destroy_domain(self.uuid, vm=self.vm)

    async def pause(self) -> None:
        await self.hypervisor.pause_domain(self.uuid, vm=self.vm)

    async def unpause(self) -> None:
        await self.hypervisor.unpause_domain(self.uuid, vm=self.vm)

    async def shutdown(self, reason: str, timeout: float) -> None:
        await self.hypervisor.shutdown_domain(self.uuid, reason, timeout, vm=self.vm)

    async def reboot(self) -> DomainInfo:
        return await self.hypervisor.reboot_domain(self.uuid, vm=self.vm)

    async def suspend(self, path: str, timeout: float) -> None:
        await self.hypervisor.suspend_domain(self.uuid, path, timeout, vm=self.vm)

    async def set_vcpus(self, count: int) -> None:
        await self.hypervisor.set_vcpus(self.uuid, count, vm=self.vm)

    async def set_memory_target(self, target: int) -> None:
        await self.hypervisor.set_memory_target(self.uuid, target, vm=self.vm)

    async def attach_disk(self, disk: DiskSpec) -> None:
        await self.hypervisor.attach_disk(self.uuid, disk, vm=self.vm)

    async def detach_disk(self, device: str) -> None:
        await self.hypervisor.detach_disk(self.uuid, device, vm=self.vm)

    async def attach_nic(self, nic: NicSpec) -> None:
        await self.hypervisor.attach_nic(self.uuid, nic, vm=self.vm)

    async def detach_nic(self, devid: int) -> None:
        await self.hypervisor.detach_nic(self.uuid, devid, vm=self.vm)

    async def guest_data(self) -> GuestData:
        return await self.hypervisor.guest_data(self.uuid, vm=self.vm)

    async def console_endpoint(self, protocol: str) -> ConsoleEndpoint:
        return await self.hypervisor.console_endpoint(self.uuid, protocol, vm=self.vm)
