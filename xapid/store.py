"""The object store: every API object by ref, with uuid and name indexes, persisted in SQLite.

Every write goes through :meth:`Store.add`, :meth:`Store.update` or :meth:`Store.remove`,
which keep two-sided references (schema ``inverse`` declarations) and derived fields
current, drop the object's cached wire encodings, and emit a :class:`Change` to every
listener — handlers never send events themselves.  Writes apply in memory at once; the
:class:`Committer` makes them durable in batches (one SQLite transaction, WAL, synchronous
FULL) and :meth:`Store.flush` tells when everything written so far is on disk.

Durability (README, "state dir"): a call's writes are flushed before it is answered, and an
``Async.*`` task's before it turns ``success`` (:mod:`xapid.tasks`).  Writes made outside calls
(the domain watch, housekeeping) are committed by the store on its own: the committer schedules
a flush on the injected reactor :data:`COMMIT_DELAY` seconds after any write, so nothing waits
for someone else's flush.  A commit that fails (disk full, I/O error) is rolled back in memory:
every object with an uncommitted write gets back its last committed image, listeners hear of
the rollback as ordinary changes (mod, or add/del for objects that come back or go away), and
every waiting flush fails with a clear INTERNAL_ERROR (:func:`commit_error`) — nothing that was
refused is saved later.
"""

from __future__ import annotations

import errno
import json
import math
import sqlite3
import uuid as uuidlib
from datetime import datetime
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from xapid.apitypes import NULL_REF, format_datetime, from_json
from xapid.errors import XenAPIError, handle_invalid, internal_error_with_id
from xapid.runner import Runner
from xapid.schema import ClassSpec, Schema

log = Logger()

COMMIT_DELAY = 0.05  # s: a write not followed by a flush is committed this soon on its own

DISK_FULL = ("the disk holding xapid's state database is full (no space left on device): the change was not "
             "saved and has been undone; free some space and try again")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether *exc* (from SQLite or the OS) means the file system is full."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def commit_error(exc: BaseException) -> XenAPIError:
    """What a caller whose writes could not be committed is told: INTERNAL_ERROR saying the disk is
    full, or an INTERNAL_ERROR with a short id that the log line repeats (never the exception text)."""
    if isinstance(exc, XenAPIError):
        return exc
    if is_disk_full(exc):
        return XenAPIError("INTERNAL_ERROR", DISK_FULL)
    incident, error = internal_error_with_id()
    log.error("the state database could not be written (internal error id {incident}): {error}",
              incident=incident, error=repr(exc))
    return error


def new_ref() -> str:
    """An unguessable reference: ``OpaqueRef:<uuid4>``."""
    return f"OpaqueRef:{uuidlib.uuid4()}"


class Obj:
    """One stored object.  ``fields`` is the record; ``cache`` holds encoded forms."""

    __slots__ = ("cls", "ref", "fields", "cache")

    def __init__(self, cls: str, ref: str, fields: dict[str, Any]):
        self.cls = cls
        self.ref = ref
        self.fields = fields
        self.cache: dict[str, Any] = {}


class CachedRecord:
    """An object's record on its way to the wire: encoded once per format until the object
    changes (every write clears ``Obj.cache``)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def encoded(self, fmt: str, encode: Callable[[Any], bytes]) -> bytes:
        cache = self.obj.cache
        text = cache.get(fmt)
        if text is None:
            text = cache[fmt] = encode(self.obj.fields)
        encoded: bytes = text  # the cache holds what encode returned
        return encoded

    @property
    def value(self) -> dict[str, Any]:
        """The record as a plain dict (a copy)."""
        return dict(self.obj.fields)


@dataclass(frozen=True)
class Change:
    """One write: ``op`` is add, mod or del; ``seq`` increases by one per change."""

    seq: int
    cls: str
    op: str
    ref: str


Deriver = Callable[["Store", Obj], dict[str, Any]]


class Store:
    def __init__(self, schema: Schema, committer: "Committer | None" = None):
        self.schema = schema
        self._committer = committer
        self._objects: dict[str, Obj] = {}
        self._by_class: dict[str, dict[str, Obj]] = {name: {} for name in schema.classes}
        self._by_uuid: dict[str, str] = {}
        self._by_name: dict[str, dict[str, set[str]]] = {name: {} for name in schema.classes}
        self._listeners: list[tuple[Callable[[Change], None], Any]] = []
        self._live_ok: set[str] = set()  # classes set_live was checked for
        self._derivers: dict[str, list[Deriver]] = {}
        # source class -> [(derived class, refs of its objects depending on a source object)]
        self._dependents: dict[str, list[tuple[str, Callable[["Store", Obj], Any]]]] = {}
        self._txn_depth = 0
        self._plain_refs: dict[str, list[tuple[str, str]]] = {}
        self._refreshers: dict[str, Callable[[Obj], None]] = {}
        self.seq = 0
        self.rollbacks = 0  # failed commits undone in memory so far (see _rollback)
        self.rollback_error: XenAPIError | None = None  # what the last one answered
        if committer is not None:
            committer.store = self

    # -- reading -------------------------------------------------------------------------

    def get(self, ref: str, cls: str | None = None) -> Obj:
        """The object named by *ref*; HANDLE_INVALID when missing or of another class."""
        obj = self._objects.get(ref) if isinstance(ref, str) else None
        if obj is None or (cls is not None and obj.cls != cls):
            raise handle_invalid(cls or "object", ref)
        refresh = self._refreshers.get(obj.cls)
        if refresh is not None:
            refresh(obj)
        return obj

    def find(self, ref: str) -> Obj | None:
        obj = self._objects.get(ref)
        if obj is not None:
            refresh = self._refreshers.get(obj.cls)
            if refresh is not None:
                refresh(obj)
        return obj

    def exists(self, ref: str, cls: str) -> bool:
        obj = self._objects.get(ref)
        return obj is not None and obj.cls == cls

    def all(self, cls: str) -> list[Obj]:
        objs = list(self._by_class[cls].values())
        refresh = self._refreshers.get(cls)
        if refresh is not None:
            for obj in objs:
                refresh(obj)
        return objs

    def refs(self, cls: str) -> list[str]:
        return list(self._by_class[cls])

    def count(self, cls: str) -> int:
        return len(self._by_class[cls])

    def by_uuid(self, uuid: str) -> Obj | None:
        ref = self._by_uuid.get(uuid)
        return self.find(ref) if ref else None

    def by_name_label(self, cls: str, label: str) -> list[str]:
        return sorted(self._by_name[cls].get(label, ()))

    # -- listeners and derived fields ------------------------------------------------------

    def subscribe(self, listener: Callable[[Change], None],
                  batch: Callable[[int, list[str], list[str]], None] | None = None) -> Callable[[], None]:
        """Call *listener* after every write; returns a function that unsubscribes.  With *batch*,
        a :meth:`live_batch` of n writes is one ``batch(first_seq, classes, refs)`` call
        instead (the objects' changes are ``first_seq`` … ``first_seq + n - 1``, all ``mod``)."""
        entry = (listener, batch)
        self._listeners.append(entry)
        return lambda: self._listeners.remove(entry)

    def compute_on_read(self, cls: str, refresh: Callable[[Obj], None]) -> None:
        """Have *refresh* bring an object of *cls* up to date, in place, each time it is read
        (:meth:`get`, :meth:`find`, :meth:`all`, :meth:`by_uuid`): for fields computed from
        outside the store (metrics rates).  A refresh is not a write: no event, no commit; it
        must clear ``obj.cache`` when it changes a field."""
        self._refreshers[cls] = refresh

    def derive(self, cls: str, deriver: Deriver,
               depends: dict[str, Callable[["Store", Obj], Any]] | None = None) -> None:
        """Register a function computing derived fields of *cls* objects after each write.

        *depends* names what else the fields are computed from: source class -> function
        giving, for a written (added, changed or removed) source object, the refs of the *cls*
        objects to derive again (e.g. a VBD's allowed_operations from its VM's power_state:
        ``{"VM": lambda store, vm: vm.fields["VBDs"]}``).  An object whose derived fields
        change that way is written (event, commit) like any other, and may in turn be a source."""
        self._derivers.setdefault(cls, []).append(deriver)
        for source, refs in (depends or {}).items():
            self._dependents.setdefault(source, []).append((cls, refs))

    # -- writing -------------------------------------------------------------------------

    def add(self, cls: str, fields: dict[str, Any] | None = None, ref: str | None = None) -> str:
        """Create an object; unspecified fields take the schema defaults; returns its ref."""
        spec = self.schema.classes[cls]
        record = spec.defaults()
        record.update(fields or {})
        if "uuid" in spec.fields and not record.get("uuid"):
            record["uuid"] = str(uuidlib.uuid4())
        ref = ref or new_ref()
        self._remember(cls, ref, self._objects.get(ref))
        obj = Obj(cls, ref, record)
        self._index(obj)
        self._apply_derivers(obj)
        self._emit(obj, "add")
        self._link(cls, ref, {}, record)
        self._derive_dependents(obj)
        return ref

    def update(self, ref: str, changes: dict[str, Any]) -> None:
        """Change some fields of an object (no-op when nothing differs)."""
        obj = self.get(ref)
        fields = obj.fields
        changed = {k: v for k, v in changes.items() if fields.get(k) != v}
        if not changed:
            return
        old = {k: fields.get(k) for k in changed}
        self._remember(obj.cls, ref, obj)
        self._unindex_names(obj)
        fields.update(changed)
        self._index_names(obj)
        self._apply_derivers(obj)
        self._emit(obj, "mod")
        self._link(obj.cls, ref, old, changed)
        self._derive_dependents(obj)

    def live_batch(self) -> "LiveBatch":
        """The fast path for live metrics values, rewritten by every sample::

            with store.live_batch() as batch:
                batch.set(ref, {"io_read_kbs": 1.5})

        Each ``set`` applies at once; the changes are emitted (as mods) when the block ends —
        to listeners subscribed with a *batch* function as one call.  Nothing is committed (the
        values reach the database with the object's next ordinary write) and nothing is
        compared, indexed or linked, so only plain value fields (no name_label, no refs) of
        classes without derivers may be set (checked on a class's first use; ValueError)."""
        return LiveBatch(self)

    def _emit_live(self, classes: list[str], refs: list[str]) -> None:
        if not refs:
            return
        first = self.seq + 1
        self.seq += len(refs)
        for listener, batch in list(self._listeners):
            if batch is not None:
                batch(first, classes, refs)
            else:
                for offset, (cls, ref) in enumerate(zip(classes, refs)):
                    listener(Change(first + offset, cls, "mod", ref))

    def _check_live(self, cls: str, changes: dict[str, Any]) -> None:
        linked = {name for (c, name) in self.schema.inverses if c == cls}
        bad = [k for k in changes if k in ("name_label", "uuid") or k in linked]
        if self._derivers.get(cls) or bad:
            raise ValueError(f"live writes cannot set {cls} {bad or '(derived class)'}")
        self._live_ok.add(cls)

    def touch(self, ref: str) -> None:
        """Emit a mod for an object without changing it (event.inject)."""
        obj = self.get(ref)
        self._remember(obj.cls, ref, obj)
        self._emit(obj, "mod")

    def remove(self, ref: str) -> None:
        """Delete an object; references to it in mirrored sets disappear too, and objects
        still pointing at it through a mirrored ref field (a clone's ``parent``, a snapshot's
        ``snapshot_of``) get OpaqueRef:NULL there — handlers cascade or refuse before that."""
        obj = self.get(ref)
        for set_field, (other_cls, ref_field) in self._mirrored_sets(obj.cls):
            for member in list(obj.fields.get(set_field, ())):
                if self.exists(member, other_cls) and self._objects[member].fields.get(ref_field) == ref:
                    self.update(member, {ref_field: NULL_REF})
        for other_cls, ref_field in self._plain_refs_to(obj.cls):  # e.g. VM.suspend_SR, pool.default_SR
            for other in list(self._by_class[other_cls].values()):
                if other.fields.get(ref_field) == ref:
                    self.update(other.ref, {ref_field: NULL_REF})
        self._remember(obj.cls, ref, obj)
        del self._objects[ref]
        del self._by_class[obj.cls][ref]
        if "uuid" in obj.fields:
            self._by_uuid.pop(obj.fields["uuid"], None)
        self._unindex_names(obj)
        self._emit(obj, "del")
        self._link(obj.cls, ref, obj.fields, {k: NULL_REF for k in obj.fields if (obj.cls, k) in self.schema.inverses})
        self._derive_dependents(obj)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes so they reach disk in one commit (no awaiting inside)."""
        self._txn_depth += 1
        try:
            yield
        finally:
            self._txn_depth -= 1
            if self._txn_depth == 0 and self._committer:
                self._committer.release()

    def flush(self) -> Deferred[Any]:
        """Fires once every write made so far is durable."""
        if self._committer is None:
            return succeed(None)
        return self._committer.flush()

    def load(self) -> None:
        """Fill the store from the committer's database (at start, before serving)."""
        if self._committer is None:
            return
        cleaned: list[Obj] = []
        for cls, ref, data in self._committer.database.read_all():
            spec = self.schema.classes.get(cls)
            if spec is None or not spec.persist:
                continue
            record = self._decode(spec, data)
            obj = Obj(cls, ref, record)
            if self._clean_floats(obj):
                cleaned.append(obj)
            self._index(obj)
        self._rebuild_inverses()
        for obj in cleaned:  # saved cleaned with the next commit (build_api flushes after start-up)
            self._committer.record(obj.cls, obj.ref, obj.fields)
        self.derive_all()  # allowed_operations as this version computes them; releases the records above too

    def _decode(self, spec: ClassSpec, data: dict[str, Any]) -> dict[str, Any]:
        """A record from its stored JSON (as :meth:`load` reads it)."""
        record = spec.defaults()
        for name, value in data.items():
            f = spec.fields.get(name)
            if f is not None:
                record[name] = from_json(f.type, value)
        return record

    def _clean_floats(self, obj: Obj) -> bool:
        """Reset NaN and ±Infinity (saved by an older xapid; the wires refuse them now) in float
        fields, and in sets and maps of floats, to the field's default (0.0); one warning per field."""
        spec = self.schema.classes[obj.cls]
        changed = False
        for name, value in obj.fields.items():
            f = spec.fields.get(name)
            if f is None:
                continue
            t = f.type
            if t.kind == "float" and isinstance(value, float) and not math.isfinite(value):
                default = f.default if isinstance(f.default, float) and math.isfinite(f.default) else 0.0
                obj.fields[name] = default
            elif t.kind in ("set", "map") and t.elem is not None and t.elem.kind == "float" and any(
                    isinstance(v, float) and not math.isfinite(v) for v in (value.values() if t.kind == "map" else value)):
                default = 0.0
                obj.fields[name] = ({k: _finite(v) for k, v in value.items()} if t.kind == "map"
                                    else [_finite(v) for v in value])
            else:
                continue
            changed = True
            log.warn("{cls} {ref}: field {field} held a non-finite float ({value}) saved by an older xapid; "
                     "reset to {default}", cls=obj.cls, ref=obj.ref, field=name, value=repr(value), default=default)
        return changed

    # -- internals -----------------------------------------------------------------------

    def _mirrored_sets(self, cls: str) -> list[tuple[str, tuple[str, str]]]:
        spec = self.schema.classes[cls]
        return [(f.name, f.inverse) for f in spec.fields.values() if f.inverse]

    def _plain_refs_to(self, cls: str) -> list[tuple[str, str]]:
        """Ref fields of type ``cls ref`` that no set mirrors (found by scanning on delete)."""
        cached = self._plain_refs.get(cls)
        if cached is None:
            mirrored = {inverse for spec in self.schema.classes.values() for f in spec.fields.values()
                        if (inverse := f.inverse) is not None}
            cached = self._plain_refs[cls] = [
                (spec.name, f.name) for spec in self.schema.classes.values() for f in spec.fields.values()
                if f.type.kind == "ref" and f.type.name == cls and (spec.name, f.name) not in mirrored]
        return cached

    def _index(self, obj: Obj) -> None:
        self._objects[obj.ref] = obj
        self._by_class[obj.cls][obj.ref] = obj
        if "uuid" in obj.fields:
            self._by_uuid[obj.fields["uuid"]] = obj.ref
        self._index_names(obj)

    def _index_names(self, obj: Obj) -> None:
        label = obj.fields.get("name_label")
        if isinstance(label, str):
            self._by_name[obj.cls].setdefault(label, set()).add(obj.ref)

    def _unindex_names(self, obj: Obj) -> None:
        label = obj.fields.get("name_label")
        refs = self._by_name[obj.cls].get(label) if isinstance(label, str) else None
        if refs is not None:
            refs.discard(obj.ref)
            if not refs:
                del self._by_name[obj.cls][str(label)]

    def _apply_derivers(self, obj: Obj) -> None:
        for deriver in self._derivers.get(obj.cls, ()):
            obj.fields.update(deriver(self, obj))

    def _derive_dependents(self, source: Obj) -> None:
        """Derive again the objects whose derived fields depend on *source* (``derive(depends=)``);
        those whose derived values change are written, so their own dependents follow."""
        for cls, refs_of in self._dependents.get(source.cls, ()):
            for ref in list(refs_of(self, source) or ()):
                obj = self._objects.get(ref) if isinstance(ref, str) else None
                if obj is None or obj.cls != cls:
                    continue
                derived: dict[str, Any] = {}
                for deriver in self._derivers.get(cls, ()):
                    derived.update(deriver(self, obj))
                changed = {k: v for k, v in derived.items() if obj.fields.get(k) != v}
                if changed:
                    self._remember(cls, ref, obj)
                    obj.fields.update(changed)
                    self._emit(obj, "mod")
                    self._derive_dependents(obj)

    def derive_all(self) -> list[Obj]:
        """Derive every object's derived fields again (after :meth:`load`: a newer xapid may
        compute them differently); returns the objects that changed (recorded for commit)."""
        changed: list[Obj] = []
        for cls in self._derivers:
            for obj in list(self._by_class[cls].values()):
                before = dict(obj.fields)
                self._apply_derivers(obj)
                if obj.fields != before:
                    obj.cache.clear()
                    changed.append(obj)
        if self._committer is not None:
            for obj in changed:
                if self.schema.classes[obj.cls].persist:
                    self._committer.record(obj.cls, obj.ref, obj.fields)
            self._committer.release()
        return changed

    def _remember(self, cls: str, ref: str, obj: Obj | None) -> None:
        """Before a write: keep the object's image (None: absent) unless it has an uncommitted
        write already, so a failed commit can put it back (:meth:`_rollback`)."""
        committer = self._committer
        if committer is not None and ref not in committer.before and self.schema.classes[cls].persist:
            committer.before[ref] = (cls, "live", None if obj is None else {
                k: (v.copy() if isinstance(v, (list, dict)) else v) for k, v in obj.fields.items()})

    def _emit(self, obj: Obj, op: str) -> None:
        spec = self.schema.classes[obj.cls]
        if self._committer is not None and spec.persist:
            self._committer.record(obj.cls, obj.ref, None if op == "del" else obj.fields)
            if self._txn_depth == 0:
                self._committer.release()
        self._notify(obj, op)

    def _notify(self, obj: Obj, op: str) -> None:
        obj.cache.clear()
        self.seq += 1
        change = Change(self.seq, obj.cls, op, obj.ref)
        for listener, _ in list(self._listeners):
            listener(change)

    def _rollback(self, images: dict[str, tuple[str, str, Any]], error: XenAPIError) -> None:
        """A commit failed: every object with an uncommitted write gets back its last committed
        image (*images*: ref -> (class, "live" fields or "json" text, or None: absent)), and
        listeners hear of each object put back (mod, add or del), so no watcher keeps a phantom."""
        self.rollbacks += 1
        self.rollback_error = error
        touched: list[tuple[Obj, str]] = []
        for ref, (cls, kind, image) in images.items():
            spec = self.schema.classes[cls]
            record = image if kind == "live" or image is None else self._decode(spec, json.loads(image))
            current = self._objects.get(ref)
            if current is not None:
                self._unindex_names(current)
                uuid = current.fields.get("uuid")
                if uuid is not None and self._by_uuid.get(uuid) == ref:
                    del self._by_uuid[current.fields["uuid"]]
            if record is None:
                if current is not None:
                    del self._objects[ref]
                    del self._by_class[current.cls][ref]
                    touched.append((current, "del"))
            elif current is not None:
                current.fields.clear()
                current.fields.update(record)
                self._index(current)
                touched.append((current, "mod"))
            else:
                obj = Obj(cls, ref, record)
                self._index(obj)
                touched.append((obj, "add"))
        done = {obj.ref for obj, _ in touched}
        repaired = [obj for obj in self._repair_inverses() if obj.ref not in done]
        for obj, op in touched + [(obj, "mod") for obj in repaired]:
            if op != "del":
                self._apply_derivers(obj)
            self._notify(obj, op)
        log.warn("a failed commit was rolled back: {count} object(s) put back as last committed", count=len(touched))

    def _repair_inverses(self) -> list[Obj]:
        """Bring mirrored sets in step with the ref fields after a rollback (members kept in
        their order); returns the objects whose sets changed."""
        changed: dict[str, Obj] = {}
        for other_cls, set_field, sets in self._inverse_sets():
            for target, members in sets.items():
                obj = self._by_class[other_cls][target]
                current = obj.fields.get(set_field) or []
                wanted = set(members)
                if set(current) != wanted:
                    keep = [r for r in current if r in wanted]
                    kept = set(keep)
                    obj.fields[set_field] = keep + [r for r in members if r not in kept]
                    changed[target] = obj
        return list(changed.values())

    def _link(self, cls: str, ref: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Keep mirrored sets (``inverse``) in step with a change of ref fields of *ref*."""
        for name, target in new.items():
            for other_cls, set_field in self.schema.inverses.get((cls, name), ()):
                before = old.get(name, NULL_REF)
                if before != target and self.exists(before, other_cls):
                    current = self._objects[before].fields[set_field]
                    if ref in current:
                        self.update(before, {set_field: [r for r in current if r != ref]})
                if self.exists(target, other_cls):
                    current = self._objects[target].fields[set_field]
                    if ref not in current:
                        self.update(target, {set_field: [*current, ref]})

    def _inverse_sets(self) -> Iterator[tuple[str, str, dict[str, list[str]]]]:
        """For each mirrored set: (class, set field, {object: the refs pointing at it, in store order})."""
        for (cls, ref_field), mirrors in self.schema.inverses.items():
            for other_cls, set_field in mirrors:
                sets: dict[str, list[str]] = {r: [] for r in self._by_class[other_cls]}
                for obj in self._by_class[cls].values():
                    target = obj.fields.get(ref_field)
                    if target in sets:
                        sets[target].append(obj.ref)
                yield other_cls, set_field, sets

    def _rebuild_inverses(self) -> None:
        for other_cls, set_field, sets in self._inverse_sets():
            for target, members in sets.items():
                self._by_class[other_cls][target].fields[set_field] = members


class LiveBatch:
    """Live metrics writes applied at once and emitted together (:meth:`Store.live_batch`).

    Only the class and ref of each write are kept until the end (strings, which the garbage
    collector does not track), so a tick's thousands of change dicts die as soon as applied."""

    __slots__ = ("store", "classes", "refs")

    def __init__(self, store: Store):
        self.store = store
        self.classes: list[str] = []
        self.refs: list[str] = []

    def __enter__(self) -> "LiveBatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.store._emit_live(self.classes, self.refs)

    def set(self, ref: str, changes: dict[str, Any]) -> None:
        """Set *changes* on the object *ref*; a ref that no longer exists is skipped."""
        store = self.store
        obj = store._objects.get(ref)
        if obj is None:
            return
        cls = obj.cls
        if cls not in store._live_ok:
            store._check_live(cls, changes)
        obj.fields.update(changes)
        obj.cache.clear()
        self.classes.append(cls)
        self.refs.append(ref)


def _finite(value: Any) -> Any:
    return 0.0 if isinstance(value, float) and not math.isfinite(value) else value


def _dump(fields: dict[str, Any]) -> str:
    return json.dumps(fields, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return format_datetime(value)
    raise TypeError(f"cannot store {type(value).__name__}")


class Database:
    """The SQLite file behind the store: one row per object, the record as JSON."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.closed = False
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS objects (ref TEXT PRIMARY KEY, cls TEXT NOT NULL, data TEXT NOT NULL)")
        from xapid.statedir import stamp  # the state dir's format version (xapid/statedir.py)

        stamp(self._conn)

    def read_all(self) -> list[tuple[str, str, dict[str, Any]]]:
        rows = self._conn.execute("SELECT cls, ref, data FROM objects ORDER BY rowid").fetchall()
        return [(cls, ref, json.loads(data)) for cls, ref, data in rows]

    def write(self, batch: dict[str, tuple[str, str | None]]) -> None:
        """Apply ``ref -> (cls, json or None for delete)`` in one durable transaction."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for ref, (cls, data) in batch.items():
                if data is None:
                    cur.execute("DELETE FROM objects WHERE ref = ?", (ref,))
                else:
                    cur.execute("INSERT INTO objects(ref, cls, data) VALUES (?, ?, ?) "
                                "ON CONFLICT(ref) DO UPDATE SET data = excluded.data", (ref, cls, data))
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite has already rolled back after e.g. SQLITE_FULL
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one to report
            raise

    def close(self) -> None:
        self.closed = True
        self._conn.close()


class Committer:
    """Group commit: writes recorded in the reactor thread, committed by *runner* in batches.

    Only one batch is in flight at a time; writes arriving meanwhile form the next batch.
    Writes inside a store transaction are held back until it ends, so a batch never holds
    half of a transaction.  With *clock* (the reactor), a flush is scheduled *delay* seconds
    after any write, so writes that no call flushes are committed all the same.

    ``before`` keeps, for every object with an uncommitted write, its last committed image
    (filled by the store before each write); a failed commit hands them to the store's
    ``_rollback`` and fails every waiting flush with :func:`commit_error`.  Nothing of a failed
    batch is retried.
    """

    def __init__(self, database: Database, runner: Runner, clock: Any = None, delay: float = COMMIT_DELAY):
        self.database = database
        self._runner = runner
        self._clock = clock
        self._delay = delay
        self._scheduled: Any = None
        self.store: Store | None = None  # set by the Store it serves
        self.before: dict[str, tuple[str, str, Any]] = {}
        # ref -> (class, the live fields or None when deleted); serialised when a batch is taken,
        # so an object changed many times between commits is encoded once
        self._held: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._ready: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._ready_waiters: list[Deferred[Any]] = []
        self._inflight_waiters: list[Deferred[Any]] | None = None
        self.failed: BaseException | None = None

    def record(self, cls: str, ref: str, fields: dict[str, Any] | None) -> None:
        self._held[ref] = (cls, fields)

    def release(self) -> None:
        """Move held writes to the next batch (the end of a transaction)."""
        if self._held:
            self._ready.update(self._held)
            self._held = {}
        if self._ready and self._clock is not None and self._scheduled is None:
            self._scheduled = self._clock.callLater(self._delay, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        """The store's own commit of writes no call flushed (a failure is logged and rolled back)."""
        self._scheduled = None
        if not self.database.closed:
            self.flush().addErrback(lambda _: None)

    def flush(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._ready:
            self._ready_waiters.append(d)
            self._kick()
        elif self._inflight_waiters is not None:
            self._inflight_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _kick(self) -> None:
        if self._inflight_waiters is not None or not self._ready:
            return
        taken, self._ready = self._ready, {}  # no transaction is open here: fields are consistent
        batch = {ref: (cls, None if fields is None else _dump(fields)) for ref, (cls, fields) in taken.items()}
        waiters, self._ready_waiters = self._ready_waiters, []
        self._inflight_waiters = waiters

        def done(_: Any) -> None:
            for ref, (cls, data) in batch.items():
                if ref in self._ready or ref in self._held:  # written again meanwhile: this is its committed image
                    self.before[ref] = (cls, "json", data)
                else:
                    self.before.pop(ref, None)
            finished, self._inflight_waiters = self._inflight_waiters or [], None
            for w in finished:
                w.callback(None)
            self._kick()

        def failed(failure: Any) -> None:
            self.failed = failure.value
            if is_disk_full(failure.value):
                log.error("committing {count} objects to {path} failed: the disk is full ({error}); "
                          "rolling back", count=len(batch), path=str(self.database.path), error=str(failure.value))
            else:
                log.failure("committing {count} objects to {path} failed; rolling back", failure, count=len(batch),
                            path=str(self.database.path))
            error = commit_error(failure.value)
            # everything not committed is undone: this batch and the writes made since, whose
            # waiters fail too (they may build on what was refused)
            images, self.before = self.before, {}
            self._ready, self._held = {}, {}
            waiters = (self._inflight_waiters or []) + self._ready_waiters
            self._inflight_waiters, self._ready_waiters = None, []
            if self.store is not None:
                self.store._rollback(images, error)
            for w in waiters:
                w.errback(error)

        self._runner.run(self.database.write, batch).addCallbacks(done, failed)
