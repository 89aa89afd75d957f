"""``pool.*`` messages with behaviour."""

from __future__ import annotations

from typing import Any

from xapid.objects import message


@message("pool.get_license_state")
def get_license_state(ctx: Any, self: str) -> dict[str, str]:
    """The pool's licence: xapid is free software with no expiry."""
    host = ctx.store.get(ctx.api.host_ref, "host").fields
    return {"edition": host["edition"], "expiry": "never", "sku_type": host["license_params"].get("sku_type", "free")}
