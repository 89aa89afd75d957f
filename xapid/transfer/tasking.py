"""The task an HTTP transfer reports on (raw VDI and XVA routes alike): the caller's own pending
task named by ``task_id``, or one created for the transfer; ended once, with its outcome."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from xapid.apitypes import utc
from xapid.auth.http import HttpCaller, HttpError, one
from xapid.auth.roles import role_at_least
from xapid.errors import XenAPIError
from xapid.tasks import ANY_TASK_ROLE
from xapid.wire.xmlrpc import encode_value

log = Logger()


def open_task(api: Any, params: dict[str, list[str]], caller: HttpCaller, label: str) -> str:
    """The pending task ``task_id`` names (404 when there is none, 403 when it is another user's
    and the caller may not use any task, 400 when it is no longer pending), or a new one labelled
    *label*, cancellable and owned by the caller."""
    tasks, store = api.tasks, api.store
    given = one(params, "task_id")
    if given:
        obj = store.find(given)
        if obj is None or obj.cls != "task":
            raise HttpError(404, f"task_id: no task {given!r}"[:200])
        owner = tasks.owner(given)
        if (owner is None or owner.user != caller.user) and not role_at_least(caller.role, ANY_TASK_ROLE):
            raise HttpError(403, f"task_id {given} belongs to another user"[:200])
        if obj.fields["status"] != "pending":
            raise HttpError(400, f"task_id {given} is not pending (status {obj.fields['status']})"[:200])
        return str(given)
    return str(tasks.create_owned(label, caller.user, caller.session_ref or ""))


def cancelled(api: Any, task: str) -> bool:
    """Whether *task* was asked to stop: ``cancelling``, or already ``cancelled`` (``task.cancel``
    ends a transfer's task at once, as no Async call runs it, so ``cancelling`` alone misses it)."""
    obj = api.store.find(task)
    return obj is not None and obj.fields["status"] in ("cancelling", "cancelled")


def check_cancelled(api: Any, task: str) -> None:
    """At a safe point of a transfer: TASK_CANCELLED when its task was asked to stop."""
    if cancelled(api, task):
        raise XenAPIError("TASK_CANCELLED", task)


def finish_task(api: Any, task: str, fields: dict[str, Any]) -> None:
    """End *task* with *fields* (its status and result or error) unless it has ended already."""
    store = api.store
    obj = store.find(task)
    if obj is None or obj.fields["status"] not in ("pending", "cancelling"):
        return
    store.update(task, {"finished": utc(api.clock(), exact=True), "allowed_operations": ["destroy"], **fields})


def fail_task(api: Any, task: str, error: XenAPIError) -> None:
    """End *task* with *error*: ``cancelled`` for TASK_CANCELLED, else ``failure``."""
    status = "cancelled" if error.code == "TASK_CANCELLED" else "failure"
    finish_task(api, task, {"status": status, "error_info": error.description})


PROGRESS_STEP = 0.01  # a transfer's task progress is written when it moved this much


class TransferTask:
    """The task a transfer reports on: the caller's (``task_id``) or one created for it."""

    def __init__(self, api: Any, ref: str) -> None:
        self.api = api
        self.ref = ref
        self._shown = 0.0

    def progress(self, fraction: float) -> None:
        if fraction - self._shown >= PROGRESS_STEP or fraction >= 1.0:
            self._shown = fraction
            self.api.tasks.progress(self.ref, fraction)

    def cancelling(self) -> bool:
        return cancelled(self.api, self.ref)

    def succeed(self, result: str) -> None:
        finish_task(self.api, self.ref, {"status": "success", "progress": 1.0, "result": encode_value(result).decode()})

    def fail(self, error: XenAPIError) -> None:
        fail_task(self.api, self.ref, error)


async def publish_committed(api: Any, driver: Any, locations: list[str]) -> None:
    """Put new disks (made ready by ``FileSR.make_ready``) under their names once their objects are
    committed.  A failure is logged, not raised: the objects exist, and the next start or
    ``SR.scan`` puts the ready disks in place (:func:`xapid.objects.sr.reconcile`)."""
    def publish() -> None:
        for location in locations:
            driver.publish_new(location)

    try:
        await api.runner.run(publish)
    except Exception:  # noqa: BLE001 - committed: reconcile finishes it
        log.failure("putting the committed disks {locations} in place failed (SR.scan finishes it)",
                    locations=locations)
