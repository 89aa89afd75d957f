"""host.query_stats answers shared until the next sample: identical calls share one encoding, a tick,
a forgotten source or a new VM is seen by the next call, and the answer is what the engine computes."""

from __future__ import annotations

import xmlrpc.client

import pytest
from test_stats import running_vm, tick

from xapid.wire import jsonrpc, xmlrpc as wire


def raw_call(env, session, *params):
    return env.dispatcher.call("host.query_stats", [session, *params])


def answer(env, session, *params):
    from support import resolve

    return resolve(raw_call(env, session, *params), env.clock)


def test_identical_calls_share_the_answer_until_the_next_tick(env, admin):
    vm, uuid = running_vm(admin, env, 0.3)
    host = admin("host.get_all")[0]
    for _ in range(7):
        tick(env)
    first = answer(env, admin.session, host, ["vm:*:cpu*"], 30.0, "AVERAGE")
    again = answer(env, admin.session, host, ["vm:*:cpu*"], 30, "average")
    assert again is first  # same sample, same request: one answer, one encoding
    xml = wire.success(first)
    assert wire.success(again) is not None and first.cache["xml"] in xml
    assert xmlrpc.client.loads(xml)[0][0]["Value"] == first.value
    keys = [k for k in env.api.stats.select("vm:*:cpu*")]
    assert first.value == env.api.stats.cooked(keys, 30.0, "AVERAGE")
    assert first.value[f"vm:{uuid}:cpu0"] == pytest.approx(0.3)
    other = answer(env, admin.session, host, ["vm:*:cpu0"], 30.0, "AVERAGE")
    assert other is not first and set(other.value) < set(first.value)
    env.api.hypervisor.driver.set_load(uuid, 0.9)
    tick(env)
    fresh = answer(env, admin.session, host, ["vm:*:cpu*"], 30.0, "AVERAGE")
    assert fresh is not first and fresh.value[f"vm:{uuid}:cpu0"] > first.value[f"vm:{uuid}:cpu0"]
    assert jsonrpc.encode_value(fresh) == jsonrpc.encode_value(fresh.value)


def test_forgotten_source_gone_at_once_and_new_vm_seen_after_a_tick(env, admin):
    vm, uuid = running_vm(admin, env, 0.3, "a")
    host = admin("host.get_all")[0]
    for _ in range(3):
        tick(env)
    assert f"vm:{uuid}:cpu0" in admin("host.query_stats", host, ["vm:*:*"], 5.0, "AVERAGE")
    admin("VM.forget_data_source_archives", vm, "cpu0")
    assert f"vm:{uuid}:cpu0" not in admin("host.query_stats", host, ["vm:*:*"], 5.0, "AVERAGE")
    _, other = running_vm(admin, env, 0.5, "b")
    tick(env)
    tick(env)
    result = admin("host.query_stats", host, ["vm:*:*"], 5.0, "AVERAGE")
    assert f"vm:{other}:cpu0" in result and f"vm:{uuid}:cpu0" in result  # sampled again
    admin("VM.hard_shutdown", admin("VM.get_by_uuid", other))
    admin("VM.destroy", admin("VM.get_by_uuid", other))
    tick(env)
    assert not any(k.startswith(f"vm:{other}:") for k in admin("host.query_stats", host, ["vm:*:*"], 5.0, "AVERAGE"))


def test_sources_changed_by_the_engine_itself_are_seen_at_once(env, admin):
    """The cache follows the table, not the handlers: a source the engine forgets between two ticks
    (and another it adds to the same owner, leaving its number of sources unchanged) is gone from
    the next call's answer."""
    vm, uuid = running_vm(admin, env, 0.3, "c")
    host = admin("host.get_all")[0]
    for _ in range(3):
        tick(env)
    before = admin("host.query_stats", host, ["vm:*:*"], 5.0, "AVERAGE")
    assert f"vm:{uuid}:cpu0" in before and f"vm:{uuid}:extra" not in before
    table = env.api.stats.table
    table.forget(f"vm:{uuid}", "cpu0")
    table.ensure(f"vm:{uuid}", "extra")
    after = admin("host.query_stats", host, ["vm:*:*"], 5.0, "AVERAGE")
    assert f"vm:{uuid}:cpu0" not in after and f"vm:{uuid}:cpu_usage" in after
    assert env.api.stats.select(f"vm:{uuid}:extra") == [(f"vm:{uuid}", "extra")]


def test_bad_patterns_refused_every_time(env, admin):
    host = admin("host.get_all")[0]
    tick(env)
    for _ in range(2):
        assert admin.fails("host.query_stats", host, ["vm:*:cpu0", "sr:*:x"], 30.0, "AVERAGE") == [
            "INVALID_VALUE", "sources", "sr:*:x"]
