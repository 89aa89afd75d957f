"""What the store keeps counted as objects are written (:mod:`xapid.store`): which objects point at
each ref through a plain (unmirrored) ref field, so a delete finds them without a scan; running sums
over a class (:class:`Tally`); objects by a field's value (:class:`FieldIndex`).  :class:`Indexes`
holds them all and counts one object in or out of them (:meth:`Indexes.account`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from xapid.apitypes import NULL_REF
from xapid.schema import Schema

if TYPE_CHECKING:
    from xapid.store_records import Obj


class Tally:
    """A running sum of one field over the objects of a class, by the ref another field holds
    (:meth:`xapid.store.Store.tally`; e.g. the ``virtual_size`` of VDIs by ``SR``)."""

    __slots__ = ("cls", "group", "value", "totals")

    def __init__(self, cls: str, group: str, value: str):
        self.cls, self.group, self.value = cls, group, value
        self.totals: dict[Any, Any] = {}

    def total(self, ref: str) -> Any:
        """The sum over the objects whose group field is *ref* (0 when there are none)."""
        return self.totals.get(ref, 0)

    def add(self, fields: dict[str, Any], sign: int) -> None:
        key = fields.get(self.group)
        total = self.totals.get(key, 0) + sign * fields.get(self.value, 0)
        if total or sign > 0:
            self.totals[key] = total
        else:
            self.totals.pop(key, None)


class FieldIndex:
    """The objects of a class by the value of one field, as *key* normalises it
    (:meth:`xapid.store.Store.index`; e.g. VIFs by lower-case MAC), kept by every write."""

    __slots__ = ("cls", "field", "key", "refs")

    def __init__(self, cls: str, field: str, key: Callable[[Any], Any] | None = None):
        self.cls, self.field, self.key = cls, field, key
        self.refs: dict[Any, dict[str, None]] = {}

    def __contains__(self, value: Any) -> bool:
        """Whether some object's field holds *value* (normalised by *key* like the fields)."""
        return (self.key(value) if self.key is not None else value) in self.refs

    def add(self, ref: str, fields: dict[str, Any], sign: int) -> None:
        value = fields.get(self.field)
        try:
            value = self.key(value) if self.key is not None else value
            if sign > 0:
                self.refs.setdefault(value, {})[ref] = None
                return
            refs = self.refs.get(value)
        except (TypeError, AttributeError):  # a value the key does not take (or unhashable): not indexed
            return
        if refs is not None:
            refs.pop(ref, None)
            if not refs:
                del self.refs[value]


class Indexes:
    """Every count the store keeps by class: the objects pointing at each ref through each plain
    ref field (``pointing``), the tallies and the field indexes; ``watched`` names, per class, the
    fields a write must change for the object to be counted again."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.mirrored = mirrored = {inverse for spec in schema.classes.values() for f in spec.fields.values()
                                    if (inverse := f.inverse) is not None}
        self.pointers: dict[str, list[str]] = {}
        self.pointing: dict[tuple[str, str], dict[str, dict[str, None]]] = {}
        for spec in schema.classes.values():
            for f in spec.fields.values():
                if f.type.kind == "ref" and (spec.name, f.name) not in mirrored:
                    self.pointers.setdefault(spec.name, []).append(f.name)
                    self.pointing[(spec.name, f.name)] = {}
        self.tallies: dict[str, list[Tally]] = {}
        self.indexes: dict[str, list[FieldIndex]] = {}
        self.watched: dict[str, frozenset[str]] = {cls: frozenset(names) for cls, names in self.pointers.items()}
        self._plain_refs: dict[str, list[tuple[str, str]]] = {}

    def tally(self, cls: str, group: str, value: str, objs: Iterable[Obj]) -> Tally:
        """The tally of *value* by *group* over *cls* (made on first use from *objs*, the class's objects)."""
        for tally in self.tallies.get(cls, ()):
            if tally.group == group and tally.value == value:
                return tally
        tally = Tally(cls, group, value)
        for obj in objs:
            tally.add(obj.fields, 1)
        self.tallies.setdefault(cls, []).append(tally)
        self.watched[cls] = self.watched.get(cls, frozenset()) | {group, value}
        return tally

    def index(self, cls: str, field: str, key: Callable[[Any], Any] | None, objs: Iterable[Obj]) -> FieldIndex:
        """The index of *cls* by *field* and *key* (made on first use from *objs*, the class's objects)."""
        for found in self.indexes.get(cls, ()):
            if found.field == field and found.key == key:
                return found
        made = FieldIndex(cls, field, key)
        for obj in objs:
            made.add(obj.ref, obj.fields, 1)
        self.indexes.setdefault(cls, []).append(made)
        self.watched[cls] = self.watched.get(cls, frozenset()) | {field}
        return made

    def plain_refs_to(self, cls: str) -> list[tuple[str, str]]:
        """Ref fields of type ``cls ref`` that no set mirrors: (class, field) pairs."""
        cached = self._plain_refs.get(cls)
        if cached is None:
            cached = self._plain_refs[cls] = [
                (spec.name, f.name) for spec in self.schema.classes.values() for f in spec.fields.values()
                if f.type.kind == "ref" and f.type.name == cls and (spec.name, f.name) not in self.mirrored]
        return cached

    def account(self, obj: Obj, sign: int) -> None:
        """Count *obj* in (1) or out (-1) of the plain-ref index and the tallies of its class."""
        for name in self.pointers.get(obj.cls, ()):
            target = obj.fields.get(name)
            if isinstance(target, str) and target != NULL_REF:
                index = self.pointing[(obj.cls, name)]
                if sign > 0:
                    index.setdefault(target, {})[obj.ref] = None
                else:
                    pointing = index.get(target)
                    if pointing is not None:
                        pointing.pop(obj.ref, None)
                        if not pointing:
                            del index[target]
        for tally in self.tallies.get(obj.cls, ()):
            tally.add(obj.fields, sign)
        for by_value in self.indexes.get(obj.cls, ()):
            by_value.add(obj.ref, obj.fields, sign)

    def recount(self, by_class: dict[str, dict[str, Obj]]) -> None:
        """Count every object again (after a load or a rollback)."""
        for counts in self.pointing.values():
            counts.clear()
        for tallies in self.tallies.values():
            for tally in tallies:
                tally.totals.clear()
        for indexes in self.indexes.values():
            for by_value in indexes:
                by_value.refs.clear()
        for cls in set(self.pointers) | set(self.tallies) | set(self.indexes):
            for obj in by_class[cls].values():
                self.account(obj, 1)
