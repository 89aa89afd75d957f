"""Issue 13, values that poison the state and unbounded work per call: NaN and infinities refused
on every wire (both XML-RPC parsers, JSON-RPC), ints outside int64 and over-long literals
FIELD_TYPE_ERROR (never INTERNAL_ERROR), strings, sets and maps bounded by [limits], set
deduplication linear, and replies that stay strict JSON."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from support import PASSWORD, vm_record
from test_http import assert_json_reply, assert_xml_reply, jrpc, npm_body, post, xml_body
from xapid.apitypes import Type, coerce
from xapid.wire.values import Limits

NON_FINITE_XML = ["nan", "NaN", "inf", "-inf", "Infinity", "-Infinity", "1e999", "-1e999"]
NON_FINITE_JSON = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", '"nan"', '"inf"', '"1e999"', '"-Infinity"']


def _strict(body: bytes) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(body, parse_constant=refuse)


# -- wire helpers ---------------------------------------------------------------------------------


def _login(daemon, user: str) -> str:
    reply = post(daemon, "/", xml_body("session.login_with_password", user, PASSWORD))
    return reply.xml["Value"]


def _xml(daemon, body: str) -> dict[str, Any]:
    reply = post(daemon, "/", body)
    assert_xml_reply(reply)
    return reply.xml


def _xml_ok(daemon, method: str, *params: Any) -> Any:
    result = _xml(daemon, xml_body(method, *params))
    assert result["Status"] == "Success", result
    return result["Value"]


def _typed_call(method: str, params: list[str], lxml: bool) -> str:
    """A compact call whose params are given as ``<value>…</value>`` texts; *lxml*: a comment
    in the body leaves it to the lxml parser (the fast path refuses comments)."""
    comment = "<!-- forces the lxml path -->" if lxml else ""
    return (f'<?xml version="1.0"?><methodCall>{comment}<methodName>{method}</methodName><params>'
            + "".join(f"<param>{p}</param>" for p in params) + "</params></methodCall>")


def _json_raw(daemon, method: str, params_text: str) -> dict[str, Any]:
    """A JSON-RPC 2.0 call with its params array written as text (NaN tokens, huge numbers)."""
    body = f'{{"jsonrpc":"2.0","method":"{method}","params":[{params_text}],"id":1}}'
    reply = post(daemon, "/jsonrpc", body, "application/json")
    assert_json_reply(reply)
    return _strict(reply.body)


def _s(text: str) -> str:
    return f"<value>{text}</value>"


@pytest.fixture(scope="module")
def sessions(daemon) -> dict[str, str]:
    return {user: _login(daemon, user) for user in ("admin", "reader", "vmadmin")}


@pytest.fixture(scope="module")
def vm(daemon, sessions) -> str:
    return _xml_ok(daemon, "VM.create", sessions["admin"], vm_record(name_label="poison-target"))


@pytest.fixture(scope="module")
def task(daemon, sessions) -> str:
    """A client task of the read-only user (its own task)."""
    return _xml_ok(daemon, "task.create", sessions["reader"], "mine", "")


# -- 1. non-finite floats ------------------------------------------------------------------------


@pytest.mark.parametrize("lxml", [False, True], ids=["fast-path", "lxml"])
@pytest.mark.parametrize("text", NON_FINITE_XML)
def test_xmlrpc_non_finite_double_refused(daemon, sessions, task, vm, text, lxml):
    for value in (f"<value><double>{text}</double></value>", _s(text)):  # typed, and a string coerced
        result = _xml(daemon, _typed_call("task.set_progress", [_s(sessions["reader"]), _s(task), value], lxml))
        assert result["Status"] == "Failure", result
        assert result["ErrorDescription"][:2] == ["INVALID_VALUE", "value"], result
        result = _xml(daemon, _typed_call("VM.set_HVM_shadow_multiplier", [_s(sessions["vmadmin"]), _s(vm), value],
                                          lxml))
        assert result["ErrorDescription"][:2] == ["INVALID_VALUE", "value"], result
    assert _xml_ok(daemon, "task.get_progress", sessions["reader"], task) == 0.0
    assert _xml_ok(daemon, "VM.get_HVM_shadow_multiplier", sessions["admin"], vm) == 1.0


@pytest.mark.parametrize("token", NON_FINITE_JSON)
def test_jsonrpc_non_finite_number_refused(daemon, sessions, task, vm, token):
    reply = _json_raw(daemon, "task.set_progress", f'"{sessions["reader"]}","{task}",{token}')
    assert reply["error"]["message"] == "INVALID_VALUE" and reply["error"]["data"][0] == "value", reply
    reply = _json_raw(daemon, "VM.set_HVM_shadow_multiplier", f'"{sessions["vmadmin"]}","{vm}",{token}')
    assert reply["error"]["message"] == "INVALID_VALUE" and reply["error"]["data"][0] == "value", reply
    assert _json_raw(daemon, "task.get_progress", f'"{sessions["reader"]}","{task}"')["result"] == 0.0
    assert _json_raw(daemon, "VM.get_HVM_shadow_multiplier", f'"{sessions["admin"]}","{vm}"')["result"] == 1.0


def test_finite_floats_still_accepted(daemon, sessions, task, vm):
    reply = _json_raw(daemon, "task.set_progress", f'"{sessions["reader"]}","{task}",0.25')
    assert reply["result"] == ""
    assert _xml_ok(daemon, "task.get_progress", sessions["reader"], task) == 0.25
    _xml(daemon, _typed_call("task.set_progress", [_s(sessions["reader"]), _s(task), "<value><double>0</double></value>"],
                             False))
    assert _xml_ok(daemon, "VM.set_HVM_shadow_multiplier", sessions["vmadmin"], vm, 2.5) == ""
    assert _xml_ok(daemon, "VM.set_HVM_shadow_multiplier", sessions["vmadmin"], vm, 1.0) == ""


def test_jsonrpc_output_stays_strict_json(daemon, sessions, task, vm):
    """After every refused attempt above, records and events are still plain JSON."""
    for token in ("NaN", "Infinity", "1e999"):
        _json_raw(daemon, "task.set_progress", f'"{sessions["reader"]}","{task}",{token}')
        _json_raw(daemon, "VM.set_HVM_shadow_multiplier", f'"{sessions["vmadmin"]}","{vm}",{token}')
    for cls in ("VM", "task"):
        reply = jrpc(daemon, f"{cls}.get_all_records", [sessions["admin"]])
        assert_json_reply(reply)
        assert _strict(reply.body)["result"]
    reply = jrpc(daemon, "event.from", [sessions["admin"], ["vm", "task"], "", 0.0])
    assert_json_reply(reply)
    assert _strict(reply.body)["result"]["events"]


def test_encoders_never_emit_non_finite():
    from xapid.wire import jsonrpc, xmlrpc

    for value in (float("nan"), float("inf"), float("-inf")):
        for encode in (jsonrpc.encode_value, xmlrpc.encode_value):
            with pytest.raises(ValueError):
                encode({"progress": value})
            with pytest.raises(ValueError):
                encode([value])


def test_poisoned_state_gives_internal_error_not_invalid_json(env, admin):
    """Defence in depth: a non-finite float that reached the store anyway (a database written
    before these checks) is answered with INTERNAL_ERROR, never with NaN in the JSON."""
    from xapid.wire.http import HttpRequest
    from xapid.wire.resource import ApiHandler

    task = admin("task.create", "poisoned", "")
    env.api.store.update(task, {"progress": float("nan")})
    handler = ApiHandler(env.dispatcher, env.api.limits)
    for method in ("task.get_progress", "task.get_all_records"):
        params = [admin.session, task] if method == "task.get_progress" else [admin.session]
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode()
        response = handler(HttpRequest(b"POST", b"/jsonrpc", b"HTTP/1.1", {}, body))
        assert response.status == 200
        reply = _strict(response.body)
        assert reply["error"]["message"] == "INTERNAL_ERROR", reply
        xml = handler(HttpRequest(b"POST", b"/", b"HTTP/1.1", {}, xml_body(method, *params).encode()))
        assert b"<double>nan" not in xml.body.lower()
        assert b"INTERNAL_ERROR" in xml.body


# -- 2. ints outside 64 bits -----------------------------------------------------------------------

OUT_OF_RANGE = [str(2**63), str(-(2**63) - 1), "9" * 5000, "-" + "1" * 5000, "0" * 4990 + str(2**63)]


@pytest.mark.parametrize("lxml", [False, True], ids=["fast-path", "lxml"])
@pytest.mark.parametrize("form", ["int", "i8", "i4", "string"])
def test_xmlrpc_int_out_of_range_is_field_type_error(daemon, sessions, vm, form, lxml):
    for digits in OUT_OF_RANGE:
        value = _s(digits) if form == "string" else f"<value><{form}>{digits}</{form}></value>"
        result = _xml(daemon, _typed_call("VM.set_start_delay", [_s(sessions["admin"]), _s(vm), value], lxml))
        assert result.get("ErrorDescription") == ["FIELD_TYPE_ERROR", "value"], (digits[:30], result)
    for digits in (str(2**63 - 1), str(-(2**63)), "00000000000000000000000000042"):
        value = _s(digits) if form == "string" else f"<value><{form}>{digits}</{form}></value>"
        result = _xml(daemon, _typed_call("VM.set_start_delay", [_s(sessions["admin"]), _s(vm), value], lxml))
        assert result["Status"] == "Success", result
        assert int(_xml_ok(daemon, "VM.get_start_delay", sessions["admin"], vm)) == int(digits)


def test_jsonrpc_int_out_of_range_is_field_type_error(daemon, sessions, vm):
    for digits in OUT_OF_RANGE:
        # a JSON number may not have leading zeros: that form only as a digit string
        for token in [f'"{digits}"'] if digits.startswith("0") else [digits, f'"{digits}"']:
            reply = _json_raw(daemon, "VM.set_start_delay", f'"{sessions["admin"]}","{vm}",{token}')
            assert reply["error"]["message"] == "FIELD_TYPE_ERROR" and reply["error"]["data"] == ["value"], reply
    reply = _json_raw(daemon, "VM.set_start_delay", f'"{sessions["admin"]}","{vm}",{2**63 - 1}')
    assert reply["result"] == ""
    assert _json_raw(daemon, "VM.get_start_delay", f'"{sessions["admin"]}","{vm}"')["result"] == 2**63 - 1
    # a float parameter given an int too big for a float is out of range, not an internal error
    reply = _json_raw(daemon, "VM.set_HVM_shadow_multiplier", f'"{sessions["vmadmin"]}","{vm}",{"9" * 5000}')
    assert reply["error"]["message"] == "INVALID_VALUE", reply
    reply = _json_raw(daemon, "VM.set_HVM_shadow_multiplier", f'"{sessions["vmadmin"]}","{vm}",{"9" * 400}')
    assert reply["error"]["message"] == "INVALID_VALUE", reply


def test_overlong_event_token_is_a_parse_failure(daemon, sessions):
    reply = jrpc(daemon, "event.from", [sessions["admin"], ["vm"], "1" * 5000, 0.0])
    assert _strict(reply.body)["error"]["message"] == "EVENT_FROM_TOKEN_PARSE_FAILURE"


# -- 3. size limits --------------------------------------------------------------------------------


def test_oversized_string_refused_naming_the_parameter(daemon, sessions):
    """read-only task.create with multi-megabyte labels grew the daemon by hundreds of MB."""
    big = "x" * ((1 << 20) + 1)
    reply = jrpc(daemon, "task.create", [sessions["reader"], big, ""])
    error = _strict(reply.body)["error"]
    assert error["message"] == "INVALID_VALUE" and error["data"][0] == "label", error
    assert "1048577 bytes" in error["data"][1] and len(error["data"][1]) < 100
    # counted in UTF-8 bytes, not characters
    result = _xml(daemon, xml_body("task.create", sessions["reader"], "é" * ((1 << 19) + 1), ""))
    assert result["ErrorDescription"][:2] == ["INVALID_VALUE", "label"], result["ErrorDescription"][:2]
    # exactly at the limit is accepted
    task = _xml_ok(daemon, "task.create", sessions["reader"], "y" * (1 << 20), "")
    _xml_ok(daemon, "task.destroy", sessions["reader"], task)


def test_oversized_set_and_map_refused_naming_the_parameter(daemon, sessions, vm):
    reply = jrpc(daemon, "event.from", [sessions["admin"], ["vm"] * 10_001, "", 0.0])
    error = _strict(reply.body)["error"]
    assert error["message"] == "INVALID_VALUE" and error["data"] == ["classes", "10001 items (at most 10000)"]
    big_map = {f"k{i}": "" for i in range(10_001)}
    result = _xml(daemon, xml_body("VM.set_other_config", sessions["admin"], vm, big_map))
    assert result["ErrorDescription"] == ["INVALID_VALUE", "value", "10001 items (at most 10000)"]
    assert _xml_ok(daemon, "VM.get_other_config", sessions["admin"], vm) == {}
    # a record is bounded as well
    record = {**vm_record(), **big_map}
    result = _xml(daemon, xml_body("VM.create", sessions["admin"], record))
    assert result["ErrorDescription"][:2] == ["INVALID_VALUE", "args"]


def test_limits_are_configurable_and_bound_growth_by_adds(tmp_path, clock):
    from support import ApiEnv

    from xapid.dispatch import Dispatcher
    from xapid.objects import collect_handlers

    env = ApiEnv(tmp_path, clock)
    admin = env.login("admin")
    vm = admin("VM.create", vm_record(name_label="small"))
    env.api.limits = Limits(max_string_bytes=64, max_collection_items=3)  # as [limits] would set them
    env.dispatcher = Dispatcher(env.api, collect_handlers())
    assert admin.fails("VM.create", vm_record())[:2] == ["INVALID_VALUE", "args"]
    assert admin.fails("VM.set_name_label", vm, "x" * 65) == ["INVALID_VALUE", "value", "a string of 65 bytes (at most 64)"]
    admin("VM.set_name_label", vm, "x" * 64)
    assert admin.fails("VM.set_tags", vm, ["a", "b", "c", "d"])[:2] == ["INVALID_VALUE", "value"]
    for tag in "abc":
        admin("VM.add_tags", vm, tag)
    admin("VM.add_tags", vm, "a")  # already there: no growth
    assert admin.fails("VM.add_tags", vm, "d") == ["INVALID_VALUE", "tags", "4 items (at most 3)"]
    for key in "xyz":
        admin("VM.add_to_other_config", vm, key, "1")
    assert admin.fails("VM.add_to_other_config", vm, "w", "1")[:2] == ["INVALID_VALUE", "other_config"]
    assert admin.fails("VM.add_to_other_config", vm, "k" * 65, "1")[:2] == ["INVALID_VALUE", "key"]


def test_config_keys(tmp_path):
    from xapid.config import ConfigError, load_config

    path = tmp_path / "x.conf"
    path.write_text("[limits]\nmax_string_bytes = 4096\nmax_collection_items = 50\n")
    config = load_config(path)
    assert (config.limits.max_string_bytes, config.limits.max_collection_items) == (4096, 50)
    path.write_text("[limits]\nmax_collection_items = 0\n")
    with pytest.raises(ConfigError, match="max_collection_items"):
        load_config(path)


# -- 4. linear set handling ---------------------------------------------------------------------------


def _best_time(fn, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_set_deduplication_is_linear():
    """80 000 distinct strings: the pairwise comparison took a minute; now about 10× 8 000."""
    t = Type("set", elem=Type("string"))
    limits = Limits(max_collection_items=1_000_000)
    small = [f"class{i}" for i in range(8_000)]
    large = [f"class{i}" for i in range(80_000)]
    assert coerce(t, large + large[:10], "classes", {}, limits) == large  # first occurrences, in order
    ratio = _best_time(lambda: coerce(t, large, "classes", {}, limits)) / _best_time(
        lambda: coerce(t, small, "classes", {}, limits))
    assert ratio < 30, ratio


def test_event_from_with_80000_class_names_is_linear(env, admin):
    env.api.limits = Limits(max_collection_items=200_000)
    from xapid.dispatch import Dispatcher
    from xapid.objects import collect_handlers

    env.dispatcher = Dispatcher(env.api, collect_handlers())

    def call(n: int) -> Any:
        names = [f"nosuchclass{i}" for i in range(n)] + ["vm"]
        return admin("event.from", names, "", 0.0)

    assert call(80_000)["events"]  # the VMs, as adds
    small = _best_time(lambda: call(8_000))
    large = _best_time(lambda: call(80_000))
    assert large < 10, large
    assert large / small < 30, (large, small)


def test_event_from_with_80000_class_names_over_the_wire_is_refused_quickly(daemon, sessions):
    start = time.monotonic()
    reply = jrpc(daemon, "event.from", [sessions["admin"], [f"c{i}" for i in range(80_000)], "", 0.0])
    assert _strict(reply.body)["error"]["data"] == ["classes", "80000 items (at most 10000)"]
    assert time.monotonic() - start < 5
