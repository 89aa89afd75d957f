"""Blobs: named binary data attached to a VM, host, pool, SR or network (xapi's ``blob``).

The record is an ordinary stored object; the data is the file ``blobs/<uuid>`` of the state
dir (mode 0600, in a 0700 directory), written by ``PUT /blob?ref=`` and read by
``GET /blob?ref=`` (:mod:`xapid.stats.http`).  ``<C>.create_new_blob`` enters the blob in
the object's ``blobs`` map under its name (MAP_DUPLICATE_KEY when the name is taken).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from xapid.apitypes import EPOCH
from xapid.context import CallContext
from xapid.errors import XenAPIError, invalid_value
from xapid.files import write_atomically
from xapid.objects import called, message

OWNERS = ("VM", "host", "pool", "SR", "network")
DEFAULT_MIME = "application/octet-stream"
MIME = re.compile(r"[!-~][ -~]{0,254}")  # printable ASCII: it becomes a Content-Type header
DEFAULT_MAX_BYTES = 4 << 20


def put_role(api: Any, blob: str) -> str:
    """The role a PUT of *blob*'s data needs: that of the create_new_blob of its owner, or of
    blob.create for a blob without one."""
    for cls in OWNERS:
        for obj in api.store.all(cls):
            if blob in obj.fields.get("blobs", {}).values():
                return api.schema.messages[f"{cls}.create_new_blob"].role
    return api.schema.messages["blob.create"].role


def blob_dir(api: Any) -> Path:
    return Path(api.state_dir) / "blobs"


def blob_path(api: Any, uuid: str) -> Path:
    return blob_dir(api) / uuid


def write_data(path: Path, data: bytes) -> None:
    """Replace the blob file (0600; via a temporary file, never following a link)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_atomically(path, data, 0o600)


def read_data(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _mime(mime_type: str) -> str:
    if mime_type == "":
        return DEFAULT_MIME
    if not MIME.fullmatch(mime_type):
        raise invalid_value("mime_type", mime_type)
    return mime_type


def new_blob(ctx: CallContext, mime_type: str, public: bool) -> str:
    return ctx.store.add("blob", {"mime_type": _mime(mime_type), "public": public,
                                  "last_updated": EPOCH})


@message(*(f"{cls}.create_new_blob" for cls in OWNERS))
def create_new_blob(ctx: CallContext, ref: str, name: str, mime_type: str, public: bool) -> str:
    """A new blob entered in the object's ``blobs`` map under *name*."""
    cls = called(ctx).cls
    obj = ctx.store.get(ref, cls)
    blobs = obj.fields["blobs"]
    if name in blobs:
        raise XenAPIError("MAP_DUPLICATE_KEY", cls, "blobs", obj.fields.get("uuid", ref), name)
    with ctx.store.transaction():
        blob = new_blob(ctx, mime_type, public)
        ctx.store.update(ref, {"blobs": {**blobs, name: blob}})
    return blob


@message("blob.create")
def create(ctx: CallContext, mime_type: str, public: bool) -> str:
    return new_blob(ctx, mime_type, public)


@message("blob.destroy")
async def destroy(ctx: CallContext, self: str) -> str:
    """The record, its entries in blobs maps, and its data file."""
    store = ctx.store
    uuid = store.get(self, "blob").fields["uuid"]
    with store.transaction():
        for cls in OWNERS:
            for obj in store.all(cls):
                blobs = obj.fields.get("blobs", {})
                if self in blobs.values():
                    store.update(obj.ref, {"blobs": {k: v for k, v in blobs.items() if v != self}})
        store.remove(self)
    path = blob_path(ctx.api, uuid)
    await ctx.api.runner.run(lambda: path.unlink(missing_ok=True))
    return ""
