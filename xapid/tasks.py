"""Tasks: records of long operations, ``Async.*`` execution, cancellation, garbage collection.

An ``Async.`` call returns its task ref at once; the operation runs as a coroutine on the
reactor (its blocking steps in the thread pool), and its outcome lands in the task record:
``success`` with ``result`` = the XML-RPC ``<value>`` text of the return value (as xapi
stores it), ``failure`` with ``error_info`` = ``[code, params…]``, or ``cancelled``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from xapid.apitypes import EPOCH
from xapid.errors import XenAPIError, operation_not_allowed
from xapid.schema import MessageSpec
from xapid.store import Store
from xapid.wire.xmlrpc import encode_value

log = Logger()


class TaskManager:
    def __init__(self, store: Store, reactor: Any, host_ref: Callable[[], str], ttl: float):
        self.store = store
        self.reactor = reactor
        self.host_ref = host_ref
        self.ttl = ttl
        self._running: dict[str, Deferred] = {}
        self._cancellable: set[str] = set()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.reactor.seconds(), tz=timezone.utc)

    def create(self, label: str, description: str, *, result_type: str = "", cancellable: bool = False) -> str:
        """A pending task (client tasks are cancellable by the client itself)."""
        return self.store.add("task", {
            "name_label": label, "name_description": description, "created": self._now(), "status": "pending",
            "resident_on": self.host_ref(), "type": result_type,
            "allowed_operations": ["cancel", "destroy"] if cancellable else ["destroy"],
        })

    def run_async(self, session: Any, spec: MessageSpec, invoke: Callable[[str], Awaitable[Any]]) -> str:
        """Start *invoke(task_ref)* in the background and return the task ref now."""
        task = self.create(f"Async.{spec.wire_name}", "", result_type=str(spec.result), cancellable=spec.cancellable)
        if spec.cancellable:
            self._cancellable.add(task)
        d = ensureDeferred(invoke(task))
        self._running[task] = d
        d.addCallbacks(lambda value: self._succeeded(task, value), lambda f: self._failed(task, f))
        d.addBoth(lambda _: self._done(task))
        return task

    def _done(self, task: str) -> None:
        self._running.pop(task, None)
        self._cancellable.discard(task)

    def _finish(self, task: str, fields: dict[str, Any]) -> None:
        if self.store.find(task) is None:
            return  # destroyed while running
        self.store.update(task, {"finished": self._now(), "allowed_operations": ["destroy"], **fields})

    def _succeeded(self, task: str, value: Any) -> None:
        self._finish(task, {"status": "success", "progress": 1.0, "result": encode_value(value).decode()})

    def _failed(self, task: str, failure: Any) -> None:
        error = failure.value if isinstance(failure.value, XenAPIError) else None
        if error is None:
            log.failure("task {task} failed unexpectedly", failure, task=task)
            error = XenAPIError("INTERNAL_ERROR", str(failure.value))
        status = "cancelled" if error.code == "TASK_CANCELLED" else "failure"
        self._finish(task, {"status": status, "error_info": error.description})

    def progress(self, task: str | None, fraction: float) -> None:
        if task is not None and self.store.find(task) is not None:
            self.store.update(task, {"progress": round(min(max(fraction, 0.0), 1.0), 3)})

    def check_cancelled(self, task: str | None) -> None:
        """At a safe point of an operation: TASK_CANCELLED when its task was asked to stop."""
        if task is None:
            return
        obj = self.store.find(task)
        if obj is not None and obj.fields["status"] == "cancelling":
            raise XenAPIError("TASK_CANCELLED", task)

    def cancel(self, task: str) -> None:
        """Ask a task to stop; OPERATION_NOT_ALLOWED unless it is pending and cancellable."""
        fields = self.store.get(task, "task").fields
        if fields["status"] != "pending" or "cancel" not in fields["allowed_operations"]:
            raise operation_not_allowed(f"task {task} cannot be cancelled (status {fields['status']})")
        if task in self._running:
            self.store.update(task, {"status": "cancelling", "allowed_operations": []})
        else:  # a client's own task: nothing runs here, it is cancelled at once
            self._finish(task, {"status": "cancelled", "error_info": ["TASK_CANCELLED", task]})

    def collect_garbage(self) -> int:
        """Destroy tasks finished more than ttl seconds ago; returns how many."""
        limit = self.reactor.seconds() - self.ttl
        old = [o.ref for o in self.store.all("task")
               if o.fields["status"] != "pending" and o.fields["status"] != "cancelling"
               and o.fields["finished"] != EPOCH and o.fields["finished"].timestamp() < limit]
        for ref in old:
            self.store.remove(ref)
        return len(old)
