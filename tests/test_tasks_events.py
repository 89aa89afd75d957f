"""Tasks, Async.*, event.from and the legacy event queue, with a fake clock and in-memory calls."""

from __future__ import annotations

import xmlrpc.client

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from support import ApiEnv, resolve, vm_record
from xapid.errors import XenAPIError


def pending(env, method, *params):
    """Start a call and return its Deferred without waiting for it."""
    return env.dispatcher.call(method, list(params))


def outcome(d: Deferred):
    """The result (or Failure) of *d* if it has fired, else None; *d* keeps its result."""
    box = []

    def keep(result):
        box.append(result)
        return result

    d.addBoth(keep)
    if box and isinstance(box[0], Failure):
        d.addErrback(lambda _: None)
    return box[0] if box else None


class ManualRunner:
    """Holds driver calls until released, to observe operations in flight."""

    def __init__(self):
        self.calls: list[tuple[Deferred, object, tuple]] = []

    def run(self, fn, *args, **kwargs):
        d: Deferred = Deferred()
        self.calls.append((d, fn, args))
        return d

    def release(self):
        d, fn, args = self.calls.pop(0)
        try:
            d.callback(fn(*args))
        except Exception:  # noqa: BLE001 - delivered like the thread pool does
            d.errback(Failure())


# -- tasks -------------------------------------------------------------------------------


def test_async_start_records_success(env, admin):
    """Async.VM.start returns a task at once; it ends in success with xapi's result encoding."""
    vm = admin("VM.create", vm_record())
    task = admin("Async.VM.start", vm, False, False)
    record = admin("task.get_record", task)
    assert record["status"] == "success" and record["progress"] == 1.0
    assert record["result"] == "<value></value>"
    assert record["name_label"] == "Async.VM.start"
    assert admin("VM.get_power_state", vm) == "Running"
    admin("task.destroy", task)
    assert admin.fails("task.get_record", task) == ["HANDLE_INVALID", "task", task]


def test_async_result_parses_as_xmlrpc(env, admin):
    """A task's result is the XML-RPC <value> of the return value (here a VM ref)."""
    task = admin("Async.VM.create", vm_record(name_label="from-task"))
    result = admin("task.get_result", task)
    (ref,), _ = xmlrpc.client.loads(f"<params><param>{result}</param></params>")
    assert admin("VM.get_name_label", ref) == "from-task"
    assert admin("task.get_type", task) == "VM ref"


def test_async_failure_fills_error_info(env, admin):
    """A failing async call ends in failure with error_info = [code, params…]."""
    vm = admin("VM.create", vm_record())
    task = admin("Async.VM.pause", vm)
    assert admin("task.get_status", task) == "failure"
    assert admin("task.get_error_info", task) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]


def test_async_checks_before_the_task_exists(env, admin):
    """Bad sessions, counts and messages without an async form fail synchronously."""
    vm = admin("VM.create", vm_record())
    assert admin.fails("Async.VM.get_name_label", vm) == \
        ["Fault", "No async mode for this operation (rpc: Async.VM.get_name_label)"]
    assert admin.fails("Async.VM.start", vm)[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
    with pytest.raises(XenAPIError) as info:
        env.raw("Async.VM.start", ["OpaqueRef:bad", vm, False, False])
    assert info.value.code == "SESSION_INVALID"


def test_operation_in_flight_and_cancel(env, admin):
    """While a start runs its task is in current_operations; cancelling undoes the domain it built."""
    vm = admin("VM.create", vm_record())
    runner = ManualRunner()
    env.api.hypervisor.runner = runner
    task = admin("Async.VM.start", vm, False, False)
    assert admin("task.get_status", task) == "pending"
    assert admin("VM.get_current_operations", vm) == {task: "start"}
    assert "start" not in admin("VM.get_allowed_operations", vm)
    assert admin.fails("VM.start", vm, False, False) == ["OTHER_OPERATION_IN_PROGRESS", "VM", vm, "start", task]
    admin("task.cancel", task)
    assert admin("task.get_status", task) == "cancelling"
    runner.release()  # create_domain completes; the handler sees the cancel and destroys it
    runner.release()  # destroy_domain
    assert admin("task.get_status", task) == "cancelled"
    assert admin("task.get_error_info", task) == ["TASK_CANCELLED", task]
    assert admin("VM.get_power_state", vm) == "Halted"
    assert admin("VM.get_current_operations", vm) == {}
    assert env.api.hypervisor.driver.list_domains()[-1].is_control_domain


def test_non_cancellable_task(env, admin):
    """task.cancel on a task that cannot be cancelled fails with OPERATION_NOT_ALLOWED."""
    vm = admin("VM.create", vm_record())
    admin("VM.start", vm, False, False)
    runner = ManualRunner()
    env.api.hypervisor.runner = runner
    task = admin("Async.VM.pause", vm)
    assert admin.fails("task.cancel", task)[0] == "OPERATION_NOT_ALLOWED"
    runner.release()
    assert admin("task.get_status", task) == "success"


def test_client_task(env, admin):
    """task.create makes a pending task the client updates, cancels and destroys."""
    task = admin("task.create", "backup", "nightly")
    admin("task.set_progress", task, 0.5)
    assert admin("task.get_record", task)["progress"] == 0.5
    admin("task.cancel", task)
    assert admin("task.get_status", task) == "cancelled"
    admin("task.destroy", task)


def test_finished_tasks_are_collected(tmp_path, clock):
    """Finished tasks disappear after task_ttl; pending ones stay."""
    env = ApiEnv(tmp_path, clock, task_ttl=100.0)
    admin = env.login()
    done = admin("Async.VM.create", vm_record())
    waiting = admin("task.create", "x", "")
    clock.advance(50)
    assert env.api.tasks.collect_garbage() == 0
    clock.advance(60)
    assert env.api.tasks.collect_garbage() == 1
    assert admin("task.get_all") == [waiting]
    assert done not in admin("task.get_all")


# -- event.from ----------------------------------------------------------------------------


def test_from_empty_token_returns_everything(env, admin):
    """Token '' returns every object of the classes as add, with int32 counts and a token."""
    batch = admin("event.from", ["vm", "HOST"], "", 0.0)
    classes = {e["class"] for e in batch["events"]}
    assert classes == {"vm", "host"}
    assert all(e["operation"] == "add" and "snapshot" in e for e in batch["events"])
    counts = batch["valid_ref_counts"]
    assert counts["vm"] == len(admin("VM.get_all")) and type(counts["vm"]).__name__ == "Int32"
    assert "task" in counts and "session" not in counts
    assert "," in batch["token"]


def test_from_sees_add_mod_del_coalesced(env, admin):
    """Changes after a token arrive once per object with the latest state."""
    token = admin("event.from", ["vm"], "", 0.0)["token"]
    vm = admin("VM.create", vm_record(name_label="a"))
    admin("VM.set_name_label", vm, "b")
    admin("VM.set_name_label", vm, "c")
    batch = admin("event.from", ["vm"], token, 0.0)
    mine = [e for e in batch["events"] if e["ref"] == vm]
    assert len(mine) == 1 and mine[0]["operation"] == "add"
    assert mine[0]["snapshot"].value["name_label"] == "c"
    token = batch["token"]
    admin("VM.set_name_label", vm, "d")
    batch = admin("event.from", ["vm"], token, 0.0)
    assert [(e["ref"], e["operation"]) for e in batch["events"]] == [(vm, "mod")]
    token = batch["token"]
    admin("VM.destroy", vm)
    batch = admin("event.from", ["vm"], token, 0.0)
    assert [(e["ref"], e["operation"]) for e in batch["events"]] == [(vm, "del")]
    assert "snapshot" not in batch["events"][0]


def test_from_blocks_until_a_change(env, admin, clock):
    """event.from waits as a deferred reply and wakes when a subscribed object changes."""
    token = admin("event.from", ["vm"], "", 0.0)["token"]
    d = pending(env, "event.from", admin.session, ["vm"], token, 30.0)
    clock.advance(5)
    assert outcome(d) is None
    admin("task.create", "unrelated", "")
    clock.advance(0)
    assert outcome(d) is None
    vm = admin("VM.create", vm_record())
    clock.advance(0)
    assert [e["ref"] for e in outcome(d)["events"]] == [vm]
    assert env.api.events.watchers == 0


def test_from_timeout_returns_empty_with_new_token(env, admin, clock):
    """With nothing new, event.from returns no events and a fresh token after the timeout."""
    token = admin("event.from", ["vm"], "", 0.0)["token"]
    admin("task.create", "moves the token", "")
    d = pending(env, "event.from", admin.session, ["vm"], token, 10.0)
    clock.advance(9)
    assert outcome(d) is None
    clock.advance(2)
    batch = outcome(d)
    assert batch["events"] == [] and batch["token"] != token


def test_logout_ends_the_wait(env, admin, clock):
    """A logout while event.from waits ends it with SESSION_INVALID."""
    token = admin("event.from", ["vm"], "", 0.0)["token"]
    other = env.login()
    d = pending(env, "event.from", other.session, ["vm"], token, 60.0)
    env.raw("session.logout", [other.session])
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.value.description == ["SESSION_INVALID", other.session]


def test_abandoned_wait_is_dropped(env, admin, clock):
    """Cancelling a waiting call (the client went away) removes its watcher."""
    token = admin("event.from", ["*"], "", 0.0)["token"]
    d = pending(env, "event.from", admin.session, ["*"], token, 60.0)
    assert env.api.events.watchers == 1
    d.cancel()
    d.addErrback(lambda f: None)
    assert env.api.events.watchers == 0


def test_subscriptions(env, admin):
    """'class/ref' subscribes to one object; unknown classes match nothing; bad ones are refused."""
    token = admin("event.from", ["*"], "", 0.0)["token"]
    a = admin("VM.create", vm_record())
    b = admin("VM.create", vm_record())
    batch = admin("event.from", [f"VM/{b}", "no_such_class"], token, 0.0)
    assert [e["ref"] for e in batch["events"]] == [b]
    assert a != b
    assert admin.fails("event.from", ["vm!"], "", 0.0) == ["EVENT_SUBSCRIPTION_PARSE_FAILURE", "vm!"]


def test_bad_and_stale_tokens(env, admin):
    """An unparsable token fails to parse; a token of an earlier run gets EVENTS_LOST."""
    assert admin.fails("event.from", ["vm"], "garbage", 0.0) == ["EVENT_FROM_TOKEN_PARSE_FAILURE", "garbage"]
    assert admin.fails("event.from", ["vm"], "00000000000000000001,00000000000000000002", 0.0) == ["EVENTS_LOST"]


def test_inject_gives_a_token_before_a_mod(env, admin):
    """event.inject returns a token positioned just before a mod of the object (the npm start-up)."""
    pool = admin("pool.get_all")[0]
    token = admin("event.inject", "pool", pool)
    batch = admin("event.from", ["pool"], token, 0.0)
    assert [(e["ref"], e["operation"]) for e in batch["events"]] == [(pool, "mod")]
    assert admin.fails("event.inject", "pool", "OpaqueRef:x") == ["HANDLE_INVALID", "pool", "OpaqueRef:x"]


def test_task_events_flow(env, admin):
    """Task records appear in event.from as the async call runs."""
    token = admin("event.from", ["task"], "", 0.0)["token"]
    vm = admin("VM.create", vm_record())
    task = admin("Async.VM.start", vm, False, False)
    events = admin("event.from", ["task"], token, 0.0)["events"]
    assert [e["ref"] for e in events] == [task]
    assert events[0]["snapshot"].value["status"] == "success"


def test_tombstone_horizon(tmp_path, clock):
    """Once deletions beyond the kept history were forgotten, older tokens get EVENTS_LOST."""
    env = ApiEnv(tmp_path, clock)
    env.api.events._max_tombstones = 2
    admin = env.login()
    token = admin("event.from", ["vm"], "", 0.0)["token"]
    for _ in range(3):
        admin("VM.destroy", admin("VM.create", vm_record()))
    assert admin.fails("event.from", ["vm"], token, 0.0) == ["EVENTS_LOST"]


# -- legacy register / next ------------------------------------------------------------------


def test_register_next(env, admin):
    """event.next returns the events queued since register, and blocks when there are none."""
    assert admin.fails("event.next") == ["SESSION_NOT_REGISTERED", admin.session]
    admin("event.register", ["vm"])
    vm = admin("VM.create", vm_record())
    events = admin("event.next")
    assert [(e["class"], e["operation"], e["ref"]) for e in events if e["class"] == "vm"] == [("vm", "add", vm)]
    d = pending(env, "event.next", admin.session)
    assert outcome(d) is None
    admin("VM.set_name_label", vm, "x")
    env.clock.advance(0)
    assert [e["operation"] for e in outcome(d)] == ["mod"]


def test_next_overflow_is_events_lost(tmp_path, clock):
    """A queue that overflows its bound answers EVENTS_LOST once, then works again."""
    env = ApiEnv(tmp_path, clock, event_queue_size=3)
    admin = env.login()
    admin("event.register", ["*"])
    vm = admin("VM.create", vm_record())
    for i in range(5):
        admin("VM.set_name_label", vm, str(i))
    assert admin.fails("event.next") == ["EVENTS_LOST"]
    admin("VM.set_name_label", vm, "after")
    assert admin("event.next")[-1]["snapshot"]["name_label"] == "after"


def test_unregister_all_classes(env, admin):
    """Unregistering every class drops the queue (event.next then needs register again)."""
    admin("event.register", ["vm", "task"])
    admin("event.unregister", ["VM", "task"])
    assert admin.fails("event.next") == ["SESSION_NOT_REGISTERED", admin.session]


def test_resolve_helper_sees_pending(env, admin, clock):
    """A blocking event.next is resolved by a change while the fake clock turns."""
    admin("event.register", ["pool"])
    d = pending(env, "event.next", admin.session)
    admin("pool.set_name_label", admin("pool.get_all")[0], "p")
    assert resolve(d, clock)[0]["class"] == "pool"


def test_waits_expire_independently(env, admin, clock):
    """Waits with different timeouts each end at their own time with no events."""
    token = admin("event.from", ["vm"], "", 0.0)["token"]
    short = pending(env, "event.from", admin.session, ["vm"], token, 5.0)
    long = pending(env, "event.from", admin.session, ["vm"], token, 10.0)
    clock.advance(5)
    assert outcome(short)["events"] == [] and outcome(long) is None
    clock.advance(5)
    assert outcome(long)["events"] == []
    assert env.api.events.watchers == 0
