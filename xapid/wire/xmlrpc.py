"""XML-RPC as xapi speaks it: hardened request parsing, compact one-line replies.

Replies carry the Xen-API envelope (``Status``/``Value`` or ``Status``/``ErrorDescription``),
ints as untyped decimal strings (never ``<i8>``), empty strings as ``<value></value>``, and
the declaration exactly ``<?xml version="1.0"?>`` — what the npm ``xen-api`` connector needs.
"""

from __future__ import annotations

import base64
import math
import re
import xmlrpc.client
from itertools import compress
from operator import eq, not_
from datetime import datetime
from typing import Any, Callable

from lxml import etree

from xapid.apitypes import format_datetime
from xapid.wire.values import Int32, Limits, Memo, WireError, float_map_members, parse_int

_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=True,
    remove_pis=True,
)
_BAD = re.compile(r"[&<>\"\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
HEADER = '<?xml version="1.0"?>'


def escape(text: str) -> str:
    """Escape markup characters; drop control characters XML 1.0 cannot carry (as xapi)."""
    if not _BAD.search(text):
        return text
    text = _CTRL.sub("", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# -- encoding ----------------------------------------------------------------------------
# Replies are built as a list of UTF-8 byte strings joined once; cached records (see
# ``Preencoded``) are kept as bytes, so a big get_all_records reply costs one join.


def encode_value(value: Any) -> bytes:
    """One ``<value>…</value>`` element, compact, as UTF-8."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Any, out: list[bytes]) -> None:
    t = type(value)
    if t is str:
        out.append(b"<value>" + escape(value).encode() + b"</value>" if value else b"<value></value>")
    elif t is bool:
        out.append(b"<value><boolean>1</boolean></value>" if value else b"<value><boolean>0</boolean></value>")
    elif t is int:
        out.append(b"<value>%d</value>" % value)
    elif t is dict:
        fast = _float_map(value)
        if fast is not None:
            out.append(fast)
            return
        # scalar members are formatted as text and encoded in runs (big metrics maps, records)
        run = ["<value><struct>"]
        for k, v in value.items():
            name = escape(k if type(k) is str else str(k))
            tv = type(v)
            if tv is float:
                run.append(f"<member><name>{name}</name><value><double>{_double(v)}</double></value></member>")
            elif tv is str:
                run.append(f"<member><name>{name}</name><value>{escape(v)}</value></member>")
            elif tv is int:
                run.append(f"<member><name>{name}</name><value>{v:d}</value></member>")
            elif tv is bool:
                run.append(f"<member><name>{name}</name><value><boolean>{1 if v else 0}</boolean></value></member>")
            else:
                run.append(f"<member><name>{name}</name>")
                out.append("".join(run).encode())
                run.clear()
                if tv in _PREENCODED:  # a record (get_all_records): its cached or freshly built bytes
                    out.append(v.encoded("xml", encode_record))
                else:
                    _encode(v, out)
                run.append("</member>")
        run.append("</struct></value>")
        out.append("".join(run).encode())
    elif t is list or t is tuple:
        out.append(b"<value><array><data>")
        for v in value:
            _encode(v, out)
        out.append(b"</data></array></value>")
    elif t is float:
        out.append(b"<value><double>" + _double(value).encode() + b"</double></value>")
    elif t is Int32:
        out.append(b"<value><i4>%d</i4></value>" % value)
    elif value is None:
        out.append(b"<value><nil/></value>")
    elif isinstance(value, datetime):
        out.append(b"<value><dateTime.iso8601>" + format_datetime(value).encode() + b"</dateTime.iso8601></value>")
    elif hasattr(value, "encoded"):
        if len(_PREENCODED) < 64:
            _PREENCODED.add(t)
        out.append(value.encoded("xml", encode_record))
    elif isinstance(value, str):
        _encode(str(value), out)
    elif isinstance(value, int):
        _encode(int(value), out)
    elif isinstance(value, (set, frozenset)):
        _encode(sorted(value), out)
    else:
        raise TypeError(f"cannot encode {t.__name__} as XML-RPC")


_PREENCODED: set[type] = set()  # types seen with an ``encoded`` method (Preencoded): struct members skip the dispatch


# -- records: shared member fragments ------------------------------------------------------------
# A record (a ``Preencoded`` value: a stored object's fields, an event.from reply) is encoded from
# per-member fragments, each ``<member><name>N</name><value>…</value></member>`` as bytes:
#
# - a *template* per record shape (the same field names with values of the same types, i.e. one
#   class): a recent record of that shape, its values and fragments (replaced by the record being
#   encoded when more than an eighth of the fields, and more than 8, differ).  A record of the shape takes
#   the template's fragment for every field whose value equals the template's (one C-level
#   comparison of the two value lists), and encodes only the others;
# - those others come from a memo by (type, name, value), shared by all records, so values many
#   objects share but the template does not (an enum, a common map) are formatted once.
#
# Only values whose equal copies always encode alike are shared: exact str, int, bool, None and
# datetime, and short lists or maps of exact strings; a float only from the template, when equal
# and not zero (-0.0 == 0.0 but is written differently), never from the memo.  Strings longer
# than SHARED_TEXT (uuids, references: one object's own) are formatted directly, anything else is
# encoded as usual.  The memo holds at most MEMO_LIMIT fragments (and no large one: see Memo), the
# templates TEMPLATE_LIMIT shapes; each is emptied when full.  Templates hold copies of their
# containers, so records changed in place later never alter a template.

MEMO_LIMIT = 65_536
TEMPLATE_LIMIT = 256
SHARED_TEXT = 32  # longer strings are not memoised: they are almost always one object's own
_MEMO: Memo[bytes] = Memo()  # (type, name, value or its key) -> the member's bytes
_NAMES: Memo[bytes] = Memo()  # member name -> b"<member><name>NAME</name>" (bounded like _MEMO)
_memo_get, _name_get = _MEMO.get, _NAMES.get  # bound once: a dict subclass's method lookup costs per call
_SCALARS = frozenset((str, int, bool, datetime, type(None)))
_NOT_SHARED = object()  # a key part never stored


class _Template:
    __slots__ = ("names", "values", "fragments", "always", "floats", "heads", "indexes")

    def __init__(self, names: tuple[Any, ...], values: list[Any], fragments: list[bytes], always: list[int],
                 floats: list[int]):
        self.names = names
        self.values = values
        self.fragments = fragments
        self.always = always  # fields never taken from the template (unshared types)
        self.floats = floats  # float fields: taken from the template only when equal and not zero (-0.0 == 0.0)
        self.heads = [_name(name) for name in names]  # each member's b"<member><name>N</name>"
        self.indexes = range(1, len(names) + 1)  # field i's fragment is fragments[i + 1] (after the struct's opening)


_TEMPLATES: dict[tuple[type, ...], _Template] = {}


def _name(name: Any) -> bytes:
    head = _name_get(name)
    if head is None:
        head = _NAMES.keep(name, ("<member><name>" + escape(name if type(name) is str else str(name))
                                  + "</name>").encode(), MEMO_LIMIT)
    return head


def _member(name: Any, value: Any) -> bytes:
    """One struct member, exactly as :func:`_encode` writes it inside a struct."""
    out = [_name(name)]
    _encode(value, out)
    out.append(b"</member>")
    return b"".join(out)


def _shared_key(t: type, value: Any) -> Any:
    """What stands for *value* (of type *t*) in the memo, or _NOT_SHARED."""
    if t in _SCALARS:
        if t is str and len(value) > SHARED_TEXT:
            return _NOT_SHARED
        return value
    if t is list:
        if not value:
            return ()
        if len(value) <= 64 and all(type(item) is str and len(item) <= SHARED_TEXT for item in value):
            return tuple(value)
    elif t is dict:
        if not value:
            return ()
        items = tuple(value.items())
        if len(items) <= 16 and all(type(k) is str and type(x) is str for k, x in items):
            return items
    return _NOT_SHARED


def _fragment(name: Any, value: Any, head: bytes | None = None) -> bytes:
    """The member for *name* = *value* (*head*: its ``_name``, when known): long strings and lists of
    strings (an object's own: uuid, references) formatted directly, other values from the memo when
    shared."""
    t = type(value)
    if t is str:
        if len(value) > SHARED_TEXT:
            return (head or _name(name)) + ("<value>" + escape(value) + "</value></member>").encode()
    elif t is list:
        for item in value:
            if type(item) is not str:
                break
        else:
            if not value:
                return (head or _name(name)) + b"<value><array><data></data></array></value></member>"
            if _BAD.search("".join(value)) is None:  # nothing to escape: the items joined as they are
                items = "<value>" + "</value><value>".join(value) + "</value>"
            else:
                items = "".join(["<value>" + escape(item) + "</value>" for item in value])
            return (head or _name(name)) + ("<value><array><data>" + items
                                             + "</data></array></value></member>").encode()
    key = _shared_key(t, value)
    if key is _NOT_SHARED:
        return _member(name, value)
    memo_key = (t, name, key)
    fragment = _memo_get(memo_key)
    if fragment is None:
        fragment = _MEMO.keep(memo_key, _member(name, value), MEMO_LIMIT)
    return fragment


def _template(names: tuple[Any, ...], values: list[Any], types: tuple[type, ...], fragments: list[bytes]) -> None:
    """Keep this record as the template of its shape (containers copied)."""
    kept: list[Any] = []
    always: list[int] = []
    floats: list[int] = []
    for i, (t, v) in enumerate(zip(types, values)):
        if t is float:
            floats.append(i)
            kept.append(v)
        elif t not in _SCALARS and _shared_key(t, v) is _NOT_SHARED:
            always.append(i)
            kept.append(_NOT_SHARED)
        else:
            kept.append(list(v) if t is list else dict(v) if t is dict else v)
    if len(_TEMPLATES) >= TEMPLATE_LIMIT:
        _TEMPLATES.clear()
    _TEMPLATES[types] = _Template(names, kept, list(fragments), always, floats)  # fragments: with the struct's tags


def encode_record(value: Any) -> bytes:
    """*value* as :func:`encode_value` gives it; a dict's members come from its shape's template
    and the shared memo."""
    if type(value) is not dict:
        return encode_value(value)
    values = list(value.values())
    types = tuple(map(type, values))
    if types and types[0] is float:
        fast = _float_map(value)
        if fast is not None:  # unique floats: nothing to share
            return fast
    template = _TEMPLATES.get(types)
    names = tuple(value)
    if template is None or template.names != names:
        if not all(type(name) is str for name in names):  # 1, True and 1.0 are one dict key: no sharing
            return encode_value(value)
        fragments = [_STRUCT_OPEN, *[_fragment(name, v) for name, v in zip(names, values)], _STRUCT_CLOSE]
        if template is None:
            _template(names, values, types, fragments)
    else:
        fragments = template.fragments.copy()
        same = list(map(eq, values, template.values))
        for i in template.always:
            same[i] = False
        for i in template.floats:
            if same[i] and values[i] == 0.0:  # 0.0 or -0.0: equal, written differently
                same[i] = False
        heads = template.heads
        changed = 0
        for j in compress(template.indexes, map(not_, same)):
            i = j - 1
            fragments[j] = _fragment(names[i], values[i], heads[i])
            changed += 1
        if changed > len(template.always) + max(8, len(names) // 8):  # a poor template: this record instead
            _template(names, values, types, fragments)
    return b"".join(fragments)


_STRUCT_OPEN = b"<value><struct>"
_STRUCT_CLOSE = b"</struct></value>"


_FLOAT_PREFIX: Memo[str] = Memo()  # map key -> "<member><name>KEY</name><value><double>" (bounded)
_FLOAT_SUFFIX = "</double></value></member>"


def _float_map(value: dict[Any, Any]) -> bytes | None:
    """A map of string keys to finite floats (``host.query_stats``, metrics maps) as the general
    path writes it, with each key's escaped text memoised; None for any other map."""
    members = float_map_members(value, _FLOAT_PREFIX,
                                lambda k: "<member><name>" + escape(str(k)) + "</name><value><double>",
                                _FLOAT_SUFFIX, MEMO_LIMIT)
    return None if members is None else ("<value><struct>" + "".join(members) + "</struct></value>").encode()


def _double(value: float) -> str:
    """A float's text; NaN and infinities have none in the API (refused on input, never sent)."""
    if not math.isfinite(value):
        raise ValueError(f"non-finite float {value!r} cannot be sent")
    return repr(value)


_HEAD = HEADER.encode() + b"<methodResponse><params><param>"
_TAIL = b"</param></params></methodResponse>"
_SUCCESS = _HEAD + (b"<value><struct><member><name>Status</name><value>Success</value></member>"
                    b"<member><name>Value</name>")
_FAILURE = _HEAD + (b"<value><struct><member><name>Status</name><value>Failure</value></member>"
                    b"<member><name>ErrorDescription</name>")
_STRUCT_TAIL = b"</member></struct></value>" + _TAIL


def success(value: Any) -> bytes:
    """The Xen-API success envelope around *value*."""
    out = [_SUCCESS]
    _encode(value, out)
    out.append(_STRUCT_TAIL)
    return b"".join(out)


def failure(description: list[str]) -> bytes:
    """The Xen-API failure envelope: ``ErrorDescription = [code, params…]``."""
    out = [_FAILURE]
    _encode([str(d) for d in description], out)
    out.append(_STRUCT_TAIL)
    return b"".join(out)


def bare(value: Any) -> bytes:
    """A reply without the envelope (only ``system.listMethods``, as xapi)."""
    out = [_HEAD]
    _encode(value, out)
    out.append(_TAIL)
    return b"".join(out)


# -- decoding ----------------------------------------------------------------------------


def decode_call(body: bytes, limits: Limits) -> tuple[str, list[Any]]:
    """Parse a ``methodCall``; raises WireError with a clear reason for anything else.

    Flat plain calls (scalars and string arrays in UTF-8, without references, comments,
    attributes or a DTD: what clients send most) take :func:`_fast_call`; anything else,
    including every malformed body, goes through lxml.
    """
    if len(body) > limits.max_body:
        raise WireError(f"request body larger than {limits.max_body} bytes")
    fast = _fast_call(body, limits)
    return fast if fast is not None else _lxml_call(body, limits)


def _lxml_call(body: bytes, limits: Limits) -> tuple[str, list[Any]]:
    """decode_call's general path: any XML, hardened lxml parsing."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body or b"<!doctype" in body:
        raise WireError("document type declarations are not accepted")
    try:
        root = etree.fromstring(body, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise WireError(f"not well-formed XML: {exc}") from None
    if b"\x00" in body and root.getroottree().docinfo.doctype:  # a DTD in UTF-16/32 the byte check missed
        raise WireError("document type declarations are not accepted")
    if root.tag != "methodCall":
        raise WireError(f"expected <methodCall>, got <{root.tag}>")
    if len(body) > 4 * limits.max_elements:  # an element takes at least 4 bytes: small bodies cannot exceed
        count = 0
        for _ in root.iter():
            count += 1
            if count > limits.max_elements:
                raise WireError(f"more than {limits.max_elements} XML elements")
    name = _child(root, "methodName")
    if name is None or not (name.text or "").strip():
        raise WireError("methodCall without methodName")
    params: list[Any] = []
    pnode = _child(root, "params")
    if pnode is not None:
        for param in pnode:
            if param.tag == "param":
                value = _child(param, "value")
                if value is None:
                    raise WireError("<param> without <value>")
                params.append(_decode(value, 1, limits.max_depth))
    return name.text.strip(), params


def _child(node: etree._Element, tag: str) -> etree._Element | None:
    """The first child named *tag* (``find`` without its path parsing)."""
    for child in node:
        if child.tag == tag:
            return child
    return None


def decode_value(node: etree._Element, max_depth: int) -> Any:
    """The value of one parsed ``<value>`` element, as calls' parameters are decoded (nesting
    bounded by *max_depth*; WireError when malformed)."""
    return _decode(node, 0, max_depth)


def _decode(node: etree._Element, depth: int, max_depth: int) -> Any:
    if depth > max_depth:
        raise WireError(f"values nested deeper than {max_depth}")
    if node.tag != "value":
        raise WireError(f"expected <value>, got <{node.tag}>")
    if len(node) == 0:
        return node.text or ""
    typed = node[0]
    tag, text = typed.tag, (typed.text or "")
    try:
        if tag == "string":
            return text
        if tag in ("int", "i4", "i8"):
            return parse_int(text)
        if tag == "boolean":
            if text.strip() not in ("0", "1"):
                raise WireError(f"bad boolean {text!r}")
            return text.strip() == "1"
        if tag == "double":
            return float(text.strip())
        if tag == "nil":
            return None
        if tag == "dateTime.iso8601":
            return xmlrpc.client.DateTime(text.strip())
        if tag == "base64":
            return base64.b64decode(text)
    except ValueError as exc:
        raise WireError(f"bad <{tag}> value: {exc}") from None
    if tag == "array":
        data = _child(typed, "data")
        return [] if data is None else [_decode(v, depth + 1, max_depth) for v in data]
    if tag == "struct":
        result: dict[str, Any] = {}
        for member in typed:
            if member.tag != "member":
                continue
            mname, mvalue = _child(member, "name"), _child(member, "value")
            if mname is None or mvalue is None:
                raise WireError("<member> needs <name> and <value>")
            result[mname.text or ""] = _decode(mvalue, depth + 1, max_depth)
        return result
    raise WireError(f"unknown value type <{tag}>")


# -- the fast path ------------------------------------------------------------------------
# Most calls are flat: a method name and parameters that are scalars or arrays of strings, in
# UTF-8 without references, comments, CDATA, attributes or a DTD.  Those are read with a few
# regular expressions; any body outside that subset (structs, nesting, entities, anything
# malformed) makes _fast_call return None and is parsed by lxml, which gives the same values
# for the subset and the errors for the rest.

_W = "[ \t\n]*"
_FAST_CALL = re.compile(
    r"""(?:<\?xml[ \t\n]+version[ \t\n]*=[ \t\n]*(["'])1\.[0-9]+\1"""
    r"""(?:[ \t\n]+encoding[ \t\n]*=[ \t\n]*(["'])(?i:utf-?8)\2)?[ \t\n]*\?>)?"""
    + _W + "<methodCall>" + _W + "<methodName>" + _W + r"([A-Za-z0-9_.]+)" + _W + "</methodName>" + _W
    + r"(?:<params>(.*)</params>|<params/>)?" + _W + "</methodCall>" + _W, re.S)
_FAST_PARAM = re.compile(
    _W + "<param>" + _W + "<value>(?:"
    r"<(string|int|i4|i8|double|boolean)>([^<]*)</\1>|"  # typed scalar
    r"([^<]*)|"  # untyped: a string
    r"<array>" + _W + "<data>((?:" + _W + "<value>(?:<string>[^<]*</string>|[^<]*)</value>)*)" + _W
    + "</data>" + _W + "</array>|<array>" + _W + "<data/>" + _W + "</array>"
    r")</value>" + _W + "</param>" + _W)
_FAST_ITEM = re.compile(r"<value>(?:<string>([^<]*)</string>|([^<]*))</value>")
# bytes that leave a body to lxml: control characters XML forbids, references, "]" (of "]]>"),
# and 0xEF, the lead byte of U+F000…U+FFFF (so of U+FFFE and U+FFFF, which XML forbids too)
_NOT_FAST = bytes(c for c in range(32) if c not in b"\t\n\r") + b"&]\xef"


def _fast_call(body: bytes, limits: Limits) -> tuple[str, list[Any]] | None:
    """The call in a flat, plain body, or None to leave the body to lxml."""
    if len(body) > 4 * limits.max_elements or limits.max_depth < 2:  # lxml's path counts and refuses
        return None
    if len(body.translate(None, _NOT_FAST)) != len(body):
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\r" in text:  # XML's end-of-line handling comes before parsing
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    call = _FAST_CALL.fullmatch(text)
    if call is None:
        return None
    params: list[Any] = []
    body_text = call.group(4)
    if body_text and body_text.strip(" \t\n"):
        pos, end = 0, len(body_text)
        while pos < end:
            m = _FAST_PARAM.match(body_text, pos)
            if m is None or m.end() == pos:
                return None
            pos = m.end()
            tag, typed, untyped, items = m.group(1, 2, 3, 4)
            if tag is not None:
                try:
                    params.append(_FAST_SCALARS[tag](typed))
                except ValueError:
                    return None  # lxml's path words the error
            elif untyped is not None:
                params.append(untyped)
            elif items is not None:  # (the group that did not match is "")
                params.append([typed_item or plain_item for typed_item, plain_item in _FAST_ITEM.findall(items)])
            else:
                params.append([])
    return call.group(3), params


def _fast_boolean(text: str) -> bool:
    text = text.strip()
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


_FAST_SCALARS: dict[str, Callable[[str], Any]] = {
    "string": str,
    "int": parse_int,
    "i4": parse_int,
    "i8": parse_int,
    "double": lambda text: float(text.strip()),
    "boolean": _fast_boolean,
}
