"""The messages the schema derives: getters, setters, set/map updates, records, lookups,
generated create/destroy.  Nothing here knows a particular class."""

from __future__ import annotations

from typing import Any, Callable

from xapid.apitypes import DEFAULT_LIMITS, coerce
from xapid.context import CallContext
from xapid.errors import XenAPIError, field_type_error, handle_invalid, invalid_value, uuid_invalid
from xapid.schema import MessageSpec
from xapid.store import CachedRecord


def create_fields(ctx: CallContext, cls: str, args: dict[str, Any]) -> dict[str, Any]:
    """Fields for a new *cls* object from a ``create`` record, as xapi reads it.

    Required fields must be present (FIELD_TYPE_ERROR naming the first missing one);
    optional ones take the schema default; runtime-only and unknown fields are ignored.
    Refs must name live objects, or be OpaqueRef:NULL where the field is declared
    ``null="true"`` (HANDLE_INVALID otherwise).
    """
    schema = ctx.api.schema
    spec = schema.classes[cls]
    fields: dict[str, Any] = {}
    for f in spec.fields.values():
        if f.create == "no":
            continue
        if f.name not in args:
            if f.create == "required":
                raise field_type_error(f.name)
            continue
        value = coerce(f.type, args[f.name], f.name, schema.enums, ctx.api.limits or DEFAULT_LIMITS)
        check_refs(ctx, f.type, value, f.null)
        check_field(ctx, cls, f.name, value)
        fields[f.name] = value
    return fields


#: (class, field) -> check(ctx, value) run by create and the generated setter; raises XenAPIError
FIELD_CHECKS: dict[tuple[str, str], Callable[[Any, Any], None]] = {}


def check_field(ctx: CallContext, cls: str, field: str, value: Any) -> None:
    check = FIELD_CHECKS.get((cls, field))
    if check is not None:
        check(ctx, value)


def check_refs(ctx: CallContext, t: Any, value: Any, null: bool = True) -> None:
    """HANDLE_INVALID for a ref (or set of refs) that is not a live object (nor OpaqueRef:NULL
    when *null*: the field's or parameter's ``null="true"`` declaration)."""
    store, classes = ctx.api.store, ctx.api.schema.classes
    if t.kind == "ref" and t.name in classes and not (null and value == "OpaqueRef:NULL") \
            and not store.exists(value, t.name):
        raise handle_invalid(t.name, value)
    if t.kind == "set" and t.elem.kind == "ref":
        for item in value:
            check_refs(ctx, t.elem, item, null)


def run(ctx: CallContext, spec: MessageSpec, values: list[Any]) -> Any:
    return _KINDS[spec.kind](ctx, spec, *values)


def _get(ctx, spec, ref):
    return ctx.store.get(ref, spec.cls).fields[spec.field.name]


def _set(ctx, spec, ref, value):
    check_refs(ctx, spec.field.type, value, spec.field.null)
    check_field(ctx, spec.cls, spec.field.name, value)
    ctx.store.update(ref, {spec.field.name: value})
    return ""


def _add(ctx, spec, ref, value):
    current = ctx.store.get(ref, spec.cls).fields[spec.field.name]
    if value not in current:
        _room(ctx, spec, current)
        check_refs(ctx, spec.field.type.elem, value, spec.field.null)
        ctx.store.update(ref, {spec.field.name: [*current, value]})
    return ""


def _room(ctx, spec, current):
    """A set or map may not grow past ``[limits] max_collection_items`` one add at a time either."""
    limit = (ctx.api.limits or DEFAULT_LIMITS).max_collection_items
    if len(current) >= limit:
        raise invalid_value(spec.field.name, f"{len(current) + 1} items (at most {limit})")


def _remove(ctx, spec, ref, value):
    current = ctx.store.get(ref, spec.cls).fields[spec.field.name]
    ctx.store.update(ref, {spec.field.name: [v for v in current if v != value]})
    return ""


def _add_to(ctx, spec, ref, key, value):
    obj = ctx.store.get(ref, spec.cls)
    current = obj.fields[spec.field.name]
    if str(key) in current:
        raise XenAPIError("MAP_DUPLICATE_KEY", spec.cls, spec.field.name, obj.fields.get("uuid", ref), key)
    _room(ctx, spec, current)
    ctx.store.update(ref, {spec.field.name: {**current, str(key): value}})
    return ""


def _remove_from(ctx, spec, ref, key):
    current = ctx.store.get(ref, spec.cls).fields[spec.field.name]
    if str(key) in current:
        ctx.store.update(ref, {spec.field.name: {k: v for k, v in current.items() if k != str(key)}})
    return ""


def _get_record(ctx, spec, ref):
    return CachedRecord(ctx.store.get(ref, spec.cls))


def _get_by_uuid(ctx, spec, uuid):
    obj = ctx.store.by_uuid(uuid)
    if obj is None or obj.cls != spec.cls:
        raise uuid_invalid(spec.cls, uuid)
    return obj.ref


def _get_by_name_label(ctx, spec, label):
    return ctx.store.by_name_label(spec.cls, label)


def _get_all(ctx, spec):
    return ctx.store.refs(spec.cls)


def _get_all_records(ctx, spec):
    return {obj.ref: CachedRecord(obj) for obj in ctx.store.all(spec.cls)}


def _where(ctx, spec, expr):
    from xapid.where import compile_where, evaluate, field_lookup

    tree = compile_where(expr)
    return [obj for obj in ctx.store.all(spec.cls) if evaluate(tree, field_lookup(obj.fields))]


def _get_all_records_where(ctx, spec, expr):
    return {obj.ref: CachedRecord(obj) for obj in _where(ctx, spec, expr)}


def _get_all_where(ctx, spec, expr):
    return [obj.ref for obj in _where(ctx, spec, expr)]


def _create(ctx, spec, args):
    return ctx.store.add(spec.cls, create_fields(ctx, spec.cls, args))


def _destroy(ctx, spec, ref):
    ctx.store.get(ref, spec.cls)
    ctx.store.remove(ref)
    return ""


_KINDS: dict[str, Callable[..., Any]] = {
    "get": _get, "set": _set, "add": _add, "remove": _remove, "add_to": _add_to, "remove_from": _remove_from,
    "get_record": _get_record, "get_by_uuid": _get_by_uuid, "get_by_name_label": _get_by_name_label,
    "get_all": _get_all, "get_all_records": _get_all_records,
    "get_all_records_where": _get_all_records_where, "get_all_where": _get_all_where, "create": _create, "destroy": _destroy,
}
