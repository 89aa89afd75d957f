"""``system.*``: introspection."""

from __future__ import annotations


from xapid.context import CallContext
from xapid.objects import message


@message("system.listMethods")
def list_methods(ctx: CallContext) -> list[str]:
    """Every wire name served, implicit messages included (as xapi)."""
    return sorted(ctx.api.schema.messages)
