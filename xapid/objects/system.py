"""``system.*``: introspection."""

from __future__ import annotations

from typing import Any

from xapid.objects import message


@message("system.listMethods")
def list_methods(ctx: Any) -> list[str]:
    """Every wire name served, implicit messages included (as xapi)."""
    return sorted(ctx.api.schema.messages)
