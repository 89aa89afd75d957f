"""Records encoded from memoised member fragments are byte-identical to the plain encoders' output,
whatever the values (equal values of different types, escapes, nesting, a full memo)."""

from __future__ import annotations

import json
import random
import xmlrpc.client
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from xapid.store import CachedRecord, Obj
from xapid.wire import jsonrpc, values, xmlrpc as wire
from xapid.wire.values import MEMO_ITEM_MAX, Int32

TRICKY: list[Any] = [
    "", "plain", "a<b>&\"c'", "ctl\x01\x1fchar", "\u00e9t\u00e9", "\ud800lone", 0, 1, -5, 1 << 62, True, False, 0.0,
    1.0, -2.5, 1e300, None, [], ["a", "b"], ["1"], [1], [True], [1.0], ["a", 1], {}, {"k": "v"}, {"k": 1},
    {"k": True}, {"a&b": "<x>"}, {"n": {"deep": ["x"]}}, (1, "a"), {"a", "b"}, Int32(7),
    datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1))),
]


class Label(str):
    """A str subclass: never memoised, encoded as its text."""


def records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec: dict[str, Any] = {f"f{j}": rng.choice(TRICKY) for j in range(12)}
        rec["uuid"] = f"uuid-{seed}-{i}"
        rec["label"] = Label(f"<{i}>")
        rec["same"] = rng.choice([1, True, 1.0, "1", [1], ["1"], {"1": "1"}, {"1": 1}])
        out.append(rec)
    return out


def test_xml_records_identical_to_plain_encoding():
    recs = records(400)
    for _ in range(2):  # the second pass is served from the memo
        for rec in recs:
            assert wire.encode_record(rec) == wire.encode_value(rec)


def test_equal_values_of_other_types_are_not_confused():
    for value in (1, True, 1.0, "1", [1], ["1"], [True], {"k": 1}, {"k": "1"}, {"k": True}):
        assert wire.encode_record({"x": value}) == wire.encode_value({"x": value})
    assert b"<boolean>1</boolean>" in wire.encode_record({"y": True})
    assert b"<double>" not in wire.encode_record({"y": 1})


def test_memo_stays_bounded(monkeypatch):
    monkeypatch.setattr(wire, "MEMO_LIMIT", 50)
    monkeypatch.setattr(jsonrpc, "MEMO_LIMIT", 50)
    for rec in records(200, seed=3):
        assert wire.encode_record(rec) == wire.encode_value(rec)
        assert jsonrpc.encode_record(rec) == jsonrpc.encode_value(rec)
        assert len(wire._MEMO) <= 50 and len(jsonrpc._MEMO) <= 50


def test_cached_records_in_replies_decode_as_before():
    recs = [r for r in records(50, seed=11) if "\ud800lone" not in r.values()]
    objs = []
    for i, rec in enumerate(recs):
        obj = Obj("VM", f"OpaqueRef:{i}", rec)
        objs.append(obj)
    reply = wire.success({o.ref: CachedRecord(o) for o in objs})
    assert reply == wire.success({o.ref: o.fields for o in objs})
    decoded = xmlrpc.client.loads(reply)[0][0]["Value"]
    assert set(decoded) == {o.ref for o in objs}


def test_json_records_identical_to_plain_encoding():
    recs = records(300, seed=5)
    for _ in range(2):
        for rec in recs:
            assert jsonrpc.encode_record(rec) == jsonrpc.encode_value(rec)
    clean = [r for r in recs if "\ud800lone" not in r.values()]
    for rec in clean[:20]:
        json.loads(jsonrpc.encode_record(rec))


def test_non_finite_floats_still_refused():
    for enc in (wire.encode_record, jsonrpc.encode_record):
        with pytest.raises(ValueError):
            enc({"x": float("nan")})


def general(codec: Any, value: dict[Any, Any]) -> bytes:
    """*codec*'s (xmlrpc's or jsonrpc's) general struct path, with its float-map fast path out of the way."""
    saved = codec._float_map
    codec._float_map = lambda v: None
    try:
        return codec.encode_value(value)
    finally:
        codec._float_map = saved


def test_float_maps_identical_to_the_general_path():
    rng = random.Random(1)
    maps = [
        {f"vm:{i}:cpu{j}": rng.uniform(-1e6, 1e6) for i in range(50) for j in range(4)},
        {"a<b>&c": 1.5, "é": -0.0, "x": 1e-300, "y": 123456789012345.0, "z": 5e307},
        {"ctl\x01": 2.0, 3: 1.0},  # a non-str key: the general path
        {"a": 1.0, "b": 2},  # an int among floats: the general path
    ]
    for value in maps:
        for _ in range(2):  # memoised keys the second time
            assert wire.encode_value(value) == general(wire, value)
            assert jsonrpc.encode_value(value) == general(jsonrpc, value)
    assert json.loads(jsonrpc.encode_value(maps[0])) == maps[0]
    assert xmlrpc.client.loads(wire.success(maps[0]))[0][0]["Value"] == maps[0]
    for bad in ({"a": 1.0, "b": float("inf")}, {"a": float("nan")}, {"a": 1e308, "b": 1e308, "c": float("-inf")}):
        with pytest.raises(ValueError):
            wire.encode_value(bad)
        with pytest.raises(ValueError):
            jsonrpc.encode_value(bad)
    big = {"a": 1e308, "b": 1e308}  # the sum overflows; the values are fine
    assert wire.encode_value(big) == general(wire, big) and jsonrpc.encode_value(big) == general(jsonrpc, big)


def test_negative_zero_and_records_changed_in_place():
    for enc, plain in ((wire.encode_record, wire.encode_value), (jsonrpc.encode_record, jsonrpc.encode_value)):
        for value in (0.0, -0.0, 0.0):
            rec = {"a": "x", "f": value, "n": 1}
            assert enc(rec) == plain(rec)
    base = {f"k{i}": "same" for i in range(20)}
    base.update(refs=["OpaqueRef:" + "a" * 36], tags=["t"], other={"a": "b"})
    assert wire.encode_record(base) == wire.encode_value(base)  # becomes its shape's template
    base["tags"].append("u")  # changed in place, as a store may do with sets
    base["other"]["c"] = "d"
    assert wire.encode_record(base) == wire.encode_value(base)
    twin = {**base, "tags": ["t", "u"], "other": {"a": "b", "c": "d"}, "k3": "different"}
    assert wire.encode_record(twin) == wire.encode_value(twin)


def test_non_string_keys_never_shared():
    for enc, plain in ((wire.encode_record, wire.encode_value), (jsonrpc.encode_record, jsonrpc.encode_value)):
        for rec in ({1: "x", "a": "b"}, {True: "x", "a": "b"}, {1.0: "x", "a": "b"}, {1: "x", "a": "b"}):
            assert enc(rec) == plain(rec)


def test_memo_never_holds_large_fragments():
    """Record values come from clients and guests: a distinct large map per record must not be pinned
    in the shared memo (a count bound alone would hold MEMO_LIMIT of them)."""
    wire._MEMO.clear()
    jsonrpc._MEMO.clear()
    for i in range(50):
        rec = {"name": "vm", "other_config": {"k": f"{i}:" + "x" * 20_000}, "tags": [f"{i}"] * 4_000}
        assert wire.encode_record(rec) == wire.encode_value(rec)
        assert jsonrpc.encode_record(rec) == jsonrpc.encode_value(rec)
    for memo in (wire._MEMO, jsonrpc._MEMO):
        assert all(len(fragment) <= MEMO_ITEM_MAX for fragment in memo.values())
        assert memo.held == sum(len(fragment) for fragment in memo.values()) < 50 * MEMO_ITEM_MAX


def test_memo_bounded_in_bytes(monkeypatch):
    monkeypatch.setattr(values, "MEMO_BYTES", 10_000)
    wire._MEMO.clear()
    for i in range(500):
        rec = {"other_config": {"k": f"{i}:" + "x" * 1_000}}
        assert wire.encode_record(rec) == wire.encode_value(rec)
        assert wire._MEMO.held <= 10_000
