"""Durable means committed (issue 13), in-process on the fake clock: an Async task turns success
only after its writes are committed; writes made outside calls are committed by the store on its
own; a failed commit (disk full) is rolled back in memory, with events, and answers a clear
error; non-finite floats saved by an older xapid are cleaned at load.  The same guarantees
against a real daemon killed with SIGKILL are in test_crash_integrity.py."""

from __future__ import annotations

import json
import math
from typing import Any

from support import disk_full, stored, vm_record
from twisted.logger import globalLogPublisher

from xapid.store import COMMIT_DELAY, Database


def test_failed_commit_rolls_back_with_events_and_says_disk_full(admin, env, monkeypatch):
    """VM.create and a setter on a full disk: a clear INTERNAL_ERROR, the objects as before the
    call, watchers told of the rollback; the daemon keeps serving; nothing refused is saved later."""
    kept = admin("VM.create", vm_record(name_label="kept"))
    changes: list[tuple[str, str, str]] = []
    env.api.store.subscribe(lambda c: changes.append((c.cls, c.op, c.ref)))
    vms_before = set(admin("VM.get_all"))
    disk_full(monkeypatch, env)

    error = admin.fails("VM.create", vm_record(name_label="doomed"))
    assert error[0] == "INTERNAL_ERROR" and "disk" in error[1] and "full" in error[1], error
    assert set(admin("VM.get_all")) == vms_before
    assert admin("VM.get_by_name_label", "doomed") == []
    added = [ref for cls, op, ref in changes if cls == "VM" and op == "add"]
    assert len(added) == 1 and ("VM", "del", added[0]) in changes  # no phantom for watchers

    error = admin.fails("VM.set_name_label", kept, "renamed")
    assert error[0] == "INTERNAL_ERROR" and "full" in error[1]
    assert admin("VM.get_name_label", kept) == "kept"
    assert admin("VM.get_by_name_label", "renamed") == []

    monkeypatch.undo()  # space is back: the daemon serves and saves again; the refused writes stay gone
    env.clock.advance(1)
    other = admin("VM.create", vm_record(name_label="after"))
    rows = stored(env)
    assert other in rows and added[0] not in rows and rows[kept][1]["name_label"] == "kept"
    env.restart()
    admin = env.login("admin")
    assert admin("VM.get_by_name_label", "doomed") == [] and admin("VM.get_name_label", kept) == "kept"
    assert admin("VM.get_by_name_label", "after") == [other]


def test_async_task_turns_success_only_after_its_writes_are_committed(admin, env, monkeypatch):
    """Async.VM.clone: the batch holding the clone is written while the task is still pending."""
    vm = admin("VM.create", vm_record(name_label="source"))
    real_write = env.api.database.write
    seen: list[tuple[set[str], list[str]]] = []  # (refs written, statuses of Async tasks at that moment)

    def write(batch: Any) -> None:
        statuses = [o.fields["status"] for o in env.api.store.all("task")]
        seen.append((set(batch), statuses))
        real_write(batch)
    monkeypatch.setattr(env.api.database, "write", write)
    task = admin("Async.VM.clone", vm, "copy")
    env.settle()
    assert admin("task.get_status", task) == "success"
    clone = admin("task.get_result", task)
    clone = clone.split("<value>")[-1].split("</value>")[0] if "<value>" in clone else clone
    batches = [statuses for refs, statuses in seen if clone in refs]
    assert batches and all(statuses == ["pending"] for statuses in batches), seen
    assert clone in stored(env)


def test_async_task_fails_with_disk_full_and_leaves_nothing(admin, env, monkeypatch):
    vm = admin("VM.create", vm_record(name_label="source"))
    before = set(admin("VM.get_all"))
    disk_full(monkeypatch, env)
    task = admin("Async.VM.clone", vm, "copy")
    env.settle()
    assert admin("task.get_status", task) == "failure"
    info = admin("task.get_error_info", task)
    assert info[0] == "INTERNAL_ERROR" and "full" in info[1], info
    assert set(admin("VM.get_all")) == before and admin("VM.get_by_name_label", "copy") == []


def test_domain_watch_writes_are_committed_without_any_call(admin, env):
    """A guest that powers off: the VM turns Halted in the database on the store's own
    scheduled commit, with no API call following."""
    vm = admin("VM.create", vm_record(actions_after_shutdown="destroy"))
    admin("VM.start", vm, False, False)
    assert stored(env)[vm][1]["power_state"] == "Running"
    env.api.hypervisor.driver.guest_shutdown(admin("VM.get_uuid", vm), "poweroff")
    env.settle()
    assert env.api.store.get(vm).fields["power_state"] == "Halted"
    env.clock.advance(COMMIT_DELAY)
    assert stored(env)[vm][1]["power_state"] == "Halted"


def test_non_finite_floats_saved_by_an_older_xapid_are_cleaned_at_load(admin, env):
    vm = admin("VM.create", vm_record(name_label="old"))
    cls, data = stored(env)[vm]
    data["HVM_shadow_multiplier"] = float("nan")
    db = Database(env.api.database.path)
    db.write({vm: (cls, json.dumps(data))})
    db.close()
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_format", "").find("non-finite") >= 0:
            lines.append(event["log_format"].format(**event))
    globalLogPublisher.addObserver(observe)
    try:
        env.restart()
    finally:
        globalLogPublisher.removeObserver(observe)
    admin = env.login("admin")
    value = admin("VM.get_HVM_shadow_multiplier", vm)
    default = env.api.schema.classes["VM"].fields["HVM_shadow_multiplier"].default
    assert math.isfinite(value) and value == (default if isinstance(default, float) else 0.0)
    assert len(lines) == 1 and "VM" in lines[0] and vm in lines[0] and "HVM_shadow_multiplier" in lines[0]
    env.clock.advance(1)
    assert math.isfinite(stored(env)[vm][1]["HVM_shadow_multiplier"])  # saved cleaned


def test_vdi_create_on_a_full_disk_leaves_no_file(admin, env, monkeypatch):
    """VDI.create whose record cannot be committed: the clear error, and its disk file removed, so a restart
    adopts no stray disk from it."""
    sr = admin("pool.get_default_SR", admin("pool.get_all")[0])
    vdis_before = set(admin("SR.get_VDIs", sr))
    sr_dir = env.api.state_dir / "sr"
    files_before = sorted(p.name for p in sr_dir.iterdir())
    disk_full(monkeypatch, env)
    error = admin.fails("VDI.create", {"SR": sr, "virtual_size": str(1 << 20), "type": "user", "sharable": False,
                                       "read_only": False, "other_config": {}, "name_label": "doomed"})
    assert error[0] == "INTERNAL_ERROR" and "full" in error[1], error
    assert sorted(p.name for p in sr_dir.iterdir()) == files_before
    monkeypatch.undo()
    env.restart()
    admin = env.login("admin")
    assert set(admin("SR.get_VDIs", sr)) == vdis_before
    assert admin("VDI.get_by_name_label", "doomed") == []
