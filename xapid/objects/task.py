"""``task.*`` messages with behaviour."""

from __future__ import annotations

from typing import Any

from xapid.objects import message


@message("task.create")
def create(ctx: Any, label: str, description: str) -> str:
    """A pending task the client drives itself (and may cancel), owned by the calling session:
    capped while pending, destroyed when the session ends."""
    return ctx.api.tasks.create_for_client(ctx.session, label, description)


@message("task.destroy")
def destroy(ctx: Any, self: str) -> str:
    ctx.store.remove(self)
    return ""


@message("task.cancel")
def cancel(ctx: Any, task: str) -> str:
    ctx.api.tasks.cancel(task)
    return ""
