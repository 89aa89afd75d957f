"""``task.*`` messages with behaviour."""

from __future__ import annotations

from typing import Any

from xapid.objects import message


@message("task.create")
def create(ctx: Any, label: str, description: str) -> str:
    """A pending task the client drives itself (and may cancel)."""
    return ctx.api.tasks.create(label, description, cancellable=True)


@message("task.destroy")
def destroy(ctx: Any, self: str) -> str:
    ctx.store.remove(self)
    return ""


@message("task.cancel")
def cancel(ctx: Any, task: str) -> str:
    ctx.api.tasks.cancel(task)
    return ""
