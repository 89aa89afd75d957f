"""``VM.provision``, ``VM.revert``, ``VM.checkpoint``, ``VM.snapshot_with_quiesce`` and
``VM.set_is_default_template``: installing from templates and going back to snapshots, as xapi
does them (``xapi_vm.ml``, ``xapi_templates.ml``, ``xapi_vm_snapshot.ml``, ``xapi_vm_clone.ml``).

Disks are made through the same code paths as ``VDI.create``/``VBD.create`` and copied like
``VM.clone`` copies them.  A suspended VM's memory image is the file ``suspend_image`` names
(state dir ``suspend/<uuid>.img``), so a checkpoint owns a copy of it under its own uuid and a
revert to a checkpoint copies it back.
"""

from __future__ import annotations

import shutil
import uuid as uuidlib
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from twisted.logger import Logger

from xapid.apitypes import NULL_REF
from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import guest_metrics, message, vbd as vbd_handlers, vdi as vdi_handlers
from xapid.objects import vm as vm_handlers
from xapid.objects.devices import remove_device
from xapid.objects.vdi import copy_vdi
from xapid.objects.vm_copy import _duplicate
from xapid.objects.vm_ops import check, operation
from xapid.templates import ParseFailure, parse_disks

log = Logger()


# -- provision ------------------------------------------------------------------------------


def _sr_by_uuid(ctx: CallContext, uuid: str) -> str:
    """xapi resolves a disk's sr only with SR.get_by_uuid: UUID_INVALID [sr, value] otherwise
    (an empty sr included: xapi has no default-SR fallback)."""
    for sr in ctx.store.all("SR"):
        if sr.fields["uuid"] == uuid:
            return sr.ref
    raise XenAPIError("UUID_INVALID", "sr", uuid)


async def _undo(ctx: CallContext, vbds: list[str], vdis: list[str]) -> None:
    """Destroy what a failed provision created (VBDs first, then their disks), logging failures."""
    for ref in vbds:
        if ctx.store.find(ref) is not None:
            try:
                vbd_handlers.destroy(ctx, ref)
            except XenAPIError as error:
                log.warn("provision clean-up: VBD {ref}: {error}", ref=ref, error=" ".join(error.description))
    for ref in vdis:
        if ctx.store.find(ref) is not None:
            try:
                await vdi_handlers.destroy(ctx, ref)
            except XenAPIError as error:
                log.warn("provision clean-up: VDI {ref}: {error}", ref=ref, error=" ".join(error.description))


@message("VM.provision")
async def provision(ctx: CallContext, vm: str) -> str:
    """Install a template: xapi's steps in xapi's order (wave2-facts §7)."""
    store = ctx.store
    async with operation(ctx, vm, "provision") as obj:
        # 1. is_a_template=false first (xapi's set_is_a_template: install time); it stays so on error
        with store.transaction():
            store.update(vm, {"is_a_template": False})
            metrics = obj.fields["metrics"]
            if store.exists(metrics, "VM_metrics"):
                store.update(metrics, {"install_time": ctx.now()})
        other = store.get(vm, "VM").fields["other_config"]
        if "disks" not in other and "postinstall" not in other:
            return ""
        ctx.progress(0.1)
        try:
            disks = parse_disks(other["disks"]) if "disks" in other else []
        except ParseFailure as failure:  # xapi: an unhandled Parse_failure, i.e. INTERNAL_ERROR
            raise XenAPIError("INTERNAL_ERROR", f"Xapi_templates.Parse_failure: {failure}") from None
        # 2. a VDI and a VBD per disk; the VDI is named after its userdevice
        created_vbds: list[str] = []
        created_vdis: list[str] = []
        try:
            for index, disk in enumerate(disks):
                sr = _sr_by_uuid(ctx, disk.sr)
                vdi = await vdi_handlers.create(ctx, {
                    "name_label": "", "name_description": "Created by template provisioner", "SR": sr,
                    "virtual_size": disk.size, "type": disk.type, "sharable": False, "read_only": False,
                    "other_config": {}, "xenstore_data": {}, "sm_config": {"vmhint": obj.fields["uuid"]},
                    "tags": []})
                created_vdis.append(vdi)
                vbd = vbd_handlers.create(ctx, {
                    "VM": vm, "VDI": vdi, "userdevice": disk.device, "bootable": disk.bootable, "mode": "RW",
                    "type": "Disk", "unpluggable": disk.type != "system", "empty": False,
                    "qos_algorithm_type": "", "qos_algorithm_params": {}, "other_config": {"owner": ""}})
                created_vbds.append(vbd)
                store.update(vdi, {"name_label": store.get(vbd, "VBD").fields["userdevice"]})
                ctx.progress(0.1 + 0.8 * (index + 1) / len(disks))
            # 3. post-install scripts: xapi runs only scripts from its dom0 post-install directory;
            #    xapid has none, so any postinstall key is refused as xapi refuses an outside path
            if "postinstall" in other:
                raise XenAPIError("PERMISSION_DENIED",
                                  "postinstall scripts are not supported (no post-install directory)")
        except BaseException:
            await _undo(ctx, created_vbds, created_vdis)
            raise
        # 4. the install information goes, so the VM is never installed twice
        remaining = {k: v for k, v in store.get(vm, "VM").fields["other_config"].items()
                     if k not in ("disks", "postinstall")}
        store.update(vm, {"other_config": remaining})
    return ""


# -- revert ---------------------------------------------------------------------------------

#: fields a revert never takes from the snapshot (xapi_vm_snapshot.ml extended_do_not_copy, plus
#: xapid's instance fields): identity, runtime state, devices, and the snapshot's own bookkeeping
_KEEP = frozenset({
    "uuid", "suspend_VDI", "power_state", "parent", "current_operations", "allowed_operations", "metrics",
    "guest_metrics", "resident_on", "domid", "protection_policy", "snapshot_schedule",
    "scheduled_to_be_resident_on", "snapshots", "tags", "affinity", "groups", "consoles", "VBDs", "VIFs", "VGPUs",
    "VUSBs", "VTPMs", "attached_PCIs", "is_snapshot_from_vmpp", "name_label", "is_a_snapshot", "is_a_template",
    "is_default_template", "snapshot_of", "snapshot_time", "transportable_snapshot_id", "children",
    "is_control_domain", "crash_dumps", "blobs", "snapshot_info", "snapshot_metadata", "is_vmss_snapshot",
})


@asynccontextmanager
async def _reverting(ctx: CallContext, ref: str) -> AsyncIterator[None]:
    """List ``reverting`` in the VM's current_operations while its snapshot is reverted into it."""
    store = ctx.store
    vm = store.get(ref, "VM")
    if vm.fields["current_operations"]:
        task, other = next(iter(vm.fields["current_operations"].items()))
        raise XenAPIError("OTHER_OPERATION_IN_PROGRESS", "VM", ref, other, task)
    key = ctx.task or f"OpaqueRef:{uuidlib.uuid4()}"
    store.update(ref, {"current_operations": {key: "reverting"}})
    try:
        yield
    finally:
        if store.find(ref) is not None:
            ops = {k: v for k, v in store.get(ref).fields["current_operations"].items() if k != key}
            store.update(ref, {"current_operations": ops})


async def _copy_file(ctx: CallContext, source: Any, target: Any) -> None:
    await ctx.api.runner.run(target.parent.mkdir, parents=True, exist_ok=True)
    await ctx.api.runner.run(shutil.copyfile, source, target)
    await ctx.api.runner.run(target.chmod, 0o600)


@message("VM.revert")
async def revert(ctx: CallContext, snapshot: str) -> str:
    """The VM goes back to the snapshot: fields, disks (fresh copies), NICs and power state."""
    store = ctx.store
    snap = store.get(snapshot, "VM")
    check(snap, "revert")  # ONLY_REVERT_SNAPSHOT unless a snapshot
    vm = snap.fields["snapshot_of"]
    if not store.exists(vm, "VM"):
        raise XenAPIError("VM_REVERT_FAILED", vm, snapshot)
    async with operation(ctx, snapshot, "revert"):
        current = store.get(vm, "VM")
        if current.fields["is_control_domain"]:
            raise XenAPIError("OPERATION_NOT_ALLOWED", "revert is not allowed on the control domain")
        if current.fields["power_state"] != "Halted":  # first of all, destroy the domain (xapi)
            await vm_handlers.hard_shutdown(ctx, vm)
        async with _reverting(ctx, vm):
            try:
                await _revert_into(ctx, snap, vm)
            except XenAPIError as error:
                vm_handlers.record_halted(ctx, vm)
                if error.code in ("SR_FULL", "VDI_INCOMPATIBLE_TYPE"):
                    raise
                log.error("revert of {vm} to {snap} failed: {error}", vm=vm, snap=snapshot,
                          error=" ".join(error.description))
                raise XenAPIError("VM_REVERT_FAILED", snapshot, vm) from None
            except Exception:
                vm_handlers.record_halted(ctx, vm)
                log.failure("revert of {vm} to {snap} failed", vm=vm, snap=snapshot)
                raise XenAPIError("VM_REVERT_FAILED", snapshot, vm) from None
    return ""


async def _revert_into(ctx: CallContext, snap: Any, vm: str) -> None:
    store = ctx.store
    fields = {k: v for k, v in snap.fields.items() if k not in _KEEP}
    fields["ha_always_run"] = False
    store.update(vm, {k: v for k, v in fields.items() if k in store.get(vm, "VM").fields})
    ctx.progress(0.1)
    current = store.get(vm, "VM")
    snap_vbds = [store.get(r) for r in snap.fields["VBDs"]]
    snap_disks = {store.get(v.fields["VDI"]).fields["snapshot_of"] for v in snap_vbds
                  if v.fields["type"] == "Disk" and not v.fields["empty"]}
    doomed: list[str] = []
    with store.transaction():
        for ref in list(current.fields["VBDs"]):  # every VBD goes; disks with a snapshot go too
            current_vbd = store.get(ref).fields
            if current_vbd["type"] == "Disk" and not current_vbd["empty"] and current_vbd["VDI"] in snap_disks:
                doomed.append(current_vbd["VDI"])
            remove_device(store, ref)
    for vdi in doomed:
        if store.find(vdi) is not None:
            await vdi_handlers.destroy(ctx, vdi)
    ctx.progress(0.2)
    new_disks: list[str] = []
    try:
        for index, vbd in enumerate(snap_vbds):
            f = vbd.fields
            target = f["VDI"]
            if f["type"] == "Disk" and not f["empty"]:
                source = store.get(f["VDI"], "VDI")
                target = await copy_vdi(ctx, source.ref, source.fields["SR"])
                new_disks.append(target)
                with store.transaction():  # the other snapshots of the replaced disk now follow the copy
                    old = source.fields["snapshot_of"]
                    for other in store.all("VDI"):
                        if other.fields["snapshot_of"] == old and old != NULL_REF:
                            store.update(other.ref, {"snapshot_of": target})
            copied = {k: v for k, v in f.items() if k not in ("uuid", "VM", "VDI", "metrics", "currently_attached",
                                                               "allowed_operations", "current_operations")}
            with store.transaction():
                store.add("VBD", {**copied, "VM": vm, "VDI": target, "metrics": store.add("VBD_metrics", {})})
            ctx.progress(0.2 + 0.4 * (index + 1) / max(1, len(snap_vbds)))
        with store.transaction():
            for ref in list(store.get(vm, "VM").fields["VIFs"]):
                remove_device(store, ref)
            for ref in snap.fields["VIFs"]:  # the snapshot's NICs, with their MACs
                f = store.get(ref).fields
                copied = {k: v for k, v in f.items()
                          if k not in ("uuid", "VM", "metrics", "currently_attached", "allowed_operations",
                                       "current_operations", "ipv4_addresses", "ipv6_addresses")}
                store.add("VIF", {**copied, "VM": vm, "metrics": store.add("VIF_metrics", {})})
            guest_metrics.clear(store, vm)
            store.update(vm, {"parent": snap.ref})
        ctx.progress(0.8)
        target = store.get(vm, "VM")
        image = vm_handlers.suspend_image(ctx, target)
        if snap.fields["power_state"] == "Suspended":
            await _copy_file(ctx, vm_handlers.suspend_image(ctx, snap), image)
            store.update(vm, {"power_state": "Suspended", "domid": -1, "resident_on": NULL_REF})
        else:
            await ctx.api.runner.run(image.unlink, missing_ok=True)
            store.update(vm, {"power_state": "Halted", "domid": -1, "resident_on": NULL_REF})
    except BaseException:
        for vdi in new_disks:
            for ref in list(store.get(vdi).fields["VBDs"]) if store.find(vdi) is not None else []:
                remove_device(store, ref)
            if store.find(vdi) is not None:
                await vdi_handlers.destroy(ctx, vdi)
        raise
    ctx.progress(1.0)


# -- checkpoint, quiesce, default templates ---------------------------------------------------


@message("VM.checkpoint")
async def checkpoint(ctx: CallContext, vm: str, new_name: str) -> str:
    """A Running VM is suspended, copied with its memory image, and resumed; the checkpoint is Suspended.
    A Suspended VM is copied as it is; a Paused one gives a disk-only (Halted) checkpoint, as xapi."""
    store = ctx.store
    obj = store.get(vm, "VM")
    check(obj, "checkpoint")
    running = obj.fields["power_state"] == "Running"
    if running:
        try:
            await vm_handlers.suspend(ctx, vm)
        except XenAPIError as error:
            if error.code in ("TASK_CANCELLED", "VM_BAD_POWER_STATE", "OTHER_OPERATION_IN_PROGRESS"):
                raise
            raise XenAPIError("VM_CHECKPOINT_SUSPEND_FAILED", vm) from None
    try:
        snap = await _duplicate(ctx, vm, "checkpoint", new_name, None, True)
        if store.get(snap, "VM").fields["power_state"] == "Suspended":
            try:
                await _copy_file(ctx, vm_handlers.suspend_image(ctx, store.get(vm, "VM")),
                                 vm_handlers.suspend_image(ctx, store.get(snap, "VM")))
            except OSError:
                store.update(snap, {"power_state": "Halted"})
                vm_handlers.destroy(ctx, snap)
                raise XenAPIError("VM_CHECKPOINT_SUSPEND_FAILED", vm) from None
    finally:
        if running:  # restore the VM's power state whatever happened (xapi: a slow resume)
            try:
                await vm_handlers.resume_vm(ctx, vm, False)
            except XenAPIError as error:
                log.error("checkpoint: VM {vm} could not be resumed: {error}", vm=vm,
                          error=" ".join(error.description))
                raise XenAPIError("VM_CHECKPOINT_RESUME_FAILED", vm) from None
    return snap


@message("VM.snapshot_with_quiesce")
def snapshot_with_quiesce(ctx: CallContext, vm: str, new_name: str) -> str:
    """Never reached: the schema marks the message removed, so the dispatcher answers MESSAGE_REMOVED."""
    raise XenAPIError("MESSAGE_REMOVED")


@message("VM.set_is_default_template")
def set_is_default_template(ctx: CallContext, vm: str, value: bool) -> str:
    ctx.store.get(vm, "VM")
    ctx.store.update(vm, {"is_default_template": value})
    return ""
