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
from xapid.wire.values import HugeInt, Int32, Limits, WireError, parse_int


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
        out.append(value.encoded("json", encode_value))
    elif isinstance(value, str):
        _encode(str(value), out)
    elif isinstance(value, int):
        _encode(int(value), out)
    elif isinstance(value, (set, frozenset)):
        _encode(sorted(value), out)
    else:
        raise TypeError(f"cannot encode {t.__name__} as JSON")


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
