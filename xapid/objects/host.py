"""``host.*`` messages with behaviour."""

from __future__ import annotations

from datetime import datetime, timezone

from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import message


@message("host.enable")
def enable(ctx: CallContext, host: str) -> str:
    """Allow VMs to start on the host again."""
    ctx.store.update(host, {"enabled": True})
    return ""


@message("host.disable")
def disable(ctx: CallContext, host: str, auto_enable: bool) -> str:
    """Refuse new VM starts and resumes (HOST_DISABLED); running VMs are untouched.

    With *auto_enable* the host is enabled again when the daemon restarts.
    """
    ctx.store.update(host, {"enabled": False, "other_config": {
        **ctx.store.get(host, "host").fields["other_config"], "xapid_auto_enable": str(auto_enable).lower()}})
    return ""


@message("host.get_servertime")
def get_servertime(ctx: CallContext, host: str) -> datetime:
    return ctx.now()


@message("host.get_server_localtime")
def get_server_localtime(ctx: CallContext, host: str) -> datetime:
    """Local wall-clock time, sent as a datetime without zone conversion (as xapi)."""
    return datetime.fromtimestamp(int(ctx.api.clock())).replace(tzinfo=timezone.utc)


@message("host.compute_free_memory")
async def compute_free_memory(ctx: CallContext, host: str) -> int:
    """Bytes the hypervisor could give to a new VM now."""
    return await ctx.api.hypervisor.free_memory()


@message("host.compute_memory_overhead")
def compute_memory_overhead(ctx: CallContext, host: str) -> int:
    return ctx.store.get(host, "host").fields["memory_overhead"]


@message("host.list_methods")
def list_methods(ctx: CallContext) -> list[str]:
    """Every wire name served (the 1.0 spelling of system.listMethods)."""
    return sorted(ctx.api.schema.messages)


@message("host.get_management_interface")
def get_management_interface(ctx: CallContext, host: str) -> str:
    """The host's PIF with management = true (xapi: INTERNAL_ERROR when there is none)."""
    for pif in ctx.store.all("PIF"):
        if pif.fields["host"] == host and pif.fields["management"]:
            return pif.ref
    raise XenAPIError("INTERNAL_ERROR", "Not_found")
