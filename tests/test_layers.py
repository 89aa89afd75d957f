"""The layers, checked statically with the AST: the API core does not import the wire.

Only the edges may import ``xapid.wire``: the wire itself, the composition root (server.py), the
command line and the client, and the modules serving HTTP routes of their own (metrics, HTTP
Basic, transfers, consoles).  Everything else (dispatch, objects, store, events, tasks, the
backends, ...) deals in plain values and :mod:`xapid.apitypes`, so a protocol change stays in
``xapid/wire`` and the core can be driven without it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "xapid"

#: the modules (files, or folders ending in "/") allowed to import xapid.wire
EDGES = ("wire/", "server.py", "cli/", "client/", "stats/http.py", "auth/http.py", "transfer/", "console/")


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an ``import`` or ``from … import`` names (also under TYPE_CHECKING or inside a
    function), relative imports resolved against *package*; ``from a import b`` counts as a and a.b."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def wire_importers() -> dict[str, list[str]]:
    """module file (relative to xapid/) -> the xapid.wire modules it imports, for non-edge modules."""
    found: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel == edge or (edge.endswith("/") and rel.startswith(edge)) for edge in EDGES):
            continue
        package = ".".join(("xapid", *path.relative_to(ROOT).parent.parts))
        modules = imported_modules(ast.parse(path.read_text(encoding="utf-8"), str(path)), package)
        wire = sorted(m for m in modules if m == "xapid.wire" or m.startswith("xapid.wire."))
        if wire:
            found[rel] = wire
    return found


def test_the_core_does_not_import_the_wire():
    assert wire_importers() == {}


def test_the_scan_sees_imports_in_every_form():
    """The scanner itself: plain, from, relative, aliased and TYPE_CHECKING imports are all seen."""
    src = (
        "import xapid.wire.http\n"
        "from xapid.wire import xmlrpc as x\n"
        "from ..wire.values import Int32\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from xapid import wire\n"
        "def f():\n    from . import http\n"
    )
    names = imported_modules(ast.parse(src), "xapid.objects")
    assert {"xapid.wire.http", "xapid.wire.xmlrpc", "xapid.wire.values.Int32", "xapid.wire",
            "xapid.objects.http"} <= names


def test_the_edges_do_import_it():
    """The allow-list is not vacuous: the composition root still builds the wire here."""
    tree = ast.parse((ROOT / "server.py").read_text(encoding="utf-8"))
    assert any(m.startswith("xapid.wire.") for m in imported_modules(tree, "xapid"))


#: what a driver module may import besides xapid.backend: plain constants and the atomic file writer
DRIVER_IMPORTS = ("xapid.backend", "xapid.constants", "xapid.files")


def test_the_drivers_know_no_api_objects():
    """The drivers (everything in xapid/backend but the typed facade proxy.py, which maps their
    errors to Xen-API errors) deal in specs and counters: no store, schema, objects, errors or events."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "backend").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "backend/proxy.py":
            continue
        package = ".".join(("xapid", *path.relative_to(ROOT).parent.parts))
        modules = imported_modules(ast.parse(path.read_text(encoding="utf-8"), str(path)), package)
        outside = sorted(m for m in modules if m.split(".")[0] == "xapid"
                         and not any(m == ok or m.startswith(ok + ".") for ok in DRIVER_IMPORTS))
        if outside:
            found[rel] = outside
    assert found == {}


def test_the_composition_root_knows_no_object_internals():
    """server.py reaches the objects only through their handlers and install hooks."""
    tree = ast.parse((ROOT / "server.py").read_text(encoding="utf-8"))
    internals = sorted(m for m in imported_modules(tree, "xapid")
                       if m.startswith(("xapid.objects.vm", "xapid.objects.allowed_ops", "xapid.objects.guest_metrics")))
    assert internals == []


def test_the_install_hooks_register_derivers_watchers_and_ticks():
    """xapid.objects.install gathers each module's hook: the VM and allowed_operations derivers,
    the domain watcher and the guest agents' tick."""
    from xapid.objects import allowed_ops, guest_metrics, install, vm_watch

    hooks = install()
    assert allowed_ops.register in hooks.store_setups
    assert vm_watch.watch in hooks.starters
    assert guest_metrics.tick in hooks.periodic
