"""Handlers for the schema's explicit messages, one module per class.

A handler is a function decorated with :func:`message`; :func:`collect_handlers` gathers
them by wire name.  One handler may serve several messages (``VM.start`` and ``VM.start_on``):
it tells them apart by :func:`called`.  The dispatcher refuses to start when handlers and schema disagree.

A module that keeps something up to date besides answering calls (derived fields, the driver's
domain changes, the guest agents' data) says so in an ``install(hooks)`` function; :func:`install`
calls them all and the composition root applies the :class:`Hooks` at the right moments, so it
needs to know none of them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from xapid.context import Api, CallContext
    from xapid.schema import MessageSpec
    from xapid.store import Store

MODULES = ("session", "pool", "host", "vm", "vm_copy", "vm_provision", "vbd", "vif", "network", "sr", "vdi", "task", "event", "system", "stats",
           "role", "messages", "blob", "plugin", "vif_ip")
#: modules with an install hook and no handlers
HOOK_MODULES = ("allowed_ops", "vm_watch", "guest_metrics")


def message(*wire_names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as the handler of the explicit messages *wire_names* (``VM.start``)."""
    if not wire_names:
        raise TypeError("message() needs at least one wire name")

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, "__xenapi_messages__", wire_names)  # a function attribute mypy cannot declare
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


@dataclass
class Hooks:
    """What the objects modules asked for in their ``install(hooks)``, applied by the composition root."""

    store_setups: list[Callable[["Store"], None]] = field(default_factory=list)
    starters: list[Callable[["Api"], Any]] = field(default_factory=list)
    periodic: list[Callable[["Api"], Any]] = field(default_factory=list)

    def setup_store(self, setup: Callable[["Store"], None]) -> None:
        """*setup(store)* before the store loads: register derivers (derived fields are computed on load)."""
        self.store_setups.append(setup)

    def at_start(self, start: Callable[["Api"], Any]) -> None:
        """*start(api)* (may be a coroutine function) once the inventory is read: watch the driver."""
        self.starters.append(start)

    def every_stats_period(self, tick: Callable[["Api"], Any]) -> None:
        """*tick(api)* every ``[stats] period`` while the daemon serves (a Deferred result is waited for)."""
        self.periodic.append(tick)

    def prepare(self, store: "Store") -> None:
        for setup in self.store_setups:
            setup(store)

    async def start(self, api: "Api") -> None:
        for start in self.starters:
            result = start(api)
            if inspect.isawaitable(result):
                await result


def install(modules: tuple[str, ...] = MODULES + HOOK_MODULES) -> Hooks:
    """Every module's ``install(hooks)``, in *modules* order."""
    hooks = Hooks()
    for name in modules:
        hook = getattr(importlib.import_module(f"xapid.objects.{name}"), "install", None)
        if hook is not None:
            hook(hooks)
    return hooks
