"""What happens to a VM whose domain shut down, crashed or vanished on its own.

The driver reports such domains (:meth:`IBackend.watch_domains`); :func:`domain_changed`
applies the VM's ``actions_after_shutdown`` (guest powered off), ``actions_after_reboot``
(guest rebooted) or ``actions_after_crash`` (crash or watchdog), as xapi does:

* ``destroy`` (and ``coredump_and_destroy``): the domain is destroyed, the VM is Halted;
* ``restart`` (and ``coredump_and_restart``, ``rename_restart``): rebuilt at once, Running;
* ``preserve``: the crashed domain is kept for inspection and the VM shows Paused.

A domain that vanished leaves its VM Halted.  VMs with an operation in flight are left to
that operation, which sees the outcome itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid.backend.interface import BackendError
from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects.vm import record_domain, record_halted
from xapid.objects.vm_ops import operation

if TYPE_CHECKING:
    from xapid.objects import Hooks

log = Logger()

ACTION_FIELD = {"poweroff": "actions_after_shutdown", "reboot": "actions_after_reboot",
                "crash": "actions_after_crash", "watchdog": "actions_after_crash"}
RESTART = {"restart", "coredump_and_restart", "rename_restart"}


def install(hooks: "Hooks") -> None:
    """The objects hook (:func:`xapid.objects.install`): listen to the driver once the inventory is read."""
    hooks.at_start(watch)


async def watch(api: Any) -> None:
    """Hear of every domain that shuts down, crashes or vanishes, and handle those that did so
    while the daemon was not running (a shut-down or crashed domain the driver still lists)."""
    api.hypervisor.watch_domains(api.reactor, lambda uuid: domain_changed(api, uuid))
    for domain in await api.hypervisor.list_domains():
        if domain.state in ("shutdown", "crashed"):
            domain_changed(api, domain.uuid)


def domain_changed(api: Any, uuid: str) -> Deferred:
    """Listener for :meth:`IBackend.watch_domains`: handle the change without blocking the reactor."""
    d = Deferred.fromCoroutine(_handle(api, uuid))
    d.addErrback(lambda f: log.failure("handling the change of domain {uuid} failed", f, uuid=uuid))
    return d


async def _handle(api: Any, uuid: str) -> None:
    store = api.store
    vm = store.by_uuid(uuid)  # the domain handle is the VM uuid
    if vm is None or vm.cls != "VM" or vm.fields["is_control_domain"] or vm.fields["current_operations"]:
        return
    ctx = CallContext.internal(api)
    domain = api.hypervisor.domain(uuid, vm=vm.ref)
    info = await api.hypervisor.find_domain(uuid, vm=vm.ref)
    if info is None:
        if vm.fields["power_state"] in ("Running", "Paused"):
            log.info("the domain of VM {uuid} vanished: now Halted", uuid=uuid)
            record_halted(ctx, vm.ref)
        return
    if info.state not in ("shutdown", "crashed"):
        return
    field = ACTION_FIELD.get(info.shutdown_reason or ("crash" if info.state == "crashed" else ""))
    if field is None:  # suspend, or a reason only an operation of ours causes
        return
    action = vm.fields[field]
    log.info("VM {uuid} domain {domid} shut down ({reason}): {action}", uuid=uuid, domid=info.domid,
             reason=info.shutdown_reason, action=action)
    try:
        if action in RESTART:
            async with operation(ctx, vm.ref, "hard_reboot"):
                record_domain(ctx, vm.ref, await domain.reboot())
        elif action == "preserve":
            store.update(vm.ref, {"power_state": "Paused"})
        else:
            async with operation(ctx, vm.ref, "hard_shutdown"):
                await domain.destroy()
                record_halted(ctx, vm.ref)
    except (BackendError, XenAPIError) as exc:
        log.warn("could not apply {action} to VM {uuid}: {error}", action=action, uuid=uuid, error=str(exc))
