"""``GET /export_raw_vdi`` and ``PUT /import_raw_vdi``: one disk's contents over HTTP, as xapi serves them.

==========================================  ==================================================================
``GET /export_raw_vdi?vdi=<ref|uuid>``       the disk as ``format=raw`` (default: the whole virtual size, holes
``&format=raw|vhd[&base=<ref|uuid>]``       sent as zeros without reading them) or ``vhd`` (a dynamic VHD with
                                            only the allocated 2 MiB blocks).  ``base=``: only the blocks that
                                            differ from that VDI (a delta to apply over it with a VHD import).
``PUT /import_raw_vdi?vdi=<ref|uuid>``       writes the body into the VDI: ``raw`` from byte 0, ``vhd`` the
``&format=raw|vhd[&chunked]``               blocks present in the VHD (absent blocks keep their data), raw
                                            ``chunked``: XenServer's {u64 offset, u32 length, data} frames
``PUT /import_raw_vdi?sr_id=<ref>``          (or ``sr_uuid=``) with ``format=raw`` and a Content-Length: a new
                                            VDI "Imported VDI" of that size in the SR
==========================================  ==================================================================

Authentication is xapi's (session_id query or cookie, or HTTP Basic); an export needs the role of
``VDI.copy``, an import the role of ``VDI.create`` (read from the schema).  ``task_id`` names a
task of the caller's to report progress on (else one is created); the reply carries ``task-id``
and the task ends with the VDI ref as its result, or the failure.  Transfers hold a slot of
:class:`~xapid.transfer.limits.TransferSlots` (503 when none is free).

An import writes into a temporary file (a copy-on-write copy of the disk, or a new sparse file)
that becomes the disk by an atomic rename only once the whole body arrived and was valid: a
broken connection, a bad VHD or a cancelled task leaves the disk and the database untouched.
A VDI attached to a VM (``currently_attached``) is refused with ``VDI_IN_USE``; read-only VDIs with
``VDI_READONLY``; disks that xapid did not create (adopted by a scan) are never written.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger

from xapid.auth.http import HttpCaller, HttpError, authenticate, internal_error, one, parse_query
from xapid.auth.roles import role_at_least
from xapid.backend.storage import PARTIAL, FileSR, StorageError
from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.transfer import disk, vhd
from xapid.transfer.limits import MAX_DISK, Slot, TransferLimitError, TransferSlots
from xapid.transfer.raw_import import RawImportSink
from xapid.transfer.tasking import TransferTask, open_task
from xapid.wire.http import BodyWriter, HttpRequest, HttpResponse

log = Logger()

TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
FORMATS = {"raw": b"application/octet-stream", "vhd": b"application/vhd"}
DIRECT_BUDGET = 64 << 20  # export: bytes sent per thread-pool call on the direct (sendfile) path


class RawVdiRoutes:
    """The two routes, built from the API and the daemon's transfer slots."""

    def __init__(self, api: Any, slots: TransferSlots) -> None:
        self.api = api
        self.slots = slots
        self.importing: set[str] = set()  # VDI refs with an import in progress
        self.discarding: dict[str, Deferred[None]] = {}  # VDI refs whose failed import's file is being removed

    def routes(self) -> dict[bytes, Callable[[HttpRequest], HttpResponse | Deferred[Any]]]:
        return {b"/export_raw_vdi": lambda request: Deferred.fromCoroutine(self._guard(request, self._export(request)))}

    def stream_routes(self) -> dict[tuple[bytes, bytes], Callable[[HttpRequest], Any]]:
        return {(b"PUT", b"/import_raw_vdi"): lambda request: Deferred.fromCoroutine(
            self._guard(request, self._import(request)))}

    async def _guard(self, request: HttpRequest, work: Any) -> Any:
        try:
            return await work
        except HttpError as error:
            return error.response()
        except TransferLimitError as error:
            return HttpError(error.status, error.reason, error.headers).response()
        except Exception:  # noqa: BLE001 - never a traceback to the client
            return internal_error(request, "raw VDI transfer")

    # ---------------------------------------------------------------------------- shared steps

    async def _caller(self, request: HttpRequest, params: dict[str, list[str]], message: str) -> HttpCaller:
        caller = await authenticate(self.api, request, params)
        need = self.api.schema.messages[message].role
        if not role_at_least(caller.role, need):
            raise HttpError(403, f"role {caller.role} may not use {request.path.decode('latin-1')}: "
                                 f"it needs {need} (the role of {message})")
        return caller

    def _object(self, cls: str, text: str | None, what: str) -> Any:
        if not text:
            raise HttpError(400, f"{what} is required (a {cls} ref or uuid)")
        obj = self.api.store.find(text) if text.startswith("OpaqueRef:") else self.api.store.by_uuid(text)
        if obj is None or obj.cls != cls:
            raise HttpError(404, f"{what}: no {cls} {text!r}")
        return obj

    def _task(self, params: dict[str, list[str]], caller: HttpCaller, label: str) -> TransferTask:
        return TransferTask(self.api, open_task(self.api, params, caller, label))

    def _driver(self, vdi: Any) -> Any:
        from xapid.objects.devices import sr_driver

        try:
            return sr_driver(CallContext.internal(self.api), vdi.fields["SR"])
        except XenAPIError as error:
            raise HttpError(400, " ".join(error.description)) from None

    @staticmethod
    def _fail_early(task: TransferTask, status: int, error: XenAPIError, reason: str) -> HttpError:
        task.fail(error)
        return HttpError(status, reason, ((b"task-id", task.ref.encode()),))

    # ---------------------------------------------------------------------------- export

    async def _export(self, request: HttpRequest) -> HttpResponse:
        params = parse_query(request)
        caller = await self._caller(request, params, "VDI.copy")
        vdi = self._object("VDI", one(params, "vdi"), "vdi")
        base = self._object("VDI", one(params, "base"), "base") if one(params, "base") else None
        fmt = (one(params, "format") or "raw").lower()
        task = self._task(params, caller, f"Export of VDI {vdi.fields['uuid']}")
        if fmt not in FORMATS:
            raise self._fail_early(task, 404, XenAPIError("INVALID_VALUE", "format", fmt, "raw or vhd"),
                                   f"format {fmt!r} is not served (raw or vhd)")
        size = vdi.fields["virtual_size"]
        if fmt == "vhd" and size > vhd.MAX_VHD_SIZE:
            raise self._fail_early(task, 400, XenAPIError("OPERATION_NOT_ALLOWED", "VDI_TOO_LARGE: a VHD holds "
                                                          f"at most {vhd.MAX_VHD_SIZE} bytes"),
                                   f"VDI_TOO_LARGE: {size} bytes is beyond the VHD limit of {vhd.MAX_VHD_SIZE}")
        path = self._disk_path(vdi, task)
        base_path = self._disk_path(base, task) if base is not None else None
        try:
            slot = self.slots.acquire(caller.user)
        except TransferLimitError as error:
            raise self._fail_early(task, 503, XenAPIError("OPERATION_NOT_ALLOWED", error.reason), error.reason) \
                from None
        try:
            plan, fds = await self.api.runner.run(self._plan, path, size, fmt, base_path,
                                                  base.fields["virtual_size"] if base is not None else 0)
        except Exception as exc:  # noqa: BLE001 - an unreadable disk: the task says why
            slot.release()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self._fail_early(task, 500, XenAPIError("SR_BACKEND_FAILURE", "EIO", "", reason),
                                   f"cannot read the disk: {reason}") from None
        length = disk.plan_length(plan)
        uuid = vdi.fields["uuid"]
        headers = [(b"task-id", task.ref.encode()), (b"Content-Type", FORMATS[fmt]),
                   (b"Content-Disposition", f'attachment; filename="{uuid}.{fmt}"'.encode()),
                   (b"Cache-Control", b"no-cache, no-store")]
        log.info("export of VDI {uuid} as {fmt} ({length} bytes) by {user}", uuid=uuid, fmt=fmt, length=length,
                 user=caller.user)

        def stream(writer: BodyWriter) -> Deferred[None]:
            return Deferred.fromCoroutine(self._send(writer, plan, fds, length, task, slot, vdi.ref))

        return HttpResponse(200, b"", headers, stream=stream, length=length)

    def _disk_path(self, vdi: Any, task: TransferTask) -> Path:
        driver = self._driver(vdi)
        location = vdi.fields["location"]
        try:
            path: Path = driver.file(location)
        except StorageError as error:
            raise self._fail_early(task, 400, XenAPIError("SR_BACKEND_FAILURE", error.status, "", error.reason),
                                   error.reason) from None
        if path.suffix == ".qcow2":
            raise self._fail_early(task, 400, XenAPIError("SR_OPERATION_NOT_SUPPORTED", vdi.fields["SR"]),
                                   "qcow2 disks are not served by raw transfers (raw file disks only)")
        return path

    def _plan(self, path: Path, size: int, fmt: str, base_path: Path | None,
              base_size: int) -> tuple[list[disk.Segment], list[int]]:
        fd = disk.open_disk(path)
        fds = [fd]
        try:
            base_fd = None
            if base_path is not None:
                base_fd = disk.open_disk(base_path)
                fds.append(base_fd)
            if fmt == "vhd":
                plan, _ = disk.vhd_plan(fd, size, self.api.reactor.seconds(), base_fd, base_size)
            else:
                plan = disk.raw_plan(fd, size, base_fd, base_size)
            for extra in fds[1:]:
                os.close(extra)
            return plan, [fd]
        except BaseException:
            for d in fds:
                os.close(d)
            raise

    async def _send(self, writer: BodyWriter, plan: list[disk.Segment], fds: list[int], length: int, task: TransferTask,
                    slot: Slot, ref: str) -> None:
        fd = fds[0]
        runner = self.api.runner
        sent = 0
        sock_fd = writer.direct()
        pending: Deferred[Any] | None = None
        try:
            if sock_fd is not None:  # a plain socket: sendfile and the zero buffer, from the thread pool
                cursor = disk.Cursor()
                idle = float(getattr(getattr(self.api, "http_settings", None), "idle_timeout", 600.0))
                while cursor.index < len(plan):
                    if task.cancelling():
                        raise XenAPIError("TASK_CANCELLED", task.ref)
                    n = await runner.run(disk.send_plan, sock_fd, fd, plan, cursor, DIRECT_BUDGET,
                                         lambda: writer.closed, idle)
                    writer.account(n)
                    sent += n
                    task.progress(sent / length if length else 1.0)
                task.succeed(ref)
                return
            pieces = self._pieces(plan)
            nxt = next(pieces, None)
            while nxt is not None:
                kind, offset, size, literal = nxt
                if kind == "data":
                    data = await (pending if pending is not None else runner.run(disk.read_piece, fd, offset, size))
                else:
                    data = literal if kind == "literal" else disk.sparse.zeros(size)
                pending = None
                nxt = next(pieces, None)
                if nxt is not None and nxt[0] == "data":  # read ahead while this piece is sent
                    pending = runner.run(disk.read_piece, fd, nxt[1], nxt[2])
                if task.cancelling():
                    raise XenAPIError("TASK_CANCELLED", task.ref)
                await writer.write(data)
                sent += len(data)
                task.progress(sent / length if length else 1.0)
            task.succeed(ref)
        except XenAPIError as error:
            task.fail(error)
            raise
        except Exception as exc:  # noqa: BLE001 - the client went away, or the disk failed
            reason = "the client closed the connection" if writer.closed else str(exc)
            log.info("export stopped after {sent} bytes: {reason}", sent=sent, reason=reason)
            task.fail(XenAPIError("INTERNAL_ERROR", "export interrupted", reason))
            if sock_fd is not None and isinstance(exc, ConnectionError):  # the direct path: the client is gone
                raise ConnectionLost(reason) from None
            raise
        finally:
            if sock_fd is not None:
                os.close(sock_fd)
            elif pending is not None and not pending.called:
                pending.addErrback(lambda _: None)
            slot.release()
            os.close(fd)

    @staticmethod
    def _pieces(plan: list[disk.Segment]) -> Any:
        for seg in plan:
            if seg.kind == "literal":
                yield "literal", 0, len(seg.literal), seg.literal
                continue
            step = disk.READ_CHUNK if seg.kind == "data" else disk.ZERO_CHUNK
            at, end = seg.offset, seg.offset + seg.length
            while at < end:
                n = min(step, end - at)
                yield seg.kind, at, n, b""
                at += n

    # ---------------------------------------------------------------------------- import

    async def _import(self, request: HttpRequest) -> Any:
        params = parse_query(request)
        caller = await self._caller(request, params, "VDI.create")
        fmt = (one(params, "format") or "raw").lower()
        chunked = "chunked" in params
        length = self._content_length(request)
        if one(params, "vdi"):
            vdi = self._object("VDI", one(params, "vdi"), "vdi")
            sr, size = vdi.fields["SR"], vdi.fields["virtual_size"]
        elif one(params, "sr_id") or one(params, "sr_uuid"):
            vdi = None
            srobj = self._object("SR", one(params, "sr_id") or one(params, "sr_uuid"), "sr_id")
            sr = srobj.ref
            if fmt != "raw" or chunked:
                raise HttpError(400, "importing into an SR (a new VDI) takes format=raw, not chunked")
            if length is None:
                raise HttpError(400, "importing into an SR needs a Content-Length: the new VDI's size")
            if length > MAX_DISK:
                raise HttpError(413, f"a new VDI of {length} bytes is beyond the limit of {MAX_DISK}")
            size = length
        else:
            raise HttpError(400, "vdi (or sr_id/sr_uuid for a new VDI) is required")
        if fmt not in FORMATS:
            raise HttpError(404, f"format {fmt!r} is not accepted (raw or vhd)")
        if chunked and fmt != "raw":
            raise HttpError(400, "chunked takes format=raw")
        driver = self._write_driver(sr)
        target_path: Path
        if vdi is not None:
            self._check_importable(vdi, driver)
            target_path = driver.file(vdi.fields["location"])
            partial = target_path.with_name(target_path.name + PARTIAL)
            source: Path | None = target_path
            new_uuid = ""
        else:
            new_uuid = str(uuidlib.uuid4())
            target_path = driver.path / f"{new_uuid}.img"
            partial = target_path.with_name(target_path.name + PARTIAL)
            source = None
        if vdi is not None and vdi.ref in self.discarding:  # a failed import's file is still being removed
            await self.discarding[vdi.ref]
            if vdi.ref in self.importing:
                raise HttpError(409, f"OTHER_OPERATION_IN_PROGRESS: an import into VDI {vdi.ref} is running")
        slot = self.slots.acquire(caller.user)
        try:
            task = self._task(params, caller, "Import of a raw VDI")
        except BaseException:
            slot.release()
            raise
        if vdi is not None:
            self.importing.add(vdi.ref)
        parser: vhd.RawParser | vhd.ChunkedParser | vhd.VhdParser
        if fmt == "vhd":
            parser = vhd.VhdParser(size, length)
        elif chunked:
            parser = vhd.ChunkedParser(size)
        else:
            parser = vhd.RawParser(size)
        target = disk.ImportTarget(partial, size, source)
        sink = RawImportSink(self, task, slot, parser, target, driver, sr, vdi.ref if vdi is not None else None,
                           target_path, new_uuid, length)
        try:
            if vdi is None:
                await self.api.runner.run(driver.claim, target_path)  # marks the new file as xapid's
                sink.claimed = True
            await self.api.runner.run(target.prepare)
        except (OSError, StorageError) as exc:
            sink.cleanup_now()
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            if isinstance(exc, FileExistsError):
                error = XenAPIError("OTHER_OPERATION_IN_PROGRESS", "VDI", vdi.ref if vdi else "", "import", "")
                task.fail(error)
                raise HttpError(409, "another import into this VDI is in progress",
                                ((b"task-id", task.ref.encode()),)) from None
            task.fail(XenAPIError("SR_BACKEND_FAILURE", "EIO", "", str(reason)))
            raise HttpError(500, f"cannot prepare the import: {reason}", ((b"task-id", task.ref.encode()),)) \
                from None
        log.info("import into {what} as {fmt} by {user}", what=vdi.fields["uuid"] if vdi else f"a new VDI in {sr}",
                 fmt=fmt + (" (chunked)" if chunked else ""), user=caller.user)
        return sink

    @staticmethod
    def _content_length(request: HttpRequest) -> int | None:
        text = request.headers.get(b"content-length")
        if text is None or b"transfer-encoding" in request.headers:
            return None
        try:
            return int(text)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None

    def _write_driver(self, sr: str) -> FileSR:
        from xapid.objects.devices import sr_driver

        try:
            driver = sr_driver(CallContext.internal(self.api), sr)
        except XenAPIError as error:
            raise HttpError(400, " ".join(error.description)) from None
        if not isinstance(driver, FileSR):
            raise HttpError(400, f"SR_OPERATION_NOT_SUPPORTED: SR {sr} is read-only (imports go to file SRs)")
        return driver

    def _check_importable(self, vdi: Any, driver: FileSR) -> None:
        f = vdi.fields
        if f["read_only"]:
            raise HttpError(400, f"VDI_READONLY: VDI {vdi.ref} is read-only")
        store = self.api.store
        for vbd in f["VBDs"]:
            rec = store.find(vbd)
            if rec is not None and rec.fields["currently_attached"]:
                raise HttpError(409, f"VDI_IN_USE: VDI {vdi.ref} is attached to a VM (VBD {vbd}); "
                                     "importing over a disk in use is refused")
        if vdi.ref in self.importing:
            raise HttpError(409, f"OTHER_OPERATION_IN_PROGRESS: an import into VDI {vdi.ref} is running")
        location = f["location"]
        try:
            path = driver.file(location)
        except StorageError as error:
            raise HttpError(400, error.reason) from None
        if path.suffix == ".qcow2":
            raise HttpError(400, "qcow2 disks are not written by raw transfers (raw file disks only)")
        if not driver.owns(location):
            raise HttpError(403, f"VDI {vdi.ref}'s file was not created by xapid (adopted by a scan): never written")
