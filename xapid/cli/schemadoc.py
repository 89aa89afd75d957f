"""Render the schema as Markdown: the served classes, their fields and messages."""

from __future__ import annotations

from xapid.schema import MISSING, Schema

QUALIFIERS = {"RW": "RW", "static-RO": "RO (set at create)", "dynamic-RO": "RO (runtime)"}


def render(schema: Schema) -> str:
    out = [f"# Xen-API served by xapid (API version {schema.version})", "",
           "Generated from `xapid/data/xenapi.xml` by `xapid schema-doc`. Every class also has the implicit "
           "messages the schema derives (`get_<field>`, `set_<field>` for writable fields, "
           "`add_<f>`/`remove_<f>` for sets, `add_to_<f>`/`remove_from_<f>` for maps, `get_record`, "
           "`get_by_uuid`, `get_by_name_label`, `get_all`, `get_all_records`).", "",
           "Roles, least to most privileged: " + ", ".join(f"`{r}`" for r in schema.roles) + ".", ""]
    for cls in schema.classes.values():
        out += [f"## {cls.name}", ""]
        if cls.doc:
            out += [cls.doc, ""]
        if cls.fields:
            out += ["| field | type | access | description |", "|---|---|---|---|"]
            for f in cls.fields.values():
                access = QUALIFIERS[f.qualifier] + (" + setter" if f.generic_setter else "")
                out.append(f"| `{f.name}` | `{f.type}` | {access} | {f.doc} |")
            out.append("")
        explicit = [m for m in schema.messages.values() if m.cls == cls.name and m.explicit]
        if explicit:
            out += ["| message | parameters | result | minimum role | async | description |",
                    "|---|---|---|---|---|---|"]
            for m in explicit:
                params = ", ".join(f"{p.name}: {p.type}" + ("" if p.default is MISSING else "?") for p in m.params)
                if m.session:
                    params = "session, " + params if params else "session"
                out.append(f"| `{m.name}` | {params} | `{m.result}` | {m.role} | {'yes' if m.is_async else ''} "
                           f"| {m.doc} |")
            out.append("")
    out += ["## Errors", "", "| code | parameters |", "|---|---|"]
    out += [f"| `{code}` | {_error_params(schema, code)} |" for code in schema.errors]
    return "\n".join(out) + "\n"


def _error_params(schema: Schema, code: str) -> str:
    """An error's parameter names; ``?`` marks one that may be left off, ``…`` one that may repeat."""
    names = list(schema.errors[code])
    arity = schema.error_arity[code]
    marked = [name + ("?" if i >= arity.least else "") for i, name in enumerate(names)]
    if arity.most is None and marked:
        marked[-1] += "…"
    return ", ".join(marked)
