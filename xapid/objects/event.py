"""``event.*``: long-polled event.from, event.inject, and the legacy register/next."""

from __future__ import annotations

from typing import Any

from xapid.context import CallContext
from xapid.errors import handle_invalid
from xapid.objects import message


@message("event.from")
def event_from(ctx: CallContext, classes: list[str], token: str, timeout: float) -> Any:
    """Changes since *token*, or a deferred reply once there are some (or *timeout* passed)."""
    return ctx.api.events.wait_from(ctx.session, classes, token, timeout)


@message("event.inject")
def inject(ctx: CallContext, cls: str, ref: str) -> str:
    """Touch the object so watchers see a mod; the token points just before it."""
    spec = ctx.api.schema.class_by_lower(cls)
    if spec is None or not ctx.store.exists(ref, spec.name):
        raise handle_invalid(spec.name if spec else cls, ref)
    before = ctx.store.seq
    ctx.store.touch(ref)
    return ctx.api.events.token(before)


@message("event.get_current_id")
def get_current_id(ctx: CallContext) -> int:
    return ctx.store.seq


@message("event.register")
def register(ctx: CallContext, classes: list[str]) -> str:
    ctx.api.events.register(ctx.session, classes)
    return ""


@message("event.unregister")
def unregister(ctx: CallContext, classes: list[str]) -> str:
    ctx.api.events.unregister(ctx.session, classes)
    return ""


@message("event.next")
def next_events(ctx: CallContext) -> Any:
    return ctx.api.events.next(ctx.session)
