"""``VDI.*``: disk images as real (sparse) files in an SR directory.

The file is complete before the VDI object exists, and the object is gone (durably)
before the file is deleted, so a crash leaves nothing that a scan cannot reconcile.
"""

from __future__ import annotations

import threading
import uuid as uuidlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid.context import CallContext
from xapid.errors import XenAPIError, invalid_value
from xapid.objects import generic, message
from xapid.objects.devices import remove_device, run_storage, sr_driver, storage_error
from xapid.objects.sr import update_sizes
from xapid.backend.storage import StorageError

log = Logger()


def _writable_driver(ctx: CallContext, sr_ref: str) -> Any:
    driver = sr_driver(ctx, sr_ref)
    if driver.read_only:
        raise XenAPIError("SR_OPERATION_NOT_SUPPORTED", sr_ref)
    return driver


def _attached_vbds(ctx: CallContext, vdi: Any) -> list[str]:
    return [v for v in vdi.fields["VBDs"] if ctx.store.get(v).fields["currently_attached"]]


@message("VDI.create")
async def create(ctx: CallContext, args: dict[str, Any]) -> str:
    """A new sparse disk of virtual_size bytes in the SR."""
    fields = generic.create_fields(ctx, "VDI", args)
    if fields["virtual_size"] < 0:
        raise invalid_value("virtual_size", fields["virtual_size"])
    driver = _writable_driver(ctx, fields["SR"])
    uuid = str(uuidlib.uuid4())
    disk = await run_storage(ctx, driver.create, uuid, fields["virtual_size"])
    with ctx.store.transaction():
        ref = ctx.store.add("VDI", {**fields, "uuid": uuid, "location": disk.location,
                                    "physical_utilisation": disk.physical_utilisation,
                                    "sm_config": {**fields.get("sm_config", {}), "type": disk.format}})
        update_sizes(ctx, fields["SR"])
    try:
        await ctx.store.flush()
    except Exception:  # the record was rolled back (disk full): its file goes too, or a restart would adopt it
        await run_storage(ctx, driver.mark_deleting, disk.location)
        await run_storage(ctx, driver.purge, disk.location)
        raise
    return ref


@message("VDI.destroy")
async def destroy(ctx: CallContext, self: str) -> str:
    """Delete the disk and its file; VDI_IN_USE while attached; detached VBDs go with it."""
    store = ctx.store
    vdi = store.get(self, "VDI")
    if _attached_vbds(ctx, vdi):
        raise XenAPIError("VDI_IN_USE", self, "destroy")
    sr, location = vdi.fields["SR"], vdi.fields["location"]
    driver = _writable_driver(ctx, sr)
    await run_storage(ctx, driver.mark_deleting, location)
    with store.transaction():
        for vbd in list(vdi.fields["VBDs"]):
            remove_device(store, vbd)
        store.remove(self)
        update_sizes(ctx, sr)
    await store.flush()
    await run_storage(ctx, driver.purge, location)
    return ""


@message("VDI.resize")
async def resize(ctx: CallContext, vdi: str, size: int) -> str:
    """Grow the disk (shrinking is refused; not while attached)."""
    obj = ctx.store.get(vdi, "VDI")
    if size < obj.fields["virtual_size"]:
        raise invalid_value("size", size)
    if _attached_vbds(ctx, obj):
        raise XenAPIError("VDI_IN_USE", vdi, "resize")
    driver = _writable_driver(ctx, obj.fields["SR"])
    await run_storage(ctx, driver.resize, obj.fields["location"], size)
    with ctx.store.transaction():
        ctx.store.update(vdi, {"virtual_size": size})
        update_sizes(ctx, obj.fields["SR"])
    return ""


def _discard(driver: Any, disk: Any) -> None:
    """Delete a disk file made for an operation that was cancelled before it recorded it."""
    driver.mark_deleting(disk.location)
    driver.purge(disk.location)


async def run_storage_uncancelled(ctx: CallContext, driver: Any, make: Any, *args: Any) -> Any:
    """:func:`run_storage` of *make* (which creates a disk file) that a cancel (task cancel, the
    daemon stopping) cannot orphan: the thread cannot be stopped, so the cancelled caller returns
    at once and the file it was making is deleted as soon as it exists, never left behind."""
    cancelled = threading.Event()

    def work() -> Any:
        disk = make(*args)
        if cancelled.is_set():  # the caller went away while the copy ran: nobody will record it
            _discard(driver, disk)
            return None
        return disk

    job = ctx.api.runner.run(work)
    waiter: Deferred = Deferred(lambda _: cancelled.set())

    def done(result: Any) -> None:
        if not waiter.called:
            waiter.callback(result)
        elif result is not None and not isinstance(result, Failure):  # made after the cancel was seen
            ctx.api.runner.run(_discard, driver, result).addErrback(lambda f: log.failure("discarding {loc}", f,
                                                                                          loc=result.location))

    job.addBoth(done)
    try:
        return await waiter
    except StorageError as error:
        raise storage_error(error) from None


async def copy_vdi(ctx: CallContext, vdi: str, sr: str, extra: dict[str, Any] | None = None) -> str:
    """A full copy of *vdi* in *sr* (file SRs copy rather than share blocks copy-on-write)."""
    source = ctx.store.get(vdi, "VDI")
    src_path = sr_driver(ctx, source.fields["SR"]).file(source.fields["location"])
    driver = _writable_driver(ctx, sr)
    uuid = str(uuidlib.uuid4())
    ctx.progress(0.1)
    disk = await run_storage_uncancelled(ctx, driver, driver.copy_from, src_path, uuid)
    ctx.progress(0.9)
    f = source.fields
    with ctx.store.transaction():
        ref = ctx.store.add("VDI", {
            "uuid": uuid, "SR": sr, "location": disk.location, "name_label": f["name_label"],
            "name_description": f["name_description"], "virtual_size": disk.virtual_size,
            "physical_utilisation": disk.physical_utilisation, "type": f["type"], "sharable": f["sharable"],
            "read_only": False, "other_config": dict(f["other_config"]), "sm_config": {"type": disk.format},
            "xenstore_data": dict(f["xenstore_data"]), "tags": list(f["tags"]), **(extra or {}),
        })
        update_sizes(ctx, sr)
    return ref


@message("VDI.clone")
async def clone(ctx: CallContext, vdi: str, driver_params: dict[str, str]) -> str:
    return await copy_vdi(ctx, vdi, ctx.store.get(vdi, "VDI").fields["SR"])


@message("VDI.copy")
async def copy(ctx: CallContext, vdi: str, sr: str) -> str:
    return await copy_vdi(ctx, vdi, sr)


@message("VDI.snapshot")
async def snapshot(ctx: CallContext, vdi: str, driver_params: dict[str, str]) -> str:
    """A read-only point-in-time copy, linked to its source by snapshot_of."""
    return await copy_vdi(ctx, vdi, ctx.store.get(vdi, "VDI").fields["SR"],
                          {"is_a_snapshot": True, "snapshot_of": vdi, "snapshot_time": ctx.now()})


@message("VDI.update")
async def update(ctx: CallContext, vdi: str) -> str:
    """Re-read the disk's sizes from its file."""
    obj = ctx.store.get(vdi, "VDI")
    from xapid.objects.sr import reconcile

    await reconcile(ctx, obj.fields["SR"])
    return ""


@message("VDI.forget")
def forget(ctx: CallContext, vdi: str) -> str:
    """Drop the record and keep the file (an SR.scan brings it back)."""
    obj = ctx.store.get(vdi, "VDI")
    if obj.fields["VBDs"]:
        raise XenAPIError("VDI_IN_USE", vdi, "forget")
    ctx.store.remove(vdi)
    return ""
