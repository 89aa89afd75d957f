"""Device slots and what the driver is told about a VM's disks and network cards.

Slot limits follow xapi's allowed-device lists: 16 disk slots for PV guests (xvda…xvdp),
4 emulated IDE slots for HVM guests without PV drivers (hda…hdd), 7 network slots.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from xapid.backend.interface import DiskSpec, NicSpec
from xapid.constants import HVM_DISK_SLOTS, NIC_SLOTS, PV_DISK_SLOTS
from xapid.context import CallContext
from xapid.errors import XenAPIError, operation_not_allowed, vm_bad_power_state
from xapid.backend.storage import StorageError, StorageRoots, UnknownSRType, open_sr


def domain_type(fields: dict[str, Any]) -> Literal["hvm", "pv", "pvh"]:
    """The kind of guest a VM record describes: hvm, pv or pvh (unspecified: by HVM_boot_policy)."""
    declared = fields["domain_type"]
    if declared in ("hvm", "pv", "pvh"):
        return declared
    if declared == "pv_in_pvh":
        return "pvh"
    return "hvm" if fields["HVM_boot_policy"] else "pv"


def disk_slots(vm: Any) -> int:
    return HVM_DISK_SLOTS if domain_type(vm.fields) == "hvm" else PV_DISK_SLOTS


def allowed_vbd_devices(store: Any, vm: Any) -> list[str]:
    used = {store.get(v).fields["userdevice"] for v in vm.fields["VBDs"]}
    return [str(i) for i in range(disk_slots(vm)) if str(i) not in used]


def allowed_vif_devices(store: Any, vm: Any) -> list[str]:
    used = {store.get(v).fields["device"] for v in vm.fields["VIFs"]}
    return [str(i) for i in range(NIC_SLOTS) if str(i) not in used]


def disk_device_name(vm: Any, userdevice: str) -> str:
    """Guest device name for a slot: xvda… for PV/PVH, hda… for HVM."""
    prefix = "hd" if domain_type(vm.fields) == "hvm" else "xvd"
    return prefix + "abcdefghijklmnop"[int(userdevice)]


def storage_error(error: StorageError, sr: str = "") -> XenAPIError:
    if isinstance(error, UnknownSRType):
        return XenAPIError("SR_UNKNOWN_DRIVER", error.reason)
    return XenAPIError("SR_BACKEND_FAILURE", error.status, "", error.reason)


async def run_storage(ctx: CallContext, fn: Any, *args: Any) -> Any:
    """Run blocking storage work in the pool; StorageError becomes SR_BACKEND_FAILURE."""
    try:
        return await ctx.api.runner.run(fn, *args)
    except StorageError as error:
        raise storage_error(error) from None


def sr_roots(ctx: CallContext) -> StorageRoots:
    """Where SRs may live: ``[storage] roots``, by default the state dir and the first-start SRs' dirs."""
    storage, state_dir = ctx.api.storage, str(ctx.api.state_dir)
    if storage is None:
        return StorageRoots.build((), state_dir)
    return StorageRoots.build(storage.roots, state_dir, storage.local_sr, storage.iso_library)


def sr_driver(ctx: CallContext, sr_ref: str) -> Any:
    """The storage driver of an SR through its PBD on this host (SR_HAS_NO_PBDS without one)."""
    store = ctx.store
    sr = store.get(sr_ref, "SR")
    pbds = [store.get(p) for p in sr.fields["PBDs"]]
    if not pbds:
        raise XenAPIError("SR_HAS_NO_PBDS", sr_ref)
    try:
        return open_sr(sr.fields["type"], pbds[0].fields["device_config"], ctx.api.disk_format, sr_roots(ctx))
    except StorageError as error:
        raise storage_error(error, sr_ref) from None


def vdi_path(ctx: CallContext, vdi_ref: str) -> str:
    vdi = ctx.store.get(vdi_ref, "VDI")
    return str(sr_driver(ctx, vdi.fields["SR"]).file(vdi.fields["location"]))


def disk_spec(ctx: CallContext, vm: Any, vbd: Any) -> DiskSpec:
    f = vbd.fields
    empty = f["empty"] or not ctx.store.exists(f["VDI"], "VDI")
    path = "" if empty else vdi_path(ctx, f["VDI"])
    fmt: Literal["raw", "qcow2"] = "raw"
    if not empty:
        fmt = "qcow2" if ctx.store.get(f["VDI"]).fields["location"].endswith(".qcow2") else "raw"
    return DiskSpec(device=disk_device_name(vm, f["userdevice"]), path=path, mode="r" if f["mode"] == "RO" else "w",
                    kind="cdrom" if f["type"] == "CD" else "disk", format=fmt)


def nic_spec(ctx: CallContext, vif: Any) -> NicSpec:
    f = vif.fields
    bridge = ctx.store.get(f["network"]).fields["bridge"] if ctx.store.exists(f["network"], "network") else ""
    return NicSpec(devid=int(f["device"]), mac=f["MAC"], bridge=bridge, mtu=f["MTU"])


def running_vm(ctx: CallContext, device: Any) -> Any:
    """The VM of a VBD or VIF, which must be Running for hot-plug (VM_BAD_POWER_STATE)."""
    vm = ctx.store.get(device.fields["VM"], "VM")
    if vm.fields["power_state"] != "Running":
        raise vm_bad_power_state(vm.ref, ["Running"], vm.fields["power_state"])
    return vm


def remove_device(store: Any, ref: str) -> None:
    """Remove a VBD or VIF with its metrics object."""
    metrics = store.get(ref).fields["metrics"]
    if store.find(metrics) is not None:
        store.remove(metrics)
    store.remove(ref)


def destroy_device(ctx: CallContext, ref: str, cls: str) -> str:
    """VBD.destroy / VIF.destroy: refused while attached to a running VM."""
    device = ctx.store.get(ref, cls)
    if device.fields["currently_attached"]:
        raise operation_not_allowed(f"the {cls} is attached to a running VM; unplug it first")
    with ctx.store.transaction():
        remove_device(ctx.store, ref)
    return ""


def random_mac(store: Any) -> str:
    """A MAC in Xen's OUI 00:16:3e, unique among this host's VIFs (looked up in the store's index of
    VIF MACs, lower case: no scan of the VIFs)."""
    used = store.index("VIF", "MAC", str.lower)
    while True:
        mac = "00:16:3e:%02x:%02x:%02x" % (random.randrange(0x80), random.randrange(256), random.randrange(256))
        if mac not in used:
            return mac
