"""``task.*`` messages with behaviour."""

from __future__ import annotations


from xapid.context import CallContext
from xapid.objects import message


@message("task.create")
def create(ctx: CallContext, label: str, description: str) -> str:
    """A pending task the client drives itself (and may cancel), owned by the calling session:
    capped while pending, destroyed when the session ends."""
    return ctx.api.tasks.create_for_client(ctx.session, label, description)


@message("task.destroy")
def destroy(ctx: CallContext, self: str) -> str:
    ctx.store.remove(self)
    return ""


@message("task.cancel")
def cancel(ctx: CallContext, task: str) -> str:
    ctx.api.tasks.cancel(task)
    return ""
