"""The object store: every API object by ref, with uuid and name indexes, persisted in SQLite
(:mod:`xapid.persistence`: the database and the committer).

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

Writes cost what the written object costs, not what the inventory holds (issue 20): a mirrored
set (``SR.VDIs``, ``VM.VBDs``, ``network.VIFs``…) changes by one member in place — copied first
only while someone else holds the list (a queued legacy event's snapshot, a caller iterating it),
so what others hold never changes under them — and is neither stored nor copied into rollback
images (the committer keeps an undo log of the member changes instead); a long set's members have
an index of their positions, so taking one out does not search the set; deletes find what points
at an object through an index of plain ref fields; and sums over a class
(:meth:`Store.tally`, the SR's sizes) are running totals.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from xapid.apitypes import NULL_REF
from xapid.errors import XenAPIError, handle_invalid
from xapid.persistence import COMMIT_DELAY, DISK_FULL, Committer, Database, commit_error, is_disk_full
from xapid.schema import Schema
from xapid.store_indexes import FieldIndex, Indexes, Tally
from xapid.store_records import CachedRecord, Change, Obj, clean_floats, decode_record, new_ref
from xapid.store_sets import INDEXED, Positions, SetPositions, rebuild_sets, repair_sets, undo_set_changes

__all__ = ["COMMIT_DELAY", "DISK_FULL", "CachedRecord", "Change", "Committer", "Database", "FieldIndex", "LiveBatch",
           "INDEXED", "Obj", "Positions", "Store", "Tally", "commit_error", "is_disk_full", "new_ref"]

log = Logger()
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
        self._refreshers: dict[str, Callable[[Obj], None]] = {}
        # class -> its mirrored set fields (maintained from the other side's ref fields, not stored)
        self._mirrors: dict[str, frozenset[str]] = {}
        self._positions = SetPositions()  # of the long mirrored sets
        for mirrors in schema.inverses.values():
            for other_cls, set_field in mirrors:
                self._mirrors[other_cls] = self._mirrors.get(other_cls, frozenset()) | {set_field}
        # the plain-ref index (what points at each ref), tallies and field indexes, by class
        self._counts = Indexes(schema)
        self._watched = self._counts.watched  # the same dict
        self.seq = 0
        self.rollbacks = 0  # failed commits undone in memory so far (see _rollback)
        self.rollback_error: XenAPIError | None = None  # what the last one answered
        if committer is not None:
            committer.store = self
            committer.skip = self._mirrors

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

    def peek(self, ref: str) -> Obj | None:
        """The object named by *ref*, or None, as stored: not brought up to date by a
        :meth:`compute_on_read` refresher (for the refreshers' own bookkeeping)."""
        return self._objects.get(ref) if isinstance(ref, str) else None

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

    def tally(self, cls: str, group: str, value: str) -> Tally:
        """The running sum of *value* over *cls* objects by their *group* ref, kept by every
        write from now on (registered on first use: one pass over the class)."""
        return self._counts.tally(cls, group, value, self._by_class[cls].values())

    def index(self, cls: str, field: str, key: Callable[[Any], Any] | None = None) -> FieldIndex:
        """The objects of *cls* by the value of *field* (normalised by *key*), kept by every write
        from now on (registered on first use with that field and key: one pass over the class)."""
        return self._counts.index(cls, field, key, self._by_class[cls].values())

    # -- writing -------------------------------------------------------------------------

    def add(self, cls: str, fields: dict[str, Any] | None = None, ref: str | None = None) -> str:
        """Create an object; unspecified fields take the schema defaults; returns its ref."""
        spec = self.schema.classes[cls]
        record = spec.defaults()
        record.update(fields or {})
        if "uuid" in spec.fields and not record.get("uuid"):
            record["uuid"] = str(uuidlib.uuid4())
        explicit = ref is not None
        ref = ref or new_ref()
        replaced = self._objects.get(ref)
        self._remember(cls, ref, replaced)
        if replaced is not None:
            self._counts.account(replaced, -1)
            self._forget_positions(replaced)
        obj = Obj(cls, ref, record)
        self._index(obj)
        self._apply_derivers(obj)
        self._counts.account(obj, 1)
        self._emit(obj, "add")
        self._link(cls, ref, {}, record, check=explicit)
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
        mirrors = self._mirrors.get(obj.cls)
        if mirrors is not None and not mirrors.isdisjoint(changed):  # a set written whole
            self._forget_positions(obj)
        watched = self._watched.get(obj.cls)
        account = watched is not None and not watched.isdisjoint(changed)
        if account:
            self._counts.account(obj, -1)
        self._unindex_names(obj)
        fields.update(changed)
        self._index_names(obj)
        self._apply_derivers(obj)
        if account:
            self._counts.account(obj, 1)
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
        watched = self._watched.get(cls, frozenset())
        bad = [k for k in changes if k in ("name_label", "uuid") or k in linked or k in watched]
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
        for other_cls, ref_field in self._counts.plain_refs_to(obj.cls):  # e.g. VM.suspend_SR, pool.default_SR
            pointing = self._counts.pointing[(other_cls, ref_field)].get(ref)
            if not pointing:
                continue  # nothing points at it that way
            if len(pointing) == 1:  # the usual case (a VM's metrics): no scan
                self.update(next(iter(pointing)), {ref_field: NULL_REF})
                continue
            for other in list(self._by_class[other_cls].values()):  # several: in store order, as always
                if other.fields.get(ref_field) == ref:
                    self.update(other.ref, {ref_field: NULL_REF})
        self._remember(obj.cls, ref, obj)
        mirrors = self._mirrors.get(obj.cls)
        if mirrors and self._committer is not None and ref in self._committer.before:
            # the sets it goes with, for a rollback that brings it back (see Committer.undo)
            self._committer.undo.setdefault(ref, []).append(
                (None, 0, {name: obj.fields.get(name) or [] for name in mirrors}, False))
        self._counts.account(obj, -1)
        self._forget_positions(obj)
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
            record = decode_record(spec, data)
            obj = Obj(cls, ref, record)
            if clean_floats(spec, obj):
                cleaned.append(obj)
            self._index(obj)
        self._rebuild_inverses()
        self._counts.recount(self._by_class)
        for obj in cleaned:  # saved cleaned with the next commit (build_api flushes after start-up)
            self._committer.record(obj.cls, obj.ref, obj.fields)
        self.derive_all()  # allowed_operations as this version computes them; releases the records above too

    # -- internals -----------------------------------------------------------------------

    def _mirrored_sets(self, cls: str) -> list[tuple[str, tuple[str, str]]]:
        spec = self.schema.classes[cls]
        return [(f.name, f.inverse) for f in spec.fields.values() if f.inverse]

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
            skip = self._mirrors.get(cls, ())  # mirrored sets: Committer.undo logs their changes instead
            committer.before[ref] = (cls, "live", None if obj is None else {
                k: (None if k in skip else v.copy() if isinstance(v, (list, dict)) else v)
                for k, v in obj.fields.items()})

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

    def _rollback(self, images: dict[str, tuple[str, str, Any]], error: XenAPIError,
                  undo: dict[str, list[tuple[Any, ...]]] | None = None) -> None:
        """A commit failed: every object with an uncommitted write gets back its last committed
        image (*images*: ref -> (class, "live" fields or "json" text, or None: absent); their
        mirrored sets as the *undo* logs played backwards give them), and listeners hear of each
        object put back (mod, add or del), so no watcher keeps a phantom."""
        self.rollbacks += 1
        self.rollback_error = error
        self._positions.clear()
        records: dict[str, dict[str, Any] | None] = {}
        for ref, (cls, kind, image) in images.items():
            record = (image if kind == "live" or image is None
                      else decode_record(self.schema.classes[cls], json.loads(image)))
            if record is not None and cls in self._mirrors:
                record.update(self._undo_sets(ref, cls, (undo or {}).get(ref, [])))
            records[ref] = record
        touched: list[tuple[Obj, str]] = []
        for ref, (cls, kind, image) in images.items():
            record = records[ref]
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
        self._counts.recount(self._by_class)
        for obj, op in touched + [(obj, "mod") for obj in repaired]:
            if op != "del":
                self._apply_derivers(obj)
            self._notify(obj, op)
        log.warn("a failed commit was rolled back: {count} object(s) put back as last committed", count=len(touched))

    def _undo_sets(self, ref: str, cls: str, entries: list[tuple[Any, ...]]) -> dict[str, list[str]]:
        """The mirrored sets of *ref* as its rollback image had them: its sets now (or as it was
        removed with them) with the logged member changes undone, latest first."""
        current = self._objects.get(ref)
        names = self._mirrors[cls]
        sets = {name: list(current.fields.get(name) or []) if current is not None and current.cls == cls else []
                for name in names}
        return undo_set_changes(sets, names, entries)

    def _repair_inverses(self) -> list[Obj]:
        """Bring mirrored sets in step with the ref fields after a rollback (members kept in
        their order); returns the objects whose sets changed."""
        self._positions.clear()
        return repair_sets(self.schema, self._by_class)

    def _link(self, cls: str, ref: str, old: dict[str, Any], new: dict[str, Any], check: bool = False) -> None:
        """Keep mirrored sets (``inverse``) in step with a change of ref fields of *ref*: one
        member added or removed.  The store keeps each set holding exactly the objects whose ref
        field names its owner, so a new pointer is not looked for first (*check*: it is, for an
        object added under a ref of the caller's choosing)."""
        inverses = self.schema.inverses
        for name, target in new.items():
            for other_cls, set_field in inverses.get((cls, name), ()):
                before = old.get(name, NULL_REF)
                if before != target and self.exists(before, other_cls):
                    self._set_remove(before, set_field, ref)
                if self.exists(target, other_cls):
                    if (before == target or check) and self._positions.find(
                            target, set_field, self._objects[target].fields[set_field], ref) is not None:
                        continue
                    self._set_add(target, set_field, ref)

    def _set_add(self, owner: str, field: str, member: str) -> None:
        """Append *member* to the set *field* of *owner* (a write of *owner*: event, commit)."""
        obj = self.get(owner)
        self._remember(obj.cls, owner, obj)
        index = self._positions.append(owner, obj.fields, field, member)  # in place unless shared
        self._set_written(obj, (field, index, member, True))

    def _set_remove(self, owner: str, field: str, member: str) -> None:
        """Take *member* out of the set *field* of *owner*, if there (a write of *owner*)."""
        obj = self.get(owner)
        index = self._positions.find(owner, field, obj.fields[field], member)
        if index is None:
            return
        self._remember(obj.cls, owner, obj)
        self._positions.remove_at(owner, obj.fields, field, index, member)  # in place unless shared
        self._set_written(obj, (field, index, member, False))

    def _forget_positions(self, obj: Obj) -> None:
        """Drop the position indexes of *obj*'s mirrored sets (replaced whole, or removed)."""
        self._positions.forget(obj.ref, self._mirrors.get(obj.cls, ()))

    def _set_written(self, obj: Obj, change: tuple[Any, ...]) -> None:
        committer = self._committer
        if committer is not None and obj.ref in committer.before:
            committer.undo.setdefault(obj.ref, []).append(change)
        self._apply_derivers(obj)
        self._emit(obj, "mod")
        self._derive_dependents(obj)

    def _rebuild_inverses(self) -> None:
        self._positions.clear()
        rebuild_sets(self.schema, self._by_class)


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

