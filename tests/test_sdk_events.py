"""Tasks and events through the official XenAPI SDK against a real daemon (the events issue's list)."""

from __future__ import annotations

import threading
import time
import xmlrpc.client

import pytest
import XenAPI

from support import PASSWORD, vm_record


def session(daemon, name: str):
    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD, "1.0", name)
    return s


@pytest.fixture(scope="module")
def x(daemon):
    s = session(daemon, "xapid-sdk-events")
    yield s.xenapi
    s.logout()


def event_from(api, classes, token, timeout):
    return getattr(api.event, "from")(classes, token, timeout)  # "from" is a Python keyword


def test_async_start_polled_until_success(x):
    """Async.VM.start returns a task at once; task.get_status reaches success; the record's result
    is an XML-RPC value the SDK's own parser reads."""
    vm = x.VM.create(vm_record(name_label="sdk-async"))
    task = x.Async.VM.start(vm, False, False)
    assert task.startswith("OpaqueRef:")
    deadline = time.monotonic() + 10
    while x.task.get_status(task) == "pending" and time.monotonic() < deadline:
        time.sleep(0.02)
    record = x.task.get_record(task)
    assert (record["status"], record["progress"], record["error_info"]) == ("success", 1.0, [])
    (result,), _ = xmlrpc.client.loads(f"<methodResponse><params><param>{record['result']}</param></params>"
                                       "</methodResponse>")
    assert result == "" and x.VM.get_power_state(vm) == "Running"
    x.task.destroy(task)
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)


def test_event_from_follows_another_sessions_vm(daemon, x):
    """A watcher sees add, mod and del of a VM that another session creates, starts and destroys;
    the several writes of a start arrive as one mod with the latest state."""
    other = session(daemon, "xapid-sdk-events-other")
    try:
        first = event_from(x, ["VM"], "", 0.0)
        counts = first["valid_ref_counts"]
        assert type(counts["vm"]) is int and counts["vm"] == len(x.VM.get_all())  # <i4>, not a string
        token = first["token"]
        vm = other.xenapi.VM.create(vm_record(name_label="watched"))
        batch = event_from(x, ["vm"], token, 5.0)
        assert [(e["ref"], e["operation"]) for e in batch["events"]] == [(vm, "add")]
        assert batch["events"][0]["snapshot"]["name_label"] == "watched"
        other.xenapi.VM.start(vm, False, False)
        batch = event_from(x, ["vm"], batch["token"], 5.0)
        assert [(e["ref"], e["operation"]) for e in batch["events"]] == [(vm, "mod")]
        assert batch["events"][0]["snapshot"]["power_state"] == "Running"
        other.xenapi.VM.hard_shutdown(vm)
        other.xenapi.VM.destroy(vm)
        batch = event_from(x, ["vm"], batch["token"], 5.0)
        assert [(e["ref"], e["operation"]) for e in batch["events"]] == [(vm, "del")]
    finally:
        other.logout()


def test_event_from_waits_for_a_change_and_times_out_empty(daemon, x):
    """A waiting event.from returns when another session changes a VM, and after its timeout with
    no events and a token that still works."""
    token = event_from(x, ["vm"], "", 0.0)["token"]
    vm = x.VM.create(vm_record(name_label="wake-me"))
    token = event_from(x, ["vm"], token, 5.0)["token"]
    waiter = session(daemon, "xapid-sdk-events-waiter")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(event_from(waiter.xenapi, ["vm"], token, 10.0)))
    try:
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive()  # blocked in the daemon: nothing changed yet
        x.VM.set_name_label(vm, "woken")
        thread.join(5)
        assert [e["snapshot"]["name_label"] for e in result["events"]] == ["woken"]
        started = time.monotonic()
        quiet = event_from(waiter.xenapi, ["vm"], result["token"], 0.5)
        assert quiet["events"] == [] and time.monotonic() - started >= 0.45
        x.VM.destroy(vm)
        assert [e["operation"] for e in event_from(x, ["vm"], quiet["token"], 5.0)["events"]] == ["del"]
    finally:
        waiter.logout()


def test_legacy_queue_overflow_is_events_lost(daemon, x):
    """event.register/next: more changes than the queue holds (1 000 by default) give EVENTS_LOST once;
    the session's queue then works again."""
    legacy = session(daemon, "xapid-sdk-events-legacy")
    try:
        legacy.xenapi.event.register(["vm"])
        vm = x.VM.create(vm_record(name_label="flood"))
        for i in range(1001):
            x.VM.set_name_label(vm, f"flood-{i}")
        with pytest.raises(XenAPI.Failure) as info:
            legacy.xenapi.event.next()
        assert info.value.details == ["EVENTS_LOST"]
        x.VM.set_name_label(vm, "after")
        events = legacy.xenapi.event.next()
        assert events[-1]["snapshot"]["name_label"] == "after" and events[-1]["operation"] == "mod"
        x.VM.destroy(vm)
    finally:
        legacy.logout()


def test_many_watchers_woken_together_each_get_their_reply_twice_in_a_row(daemon, x):
    """The fan-out's express lane over real sockets: SDK watchers and a JSON-RPC watcher (its own
    id), all blocked in event.from, get one change, re-arm, and get the next one."""
    import http.client
    import json

    vm = x.VM.create(vm_record(name_label="fan-out"))
    token = event_from(x, ["vm"], "", 0.0)["token"]
    watchers = [session(daemon, f"xapid-sdk-fan-{index}") for index in range(6)]
    names: dict[str, list[str]] = {}
    ready = threading.Barrier(len(watchers) + 2, timeout=15)  # the watchers, the JSON one, the changer

    def sdk_watch(index: int) -> None:
        seen, since = [], token
        for _ in range(2):
            ready.wait()
            batch = event_from(watchers[index].xenapi, ["vm"], since, 10.0)
            seen += [e["snapshot"]["name_label"] for e in batch["events"] if e["ref"] == vm]
            since = batch["token"]
        names[f"sdk-{index}"] = seen

    def json_watch() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
        seen, since = [], token
        for call in range(2):
            body = json.dumps({"jsonrpc": "2.0", "id": f"fan-{call}", "method": "event.from",
                               "params": [watchers[0]._session, ["vm"], since, 10.0]})
            ready.wait()
            conn.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
            assert reply["id"] == f"fan-{call}"
            seen += [e["snapshot"]["name_label"] for e in reply["result"]["events"] if e["ref"] == vm]
            since = reply["result"]["token"]
        conn.close()
        names["json"] = seen

    threads = [threading.Thread(target=sdk_watch, args=(index,)) for index in range(len(watchers))]
    threads.append(threading.Thread(target=json_watch))
    try:
        for thread in threads:
            thread.start()
        for name in ("first", "second"):
            ready.wait()  # every watcher is about to call (again)
            time.sleep(0.5)  # and is blocked in the daemon
            x.VM.set_name_label(vm, name)
        for thread in threads:
            thread.join(15)
        assert names == {name: ["first", "second"] for name in [f"sdk-{i}" for i in range(len(watchers))] + ["json"]}
    finally:
        ready.abort()
        for watcher in watchers:
            watcher.logout()
        x.VM.destroy(vm)
