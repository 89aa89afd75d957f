"""Handlers for the schema's explicit messages, one module per class.

A handler is a function decorated with :func:`message`; :func:`collect_handlers` gathers
them by wire name.  The dispatcher refuses to start when handlers and schema disagree.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

MODULES = ("session", "pool", "host", "vm", "vm_copy", "vm_provision", "vbd", "vif", "network", "sr", "vdi", "task", "event", "system", "stats",
           "role", "messages", "blob", "plugin", "vif_ip")


def message(wire_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as the handler of the explicit message *wire_name* (``VM.start``)."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__xenapi_message__ = wire_name  # type: ignore[attr-defined]
        return fn

    return mark


def collect_handlers(modules: tuple[str, ...] = MODULES) -> dict[str, Callable[..., Any]]:
    handlers: dict[str, Callable[..., Any]] = {}
    for name in modules:
        module = importlib.import_module(f"xapid.objects.{name}")
        for value in vars(module).values():
            wire = getattr(value, "__xenapi_message__", None)
            if wire is not None:
                if wire in handlers:
                    raise ValueError(f"two handlers for {wire}")
                handlers[wire] = value
    return handlers
