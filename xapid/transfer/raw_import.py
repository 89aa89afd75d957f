"""The body of ``PUT /import_raw_vdi`` (:mod:`xapid.transfer.raw_routes`): parsed as it arrives,
written in the thread pool one batch at a time into a private copy of the disk, which becomes the
disk only when the whole body arrived and checked out; a broken connection, a bad body or a
cancelled task leaves the disk and the database untouched."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid.auth.http import HttpError
from xapid.backend.storage import READY, FileSR
from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.runner import InlineRunner
from xapid.transfer import disk, vhd
from xapid.transfer.limits import Slot
from xapid.transfer.tasking import TransferTask, publish_committed
from xapid.wire.http import HttpResponse

if TYPE_CHECKING:
    from xapid.transfer.raw_routes import RawVdiRoutes

log = Logger()

TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
BATCH = 8 << 20  # bytes of writes handed to the thread pool at once (one batch in flight)
DIRECT_READ_BUDGET = 64 << 20  # bytes read from the socket per thread-pool call on the direct path


class RawImportSink:
    """Receives an import's body: parses it as it arrives, writes it in the thread pool one batch
    at a time (pausing the socket while the disk is behind), commits on finish, cleans up on abort."""

    def __init__(self, routes: RawVdiRoutes, task: TransferTask, slot: Slot, parser: Any, target: disk.ImportTarget,
                 driver: FileSR, sr: str, vdi_ref: str | None, final: Path, new_uuid: str,
                 length: int | None) -> None:
        self.routes = routes
        self.api = routes.api
        self.task = task
        self.slot = slot
        self.parser = parser
        self.target = target
        self.driver = driver
        self.sr = sr
        self.vdi_ref = vdi_ref
        self.final = final
        self.new_uuid = new_uuid
        self.length = length
        self.received = 0
        self._batch: list[vhd.Op] = []
        self._batch_bytes = 0
        self._inflight: Deferred[Any] | None = None
        self._failure: Failure | None = None
        self._error: XenAPIError | None = None
        self._done = False
        self.claimed = False  # a new disk's name is marked as xapid's (undone on failure)
        self._stopped = False  # aborted: a direct read in the thread pool stops at its next check
        # a known-length raw body may be read by the thread pool straight from the socket (see read_direct)
        self.read_direct: Callable[[int, bytes, int, float], Deferred[int]] | None = (
            self._read_direct if isinstance(parser, vhd.RawParser) and not isinstance(self.api.runner, InlineRunner)
            else None)
        self.complete = False  # the disk is whole (raw: its size arrived; chunked: the end marker; vhd: see ended)
        # xapi's reply, sent before the body is read: the outcome is on the task only
        self.early: HttpResponse | None = HttpResponse(200, b"", [(b"task-id", task.ref.encode()),
                                                                 (b"Content-Type", b"application/octet-stream")])

    # -- the BodySink protocol ----------------------------------------------------------------

    def write(self, data: bytes) -> Deferred[None] | None:
        if self._failure is not None:
            self._failure.raiseException()
        if self.task.cancelling():
            self._error = XenAPIError("TASK_CANCELLED", self.task.ref)
            raise HttpError(400, f"task {self.task.ref} was cancelled", self._task_header())
        if self.complete:
            return None
        raw = isinstance(self.parser, vhd.RawParser)
        if raw and self.received + len(data) >= self.target.size:  # a raw body ends at the disk's size
            data = data[:self.target.size - self.received]
            self.complete = True
        if isinstance(self.parser, vhd.VhdParser) and self.parser.costly(len(data)):
            # a large BAT takes up to a third of a second to parse: done in the thread pool while
            # reading waits on the Deferred, so the parser still sees one piece at a time, in order
            job: Deferred[list[vhd.Op]] = self.api.runner.run(self.parser.feed, data)
            return job.addCallbacks(self._fed_later, self._feed_failed, callbackArgs=(data,))
        try:
            ops = self.parser.feed(data)
        except vhd.FormatError as error:
            raise self._format_error(error) from None
        return self._fed(ops, data)

    def _format_error(self, error: vhd.FormatError) -> HttpError:
        """A body that is not of its format: the task's IMPORT_ERROR, a 400 for the request."""
        self._error = XenAPIError("IMPORT_ERROR", str(error))
        return HttpError(400, str(error), self._task_header())

    def _feed_failed(self, failure: Failure) -> None:
        failure.trap(vhd.FormatError)
        raise self._format_error(failure.value) from None

    def _fed_later(self, ops: list[vhd.Op], data: bytes) -> Deferred[None] | None:
        if self._stopped:
            return None  # aborted while the piece was parsed: the disk is being discarded
        return self._fed(ops, data)

    def _fed(self, ops: list[vhd.Op], data: bytes) -> Deferred[None] | None:
        """Account for *data* (parsed into *ops*) and batch its writes; a Deferred while the disk is behind."""
        self.received += len(data)
        if isinstance(self.parser, (vhd.ChunkedParser, vhd.VhdParser)) and self.parser.ended:
            self.complete = True  # the end marker, or a VHD's footer after its last block
        raw = isinstance(self.parser, vhd.RawParser)
        total = self.target.size if raw or not self.length else self.length
        if total:
            self.task.progress(min(self.received / total, 0.99))
        for op in ops:
            self._batch.append(op)
            self._batch_bytes += op.length if op.data is not None else 64
        if self._batch_bytes < BATCH:
            return None
        if self._inflight is None:
            self._submit()
            return None
        waiting = self._inflight
        d: Deferred[None] = Deferred()

        def then(_: Any) -> None:
            if self._failure is not None:
                d.errback(self._failure)
                return
            if self._batch and self._inflight is None:
                self._submit()
            d.callback(None)

        waiting.addBoth(then)
        return d

    def _read_direct(self, sock_fd: int, first: bytes, count: int, idle: float) -> Deferred[int]:
        """Read the next *count* bytes of the body (*first* already arrived) from *sock_fd*, a ``dup``
        of the client's socket that this closes, in the thread pool (:class:`disk.SocketImport`):
        the channel's reading is paused meanwhile.  Fires with the bytes consumed (the body up to
        the disk's size, then ``complete``); fails as :meth:`write` does (a cancelled task, a
        client gone or silent for *idle* seconds, a disk error: the channel then calls abort)."""
        return Deferred.fromCoroutine(self._direct(sock_fd, first, count, idle))

    async def _direct(self, sock_fd: int, first: bytes, count: int, idle: float) -> int:
        reader: disk.SocketImport | None = None
        try:
            while self._inflight is not None:  # nothing is batched before the direct read; never trust twice
                await self._wait_inflight()
            if self._failure is not None:
                self._failure.raiseException()
            want = min(count, self.target.size - self.received)
            reader = disk.SocketImport(sock_fd, first, want, self.target, self.received, idle,
                                       lambda: self._stopped)
            self.parser.received += want  # the raw parser's position: the body is written at its offsets
            while not reader.done:
                if self._stopped:
                    raise HttpError(400, "the import was aborted", self._task_header())
                if self.task.cancelling():
                    self._error = XenAPIError("TASK_CANCELLED", self.task.ref)
                    raise HttpError(400, f"task {self.task.ref} was cancelled", self._task_header())
                job = self.api.runner.run(reader.step, DIRECT_READ_BUDGET)
                self._inflight = job
                box: Deferred[int] = Deferred()
                job.addBoth(self._stepped, job, box)
                try:
                    n = await box
                except ConnectionError as exc:
                    raise HttpError(400, f"the transfer broke: {exc}", self._task_header()) from None
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    self._error = XenAPIError("SR_BACKEND_FAILURE", "EIO", "", reason)
                    raise HttpError(500, f"writing the disk failed: {reason}", self._task_header()) from None
                self.received += n
                total = self.target.size
                if total:
                    self.task.progress(min(self.received / total, 0.99))
            if self.received >= self.target.size:
                self.complete = True
            return want
        finally:
            if reader is not None:
                reader.close()  # its writer thread is idle: each step waits for its last write
            os.close(sock_fd)

    def _stepped(self, result: Any, job: Deferred[Any], box: Deferred[int]) -> None:
        if self._inflight is job:
            self._inflight = None
        if isinstance(result, Failure):
            box.errback(result)
        else:
            box.callback(result)

    def _task_header(self) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"task-id", self.task.ref.encode()),)

    def _submit(self) -> None:
        ops, self._batch, self._batch_bytes = self._batch, [], 0
        job = self.api.runner.run(self.target.apply, ops)
        self._inflight = job

        def done(result: Any) -> Any:
            self._inflight = None
            if isinstance(result, Failure):
                self._failure = result
            return None

        job.addBoth(done)

    def finish(self) -> Deferred[HttpResponse]:
        return Deferred.fromCoroutine(self._finish())

    async def _finish(self) -> HttpResponse:
        headers = [(b"task-id", self.task.ref.encode()), TEXT]
        try:
            try:
                ops = self.parser.finish()
            except vhd.FormatError as error:
                raise XenAPIError("IMPORT_ERROR", str(error)) from None
            self._batch.extend(ops)
            while self._inflight is not None:
                await self._wait_inflight()
            if self._failure is not None:
                self._failure.raiseException()
            if self._batch:
                ops, self._batch = self._batch, []
                await self.api.runner.run(self.target.apply, ops)
            if self.task.cancelling():
                raise XenAPIError("TASK_CANCELLED", self.task.ref)
            ref = await self._commit()
        except XenAPIError as error:
            self._cleanup(error)
            status = 400 if error.code in ("IMPORT_ERROR", "TASK_CANCELLED") else 500
            return HttpResponse(status, f"{' '.join(error.description)}\n".encode(), headers)
        except Exception as exc:  # noqa: BLE001 - a disk failure: the task says why, nothing is left behind
            reason = getattr(exc, "strerror", None) or str(exc)
            log.failure("import failed while writing", Failure())
            self._cleanup(XenAPIError("SR_BACKEND_FAILURE", "EIO", "", str(reason)))
            return HttpResponse(500, f"the import failed: {reason}\n".encode(), headers)
        self._done = True
        self.slot.release()
        if self.vdi_ref is not None:
            self.routes.importing.discard(self.vdi_ref)
        self.task.succeed(ref)
        return HttpResponse(200, f"{ref}\n".encode(), headers)

    async def _wait_inflight(self) -> None:
        job = self._inflight
        if job is None:
            return
        d: Deferred[None] = Deferred()
        job.addBoth(lambda _: d.callback(None))
        await d

    async def _commit(self) -> str:
        store = self.api.store
        from xapid.objects.sr import update_sizes

        ctx = CallContext.internal(self.api)
        if self.vdi_ref is not None:
            if store.find(self.vdi_ref) is None:
                raise XenAPIError("HANDLE_INVALID", "VDI", self.vdi_ref)
            await self.api.runner.run(self.target.commit, self.final)
            used = await self.api.runner.run(disk.allocated_bytes, self.final)
            with store.transaction():
                store.update(self.vdi_ref, {"physical_utilisation": used})
                update_sizes(ctx, self.sr)
            await store.flush()
            return self.vdi_ref
        if store.find(self.sr) is None:
            raise XenAPIError("HANDLE_INVALID", "SR", self.sr)
        # whole and synced as <name>.ready, under its name only once its VDI is committed: a crash
        # before leaves a file without a record (removed at start), after one that start puts in place
        ready = self.driver.sibling(self.final.name, READY)
        await self.api.runner.run(self.target.commit, ready, lambda *_: self.driver.make_ready(self.final.name))
        used = await self.api.runner.run(disk.allocated_bytes, ready)
        with store.transaction():
            ref = store.add("VDI", {"uuid": self.new_uuid, "SR": self.sr, "location": self.final.name,
                                    "name_label": "Imported VDI", "virtual_size": self.target.size,
                                    "physical_utilisation": used, "type": "user",
                                    "sm_config": {"type": "raw"}})
            update_sizes(ctx, self.sr)
        await store.flush()
        await publish_committed(self.api, self.driver, [self.final.name])
        return ref

    def abort(self, reason: str) -> None:
        self._stopped = True
        if self._done:
            return
        error = self._error or XenAPIError("IMPORT_ERROR", f"the transfer broke: {reason}")
        log.info("import aborted: {reason}", reason=reason)
        self._cleanup(error)

    # -- cleanup -----------------------------------------------------------------------------

    def _cleanup(self, error: XenAPIError) -> None:
        """Fail the task, drop the temporary file (after any write in flight), free the slot."""
        if self._done:
            return
        self._done = True
        self.task.fail(error)
        self.slot.release()
        if self.vdi_ref is not None:
            self.routes.importing.discard(self.vdi_ref)
        after = self._inflight if self._inflight is not None else succeed(None)
        removed: Deferred[None] = Deferred()
        vdi_ref = self.vdi_ref
        if vdi_ref is not None:
            self.routes.discarding[vdi_ref] = removed

        def gone(_: Any) -> None:
            if vdi_ref is not None and self.routes.discarding.get(vdi_ref) is removed:
                del self.routes.discarding[vdi_ref]
            removed.callback(None)

        after.addBoth(lambda _: self.api.runner.run(self._discard)).addErrback(
            lambda f: log.failure("removing a partial import failed", f)).addBoth(gone)

    def cleanup_now(self) -> None:
        """Before the body: undo the preparation (the claim of a new disk's name)."""
        self._done = True
        self.slot.release()
        if self.vdi_ref is not None:
            self.routes.importing.discard(self.vdi_ref)
        self._discard()

    def _discard(self) -> None:
        self.target.discard()
        if self.claimed:
            try:
                self.driver.remove_partial(self.final.name + READY)  # made ready, its VDI not committed
                self.driver.unclaim(self.final.name)
            except OSError:
                pass
