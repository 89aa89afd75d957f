"""JSON-RPC 1.0 and 2.0 on ``/jsonrpc``, as xapi answers it.

v1: ``{"result": …, "error": null, "id": …}`` / ``{"result": null, "error": [code, …], "id": …}``.
v2: ``{"jsonrpc": "2.0", "result": …, "id": …}`` with no ``error`` key on success, and
``{"jsonrpc": "2.0", "error": {"code": 1, "message": CODE, "data": [params]}, "id": …}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
import re
from json.encoder import encode_basestring, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from xapid.apitypes import format_datetime
from xapid.wire.values import Int32, Limits, WireError


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


def encode_value(value: Any) -> str:
    out: list[str] = []
    _encode(value, out)
    return "".join(out)


def _encode(value: Any, out: list[str]) -> None:
    t = type(value)
    if t is str:
        out.append(_string(value))
    elif t is bool:
        out.append("true" if value else "false")
    elif t is int or t is Int32:
        out.append(str(int(value)))
    elif t is dict:
        out.append("{")
        first = True
        for k, v in value.items():
            if not first:
                out.append(",")
            first = False
            out.append(_string(str(k)))
            out.append(":")
            _encode(v, out)
        out.append("}")
    elif t is list or t is tuple:
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(",")
            _encode(v, out)
        out.append("]")
    elif t is float:
        out.append(json.dumps(value))
    elif value is None:
        out.append("null")
    elif isinstance(value, datetime):
        out.append(_string(format_datetime(value)))
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
        doc = json.loads(body)
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
    if not isinstance(doc["id"], (str, int)) or isinstance(doc["id"], bool):
        raise WireError("a JSON-RPC id must be a string or an integer")
    params = doc.get("params", [])
    if isinstance(params, dict):
        params = list(params.values())
    if not isinstance(params, list):
        raise WireError("JSON-RPC params must be an array")
    return JsonCall(method, params, doc["id"], doc.get("jsonrpc") == "2.0")


def success(call: JsonCall, value: Any) -> bytes:
    ident = encode_value(call.id)
    if call.v2:
        return f'{{"jsonrpc":"2.0","result":{encode_value(value)},"id":{ident}}}'.encode()
    return f'{{"result":{encode_value(value)},"error":null,"id":{ident}}}'.encode()


def failure(call: JsonCall, description: list[str]) -> bytes:
    ident = encode_value(call.id)
    desc = [str(d) for d in description]
    if call.v2:
        error = {"code": 1, "message": desc[0], "data": desc[1:]}
        return f'{{"jsonrpc":"2.0","error":{encode_value(error)},"id":{ident}}}'.encode()
    return f'{{"result":null,"error":{encode_value(desc)},"id":{ident}}}'.encode()
