"""``SR.*`` and ``PBD.*``: storage repositories backed by directories, and reconciling them.

:func:`reconcile` makes an SR's VDI objects and its files agree: files nobody knows become
VDIs, VDIs whose file vanished are forgotten (or marked missing while a VBD uses them),
half-created files are removed (a whole one whose VDI was committed is put in place) and
half-destroyed ones finished or restored.  It runs at
start for every attached SR and on ``SR.scan``.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import message
from xapid.objects.devices import run_storage, sr_driver, sr_roots, storage_error
from xapid.backend.storage import READY, SR_TYPES, StorageError, disk_of, open_sr


async def reconcile(ctx: CallContext, sr_ref: str) -> None:
    """Bring the SR's VDIs in line with its directory and refresh its sizes."""
    store = ctx.store
    driver = sr_driver(ctx, sr_ref)
    sr = store.get(sr_ref, "SR")
    known = {store.get(v).fields["location"]: store.get(v) for v in sr.fields["VDIs"]}
    if hasattr(driver, "mark_known"):
        await run_storage(ctx, driver.mark_known,
                          [location for location, vdi in known.items() if not vdi.fields["read_only"]])
    disks, deleting, partial = await run_storage(ctx, driver.scan)
    for location in deleting:
        if location in known:
            await run_storage(ctx, driver.unmark_deleting, location)  # destroy never committed: restore
        else:
            await run_storage(ctx, driver.purge, location)
    published = False
    on_disk = {d.location for d in disks}
    for name in partial:
        final = disk_of(name)
        if name.endswith(READY) and final in known and final not in on_disk:
            # whole, and its record was committed before a crash: finish the import
            await run_storage(ctx, driver.publish_new, final)
            published = True
        else:
            await run_storage(ctx, driver.remove_partial, name)
    if deleting or published:
        disks, _, _ = await run_storage(ctx, driver.scan)
    stats = await run_storage(ctx, driver.stats)
    found = {d.location: d for d in disks}
    with store.transaction():
        for location, vdi in known.items():
            disk = found.get(location)
            if disk is None:
                if vdi.fields["VBDs"]:
                    store.update(vdi.ref, {"missing": True})
                else:
                    store.remove(vdi.ref)
                continue
            store.update(vdi.ref, {"missing": False, "virtual_size": disk.virtual_size,
                                   "physical_utilisation": disk.physical_utilisation})
        for location, disk in found.items():
            if location not in known:
                uuid = disk.uuid if store.by_uuid(disk.uuid) is None else str(uuidlib.uuid4())
                store.add("VDI", {
                    "uuid": uuid, "SR": sr_ref, "location": location, "name_label": location,
                    "virtual_size": disk.virtual_size, "physical_utilisation": disk.physical_utilisation,
                    # a file xapid did not create is adopted read-only: never written, resized or deleted
                    "type": "user", "read_only": driver.read_only or not disk.owned, "sharable": driver.read_only,
                    "managed": True,
                    "sm_config": {"type": disk.format}, "other_config": {},
                })
        update_sizes(ctx, sr_ref, stats.physical_size, stats.physical_utilisation)


def update_sizes(ctx: CallContext, sr_ref: str, physical_size: int | None = None, used: int | None = None) -> None:
    """Set the SR's ``virtual_allocation`` (the sum of its VDIs' virtual sizes) and
    ``physical_utilisation`` (*used*, or the sum of its VDIs' physical utilisation), and
    ``physical_size`` when given.  The sums are the store's running totals (:meth:`Store.tally`),
    so this costs the same in an SR of ten disks as in one of ten thousand."""
    store = ctx.store
    store.get(sr_ref, "SR")
    changes: dict[str, Any] = {"virtual_allocation": store.tally("VDI", "SR", "virtual_size").total(sr_ref)}
    changes["physical_utilisation"] = (
        used if used is not None else store.tally("VDI", "SR", "physical_utilisation").total(sr_ref))
    if physical_size is not None:
        changes["physical_size"] = physical_size
    store.update(sr_ref, changes)


async def refresh_sizes(ctx: CallContext, sr_ref: str) -> None:
    stats = await run_storage(ctx, sr_driver(ctx, sr_ref).stats)
    update_sizes(ctx, sr_ref, stats.physical_size, stats.physical_utilisation)


def _driver_for(ctx: CallContext, sr_type: str, device_config: dict[str, str]) -> Any:
    """The SR's driver; SR_BACKEND_FAILURE for a location outside ``[storage] roots`` or not local."""
    try:
        return open_sr(sr_type, device_config, ctx.api.disk_format, sr_roots(ctx))
    except StorageError as error:
        raise storage_error(error) from None


async def _introduce(ctx: CallContext, uuid: str, name_label: str, name_description: str, type: str, content_type: str,
                     shared: bool, sm_config: dict[str, str], device_config: dict[str, str] | None,
                     create: bool) -> str:
    store = ctx.store
    if type not in SR_TYPES:
        raise XenAPIError("SR_UNKNOWN_DRIVER", type)
    if uuid and store.by_uuid(uuid) is not None:
        raise XenAPIError("INVALID_VALUE", "uuid", uuid)
    driver = _driver_for(ctx, type, device_config) if device_config is not None else None
    if driver is not None:
        await run_storage(ctx, driver.attach, create)
    with store.transaction():
        sr = store.add("SR", {
            **({"uuid": uuid} if uuid else {}), "name_label": name_label, "name_description": name_description,
            "type": type, "content_type": content_type or SR_TYPES[type].content_type, "shared": shared,
            "sm_config": sm_config,
        })
        if device_config is not None:
            store.add("PBD", {"host": ctx.api.host_ref, "SR": sr, "device_config": device_config,
                              "currently_attached": True})
    if device_config is not None:
        await reconcile(ctx, sr)
    return sr


async def make_sr(ctx: CallContext, name_label: str, name_description: str, type: str, content_type: str,
                  device_config: dict[str, str]) -> str:
    """An SR on a directory (created when missing) with its PBD, as SR.create does."""
    return await _introduce(ctx, "", name_label, name_description, type, content_type, False, {}, device_config,
                            True)


@message("SR.create")
async def create(ctx: CallContext, host: str, device_config: dict[str, str], physical_size: int, name_label: str,
                 name_description: str, type: str, content_type: str, shared: bool,
                 sm_config: dict[str, str]) -> str:
    """A new SR on a directory (device_config location), created when missing, with its PBD."""
    return await _introduce(ctx, "", name_label, name_description, type, content_type, shared, sm_config,
                            device_config, True)


@message("SR.introduce")
async def introduce(ctx: CallContext, uuid: str, name_label: str, name_description: str, type: str, content_type: str,
                    shared: bool, sm_config: dict[str, str]) -> str:
    """Record an existing SR without a PBD (create one with PBD.create, then PBD.plug)."""
    return await _introduce(ctx, uuid, name_label, name_description, type, content_type, shared, sm_config,
                            None, False)


def _unplugged(ctx: CallContext, sr_ref: str) -> Any:
    sr = ctx.store.get(sr_ref, "SR")
    if any(ctx.store.get(p).fields["currently_attached"] for p in sr.fields["PBDs"]):
        raise XenAPIError("SR_HAS_PBD", sr_ref)
    return sr


def _forget(ctx: CallContext, sr: Any) -> None:
    store = ctx.store
    with store.transaction():
        for vdi in list(sr.fields["VDIs"]):
            if store.get(vdi).fields["VBDs"]:
                raise XenAPIError("VDI_IN_USE", vdi, "forget")
        for vdi in list(sr.fields["VDIs"]):
            store.remove(vdi)
        for pbd in list(sr.fields["PBDs"]):
            store.remove(pbd)
        pool = store.get(ctx.api.pool_ref)
        for key in ("default_SR", "suspend_image_SR", "crash_dump_SR"):
            if pool.fields[key] == sr.ref:
                store.update(ctx.api.pool_ref, {key: "OpaqueRef:NULL"})
        store.remove(sr.ref)


@message("SR.forget")
def forget(ctx: CallContext, sr: str) -> str:
    """Drop the SR's records (its PBDs must be unplugged); the files stay."""
    _forget(ctx, _unplugged(ctx, sr))
    return ""


@message("SR.destroy")
async def destroy(ctx: CallContext, sr: str) -> str:
    """Remove an SR whose PBDs are unplugged and that holds no disks (SR_NOT_EMPTY)."""
    obj = _unplugged(ctx, sr)
    if obj.fields["VDIs"] and obj.fields["content_type"] != "iso":
        raise XenAPIError("SR_NOT_EMPTY")
    _forget(ctx, obj)
    return ""


@message("SR.scan")
async def scan(ctx: CallContext, sr: str) -> str:
    """Pick up disk files added or removed behind the daemon's back; refresh sizes."""
    await reconcile(ctx, sr)
    return ""


@message("SR.update")
async def update(ctx: CallContext, sr: str) -> str:
    """Refresh the SR's size figures from the filesystem."""
    await refresh_sizes(ctx, sr)
    return ""


@message("SR.get_supported_types")
def get_supported_types(ctx: CallContext) -> list[str]:
    return sorted(SR_TYPES)


@message("PBD.plug")
async def pbd_plug(ctx: CallContext, self: str) -> str:
    """Attach the SR on this host: its directory must be usable; its VDIs are reconciled."""
    pbd = ctx.store.get(self, "PBD")
    if pbd.fields["currently_attached"]:
        return ""
    sr = ctx.store.get(pbd.fields["SR"], "SR")
    driver = _driver_for(ctx, sr.fields["type"], pbd.fields["device_config"])
    await run_storage(ctx, driver.attach, False)
    ctx.store.update(self, {"currently_attached": True})
    await reconcile(ctx, sr.ref)
    return ""


@message("PBD.unplug")
def pbd_unplug(ctx: CallContext, self: str) -> str:
    """Detach the SR from this host; refused while a running VM uses one of its disks."""
    store = ctx.store
    pbd = store.get(self, "PBD")
    for vdi in store.get(pbd.fields["SR"]).fields["VDIs"]:
        for vbd in store.get(vdi).fields["VBDs"]:
            if store.get(vbd).fields["currently_attached"]:
                raise XenAPIError("VDI_IN_USE", vdi, "unplug")
    store.update(self, {"currently_attached": False})
    return ""


@message("PBD.destroy")
def pbd_destroy(ctx: CallContext, self: str) -> str:
    pbd = ctx.store.get(self, "PBD")
    if pbd.fields["currently_attached"]:
        raise XenAPIError("OPERATION_NOT_ALLOWED", "unplug the PBD before destroying it")
    ctx.store.remove(self)
    return ""
