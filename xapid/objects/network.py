"""``network.*`` and ``PIF.*``: bridges, and the host's physical interfaces."""

from __future__ import annotations

from typing import Any

from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import generic, message


@message("network.create")
def create(ctx: CallContext, args: dict[str, Any]) -> str:
    """A network; without a bridge name one is chosen (xapi0, xapi1, …)."""
    fields = generic.create_fields(ctx, "network", args)
    if not fields.get("bridge"):
        taken = {o.fields["bridge"] for o in ctx.store.all("network")}
        fields["bridge"] = next(f"xapi{i}" for i in range(len(taken) + 1) if f"xapi{i}" not in taken)
    return ctx.store.add("network", fields)


@message("network.destroy")
def destroy(ctx: CallContext, self: str) -> str:
    """Remove a network no VIF or PIF uses."""
    net = ctx.store.get(self, "network")
    if net.fields["VIFs"]:
        raise XenAPIError("NETWORK_CONTAINS_VIF", *net.fields["VIFs"])
    if net.fields["PIFs"]:
        raise XenAPIError("NETWORK_CONTAINS_PIF", *net.fields["PIFs"])
    ctx.store.remove(self)
    return ""


@message("PIF.destroy")
def pif_destroy(ctx: CallContext, self: str) -> str:
    pif = ctx.store.get(self, "PIF")
    if pif.fields["physical"]:
        raise XenAPIError("PIF_IS_PHYSICAL", self)
    ctx.store.remove(self)
    return ""


@message("PIF.plug")
def pif_plug(ctx: CallContext, self: str) -> str:
    ctx.store.update(self, {"currently_attached": True})
    return ""


@message("PIF.unplug")
def pif_unplug(ctx: CallContext, self: str) -> str:
    """Bring the interface down (refused for the management interface)."""
    pif = ctx.store.get(self, "PIF")
    if pif.fields["management"]:
        raise XenAPIError("OPERATION_NOT_ALLOWED", "the management interface cannot be unplugged")
    ctx.store.update(self, {"currently_attached": False})
    return ""
