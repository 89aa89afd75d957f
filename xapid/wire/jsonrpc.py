"""JSON-RPC 1.0 and 2.0 on ``/jsonrpc``, as xapi answers it.

v1: ``{"result": …, "error": null, "id": …}`` / ``{"result": null, "error": [code, …], "id": …}``.
v2: ``{"jsonrpc": "2.0", "result": …, "id": …}`` with no ``error`` key on success, and
``{"jsonrpc": "2.0", "error": {"code": 1, "message": CODE, "data": [params]}, "id": …}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
import re
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

from xapid.apitypes import format_datetime
from xapid.wire.values import HugeInt, Int32, Limits, Memo, WireError, float_map_members, parse_int


@dataclass(frozen=True)
class JsonCall:
    method: str
    params: list[Any]
    id: Any
    v2: bool


_SURROGATE = re.compile("[\ud800-\udfff]")


def _string(text: str) -> str:
    """A JSON string; lone surrogates (not encodable as UTF-8) travel as \\u escapes."""
    return encode_basestring_ascii(text) if _SURROGATE.search(text) else encode_basestring(text)


def encode_value(value: Any) -> bytes:
    """*value* as compact JSON in UTF-8."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Any, out: list[bytes]) -> None:
    t = type(value)
    if t is str:
        out.append(_string(value).encode())
    elif t is bool:
        out.append(b"true" if value else b"false")
    elif t is int or t is Int32:
        out.append(b"%d" % value)
    elif t is dict:
        fast = _float_map(value)
        if fast is not None:
            out.append(fast)
            return
        out.append(b"{")
        first = True
        for k, v in value.items():
            if not first:
                out.append(b",")
            first = False
            out.append(_string(str(k)).encode() + b":")
            _encode(v, out)
        out.append(b"}")
    elif t is list or t is tuple:
        out.append(b"[")
        for i, v in enumerate(value):
            if i:
                out.append(b",")
            _encode(v, out)
        out.append(b"]")
    elif t is float:
        if not math.isfinite(value):  # NaN/Infinity are not JSON: a strict parser refuses the whole reply
            raise ValueError(f"non-finite float {value!r} cannot be sent")
        out.append(json.dumps(value, allow_nan=False).encode())
    elif value is None:
        out.append(b"null")
    elif isinstance(value, datetime):
        out.append(_string(format_datetime(value)).encode())
    elif hasattr(value, "encoded"):
        out.append(value.encoded("json", encode_record))
    elif isinstance(value, str):
        _encode(str(value), out)
    elif isinstance(value, int):
        _encode(int(value), out)
    elif isinstance(value, (set, frozenset)):
        _encode(sorted(value), out)
    else:
        raise TypeError(f"cannot encode {t.__name__} as JSON")


# -- records: memoised member fragments (as in xmlrpc.encode_record) ----------------------------

MEMO_LIMIT = 65_536
_MEMO: Memo[bytes] = Memo()  # (type, name, value or its key) -> '"name":value' as bytes
_SCALARS = frozenset((str, int, bool, datetime, type(None)))  # never floats: -0.0 == 0.0
SHARED_TEXT = 32  # longer strings (uuids, references: one object's own) are not memoised


def _member(name: Any, value: Any) -> bytes:
    """One object member, exactly as :func:`_encode` writes it."""
    out = [_string(str(name)).encode() + b":"]
    _encode(value, out)
    return b"".join(out)


def encode_record(value: Any) -> bytes:
    """*value* as :func:`encode_value` gives it; a dict's members come from a memo shared by all
    records, so values many objects share (defaults, enums, empty sets and maps) are encoded
    once.  Only values whose equal copies always encode alike are memoised (exact str up to
    SHARED_TEXT characters, int, bool, None and datetime, lists and maps of exact strings);
    at most MEMO_LIMIT entries, none of them large (see Memo)."""
    if type(value) is not dict:
        return encode_value(value)
    fast = _float_map(value)
    if fast is not None:
        return fast
    if not all(type(name) is str for name in value):  # 1, True and 1.0 are one dict key: no sharing
        return encode_value(value)
    out: list[bytes] = []
    append = out.append
    memo = _MEMO
    get = memo.get  # bound once: a dict subclass's method lookup costs per call
    scalars = _SCALARS
    for name, v in value.items():
        t = type(v)
        if t is str and len(v) > SHARED_TEXT:
            append(_string(name).encode() + b":" + _string(v).encode())
            continue
        if t in scalars:
            key: Any = (t, name, v)
        elif t is list:
            if v and not all(type(item) is str for item in v):
                append(_member(name, v))
                continue
            key = (t, name, tuple(v))
        elif t is dict:
            items = tuple(v.items())
            if items and not all(type(k) is str and type(x) is str for k, x in items):
                append(_member(name, v))
                continue
            key = (t, name, items)
        else:
            append(_member(name, v))
            continue
        fragment = get(key)
        if fragment is None:
            fragment = memo.keep(key, _member(name, v), MEMO_LIMIT)
        append(fragment)
    return b"{" + b",".join(out) + b"}"


_FLOAT_PREFIX: Memo[str] = Memo()  # map key -> '"KEY":' (bounded)


def _float_map(value: dict[Any, Any]) -> bytes | None:
    """A map of string keys to finite floats (``host.query_stats``) as the general path writes
    it (float.__repr__ is what json writes for a finite float), each key's text memoised; None
    for any other map."""
    members = float_map_members(value, _FLOAT_PREFIX, lambda k: _string(str(k)) + ":", "", MEMO_LIMIT)
    return None if members is None else ("{" + ",".join(members) + "}").encode()


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


def decode_call(body: bytes, limits: Limits) -> JsonCall:
    """Parse one JSON-RPC request; WireError with the reason for anything unusable."""
    if len(body) > limits.max_body:
        raise WireError(f"request body larger than {limits.max_body} bytes")
    try:
        # NaN, Infinity and numbers overflowing to inf decode as floats that apitypes.coerce
        # refuses with the parameter's name; over-long ints never meet int()'s digit limit
        doc = json.loads(body, parse_int=parse_int)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WireError("a JSON-RPC request must be an object")
    if not _depth_ok(doc, limits.max_depth + 2):
        raise WireError(f"values nested deeper than {limits.max_depth}")
    method = doc.get("method")
    if not isinstance(method, str) or not method:
        raise WireError("JSON-RPC request without a method")
    if "id" not in doc or doc["id"] is None:
        raise WireError("JSON-RPC notifications (no id) are not accepted")
    if not isinstance(doc["id"], (str, int)) or isinstance(doc["id"], (bool, HugeInt)):
        raise WireError("a JSON-RPC id must be a string or an integer")
    params = doc.get("params", [])
    if isinstance(params, dict):
        params = list(params.values())
    if not isinstance(params, list):
        raise WireError("JSON-RPC params must be an array")
    return JsonCall(method, params, doc["id"], doc.get("jsonrpc") == "2.0")


def success(call: JsonCall, value: Any) -> bytes:
    out = [b'{"jsonrpc":"2.0","result":' if call.v2 else b'{"result":']
    _encode(value, out)
    out.append(b',"id":' if call.v2 else b',"error":null,"id":')
    _encode(call.id, out)
    out.append(b"}")
    return b"".join(out)


def failure(call: JsonCall, description: list[str]) -> bytes:
    desc = [str(d) for d in description]
    if call.v2:
        body: dict[str, Any] = {"jsonrpc": "2.0", "error": {"code": 1, "message": desc[0], "data": desc[1:]}}
    else:
        body = {"result": None, "error": desc}
    return encode_value({**body, "id": call.id})
