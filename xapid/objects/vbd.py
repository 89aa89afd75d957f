"""``VBD.*``: virtual disks and CD drives of VMs, hot-plug, CD insert/eject."""

from __future__ import annotations

from typing import Any

from xapid.apitypes import NULL_REF
from xapid.context import CallContext
from xapid.errors import XenAPIError, invalid_value, operation_not_allowed
from xapid.objects import called, generic, message
from xapid.objects.devices import allowed_vbd_devices, destroy_device, disk_device_name, disk_spec, running_vm


@message("VBD.create")
def create(ctx: CallContext, args: dict[str, Any]) -> str:
    """A disk or CD slot of a VM; userdevice 'autodetect' takes the first free slot."""
    store = ctx.store
    fields = generic.create_fields(ctx, "VBD", {**args, "VDI": args.get("VDI", NULL_REF)})
    vm = store.get(fields["VM"], "VM")
    if fields["type"] == "CD" and fields["mode"] != "RO":
        raise XenAPIError("VBD_CDS_MUST_BE_READONLY")
    if fields["empty"] and fields["type"] != "CD":
        raise invalid_value("empty", "true")
    if not fields["empty"]:
        vdi = store.get(fields["VDI"], "VDI")
        if fields["mode"] == "RW" and vdi.fields["read_only"]:
            raise XenAPIError("VDI_READONLY", vdi.ref)
    else:
        fields["VDI"] = NULL_REF
    free = allowed_vbd_devices(store, vm)
    if fields["userdevice"] == "autodetect":
        if not free:
            raise XenAPIError("DEVICE_ALREADY_EXISTS", "autodetect")
        fields["userdevice"] = free[0]
    if fields["userdevice"] in {store.get(v).fields["userdevice"] for v in vm.fields["VBDs"]}:
        raise XenAPIError("DEVICE_ALREADY_EXISTS", fields["userdevice"])
    if fields["userdevice"] not in free:  # beyond the slots this kind of guest has
        raise invalid_value("userdevice", fields["userdevice"])
    with store.transaction():
        fields["metrics"] = store.add("VBD_metrics", {})
        fields["device"] = disk_device_name(vm, fields["userdevice"])
        return store.add("VBD", fields)


@message("VBD.destroy")
def destroy(ctx: CallContext, self: str) -> str:
    """Remove a detached VBD (and its metrics); the VDI stays."""
    return destroy_device(ctx, self, "VBD")


@message("VBD.plug")
async def plug(ctx: CallContext, self: str) -> str:
    """Hot-plug into the running VM."""
    vbd = ctx.store.get(self, "VBD")
    vm = running_vm(ctx, vbd)
    if vbd.fields["currently_attached"]:
        raise XenAPIError("DEVICE_ALREADY_ATTACHED", self)
    await ctx.api.hypervisor.domain(vm.fields["uuid"], vm=vm.ref).attach_disk(disk_spec(ctx, vm, vbd))
    ctx.store.update(self, {"currently_attached": True})
    return ""


@message("VBD.unplug", "VBD.unplug_force")
async def unplug(ctx: CallContext, ref: str) -> str:
    force = called(ctx).name == "unplug_force"
    vbd = ctx.store.get(ref, "VBD")
    vm = running_vm(ctx, vbd)
    if not vbd.fields["currently_attached"]:
        raise XenAPIError("DEVICE_ALREADY_DETACHED", ref)
    if not vbd.fields["unpluggable"] and not force:
        raise operation_not_allowed("the VBD is not unpluggable (use unplug_force)")
    device = disk_device_name(vm, vbd.fields["userdevice"])
    await ctx.api.hypervisor.domain(vm.fields["uuid"], vm=vm.ref).detach_disk(device)
    ctx.store.update(ref, {"currently_attached": False})
    return ""


def _cd(ctx: CallContext, ref: str) -> Any:
    vbd = ctx.store.get(ref, "VBD")
    if vbd.fields["type"] != "CD":
        raise XenAPIError("VBD_NOT_REMOVABLE_MEDIA", ref)
    return vbd


async def _change_media(ctx: CallContext, vbd: Any, changes: dict[str, Any]) -> None:
    """Apply a media change, telling a running guest's drive about it."""
    vm = ctx.store.get(vbd.fields["VM"], "VM")
    if vbd.fields["currently_attached"] and vm.fields["power_state"] == "Running":
        device = disk_device_name(vm, vbd.fields["userdevice"])
        domain = ctx.api.hypervisor.domain(vm.fields["uuid"], vm=vm.ref)
        await domain.detach_disk(device)
        ctx.store.update(vbd.ref, changes)
        await domain.attach_disk(disk_spec(ctx, vm, vbd))
    else:
        ctx.store.update(vbd.ref, changes)


@message("VBD.insert")
async def insert(ctx: CallContext, vbd: str, vdi: str) -> str:
    """Put an ISO into an empty CD drive."""
    obj = _cd(ctx, vbd)
    if not obj.fields["empty"]:
        raise XenAPIError("VBD_NOT_EMPTY", vbd)
    sr = ctx.store.get(ctx.store.get(vdi, "VDI").fields["SR"], "SR")
    if sr.fields["content_type"] != "iso":
        raise XenAPIError("VDI_IS_NOT_ISO", vdi, sr.fields["content_type"] or "user")
    await _change_media(ctx, obj, {"VDI": vdi, "empty": False})
    return ""


@message("VBD.eject")
async def eject(ctx: CallContext, vbd: str) -> str:
    """Take the ISO out of a CD drive."""
    obj = _cd(ctx, vbd)
    if obj.fields["empty"]:
        raise XenAPIError("VBD_IS_EMPTY", vbd)
    await _change_media(ctx, obj, {"VDI": NULL_REF, "empty": True})
    return ""


@message("VBD.assert_attachable")
def assert_attachable(ctx: CallContext, self: str) -> str:
    """Fail unless the VBD's disk could be attached now (its VDI exists and is not missing)."""
    vbd = ctx.store.get(self, "VBD")
    if not vbd.fields["empty"]:
        vdi = ctx.store.get(vbd.fields["VDI"], "VDI")
        if vdi.fields["missing"]:
            raise XenAPIError("VDI_MISSING", vdi.fields["SR"], vdi.ref)
    return ""
