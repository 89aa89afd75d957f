"""Handlers for the schema's explicit messages, one module per class.

A handler is a function decorated with :func:`message`; :func:`collect_handlers` gathers
them by wire name.  One handler may serve several messages (``VM.start`` and ``VM.start_on``):
it tells them apart by :func:`called`.  The dispatcher refuses to start when handlers and schema disagree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from xapid.context import CallContext
    from xapid.schema import MessageSpec

MODULES = ("session", "pool", "host", "vm", "vm_copy", "vm_provision", "vbd", "vif", "network", "sr", "vdi", "task", "event", "system", "stats",
           "role", "messages", "blob", "plugin", "vif_ip")


def message(*wire_names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as the handler of the explicit messages *wire_names* (``VM.start``)."""
    if not wire_names:
        raise TypeError("message() needs at least one wire name")

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__xenapi_messages__ = wire_names  # type: ignore[attr-defined]
        return fn

    return mark


def called(ctx: CallContext) -> MessageSpec:
    """The message this call serves: how a handler of several messages tells them apart."""
    if ctx.message is None:
        raise TypeError("a handler of several messages needs the context of one of them")
    return ctx.message


def collect_handlers(modules: tuple[str, ...] = MODULES) -> dict[str, Callable[..., Any]]:
    handlers: dict[str, Callable[..., Any]] = {}
    for name in modules:
        module = importlib.import_module(f"xapid.objects.{name}")
        for value in vars(module).values():
            for wire in getattr(value, "__xenapi_messages__", ()):
                if wire in handlers:
                    raise ValueError(f"two handlers for {wire}")
                handlers[wire] = value
    return handlers
