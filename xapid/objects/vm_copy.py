"""``VM.clone``, ``VM.copy``, ``VM.snapshot`` and the free device slots of a VM.

File SRs have no copy-on-write: clones and snapshots copy their disks in full (sparse
copies, so unwritten blocks cost nothing).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.logger import Logger

from xapid.apitypes import NULL_REF
from xapid.context import CallContext
from xapid.objects import message
from xapid.objects.devices import allowed_vbd_devices, allowed_vif_devices, random_mac
from xapid.objects import vdi as vdi_handlers
from xapid.objects.vdi import copy_vdi
from xapid.objects.vm_ops import operation

log = Logger()

# fields that describe one VM instance rather than its configuration
_NOT_COPIED = {"uuid", "VBDs", "VIFs", "consoles", "crash_dumps", "metrics", "guest_metrics", "snapshots",
               "children", "allowed_operations", "current_operations", "domid", "resident_on", "power_state",
               "suspend_VDI", "VTPMs", "VUSBs", "VGPUs", "attached_PCIs", "scheduled_to_be_resident_on",
               "is_control_domain", "is_a_snapshot", "snapshot_of", "snapshot_time", "parent"}


def _other_config(fields: dict[str, Any], snapshot: bool) -> dict[str, str]:
    """xapi's other_config of a copy: default_template and xensource_internal dropped, the template's
    name kept as base_template_name, and a clone's mac_seed renewed (a snapshot keeps its own)."""
    other = {k: v for k, v in fields["other_config"].items() if k not in ("default_template", "xensource_internal")}
    if fields["is_a_template"] and "base_template_name" not in other:
        other["base_template_name"] = fields["name_label"]
    if not snapshot:
        other["mac_seed"] = str(uuidlib.uuid4())
    return other


async def _duplicate(ctx: CallContext, ref: str, op: str, new_name: str, sr: str | None, snapshot: bool,
                     skip_vdis: frozenset[str] = frozenset()) -> str:
    store = ctx.store
    async with operation(ctx, ref, op) as vm:
        disks: list[tuple[Any, str]] = []
        copies: list[str] = []
        vbds = [store.get(v) for v in vm.fields["VBDs"]]
        try:
            for index, vbd in enumerate(vbds):
                source = vbd.fields["VDI"]
                if vbd.fields["empty"] or vbd.fields["type"] == "CD" or source in skip_vdis:
                    disks.append((vbd, source if vbd.fields["type"] == "CD" else NULL_REF))
                    continue
                extra = ({"is_a_snapshot": True, "snapshot_of": source, "snapshot_time": ctx.now()}
                         if snapshot else None)
                target_sr = sr if sr and sr != NULL_REF else store.get(source).fields["SR"]
                copies.append(await copy_vdi(ctx, source, target_sr, extra))
                disks.append((vbd, copies[-1]))
                ctx.progress(0.1 + 0.8 * (index + 1) / len(vbds))
                ctx.check_cancelled()
        except BaseException:  # failed or cancelled (task cancel, daemon stopping): no stray copies
            for copy_ref in copies:
                try:
                    await vdi_handlers.destroy(ctx, copy_ref)
                except Exception:  # noqa: BLE001 - keep undoing the rest, then report the first failure
                    log.failure("undoing VM.{op}: could not destroy the copy {vdi}", op=op, vdi=copy_ref)
            raise
        fields = {k: v for k, v in vm.fields.items() if k not in _NOT_COPIED}
        # as xapi_vm_clone.ml: a checkpoint of a Running (now suspended) or Suspended VM is Suspended
        state = "Suspended" if op == "checkpoint" and vm.fields["power_state"] == "Suspended" else "Halted"
        fields.update(name_label=new_name, uuid=str(uuidlib.uuid4()), power_state=state,
                      is_default_template=False, other_config=_other_config(vm.fields, snapshot))
        if snapshot:  # a snapshot is a template (is_a_template) that only revert, clone, copy… accept
            fields.update(is_a_snapshot=True, snapshot_of=ref, snapshot_time=ctx.now(), is_a_template=True)
        else:
            fields.update(parent=ref)
        with store.transaction():
            metrics = store.add("VM_metrics", {"install_time": ctx.now()})
            new = store.add("VM", {**fields, "metrics": metrics})
            for vbd, vdi in disks:
                copied = {k: v for k, v in vbd.fields.items()
                          if k not in ("uuid", "VM", "VDI", "metrics", "currently_attached", "allowed_operations",
                                       "current_operations")}
                store.add("VBD", {**copied, "VM": new, "VDI": vdi, "empty": vdi == NULL_REF,
                                  "metrics": store.add("VBD_metrics", {})})
            for vif_ref in vm.fields["VIFs"]:
                vif = store.get(vif_ref).fields
                copied = {k: v for k, v in vif.items()
                          if k not in ("uuid", "VM", "metrics", "currently_attached", "MAC", "allowed_operations",
                                       "current_operations", "ipv4_addresses", "ipv6_addresses")}
                mac = vif["MAC"] if snapshot else random_mac(store)  # a snapshot keeps its identity
                store.add("VIF", {**copied, "VM": new, "MAC": mac, "metrics": store.add("VIF_metrics", {})})
    return new


@message("VM.clone")
async def clone(ctx: CallContext, vm: str, new_name: str) -> str:
    """A halted copy with copies of its disks and new MACs, in the same SRs."""
    return await _duplicate(ctx, vm, "clone", new_name, None, False)


@message("VM.copy")
async def copy(ctx: CallContext, vm: str, new_name: str, sr: str) -> str:
    """Like clone, with the disks copied into *sr* (OpaqueRef:NULL: each disk's own SR)."""
    return await _duplicate(ctx, vm, "copy", new_name, sr, False)


@message("VM.snapshot")
async def snapshot(ctx: CallContext, vm: str, new_name: str, ignore_vdis: list[str]) -> str:
    """A snapshot VM (is_a_snapshot, snapshot_of) with snapshot copies of its disks."""
    return await _duplicate(ctx, vm, "snapshot", new_name, None, True, frozenset(ignore_vdis))


@message("VM.get_allowed_VBD_devices")
def get_allowed_VBD_devices(ctx: CallContext, vm: str) -> list[str]:
    """The free disk slots (userdevice values)."""
    return allowed_vbd_devices(ctx.store, ctx.store.get(vm, "VM"))


@message("VM.get_allowed_VIF_devices")
def get_allowed_VIF_devices(ctx: CallContext, vm: str) -> list[str]:
    """The free network card slots (device values)."""
    return allowed_vif_devices(ctx.store, ctx.store.get(vm, "VM"))
