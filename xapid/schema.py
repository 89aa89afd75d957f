"""Load ``xapid/data/xenapi.xml`` into an immutable registry of classes, fields and messages.

The file is validated against ``xapid/data/xenapi.rng`` first; any problem raises
:class:`SchemaError` naming the line and the reason.  Implicit messages (getters, setters,
map/set updates, records, ``get_all``, ``get_by_*``, generated ``create``/``destroy``) are
derived here, so dispatch and ``system.listMethods`` see one flat table of messages.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from lxml import etree

from xapid.apitypes import Type, TypeSyntaxError, parse_default, parse_type, zero_value

#: where the schema ships: package data of xapid (``xapid/data/``), so an installed wheel finds it
PACKAGE_DATA = "data"


def data_file(name: str) -> Path:
    """The packaged data file *name*, read through importlib.resources (a wheel is always unpacked
    into a directory, so the resource is a real file lxml can open)."""
    from importlib.resources import files

    return Path(str(files("xapid") / PACKAGE_DATA / name))


DEFAULT_SCHEMA = data_file("xenapi.xml")
GRAMMAR = data_file("xenapi.rng")
SCHEMA_DIR = DEFAULT_SCHEMA.parent

MISSING: Any = object()
READ_ONLY = "read-only"


class SchemaError(Exception):
    """The schema file is unusable; the message names file, line and reason."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: Type
    qualifier: str  # RW, static-RO, dynamic-RO
    default: Any
    create: str  # required, optional, no
    generic_setter: bool
    inverse: tuple[str, str] | None  # (class, ref field) this set mirrors
    runtime: bool
    doc: str
    null: bool = False  # a ref field that may hold OpaqueRef:NULL when written (schema null="true")

    @property
    def writable(self) -> bool:
        return self.qualifier == "RW" or self.generic_setter

    def fresh_default(self) -> Any:
        return copy.copy(self.default)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: Type
    default: Any = MISSING
    doc: str = ""
    null: bool = False  # a ref parameter that accepts OpaqueRef:NULL (schema null="true")


@dataclass(frozen=True)
class MessageSpec:
    cls: str
    name: str
    params: tuple[ParamSpec, ...]
    result: Type
    role: str
    is_async: bool
    session: bool
    kind: str  # "explicit" or the implicit kind: get, set, add, remove, add_to, remove_from, …
    field: FieldSpec | None = None
    deprecated: bool = False
    doc: str = ""
    cancellable: bool = False
    removed: bool = False  # removed from xapi's API: MESSAGE_REMOVED after the session check

    @property
    def wire_name(self) -> str:
        return f"{self.cls}.{self.name}"

    @property
    def explicit(self) -> bool:
        return self.kind == "explicit"

    @property
    def min_params(self) -> int:
        return sum(1 for p in self.params if p.default is MISSING)


@dataclass(frozen=True)
class ClassSpec:
    name: str
    doc: str
    fields: Mapping[str, FieldSpec]
    create: str
    destroy: str
    write_role: str
    implicit: bool
    get_all: bool
    persist: bool
    events: bool
    removed: bool

    def defaults(self) -> dict[str, Any]:
        return {name: f.fresh_default() for name, f in self.fields.items()}


@dataclass(frozen=True)
class ErrorArity:
    """How many parameters an error may carry: at least *least*, at most *most* (None: no bound),
    from its ``<param>`` list (``optional="true"`` ones may be left off, a ``repeated="true"`` one
    may be given any number of times)."""

    least: int
    most: int | None

    def accepts(self, count: int) -> bool:
        return self.least <= count and (self.most is None or count <= self.most)


@dataclass(frozen=True)
class Schema:
    version: str
    roles: tuple[str, ...]  # least to most privileged
    enums: Mapping[str, tuple[str, ...]]
    errors: Mapping[str, tuple[str, ...]]
    classes: Mapping[str, ClassSpec]
    messages: Mapping[str, MessageSpec]  # by wire name
    # (class, ref field) -> [(class, set field)] that mirror it
    inverses: Mapping[tuple[str, str], tuple[tuple[str, str], ...]] = field(default_factory=dict)
    role_docs: Mapping[str, str] = field(default_factory=dict)  # role -> its doc (role.name_description)
    error_arity: Mapping[str, ErrorArity] = field(default_factory=dict)  # code -> its parameter counts

    def role_allows(self, role: str, minimum: str) -> bool:
        return self.roles.index(role) >= self.roles.index(minimum)

    def roles_at_least(self, minimum: str) -> list[str]:
        return list(self.roles[self.roles.index(minimum):])

    # class by lower-case name, filled by __post_init__
    _lower: Mapping[str, ClassSpec] = field(init=False, repr=False, compare=False, default_factory=dict)

    def class_by_lower(self, name: str) -> ClassSpec | None:
        return self._lower.get(name.lower())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lower", {n.lower(): c for n, c in self.classes.items()})


def load_schema(path: str | Path = DEFAULT_SCHEMA, grammar: str | Path = GRAMMAR) -> Schema:
    """Parse, validate and interpret the schema file."""
    path = Path(path)
    try:
        parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True)
        doc = etree.parse(str(path), parser)
        relaxng = etree.RelaxNG(etree.parse(str(grammar)))
    except (OSError, etree.XMLSyntaxError, etree.RelaxNGParseError) as exc:
        raise SchemaError(f"{path}: {exc}") from None
    if not relaxng.validate(doc):
        err = relaxng.error_log.last_error
        raise SchemaError(f"{path}:{err.line}: {err.message}")
    return _Builder(path, doc.getroot()).build()


class _Builder:
    def __init__(self, path: Path, root: etree._Element):
        self.path = path
        self.root = root
        self.enums: dict[str, tuple[str, ...]] = {}

    def fail(self, node: etree._Element, message: str) -> SchemaError:
        return SchemaError(f"{self.path}:{node.sourceline}: {message}")

    def type(self, node: etree._Element, text: str) -> Type:
        try:
            return parse_type(text, frozenset(self.enums))
        except TypeSyntaxError as exc:
            raise self.fail(node, str(exc)) from None

    def build(self) -> Schema:
        root = self.root
        roles = tuple(r.get("name") for r in root.find("roles"))
        for node in root.iterfind("enum"):
            name = node.get("name")
            if name in self.enums:
                raise self.fail(node, f"enum {name} declared twice")
            self.enums[name] = tuple(v.text for v in node.iterfind("value"))
        errors: dict[str, tuple[str, ...]] = {}
        arity: dict[str, ErrorArity] = {}
        for node in root.iterfind("error"):
            code = node.get("code")
            if code in errors:
                raise self.fail(node, f"error {code} declared twice")
            errors[code] = tuple(p.text for p in node.iterfind("param"))
            arity[code] = self.error_arity(node)
        classes: dict[str, ClassSpec] = {}
        messages: dict[str, MessageSpec] = {}
        for node in root.iterfind("class"):
            spec, msgs = self.build_class(node, roles, errors)
            if spec.name in classes:
                raise self.fail(node, f"class {spec.name} declared twice")
            classes[spec.name] = spec
            messages.update(msgs)
        inverses: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for spec in classes.values():
            for f in spec.fields.values():
                if f.inverse:
                    other, ref_field = f.inverse
                    target = classes.get(other)
                    if target is None or ref_field not in target.fields:
                        raise SchemaError(f"{self.path}: {spec.name}.{f.name}: inverse {other}.{ref_field} is not declared")
                    if target.fields[ref_field].type != Type("ref", name=spec.name):
                        raise SchemaError(f"{self.path}: {spec.name}.{f.name}: {other}.{ref_field} is not a {spec.name} ref")
                    inverses.setdefault((other, ref_field), []).append((spec.name, f.name))
        return Schema(
            version=root.get("version"),
            roles=roles,
            enums=MappingProxyType(self.enums),
            errors=MappingProxyType(errors),
            classes=MappingProxyType(classes),
            messages=MappingProxyType(messages),
            inverses=MappingProxyType({k: tuple(v) for k, v in inverses.items()}),
            role_docs=MappingProxyType({r.get("name"): r.get("doc", "") for r in root.find("roles")}),
            error_arity=MappingProxyType(arity),
        )

    def error_arity(self, node: etree._Element) -> ErrorArity:
        """The parameter counts of an ``<error>``: optional parameters only at the end, a repeated one last."""
        params = list(node.iterfind("param"))
        optional = [p.get("optional") == "true" for p in params]
        if any(o and not later for o, later in zip(optional, optional[1:])):
            raise self.fail(node, f"error {node.get('code')}: a required parameter follows an optional one")
        if any(p.get("repeated") == "true" for p in params[:-1]):
            raise self.fail(node, f"error {node.get('code')}: only the last parameter may be repeated")
        repeated = bool(params) and params[-1].get("repeated") == "true"
        return ErrorArity(optional.count(False), None if repeated else len(params))

    def build_class(self, node: etree._Element, roles: tuple[str, ...], errors: Mapping[str, tuple[str, ...]]) -> tuple[ClassSpec, dict[str, MessageSpec]]:
        name = node.get("name")
        write_role = node.get("write-role", "pool-admin")
        if write_role not in roles:
            raise self.fail(node, f"unknown role {write_role!r}")
        fields: dict[str, FieldSpec] = {}
        for fnode in node.iterfind("field"):
            f = self.build_field(fnode)
            if f.name in fields:
                raise self.fail(fnode, f"field {name}.{f.name} declared twice")
            fields[f.name] = f
        spec = ClassSpec(
            name=name,
            doc=node.get("doc", ""),
            fields=MappingProxyType(fields),
            create=node.get("create", "none"),
            destroy=node.get("destroy", "none"),
            write_role=write_role,
            implicit=node.get("implicit", "true") == "true",
            get_all=node.get("get-all", "true") == "true",
            persist=node.get("persist", "true") == "true",
            events=node.get("events", "true") == "true",
            removed=node.get("removed", "false") == "true",
        )
        messages: dict[str, MessageSpec] = {}
        if spec.implicit:
            for m in self.implicit_messages(spec):
                messages[m.wire_name] = m
        for mnode in node.iterfind("message"):
            m = self.build_message(name, mnode, roles, errors)
            messages[m.wire_name] = m  # an explicit message replaces an implicit one
        for verb in ("create", "destroy"):
            explicit = f"{name}.{verb}" in messages and messages[f"{name}.{verb}"].explicit
            if (getattr(spec, verb) == "explicit") != explicit:
                raise self.fail(node, f"class {name}: {verb}=\"{getattr(spec, verb)}\" but "
                                      f"{'a' if explicit else 'no'} <message name=\"{verb}\"> is declared")
        return spec, messages

    def build_field(self, node: etree._Element) -> FieldSpec:
        t = self.type(node, node.get("type"))
        qualifier = node.get("qualifier")
        text = node.get("default")
        if text is not None:
            try:
                default = parse_default(t, text, self.enums)
            except Exception as exc:  # noqa: BLE001 - any parse problem is a schema error
                raise self.fail(node, f"bad default {text!r} for type {t}: {exc}") from None
        else:
            default = zero_value(t)
        create = node.get("create")
        if create is None:
            if qualifier == "dynamic-RO":
                create = "no"
            else:
                create = "optional" if text is not None else "required"
        if t.kind == "enum" and text is None and create != "required":
            raise self.fail(node, f"enum field {node.get('name')} needs a default")
        inverse = None
        if node.get("inverse"):
            other, _, ref_field = node.get("inverse").partition(".")
            if t.kind != "set" or t.elem is None or t.elem.kind != "ref" or not ref_field:
                raise self.fail(node, "inverse needs a 'X ref set' field and 'Class.field'")
            inverse = (other, ref_field)
        null = self.null_flag(node, t)
        return FieldSpec(
            name=node.get("name"),
            type=t,
            qualifier=qualifier,
            default=default,
            create=create,
            generic_setter=node.get("setter") == "generic",
            inverse=inverse,
            runtime=node.get("runtime") == "true",
            doc=node.get("doc", ""),
            null=null,
        )

    def null_flag(self, node: etree._Element, t: Type) -> bool:
        """``null="true"``: OpaqueRef:NULL is accepted for this ref (or ref set element)."""
        if node.get("null") != "true":
            return False
        if t.kind != "ref" and not (t.kind == "set" and t.elem is not None and t.elem.kind == "ref"):
            raise self.fail(node, f"null=\"true\" on {node.get('name')}, which is not a ref")
        return True

    def build_message(self, cls: str, node: etree._Element, roles: tuple[str, ...],
                      errors: Mapping[str, tuple[str, ...]]) -> MessageSpec:
        role = node.get("role")
        if role not in roles:
            raise self.fail(node, f"unknown role {role!r}")
        params = []
        seen_default = False
        for pnode in node.iterfind("param"):
            t = self.type(pnode, pnode.get("type"))
            default = MISSING
            if pnode.get("default") is not None:
                seen_default = True
                try:
                    default = parse_default(t, pnode.get("default"), self.enums)
                except Exception as exc:  # noqa: BLE001
                    raise self.fail(pnode, f"bad default: {exc}") from None
            elif seen_default:
                raise self.fail(pnode, "a parameter without default follows one with a default")
            params.append(ParamSpec(pnode.get("name"), t, default, pnode.get("doc", ""), self.null_flag(pnode, t)))
        for rnode in node.iterfind("raises"):
            if rnode.get("code") not in errors:
                raise self.fail(rnode, f"undeclared error code {rnode.get('code')}")
        return MessageSpec(
            cls=cls,
            name=node.get("name"),
            params=tuple(params),
            result=self.type(node, node.get("result")),
            role=role,
            is_async=node.get("async") == "true",
            session=node.get("session", "true") == "true",
            kind="explicit",
            deprecated=node.get("deprecated") == "true",
            doc=node.get("doc", ""),
            cancellable=node.get("cancellable") == "true",
            removed=node.get("removed") == "true",
        )

    def implicit_messages(self, spec: ClassSpec) -> list[MessageSpec]:
        cls = spec.name
        self_param = ParamSpec("self", Type("ref", name=cls))
        ref_t, rec_t = Type("ref", name=cls), Type("record", name=cls)
        out: list[MessageSpec] = []

        def add(name: str, params: list[ParamSpec], result: Type, role: str, kind: str, f: FieldSpec | None = None,
                is_async: bool = False, doc: str = "") -> None:
            out.append(MessageSpec(cls, name, tuple(params), result, role, is_async, True, kind, f, doc=doc))

        for f in spec.fields.values():
            add(f"get_{f.name}", [self_param], f.type, READ_ONLY, "get", f, doc=f"Get the {f.name} field.")
            if not f.writable:
                continue
            add(f"set_{f.name}", [self_param, ParamSpec("value", f.type, null=f.null)], Type("void"), spec.write_role, "set", f,
                doc=f"Set the {f.name} field.")
            elem, key = f.type.elem, f.type.key
            if f.type.kind == "set":
                assert elem is not None  # parse_type gives every set its element type
                add(f"add_{f.name}", [self_param, ParamSpec("value", elem, null=f.null)], Type("void"), spec.write_role,
                    "add", f, doc=f"Add a value to the {f.name} set.")
                add(f"remove_{f.name}", [self_param, ParamSpec("value", elem)], Type("void"),
                    spec.write_role, "remove", f, doc=f"Remove a value from the {f.name} set.")
            if f.type.kind == "map":
                assert elem is not None and key is not None  # parse_type gives every map both
                add(f"add_to_{f.name}", [self_param, ParamSpec("key", key), ParamSpec("value", elem)],
                    Type("void"), spec.write_role, "add_to", f,
                    doc=f"Add a key to the {f.name} map (MAP_DUPLICATE_KEY if present).")
                add(f"remove_from_{f.name}", [self_param, ParamSpec("key", key)], Type("void"),
                    spec.write_role, "remove_from", f, doc=f"Remove a key from the {f.name} map (no error if absent).")
        add("get_record", [self_param], rec_t, READ_ONLY, "get_record", doc="Get the whole record.")
        if "uuid" in spec.fields:
            add("get_by_uuid", [ParamSpec("uuid", Type("string"))], ref_t, READ_ONLY, "get_by_uuid",
                doc="Get the object with this uuid (UUID_INVALID if none).")
        if "name_label" in spec.fields:
            add("get_by_name_label", [ParamSpec("label", Type("string"))], Type("set", elem=ref_t), READ_ONLY,
                "get_by_name_label", doc="Get every object with this name_label.")
        if spec.get_all:
            add("get_all", [], Type("set", elem=ref_t), READ_ONLY, "get_all", doc="Get every object.")
            add("get_all_records", [], Type("map", key=ref_t, elem=rec_t), READ_ONLY, "get_all_records",
                doc="Get every object with its record.")
            expr = ParamSpec("expr", Type("string"), doc="xapi's filter expression, e.g. field \"name__label\" = \"x\"")
            add("get_all_records_where", [expr], Type("map", key=ref_t, elem=rec_t), READ_ONLY,
                "get_all_records_where", doc="Every object matching the expression, with its record (xapid/where.py).")
            add("get_all_where", [expr], Type("set", elem=ref_t), READ_ONLY, "get_all_where",
                doc="Every object matching the expression (xapid/where.py).")
        if spec.create == "generated":
            add("create", [ParamSpec("args", rec_t)], ref_t, spec.write_role, "create", is_async=True,
                doc="Create an object from a record.")
        if spec.destroy == "generated":
            add("destroy", [self_param], Type("void"), spec.write_role, "destroy", is_async=True,
                doc="Destroy the object.")
        return out
