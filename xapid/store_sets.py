"""Mirrored sets changed in place (:mod:`xapid.store`): ``SR.VDIs``, ``VM.VBDs``… hold exactly
the objects whose ref field names their owner.  One member is appended or taken out in place —
the list copied first only while someone else holds it (:class:`SetPositions`); a long set has an
index of its members' positions (:class:`Positions`); a failed commit's undo log of member changes
is played backwards (:func:`undo_set_changes`); and the sets are built again, or repaired, from the
ref fields (:func:`inverse_sets`, :func:`repair_sets`)."""

from __future__ import annotations

import sys
from bisect import bisect_left, insort
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from xapid.schema import Schema

if TYPE_CHECKING:
    from xapid.store_records import Obj



def _unshared_count() -> int:
    """sys.getrefcount of a list that only one dict holds, read into a local as :meth:`SetPositions.append`
    and :meth:`SetPositions.remove_at` read it: 3 on CPython 3.11, measured here rather than assumed,
    since interpreters differ in the references they count (a lower count would let a list someone
    else holds be changed in place)."""
    holder: dict[str, list[str]] = {"field": []}
    current = holder["field"]
    return sys.getrefcount(current)


#: sys.getrefcount of a list only its object's fields hold, seen from a function with it in a local
_UNSHARED = _unshared_count()
#: a mirrored set at least this long gets an index of its members' positions (:class:`Positions`)
INDEXED = 64


class Positions:
    """Where each member of one long mirrored set is, so that taking one out costs O(log n), not a
    search of the set: every member has a number, increasing in the set's order (its position when
    the index was built, or a next number when appended since), and the numbers of the members taken
    out since are kept sorted; a member's position is its number less the removed numbers below it.
    The store builds it again from the list when it no longer matches the list's length, and
    after as many removals as the set has members (so an O(n) rebuild per n removals)."""

    __slots__ = ("number", "gone", "next")

    def __init__(self, members: list[str]):
        self.number = {member: n for n, member in enumerate(members)}
        self.gone: list[int] = []
        self.next = len(members)

    def position(self, member: str) -> int | None:
        n = self.number.get(member)
        return None if n is None else n - bisect_left(self.gone, n)

    def appended(self, member: str) -> None:
        self.number[member] = self.next
        self.next += 1

    def removed(self, member: str) -> None:
        n = self.number.pop(member, None)
        if n is not None:
            insort(self.gone, n)


class SetPositions:
    """The :class:`Positions` of the long mirrored sets, by (owner, set field), and the in-place
    changes of a set that keep them."""

    __slots__ = ("by_set",)

    def __init__(self) -> None:
        self.by_set: dict[tuple[str, str], Positions] = {}

    def clear(self) -> None:
        self.by_set.clear()

    def forget(self, owner: str, fields: Iterable[str]) -> None:
        """Drop the indexes of *owner*'s sets *fields* (replaced whole, or removed)."""
        for name in fields:
            self.by_set.pop((owner, name), None)

    def find(self, owner: str, field: str, members: list[str], member: str) -> int | None:
        """Where *member* is in the mirrored set *field* of *owner* (*members*), or None: looked
        up in the set's :class:`Positions` when it is long, searched when it is short."""
        key = (owner, field)
        by_set = self.by_set
        positions = by_set.get(key)
        if len(members) >= INDEXED:
            if positions is None or len(positions.number) != len(members) or len(positions.gone) > len(members):
                positions = Positions(members)
                if len(positions.number) != len(members):  # a member twice (never kept so): search
                    by_set.pop(key, None)
                    positions = None
                else:
                    by_set[key] = positions
            if positions is not None:
                index = positions.position(member)
                if index is None:
                    return None
                if index < len(members) and members[index] == member:
                    return index
                del by_set[key]  # out of step (never expected): searched instead
        elif positions is not None:
            del by_set[key]  # short again
        try:
            return members.index(member)
        except ValueError:
            return None

    def append(self, owner: str, fields: dict[str, Any], field: str, member: str) -> int:
        """Append *member* to the set *field* of *owner* (its *fields*); returns its index.  The
        caller must hold no reference to the list (so that only a holder elsewhere makes a copy)."""
        current = fields[field]
        if sys.getrefcount(current) > _UNSHARED:  # someone holds this list: they keep it as it is
            current = fields[field] = list(current)
        current.append(member)
        positions = self.by_set.get((owner, field))
        if positions is not None:
            positions.appended(member)
        return len(current) - 1

    def remove_at(self, owner: str, fields: dict[str, Any], field: str, index: int, member: str) -> None:
        """Take *member*, at *index* (:meth:`find`), out of the set *field* of *owner* (its *fields*);
        the caller must hold no reference to the list."""
        current = fields[field]
        if sys.getrefcount(current) > _UNSHARED:
            fields[field] = current[:index] + current[index + 1:]
        else:
            del current[index]
        positions = self.by_set.get((owner, field))
        if positions is not None:
            positions.removed(member)


def undo_set_changes(sets: dict[str, list[str]], names: frozenset[str],
                     entries: list[tuple[Any, ...]]) -> dict[str, list[str]]:
    """*sets* (an object's mirrored sets now, copies) with the logged member changes *entries*
    undone, latest first: ``(field, index, member, added)``, or ``(None, 0, sets, False)`` for the
    object removed with those sets (*names*: the class's mirrored set fields)."""
    for field, index, member, added in reversed(entries):
        if field is None:  # removed here, with these sets
            sets = {name: list(member.get(name) or []) for name in names}
        elif added:
            members = sets.setdefault(field, [])
            if index < len(members) and members[index] == member:
                del members[index]
            elif member in members:
                members.remove(member)
        else:
            members = sets.setdefault(field, [])
            members.insert(min(index, len(members)), member)
    return sets


def inverse_sets(schema: Schema, by_class: dict[str, dict[str, Obj]]
                 ) -> Iterator[tuple[str, str, dict[str, list[str]]]]:
    """For each mirrored set: (class, set field, {object: the refs pointing at it, in store order})."""
    for (cls, ref_field), mirrors in schema.inverses.items():
        for other_cls, set_field in mirrors:
            sets: dict[str, list[str]] = {r: [] for r in by_class[other_cls]}
            for obj in by_class[cls].values():
                target = obj.fields.get(ref_field)
                if target in sets:
                    sets[target].append(obj.ref)
            yield other_cls, set_field, sets


def repair_sets(schema: Schema, by_class: dict[str, dict[str, Obj]]) -> list[Obj]:
    """Bring mirrored sets in step with the ref fields (after a rollback; members kept in their
    order); returns the objects whose sets changed."""
    changed: dict[str, Obj] = {}
    for other_cls, set_field, sets in inverse_sets(schema, by_class):
        for target, members in sets.items():
            obj = by_class[other_cls][target]
            current = obj.fields.get(set_field) or []
            wanted = set(members)
            if set(current) != wanted:
                keep = [r for r in current if r in wanted]
                kept = set(keep)
                obj.fields[set_field] = keep + [r for r in members if r not in kept]
                changed[target] = obj
    return list(changed.values())


def rebuild_sets(schema: Schema, by_class: dict[str, dict[str, Obj]]) -> None:
    """Set every mirrored set from the ref fields (after a load)."""
    for other_cls, set_field, sets in inverse_sets(schema, by_class):
        for target, members in sets.items():
            by_class[other_cls][target].fields[set_field] = members
