"""``VM.*`` messages with behaviour: create/destroy, the power-state machine, live resources.

Each lifecycle handler checks the operation (``vm_ops``), asks the driver to act, and only
after the effect succeeded records the new state in the store.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from xapid.apitypes import NULL_REF, utc
from xapid.backend.interface import DomainInfo, DomainSpec
from xapid.backend.specs import BootPolicy, PathRefused
from xapid.constants import MiB
from xapid.context import CallContext
from xapid.errors import XenAPIError, invalid_value
from xapid.objects import called, generic, guest_metrics, message
from xapid.objects.devices import disk_spec, domain_type, nic_spec, remove_device
from xapid.objects.vm_ops import check, operation


# -- helpers -----------------------------------------------------------------------------


def check_memory(fields: dict[str, Any]) -> None:
    """MEMORY_CONSTRAINT_VIOLATION unless static_min ≤ dynamic_min ≤ dynamic_max ≤ static_max."""
    smin, dmin = fields["memory_static_min"], fields["memory_dynamic_min"]
    dmax, smax = fields["memory_dynamic_max"], fields["memory_static_max"]
    if not (0 <= smin <= dmin <= dmax <= smax):
        raise XenAPIError("MEMORY_CONSTRAINT_VIOLATION",
                          "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max")


def check_vcpus(fields: dict[str, Any]) -> None:
    if fields["VCPUs_max"] < 1:
        raise invalid_value("VCPUs_max", fields["VCPUs_max"])
    if not 1 <= fields["VCPUs_at_startup"] <= fields["VCPUs_max"]:
        raise invalid_value("VCPUs_at_startup", fields["VCPUs_at_startup"])


def _int_param(params: dict[str, str], key: str, default: int) -> int:
    value = params.get(key, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else default  # never int()'s digit limit


def domain_spec(ctx: CallContext, vm: Any) -> DomainSpec:
    """The driver's view of a VM record and its devices (no refs, no store objects)."""
    f = vm.fields
    store = ctx.store
    vbds = sorted((store.get(r) for r in f["VBDs"]), key=lambda v: int(v.fields["userdevice"]))
    vifs = sorted((store.get(r) for r in f["VIFs"]), key=lambda v: int(v.fields["device"]))
    params = f["VCPUs_params"]
    return DomainSpec(
        uuid=f["uuid"], name=f["name_label"], domain_type=domain_type(f),
        memory_static_max=f["memory_static_max"], memory_target=f["memory_dynamic_max"],
        vcpus_max=f["VCPUs_max"], vcpus_at_startup=f["VCPUs_at_startup"],
        kernel=f["PV_kernel"], ramdisk=f["PV_ramdisk"], cmdline=" ".join(x for x in (f["PV_args"], f["PV_legacy_args"]) if x),
        bootloader=f["PV_bootloader"], bootloader_args=f["PV_bootloader_args"],
        boot_order=f["HVM_boot_params"].get("order", ""), firmware=f["HVM_boot_params"].get("firmware", "bios"),
        platform=tuple(sorted(f["platform"].items())),
        vcpu_weight=_int_param(params, "weight", 256), vcpu_cap=_int_param(params, "cap", 0),
        on_poweroff=f["actions_after_shutdown"], on_reboot=f["actions_after_reboot"], on_crash=f["actions_after_crash"],
        disks=tuple(disk_spec(ctx, vm, v) for v in vbds), nics=tuple(nic_spec(ctx, v) for v in vifs),
    )


def suspend_image(ctx: CallContext, vm: Any) -> Path:
    return ctx.api.state_dir / "suspend" / f"{vm.fields['uuid']}.img"


def record_domain(ctx: CallContext, vm_ref: str, info: DomainInfo) -> None:
    """Write a live domain's state into the VM and its metrics."""
    store = ctx.store
    with store.transaction():
        was_running = store.get(vm_ref, "VM").fields["power_state"] in ("Running", "Paused")
        store.update(vm_ref, {
            "power_state": "Paused" if info.state == "paused" else "Running",
            "domid": info.domid, "resident_on": ctx.api.host_ref,
        })
        vm = store.get(vm_ref, "VM")
        metrics = vm.fields["metrics"]
        if store.exists(metrics, "VM_metrics"):
            store.update(metrics, metrics_fields(info, ctx.now()))
        if not was_running:
            for device in [*vm.fields["VBDs"], *vm.fields["VIFs"]]:
                store.update(device, {"currently_attached": True})
        if not vm.fields["consoles"]:  # HVM: the device model's VNC (first, as xapi lists it) and the serial line
            for protocol in (("rfb", "vt100") if info.domain_type == "hvm" else ("vt100",)):
                uuid = str(uuidlib.uuid4())
                store.add("console", {"uuid": uuid, "VM": vm_ref, "location": ctx.api.console_url(uuid),
                                      "protocol": protocol})


def metrics_fields(info: DomainInfo, now: datetime) -> dict[str, Any]:
    """VM_metrics fields describing a live domain."""
    return {
        "memory_actual": info.memory_actual, "VCPUs_number": info.vcpus,
        "VCPUs_CPU": {str(i): cpu for i, cpu in enumerate(info.vcpu_cpu)},
        "VCPUs_flags": {str(i): ["online", "running" if info.state == "running" else "blocked"]
                        for i in range(info.vcpus)},
        "state": [info.state], "start_time": utc(info.start_time),
        "current_domain_type": info.domain_type, "hvm": info.domain_type == "hvm", "last_updated": now,
    }


def record_halted(ctx: CallContext, vm_ref: str, power_state: str = "Halted") -> None:
    store = ctx.store
    with store.transaction():
        store.update(vm_ref, {"power_state": power_state, "domid": -1, "resident_on": NULL_REF})
        vm = store.get(vm_ref, "VM")
        for device in [*vm.fields["VBDs"], *vm.fields["VIFs"]]:
            store.update(device, {"currently_attached": False})
        for console in list(vm.fields["consoles"]):
            store.remove(console)
        guest_metrics.clear(store, vm_ref)
        metrics = vm.fields["metrics"]
        if store.exists(metrics, "VM_metrics"):
            store.update(metrics, {"memory_actual": 0, "VCPUs_number": 0, "VCPUs_CPU": {}, "VCPUs_flags": {},
                                   "state": [], "last_updated": ctx.now()})


def _host_enabled(ctx: CallContext) -> None:
    host = ctx.store.get(ctx.api.host_ref, "host")
    if not host.fields["enabled"]:
        raise XenAPIError("HOST_DISABLED", host.ref)


def _bootable(vm: Any) -> None:
    f = vm.fields
    if domain_type(f) == "pv" and not (f["PV_kernel"] or f["PV_bootloader"]):
        raise XenAPIError("VALUE_NOT_SUPPORTED", "PV_kernel", "", "a PV guest needs PV_kernel or PV_bootloader")


# -- host paths: PV_kernel, PV_ramdisk, PV_bootloader(_args) ([security], issue 13) ---------


def _boot_check(judge: Callable[[Any, str], str]) -> Callable[[Any, str], None]:
    def check(ctx: CallContext, value: str) -> None:
        try:
            judge(ctx.api.boot or BootPolicy.default(str(ctx.api.state_dir)), value)
        except PathRefused as refused:
            raise XenAPIError("INVALID_VALUE", refused.field, refused.value, refused.reason) from None
    return check


generic.FIELD_CHECKS.update({
    ("VM", "PV_kernel"): _boot_check(lambda policy, value: policy.boot_file("PV_kernel", value)),
    ("VM", "PV_ramdisk"): _boot_check(lambda policy, value: policy.boot_file("PV_ramdisk", value)),
    ("VM", "PV_bootloader"): _boot_check(BootPolicy.bootloader),
    ("VM", "PV_bootloader_args"): _boot_check(BootPolicy.bootloader_args),
})


# -- create / destroy ---------------------------------------------------------------------


@message("VM.create")
def create(ctx: CallContext, args: dict[str, Any]) -> str:
    """A new halted VM from a record, with its metrics object."""
    fields = generic.create_fields(ctx, "VM", args)
    probe = {**ctx.api.schema.classes["VM"].defaults(), **fields}
    check_memory(probe)
    check_vcpus(probe)
    store = ctx.store
    with store.transaction():
        metrics = store.add("VM_metrics", {"VCPUs_params": probe["VCPUs_params"], "install_time": ctx.now(),
                                            "last_updated": ctx.now()})
        fields.update(power_state="Halted", domid=-1, metrics=metrics)
        return store.add("VM", fields)


@message("VM.destroy")
def destroy(ctx: CallContext, self: str) -> str:
    """Remove a halted or suspended VM with its VBDs, VIFs, consoles and metrics (not its VDIs)."""
    store = ctx.store
    vm = store.get(self, "VM")
    check(vm, "destroy")
    if vm.fields["is_default_template"]:  # as xapi: unmark it first (VM.set_is_default_template)
        raise XenAPIError("VM_CANNOT_DELETE_DEFAULT_TEMPLATE", self)
    image = suspend_image(ctx, vm)
    with store.transaction():
        for device in [*vm.fields["VBDs"], *vm.fields["VIFs"]]:
            remove_device(store, device)
        for ref in [*vm.fields["consoles"], *vm.fields["crash_dumps"]]:
            store.remove(ref)
        for child in list(vm.fields["children"]):  # as xapi: children are rebased on our parent
            store.update(child, {"parent": vm.fields["parent"]})
        for field in ("metrics", "guest_metrics"):
            if store.find(vm.fields[field]) is not None:
                store.remove(vm.fields[field])
        store.remove(self)
    image.unlink(missing_ok=True)
    return ""


# -- lifecycle ----------------------------------------------------------------------------


async def _built(ctx: CallContext, vm_ref: str, info: DomainInfo) -> None:
    """Record a domain just built, or destroy it again when the task was cancelled meanwhile."""
    try:
        ctx.check_cancelled()
    except XenAPIError:
        await ctx.api.hypervisor.domain(info.uuid, vm=vm_ref).destroy()
        raise
    record_domain(ctx, vm_ref, info)


@message("VM.start", "VM.start_on")
async def start(ctx: CallContext, vm_ref: str, *args: Any) -> str:
    """Halted → Running (or Paused when *start_paused*): the arguments are (start_paused, force),
    after the host for ``VM.start_on`` (always this one)."""
    start_paused = args[-2]
    async with operation(ctx, vm_ref, called(ctx).name) as vm:
        _host_enabled(ctx)
        _bootable(vm)
        ctx.check_cancelled()
        ctx.progress(0.1)
        info = await ctx.api.hypervisor.create_domain(domain_spec(ctx, vm), start_paused, vm=vm_ref)
        await _built(ctx, vm_ref, info)
    return ""


@message("VM.pause")
async def pause(ctx: CallContext, vm: str) -> str:
    async with operation(ctx, vm, "pause") as obj:
        await ctx.api.hypervisor.domain(obj.fields["uuid"], vm=vm).pause()
        ctx.store.update(vm, {"power_state": "Paused"})
    return ""


@message("VM.unpause")
async def unpause(ctx: CallContext, vm: str) -> str:
    async with operation(ctx, vm, "unpause") as obj:
        await ctx.api.hypervisor.domain(obj.fields["uuid"], vm=vm).unpause()
        ctx.store.update(vm, {"power_state": "Running"})
    return ""


async def _clean_shutdown(ctx: CallContext, vm: str, op: str) -> None:
    async with operation(ctx, vm, op) as obj:
        ctx.check_cancelled()
        await ctx.api.hypervisor.domain(obj.fields["uuid"], vm=vm).shutdown("poweroff", ctx.api.shutdown_timeout)
        record_halted(ctx, vm)


@message("VM.clean_shutdown")
async def clean_shutdown(ctx: CallContext, vm: str) -> str:
    """Ask the guest to power off and wait (VM_SHUTDOWN_TIMEOUT if it does not)."""
    await _clean_shutdown(ctx, vm, "clean_shutdown")
    return ""


async def _hard_shutdown(ctx: CallContext, vm: str, op: str) -> None:
    async with operation(ctx, vm, op) as obj:
        if obj.fields["power_state"] == "Suspended":
            suspend_image(ctx, obj).unlink(missing_ok=True)
        else:
            await ctx.api.hypervisor.domain(obj.fields["uuid"], vm=vm).destroy()
        record_halted(ctx, vm)


@message("VM.hard_shutdown")
async def hard_shutdown(ctx: CallContext, vm: str) -> str:
    """Destroy the domain at once (or drop the suspend image)."""
    await _hard_shutdown(ctx, vm, "hard_shutdown")
    return ""


@message("VM.shutdown")
async def shutdown(ctx: CallContext, vm: str) -> str:
    """Clean shutdown when the VM is running and the guest complies, hard otherwise."""
    obj = ctx.store.get(vm, "VM")
    if obj.fields["power_state"] == "Running":
        try:
            await _clean_shutdown(ctx, vm, "shutdown")
            return ""
        except XenAPIError as error:
            if error.code != "VM_SHUTDOWN_TIMEOUT":
                raise
    await _hard_shutdown(ctx, vm, "shutdown")
    return ""


@message("VM.clean_reboot")
async def clean_reboot(ctx: CallContext, vm: str) -> str:
    async with operation(ctx, vm, "clean_reboot") as obj:
        ctx.check_cancelled()
        domain = ctx.api.hypervisor.domain(obj.fields["uuid"], vm=vm)
        await domain.shutdown("reboot", ctx.api.shutdown_timeout)
        info = await domain.info()
        record_domain(ctx, vm, info)
    return ""


@message("VM.hard_reboot")
async def hard_reboot(ctx: CallContext, vm: str) -> str:
    async with operation(ctx, vm, "hard_reboot") as obj:
        info = await ctx.api.hypervisor.domain(obj.fields["uuid"], vm=vm).reboot()
        record_domain(ctx, vm, info)
    return ""


@message("VM.power_state_reset")
async def power_state_reset(ctx: CallContext, vm: str) -> str:
    """Force Halted when the domain is really gone; refused while it still exists."""
    obj = ctx.store.get(vm, "VM")
    check(obj, "power_state_reset")
    domains = await ctx.api.hypervisor.list_domains(vm=vm)
    if any(d.uuid == obj.fields["uuid"] for d in domains):
        raise XenAPIError("OPERATION_NOT_ALLOWED", "the VM's domain is still running; use hard_shutdown")
    suspend_image(ctx, obj).unlink(missing_ok=True)
    record_halted(ctx, vm)
    return ""


@message("VM.suspend")
async def suspend(ctx: CallContext, vm: str) -> str:
    """Save the guest's memory to a file in the state dir and stop it."""
    async with operation(ctx, vm, "suspend") as obj:
        image = suspend_image(ctx, obj)
        await ctx.api.runner.run(image.parent.mkdir, parents=True, exist_ok=True)
        ctx.check_cancelled()
        ctx.progress(0.1)
        await ctx.api.hypervisor.domain(obj.fields["uuid"], vm=vm).suspend(str(image), ctx.api.shutdown_timeout)
        record_halted(ctx, vm, "Suspended")
    return ""


async def resume_vm(ctx: CallContext, vm: str, start_paused: bool, op: str = "resume") -> str:
    """Suspended → Running (or Paused), as the operation *op*."""
    async with operation(ctx, vm, op) as obj:
        _host_enabled(ctx)
        image = suspend_image(ctx, obj)
        ctx.check_cancelled()
        ctx.progress(0.1)
        info = await ctx.api.hypervisor.resume_domain(domain_spec(ctx, obj), str(image), start_paused, vm=vm)
        await _built(ctx, vm, info)
        await ctx.api.runner.run(image.unlink, missing_ok=True)
    return ""


@message("VM.resume", "VM.resume_on")
async def resume(ctx: CallContext, vm: str, *args: Any) -> str:
    """The arguments are (start_paused, force), after the host for ``VM.resume_on`` (always this one)."""
    return await resume_vm(ctx, vm, args[-2], called(ctx).name)


# -- resources ----------------------------------------------------------------------------


@message("VM.set_VCPUs_number_live")
async def set_VCPUs_number_live(ctx: CallContext, self: str, nvcpu: int) -> str:
    """Hot-plug or unplug vCPUs of a running VM (1 ≤ nvcpu ≤ VCPUs_max)."""
    async with operation(ctx, self, "changing_VCPUs_live") as obj:
        if not 1 <= nvcpu <= obj.fields["VCPUs_max"]:
            raise invalid_value("nvcpu", nvcpu)
        domain = ctx.api.hypervisor.domain(obj.fields["uuid"], vm=self)
        await domain.set_vcpus(nvcpu)
        info = await domain.info()
        with ctx.store.transaction():
            ctx.store.update(self, {"VCPUs_at_startup": nvcpu})
            record_domain(ctx, self, info)
    return ""


def _set_halted(ctx: CallContext, ref: str, op: str, changes: dict[str, Any]) -> str:
    """Apply static resource changes to a halted VM after checking the constraints."""
    vm = ctx.store.get(ref, "VM")
    check(vm, op)
    probe = {**vm.fields, **changes}
    check_memory(probe)
    check_vcpus(probe)
    ctx.store.update(ref, changes)
    return ""


@message("VM.set_VCPUs_max")
def set_VCPUs_max(ctx: CallContext, self: str, value: int) -> str:
    return _set_halted(ctx, self, "changing_VCPUs", {"VCPUs_max": value})


@message("VM.set_VCPUs_at_startup")
def set_VCPUs_at_startup(ctx: CallContext, self: str, value: int) -> str:
    return _set_halted(ctx, self, "changing_VCPUs", {"VCPUs_at_startup": value})


@message("VM.set_memory_static_range")
def set_memory_static_range(ctx: CallContext, self: str, min: int, max: int) -> str:
    return _set_halted(ctx, self, "changing_static_range", {"memory_static_min": min, "memory_static_max": max})


@message("VM.set_memory_limits")
def set_memory_limits(ctx: CallContext, self: str, static_min: int, static_max: int, dynamic_min: int,
                      dynamic_max: int) -> str:
    return _set_halted(ctx, self, "changing_memory_limits", {
        "memory_static_min": static_min, "memory_static_max": static_max,
        "memory_dynamic_min": dynamic_min, "memory_dynamic_max": dynamic_max})


@message("VM.set_memory")
def set_memory(ctx: CallContext, self: str, value: int) -> str:
    """static_max, dynamic_min and dynamic_max all become *value* (static_min kept)."""
    return _set_halted(ctx, self, "changing_memory_limits", {
        "memory_static_max": value, "memory_dynamic_min": value, "memory_dynamic_max": value})


@message("VM.set_memory_static_max")
def set_memory_static_max(ctx: CallContext, self: str, value: int) -> str:
    return _set_halted(ctx, self, "changing_static_range", {"memory_static_max": value})


@message("VM.set_memory_static_min")
def set_memory_static_min(ctx: CallContext, self: str, value: int) -> str:
    return _set_halted(ctx, self, "changing_static_range", {"memory_static_min": value})


async def _set_dynamic(ctx: CallContext, ref: str, changes: dict[str, Any]) -> str:
    """Change the dynamic range; a running VM's balloon target follows dynamic_max."""
    async with operation(ctx, ref, "changing_dynamic_range") as vm:
        probe = {**vm.fields, **changes}
        check_memory(probe)
        if vm.fields["power_state"] == "Running":
            domain = ctx.api.hypervisor.domain(vm.fields["uuid"], vm=ref)
            await domain.set_memory_target(probe["memory_dynamic_max"])
            info = await domain.info()
            with ctx.store.transaction():
                ctx.store.update(ref, changes)
                record_domain(ctx, ref, info)
        else:
            ctx.store.update(ref, changes)
    return ""


@message("VM.set_memory_dynamic_range")
async def set_memory_dynamic_range(ctx: CallContext, self: str, min: int, max: int) -> str:
    return await _set_dynamic(ctx, self, {"memory_dynamic_min": min, "memory_dynamic_max": max})


@message("VM.set_memory_dynamic_max")
async def set_memory_dynamic_max(ctx: CallContext, self: str, value: int) -> str:
    return await _set_dynamic(ctx, self, {"memory_dynamic_max": value})


@message("VM.set_memory_dynamic_min")
async def set_memory_dynamic_min(ctx: CallContext, self: str, value: int) -> str:
    return await _set_dynamic(ctx, self, {"memory_dynamic_min": value})


@message("VM.set_memory_target_live")
async def set_memory_target_live(ctx: CallContext, self: str, target: int) -> str:
    """Deprecated in xapi: set the balloon target of a running VM within its dynamic range."""
    async with operation(ctx, self, "changing_memory_live") as vm:
        if not vm.fields["memory_dynamic_min"] <= target <= vm.fields["memory_dynamic_max"]:
            raise invalid_value("target", target)
        domain = ctx.api.hypervisor.domain(vm.fields["uuid"], vm=self)
        await domain.set_memory_target(target)
        info = await domain.info()
        record_domain(ctx, self, info)
    return ""


@message("VM.compute_memory_overhead")
def compute_memory_overhead(ctx: CallContext, vm: str) -> int:
    """Hypervisor memory needed beside the guest's own: page tables and per-vCPU state."""
    f = ctx.store.get(vm, "VM").fields
    pages = (f["memory_static_max"] + 4095) // 4096
    shadow = int(pages * 8 * f["HVM_shadow_multiplier"]) if domain_type(f) == "hvm" else pages * 8
    return ((shadow + f["VCPUs_max"] * 4 * 4096 + MiB - 1) // MiB) * MiB


@message("VM.assert_operation_valid")
def assert_operation_valid(ctx: CallContext, self: str, op: str) -> str:
    check(ctx.store.get(self, "VM"), op)
    return ""


@message("VM.update_allowed_operations")
def update_allowed_operations(ctx: CallContext, self: str) -> str:
    """allowed_operations is recomputed on every write; this only checks the ref."""
    ctx.store.get(self, "VM")
    return ""


@message("crashdump.destroy")
def crashdump_destroy(ctx: CallContext, self: str) -> str:
    """Forget a crash dump record (its VDI stays)."""
    ctx.store.remove(self)
    return ""


@message("VM.get_boot_record")
def get_boot_record(ctx: CallContext, self: str) -> Any:
    return generic.CachedRecord(ctx.store.get(self, "VM"))
