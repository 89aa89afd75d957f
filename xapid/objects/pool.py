"""``pool.*`` messages with behaviour."""

from __future__ import annotations


from xapid.context import CallContext
from xapid.objects import message


@message("pool.get_license_state")
def get_license_state(ctx: CallContext, self: str) -> dict[str, str]:
    """The pool's licence: xapid is free software with no expiry."""
    host = ctx.store.get(ctx.api.host_ref, "host").fields
    return {"edition": host["edition"], "expiry": "never", "sku_type": host["license_params"].get("sku_type", "free")}
