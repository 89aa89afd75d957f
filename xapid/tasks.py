"""Tasks: records of long operations, ``Async.*`` execution, cancellation, garbage collection.

An ``Async.`` call returns its task ref at once; the operation runs as a coroutine on the
reactor (its blocking steps in the thread pool), and its outcome lands in the task record:
``success`` with ``result`` = the XML-RPC ``<value>`` text of the return value (as xapi
stores it; the encoder is given by the composition root, so the core does not import the
wire), ``failure`` with ``error_info`` = ``[code, params…]``, or ``cancelled``.

Ownership (xapi's model): every task records the user and session that created it in a side
table (:class:`Owner`, keyed by task ref; tasks are not persisted, so neither is the table).
:meth:`TaskManager.authorize` lets a user act on the tasks of any of its own sessions (the user
name is compared, so a client that logged in again keeps its tasks) and requires pool-operator
(xapi's ``task.destroy/any``) for anyone else's.  Client tasks (``task.create``) are capped per
session and per user while pending, and destroyed when their session ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Coroutine

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger

from xapid.apitypes import EPOCH, utc
from xapid.auth.rbac import ANY_TASK_PERMISSION, ANY_TASK_ROLE, permission_denied
from xapid.errors import XenAPIError, internal_error_with_id, operation_not_allowed
from xapid.schema import MessageSpec
from xapid.store import Change, Store

log = Logger()



@dataclass(frozen=True)
class Owner:
    """Who created a task: the user of the creating session, and that session."""

    user: str
    session: str
    client: bool  # task.create (destroyed with its session, capped while pending); else Async.*


#: the text a task's ``result`` field holds for an operation's return value
ResultEncoder = Callable[[Any], str]


class TaskManager:
    def __init__(self, store: Store, reactor: Any, host_ref: Callable[[], str], ttl: float,
                 max_pending_per_session: int = 100, max_pending_per_user: int = 1000, *,
                 encode_result: ResultEncoder):
        self.store = store
        self.encode_result = encode_result
        self.reactor = reactor
        self.host_ref = host_ref
        self.ttl = ttl
        self.max_pending_per_session = max_pending_per_session
        self.max_pending_per_user = max_pending_per_user
        self._running: dict[str, Deferred] = {}
        self._cancellable: set[str] = set()
        self._owners: dict[str, Owner] = {}  # task ref -> who created it
        self._client_tasks: dict[str, set[str]] = {}  # session ref -> its task.create tasks
        self._pending: set[str] = set()  # client tasks counted as pending
        self._pending_by_session: dict[str, int] = {}
        self._pending_by_user: dict[str, int] = {}
        store.subscribe(self._changed)

    def _now(self) -> datetime:
        return utc(self.reactor.seconds(), exact=True)

    def create(self, label: str, description: str, *, result_type: str = "", cancellable: bool = False) -> str:
        """A pending task (client tasks are cancellable by the client itself)."""
        return self.store.add("task", {
            "name_label": label, "name_description": description, "created": self._now(), "status": "pending",
            "resident_on": self.host_ref(), "type": result_type,
            "allowed_operations": ["cancel", "destroy"] if cancellable else ["destroy"],
        })

    def run_async(self, session: Any, spec: MessageSpec, invoke: Callable[[str], Coroutine[Any, Any, Any]]) -> str:
        """Start *invoke(task_ref)* in the background and return the task ref now."""
        task = self.create(f"Async.{spec.wire_name}", "", result_type=str(spec.result), cancellable=spec.cancellable)
        if session is not None:
            self._owners[task] = Owner(session.user, session.ref, client=False)
        if spec.cancellable:
            self._cancellable.add(task)
        d: Deferred[Any] = ensureDeferred(invoke(task))
        self._running[task] = d
        d.addCallbacks(lambda value: self._succeeded(task, value), lambda f: self._failed(task, f))
        d.addBoth(lambda _: self._done(task))
        return task

    # -- ownership ----------------------------------------------------------------------------

    def owner(self, task: str) -> Owner | None:
        """Who created *task* (None: created inside the daemon, or unknown)."""
        return self._owners.get(task)

    def owns(self, session: Any, task: str) -> bool:
        """Whether *task* was created by a session of *session*'s user."""
        owner = self._owners.get(task)
        return owner is not None and owner.user == session.user

    def authorize(self, schema: Any, session: Any, task: str, message: str) -> None:
        """RBAC_PERMISSION_DENIED unless *session* may act on *task*: its own user's tasks, or
        anyone's with pool-operator or above (xapi's ``task.destroy/any``)."""
        if self.owns(session, task) or schema.role_allows(session.role, ANY_TASK_ROLE):
            return
        log.info("refused {message} on task {task} of another user: session of {user} ({role})",
                 message=message, task=task, user=session.user, role=session.role)
        raise permission_denied(schema, session.role, ANY_TASK_PERMISSION, ANY_TASK_ROLE,
                                "on a task created by another user")

    def create_owned(self, label: str, user: str, session_ref: str) -> str:
        """A pending, cancellable task made by the daemon on a user's behalf (an HTTP transfer),
        owned by *user* (and *session_ref* when there is one) for the ownership checks."""
        task = self.create(label, "", cancellable=True)
        self._owners[task] = Owner(user, session_ref, client=False)
        return task

    def create_for_client(self, session: Any, label: str, description: str) -> str:
        """``task.create``: a pending, cancellable task owned by *session*, within the caps;
        destroyed when the session ends."""
        self.check_pending_caps(session.ref, session.user)
        task = self.create(label, description, cancellable=True)
        self._owners[task] = Owner(session.user, session.ref, client=True)
        self._client_tasks.setdefault(session.ref, set()).add(task)
        self._count_pending(task)
        session.ended.setdefault((TaskManager, "client tasks"), lambda: self.session_ended(session.ref))
        return task

    def check_pending_caps(self, session_ref: str, user: str) -> None:
        """OPERATION_NOT_ALLOWED when one more pending client task would pass a cap."""
        if self._pending_by_session.get(session_ref, 0) >= self.max_pending_per_session:
            raise operation_not_allowed(
                f"too many pending tasks in this session ({self.max_pending_per_session}, "
                f"[limits] max_pending_tasks_per_session): finish or destroy some first")
        if self._pending_by_user.get(user, 0) >= self.max_pending_per_user:
            raise operation_not_allowed(
                f"too many pending tasks for user {user} ({self.max_pending_per_user}, "
                f"[limits] max_pending_tasks_per_user): finish or destroy some first")

    def is_pending(self, task: str) -> bool:
        return task in self._pending

    def session_ended(self, session_ref: str) -> None:
        """Destroy the client tasks of a session that ended (logout, expiry, revocation)."""
        tasks = self._client_tasks.pop(session_ref, set())
        for task in list(tasks):
            if self.store.find(task) is not None:
                self.store.remove(task)
        if tasks:
            log.info("destroyed {count} client task(s) of an ended session", count=len(tasks))

    def _count_pending(self, task: str) -> None:
        owner = self._owners.get(task)
        if owner is None or not owner.client or task in self._pending:
            return
        self._pending.add(task)
        self._pending_by_session[owner.session] = self._pending_by_session.get(owner.session, 0) + 1
        self._pending_by_user[owner.user] = self._pending_by_user.get(owner.user, 0) + 1

    def _uncount_pending(self, task: str, owner: Owner) -> None:
        if task not in self._pending:
            return
        self._pending.discard(task)
        for table, key in ((self._pending_by_session, owner.session), (self._pending_by_user, owner.user)):
            left = table.get(key, 0) - 1
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)

    def _changed(self, change: Change) -> None:
        """Keep the owner table and the pending counts in step with every task write."""
        if change.cls != "task":
            return
        owner = self._owners.get(change.ref)
        if owner is None:
            return
        if change.op == "del":
            self._uncount_pending(change.ref, owner)
            del self._owners[change.ref]
            if owner.client:
                mine = self._client_tasks.get(owner.session)
                if mine is not None:
                    mine.discard(change.ref)
                    if not mine:
                        del self._client_tasks[owner.session]
            return
        obj = self.store.find(change.ref)
        if obj is not None and obj.fields["status"] == "pending":
            self._count_pending(change.ref)
        else:
            self._uncount_pending(change.ref, owner)

    def _done(self, task: str) -> None:
        self._running.pop(task, None)
        self._cancellable.discard(task)

    def _finish(self, task: str, fields: dict[str, Any]) -> None:
        if self.store.find(task) is None:
            return  # destroyed while running
        self.store.update(task, {"finished": self._now(), "allowed_operations": ["destroy"], **fields})

    def _succeeded(self, task: str, value: Any) -> Deferred:
        """``success`` only once the operation's writes are committed (the task record itself is
        not persisted): a client that sees it may kill -9 the daemon and keep the result.  A
        commit that fails makes the task a failure with the commit's error instead."""
        result = self.encode_result(value)
        return self.store.flush().addCallbacks(
            lambda _: self._finish(task, {"status": "success", "progress": 1.0, "result": result}),
            lambda f: self._failed(task, f, flushed=True))

    def _failed(self, task: str, failure: Any, flushed: bool = False) -> Any:
        if not flushed:  # what the operation wrote before failing is committed (or undone) first
            return self.store.flush().addCallbacks(lambda _: self._failed(task, failure, flushed=True),
                                                   lambda f: self._failed(task, f, flushed=True))
        error = failure.value if isinstance(failure.value, XenAPIError) else None
        if error is None and failure.check(CancelledError):  # the daemon stopping (Daemon._drain)
            error = XenAPIError("TASK_CANCELLED", task)
        if error is None:
            incident, error = internal_error_with_id()
            log.failure("task {task} failed unexpectedly (internal error id {incident})", failure, task=task,
                        incident=incident)
        status = "cancelled" if error.code == "TASK_CANCELLED" else "failure"
        self._finish(task, {"status": status, "error_info": error.description})

    def running(self) -> list[tuple[str, Deferred]]:
        """The Async tasks not yet finished: (task ref, a Deferred firing once the outcome is recorded;
        ``called`` once the operation itself is over, cancel it only before)."""
        return list(self._running.items())

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
