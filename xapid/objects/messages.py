"""``message.*``: messages for the administrator, kept in the store and bounded.

xapi keeps messages in files beside its database and serves them only through explicit calls;
xapid keeps them as ordinary stored objects (so they persist, and ``event.from`` reports them
under ``message``), at most ``[limits] max_messages`` of them: creating one beyond that drops
the oldest.  Timestamps are kept to the second, so ``get_since``/``get`` include the boundary
second (a poller may see a message twice, never miss one).
"""

from __future__ import annotations

import heapq
from datetime import datetime, timezone
from typing import Any

from xapid.apitypes import utc
from xapid.context import CallContext
from xapid.errors import XenAPIError, uuid_invalid
from xapid.objects import message
from xapid.store import CachedRecord
from xapid.where import compile_where, evaluate, field_lookup

#: the message ``cls`` enum value -> the xapid class whose objects it names (None: not served)
CLASSES = {"VM": "VM", "Host": "host", "SR": "SR", "Pool": "pool", "VDI": "VDI",
           "VMPP": None, "VMSS": None, "PVS_proxy": None, "Certificate": None}
DEFAULT_LIMIT = 10_000  # xapi's message_limit


def add_message(api: Any, name: str, priority: int, cls: str, obj_uuid: str, body: str,
                timestamp: datetime | None = None, ref: str | None = None, uuid: str | None = None) -> str:
    """Store one message (after the caller's checks) and drop the oldest beyond the limit."""
    store = api.store
    fields = {"name": name, "priority": priority, "cls": cls, "obj_uuid": obj_uuid, "body": body,
              "timestamp": timestamp or utc(api.clock())}
    if uuid:
        fields["uuid"] = uuid
    ref = store.add("message", fields, ref=ref)
    limit = getattr(api, "max_messages", DEFAULT_LIMIT) or DEFAULT_LIMIT
    excess = store.count("message") - limit
    if excess > 0:
        oldest = heapq.nsmallest(excess, store.all("message"), key=lambda o: o.fields["timestamp"])
        for obj in oldest:
            if obj.ref != ref:
                store.remove(obj.ref)
    return ref


def object_exists(store: Any, cls: str, obj_uuid: str) -> bool:
    target = CLASSES.get(cls)
    obj = store.by_uuid(obj_uuid) if target else None
    return obj is not None and obj.cls == target


@message("message.create")
def create(ctx: CallContext, name: str, priority: int, cls: str, obj_uuid: str, body: str) -> str:
    if not object_exists(ctx.store, cls, obj_uuid):
        raise XenAPIError("UUID_INVALID", cls, obj_uuid)
    return add_message(ctx.api, name, priority, cls, obj_uuid, body)


@message("message.destroy")
def destroy(ctx: CallContext, self: str) -> str:
    ctx.store.get(self, "message")
    ctx.store.remove(self)
    return ""


@message("message.destroy_many")
def destroy_many(ctx: CallContext, messages: list[str]) -> str:
    with ctx.store.transaction():
        for ref in messages:
            if ctx.store.exists(ref, "message"):
                ctx.store.remove(ref)
    return ""


def _records(objs: Any) -> dict[str, Any]:
    return {obj.ref: CachedRecord(obj) for obj in objs}


@message("message.get")
def get(ctx: CallContext, cls: str, obj_uuid: str, since: datetime) -> dict[str, Any]:
    return _records(o for o in ctx.store.all("message") if o.fields["cls"] == cls
                    and o.fields["obj_uuid"] == obj_uuid and o.fields["timestamp"] >= since)


@message("message.get_all")
def get_all(ctx: CallContext) -> list[str]:
    return ctx.store.refs("message")


@message("message.get_since")
def get_since(ctx: CallContext, since: datetime) -> dict[str, Any]:
    return _records(o for o in ctx.store.all("message") if o.fields["timestamp"] >= since)


@message("message.get_record")
def get_record(ctx: CallContext, self: str) -> Any:
    return CachedRecord(ctx.store.get(self, "message"))


@message("message.get_by_uuid")
def get_by_uuid(ctx: CallContext, uuid: str) -> str:
    obj = ctx.store.by_uuid(uuid)
    if obj is None or obj.cls != "message":
        raise uuid_invalid("message", uuid)
    return obj.ref


@message("message.get_all_records")
def get_all_records(ctx: CallContext) -> dict[str, Any]:
    return _records(ctx.store.all("message"))


@message("message.get_all_records_where")
def get_all_records_where(ctx: CallContext, expr: str) -> dict[str, Any]:
    tree = compile_where(expr)
    return _records(o for o in ctx.store.all("message") if evaluate(tree, field_lookup(o.fields)))


# -- xapi's message XML (PUT /messages imports it, GET /messages exports it) -------------------

_TAGS = ("ref", "name", "priority", "cls", "obj_uuid", "timestamp", "uuid", "body")


def export_xml(objs: Any) -> bytes:
    """Each message as xapi writes one: an XML declaration and a ``<message>`` element."""
    from xml.sax.saxutils import escape

    out = []
    for obj in objs:
        f = obj.fields
        values = {"ref": obj.ref, "name": f["name"], "priority": str(f["priority"]), "cls": f["cls"],
                  "obj_uuid": f["obj_uuid"], "timestamp": f["timestamp"].strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "uuid": f["uuid"], "body": f["body"]}
        inner = "".join(f"<{t}>{escape(values[t])}</{t}>" for t in _TAGS)
        out.append(f'<?xml version="1.0" encoding="UTF-8"?><message>{inner}</message>')
    return "".join(out).encode("utf-8")


def import_xml(api: Any, body: bytes) -> int:
    """Store the messages of *body* (xapi's format); a ref or uuid already in use is skipped
    (xapi: a message already written is not written again).  ValueError for bad XML."""
    import re

    from lxml import etree

    text = re.sub(rb"<\?xml[^>]*\?>", b"", body)
    if b"<!" in text:
        raise ValueError("DTDs and entities are not accepted")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_comments=True)
    try:
        root = etree.fromstring(b"<messages>" + text + b"</messages>", parser)
    except etree.XMLSyntaxError as exc:
        raise ValueError(f"bad message XML: {exc}") from None
    limit = getattr(api, "max_messages", DEFAULT_LIMIT) or DEFAULT_LIMIT
    items = list(root)
    if len(items) > limit:
        raise ValueError(f"at most {limit} messages at once ([limits] max_messages)")
    store, count = api.store, 0
    with store.transaction():
        for item in items:
            if item.tag != "message":
                raise ValueError(f"unexpected element <{item.tag}>")
            f = {child.tag: (child.text or "") for child in item}
            cls = f.get("cls", "")
            if cls not in CLASSES:
                raise ValueError(f"bad class {cls!r}")
            try:
                priority = int(f.get("priority", "0"))
                when = datetime.fromisoformat(f.get("timestamp", "").replace("Z", "+00:00"))
            except ValueError:
                raise ValueError("bad priority or timestamp") from None
            when = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
            ref, uuid = f.get("ref", ""), f.get("uuid", "")
            if store.find(ref) is not None or (uuid and store.by_uuid(uuid) is not None):
                continue
            ok_ref = ref if re.fullmatch(r"OpaqueRef:[0-9A-Za-z-]{1,64}", ref) and ref != "OpaqueRef:NULL" else None
            ok_uuid = uuid if re.fullmatch(r"[0-9a-fA-F-]{36}", uuid) else None
            add_message(api, f.get("name", ""), priority, cls, f.get("obj_uuid", ""), f.get("body", ""),
                        timestamp=when.replace(microsecond=0), ref=ok_ref, uuid=ok_uuid)
            count += 1
    return count
