"""Whole-store integrity checks shared by the property tests and the kill -9 tests.

``problems(call)`` reads every class with ``<Class>.get_all_records`` through *call* (an
in-process ``LocalClient`` or a function wrapping an SDK session) and returns one line per
violation:

* every ref field (plain, set element, map key or value) names a live object of the
  declared class, or is OpaqueRef:NULL;
* every declared inverse set (``inverse="C.f"`` in the schema) holds exactly the objects
  whose ref field names its owner, each once;
* every VDI of an SR has its own file in the SR's directory, every disk file of a file SR
  has a VDI, and no ``*.partial`` / ``*.deleting`` file is left behind.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Callable, Iterator

from xapid.apitypes import Type
from xapid.schema import Schema, load_schema

NULL = "OpaqueRef:NULL"
DISK_EXTENSIONS = ("img", "qcow2", "raw")


@lru_cache(maxsize=1)
def schema() -> Schema:
    return load_schema()


def listed_classes() -> list[str]:
    """Classes whose objects can be read with get_all_records."""
    s = schema()
    return [name for name in s.classes if f"{name}.get_all_records" in s.messages]


def read_all(call: Callable[..., Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every listed class's records: ``{class: {ref: record}}``."""
    return {name: call(f"{name}.get_all_records") for name in listed_classes()}


def _refs_in(t: Type, value: Any) -> Iterator[tuple[str, str]]:
    """(class, ref) for every reference held in a value of type *t*."""
    if t.kind == "ref":
        yield t.name, value
    elif t.kind == "set" and t.elem is not None:
        for item in value:
            yield from _refs_in(t.elem, item)
    elif t.kind == "map":
        for k, v in value.items():
            if t.key is not None:
                yield from _refs_in(t.key, k)
            if t.elem is not None:
                yield from _refs_in(t.elem, v)


def reference_problems(records: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    s = schema()
    found: list[str] = []
    for cls, objects in records.items():
        spec = s.classes[cls]
        for ref, record in objects.items():
            for name, f in spec.fields.items():
                if name not in record:
                    found.append(f"{cls} {ref} record lacks field {name}")
                    continue
                for target_cls, target in _refs_in(f.type, record[name]):
                    if target == NULL:
                        continue
                    if target not in records.get(target_cls, {}):
                        found.append(f"{cls} {ref} .{name} = {target}: no such {target_cls}")
    for (cls, ref_field), mirrors in s.inverses.items():
        if cls not in records:
            continue
        for other_cls, set_field in mirrors:
            if other_cls not in records:
                continue
            expected: dict[str, set[str]] = {r: set() for r in records[other_cls]}
            for ref, record in records[cls].items():
                target = record[ref_field]
                if target in expected:
                    expected[target].add(ref)
            for owner, record in records[other_cls].items():
                actual = list(record[set_field])
                if len(actual) != len(set(actual)):
                    found.append(f"{other_cls} {owner} .{set_field} has duplicates: {actual}")
                if set(actual) != expected[owner]:
                    found.append(f"{other_cls} {owner} .{set_field} = {sorted(actual)}, but the {cls}s whose "
                                 f"{ref_field} names it are {sorted(expected[owner])}")
    return found


def sr_directories(records: dict[str, dict[str, dict[str, Any]]]) -> dict[str, tuple[str, str]]:
    """SR ref -> (SR type, directory) for every SR with a PBD."""
    dirs = {}
    for pbd in records["PBD"].values():
        config = pbd["device_config"]
        location = config.get("location") or config.get("path")
        if location and pbd["SR"] in records["SR"]:
            dirs[pbd["SR"]] = (records["SR"][pbd["SR"]]["type"], location)
    return dirs


def file_problems(records: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    found: list[str] = []
    dirs = sr_directories(records)
    for sr, (sr_type, directory) in dirs.items():
        names = set(os.listdir(directory))
        vdis = {ref: rec for ref, rec in records["VDI"].items() if rec["SR"] == sr}
        locations = [rec["location"] for rec in vdis.values()]
        if len(locations) != len(set(locations)):
            found.append(f"SR {sr}: two VDIs share a file: {sorted(locations)}")
        for ref, rec in vdis.items():
            if rec["location"] not in names or not os.path.isfile(os.path.join(directory, rec["location"])):
                found.append(f"VDI {ref} ({rec['location']}) has no file in {directory}")
        leftovers = sorted(n for n in names if n.endswith((".partial", ".deleting")))
        if leftovers:
            found.append(f"SR {sr}: leftover files {leftovers}")
        if sr_type == "file":
            disks = {n for n in names if n.rpartition(".")[2] in DISK_EXTENSIONS
                     and os.path.isfile(os.path.join(directory, n))}
            for name in sorted(disks - set(locations)):
                found.append(f"SR {sr}: disk file {name} has no VDI")
    return found


def problems(call: Callable[..., Any], files: bool = True) -> list[str]:
    """Every integrity violation visible through *call* (empty when all is well)."""
    records = read_all(call)
    return reference_problems(records) + (file_problems(records) if files else [])


def sdk_caller(session: Any) -> Callable[..., Any]:
    """Adapt an XenAPI SDK session to the ``call("Class.method", *args)`` form."""

    def call(method: str, *args: Any) -> Any:
        target = session.xenapi
        for part in method.split("."):
            target = getattr(target, part)
        return target(*args)

    return call
