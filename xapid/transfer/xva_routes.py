"""Whole-VM export and import in xapi's XVA format (:mod:`xapid.transfer.xva`), over the API port.

=====================================  ==========================================================
``GET /export?ref=|uuid=``             the VM as an XVA tar: ``use_compression=true|gzip|zstd``,
                                       ``preserve_power_state`` (a Suspended VM keeps its suspend
                                       image).  The VM must be Halted (or Suspended with
                                       ``preserve_power_state``); templates and snapshots export too.
                                       ``Connection: close``, no Content-Length (as xapi)
``GET /export_metadata?uuid=|ref=``    ``ova.xml`` alone in a tar, with Content-Length
``PUT /import?sr_id=|sr_uuid=``        a new VM from an XVA (plain, gzip or zstd): new uuids, its
                                       disks in the SR (default: the pool's default SR), fresh MACs
                                       unless ``restore=true``; ``force=true`` ignores checksums.
                                       The task's result is the XML-RPC VM ref set
=====================================  ==========================================================

Authentication as :mod:`xapid.auth.http` (session, cookie or HTTP Basic); both need vm-admin, as
xapi's ``http/get_export`` and ``http/put_import``.  ``task_id`` names a pending task of the
caller's (else one is created); the reply carries ``task-id``, progress goes on the task, and
the outcome lands there (xapi's flow: ``task.create``, HTTP with ``task_id``, watch the task).
Each transfer takes a slot of :class:`~xapid.transfer.limits.TransferSlots` (503 when full).

An import never leaves half a VM: its disks are written into new files that become VDIs, with
the VM, VBDs and VIFs, in one transaction once the whole stream checked out; a broken stream,
a bad checksum or a cancel deletes the files made so far.  Disk I/O runs in the thread pool and
bodies stream with backpressure in both directions.
"""

from __future__ import annotations

import os
import time
import uuid as uuidlib
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid.apitypes import NULL_REF, Type, coerce, format_datetime, utc
from xapid.auth.http import HttpCaller, HttpError, authenticate, one, parse_query
from xapid.auth.roles import role_at_least
from xapid.backend.storage import FileSR, StorageError
from xapid.context import CallContext
from xapid.errors import XenAPIError, internal_error_with_id
from xapid.objects.devices import random_mac, sr_driver, storage_error
from xapid.objects.vm_ops import check as check_vm_operation
from xapid.objects.vm_ops import operation
from xapid.transfer import xva
from xapid.transfer.limits import MAX_DISK, TransferLimitError, TransferSlots
from xapid.transfer.tasking import fail_task, finish_task, open_task
from xapid.wire.http import BodyWriter, HttpRequest, HttpResponse
from xapid.wire.values import DEFAULT_LIMITS
from xapid.wire.xmlrpc import encode_value

log = Logger()

EXPORT_ROLE = "vm-admin"  # xapi's http/get_export and http/get_export_metadata
IMPORT_ROLE = "vm-admin"  # xapi's http/put_import
TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
MAX_OBJECTS = 10_000  # objects in one ova.xml
MAX_VMS = 256
MAX_DISKS = 256  # disks in one XVA: each is a file held open until the import ends

# VM fields that describe one instance, never imported from a record
_VM_SKIP = {"uuid", "power_state", "suspend_VDI", "affinity", "suspend_SR", "snapshot_of", "parent",
            "is_control_domain", "domid", "resident_on"}


def _flag(params: dict[str, list[str]], name: str) -> bool:
    value = one(params, name)
    return value is not None and value.lower() in ("", "true", "1", "yes", "on")


def _has_ref(t: Type | None) -> bool:
    return t is not None and (t.kind == "ref" or _has_ref(t.elem) or _has_ref(t.key))


def _remap(t: Type, value: Any, ids: dict[str, str]) -> Any:
    """*value* with refs to exported objects as their ``Ref:<n>`` and others as OpaqueRef:NULL
    (dropped from sets and maps)."""
    if t.kind == "ref":
        return ids.get(value, NULL_REF) if isinstance(value, str) else NULL_REF
    if t.kind == "set" and t.elem is not None and _has_ref(t.elem):
        return [ids[v] for v in value if isinstance(v, str) and v in ids]
    if t.kind == "map" and (_has_ref(t.key) or _has_ref(t.elem)):
        out = {}
        for k, v in value.items():
            k2 = _remap(t.key, k, ids) if t.key is not None and _has_ref(t.key) else k
            v2 = _remap(t.elem, v, ids) if t.elem is not None and _has_ref(t.elem) else v
            if k2 != NULL_REF and v2 != NULL_REF:
                out[k2] = v2
        return out
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _xva_error(exc: xva.XvaError, task: str) -> XenAPIError:
    """The Xen-API error of a format failure."""
    if exc.code == "TASK_CANCELLED":
        return XenAPIError("TASK_CANCELLED", task)
    if exc.code == "IMPORT_ERROR_PREMATURE_EOF":
        return XenAPIError("IMPORT_ERROR_PREMATURE_EOF")
    if exc.code == "IMPORT_ERROR_SOME_CHECKSUMS_FAILED":
        return XenAPIError("IMPORT_ERROR_SOME_CHECKSUMS_FAILED")
    if exc.code == "IMPORT_INCOMPATIBLE_VERSION":
        return XenAPIError("IMPORT_INCOMPATIBLE_VERSION")
    return XenAPIError("IMPORT_ERROR", str(exc))


class XvaRoutes:
    """The routes: ``routes()`` (GET) and ``stream_routes()`` (PUT /import, streamed)."""

    def __init__(self, api: Any, slots: TransferSlots | None = None, piece: int = 1 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.slots = slots or TransferSlots()
        self.piece = piece
        self.clock = clock

    def routes(self) -> dict[bytes, Callable[[HttpRequest], Deferred[HttpResponse]]]:
        return {b"/export": lambda r: Deferred.fromCoroutine(self._answer(r, self._export)),
                b"/export_metadata": lambda r: Deferred.fromCoroutine(self._answer(r, self._export_metadata))}

    def stream_routes(self) -> dict[tuple[bytes, bytes], Callable[[HttpRequest], Deferred[Any]]]:
        return {(b"PUT", b"/import"): lambda r: Deferred.fromCoroutine(self._answer(r, self._import))}

    # ------------------------------------------------------------------------- plumbing

    async def _answer(self, request: HttpRequest, handler: Callable[..., Any]) -> Any:
        try:
            params = parse_query(request)
            caller = await authenticate(self.api, request, params)
            need = IMPORT_ROLE if request.method == b"PUT" else EXPORT_ROLE
            if not role_at_least(caller.role, need):
                raise HttpError(403, f"role {caller.role} may not use {request.path.decode('latin-1')[:64]}: "
                                     f"it needs {need}")
            return await handler(request, params, caller)
        except HttpError as error:
            return error.response()
        except TransferLimitError as error:
            return HttpResponse(503, f"{error.reason}\n".encode(), [TEXT, *error.headers])
        except XenAPIError as error:
            return HttpResponse(409 if error.code in ("VM_BAD_POWER_STATE", "OTHER_OPERATION_IN_PROGRESS",
                                                      "VM_IS_TEMPLATE", "OPERATION_NOT_ALLOWED") else 400,
                                (" ".join(error.description)[:1000] + "\n").encode(), [TEXT])
        except Exception:  # noqa: BLE001 - never a traceback, never a dead daemon
            incident, _ = internal_error_with_id()
            log.failure("{method} {path} failed (internal error id {incident})",
                        method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                        incident=incident)
            return HttpResponse(500, f"internal error, id {incident}; see the daemon log\n".encode(), [TEXT])

    def _ctx(self, task: str | None) -> CallContext:
        return CallContext(self.api, None, None, task)

    def _vm(self, params: dict[str, list[str]]) -> Any:
        ref, uuid = one(params, "ref"), one(params, "uuid")
        if not ref and not uuid:
            raise HttpError(400, "ref or uuid (the VM) is required")
        store = self.api.store
        obj = store.find(ref) if ref else store.by_uuid(uuid or "")
        if obj is None or obj.cls != "VM":
            raise HttpError(404, f"no VM {ref or uuid}"[:200])
        if obj.fields["is_control_domain"]:
            raise HttpError(403, "the control domain cannot be exported")
        return obj

    def _task(self, params: dict[str, list[str]], caller: HttpCaller, label: str) -> str:
        """The caller's pending task named by ``task_id``, or a new one owned by the caller."""
        return open_task(self.api, params, caller, label)

    def _fail_task(self, task: str, failure: Failure | BaseException) -> XenAPIError:
        exc = failure.value if isinstance(failure, Failure) else failure
        if isinstance(exc, XenAPIError):
            error = exc
        elif isinstance(exc, xva.XvaError):
            error = _xva_error(exc, task)
        elif isinstance(exc, StorageError):
            error = storage_error(exc)
        else:
            incident, error = internal_error_with_id()
            log.failure("transfer task {task} failed (internal error id {incident})",
                        failure if isinstance(failure, Failure) else Failure(exc), task=task, incident=incident)
        fail_task(self.api, task, error)
        return error

    # ------------------------------------------------------------------------- export

    def _compression(self, params: dict[str, list[str]]) -> str:
        value = (one(params, "use_compression") or "").lower()
        if value in ("", "false", "no", "none"):
            return ""
        if value in ("true", "gzip"):
            return "gzip"
        if value == "zstd":
            return "zstd"
        raise HttpError(400, "use_compression must be true, gzip, zstd or false")

    def _version(self) -> dict[str, Any]:
        store = self.api.store
        host = store.find(self.api.host_ref)
        hf = host.fields if host is not None else {}
        sv = hf.get("software_version", {}) or {}
        return {"hostname": hf.get("hostname", ""), "date": format_datetime(utc(self.api.clock())),
                "product_version": sv.get("product_version", ""), "product_brand": sv.get("product_brand", "xapid"),
                "build_number": sv.get("build_number", ""), "xapi_major": int(hf.get("API_version_major", 2)),
                "xapi_minor": int(hf.get("API_version_minor", 21)), "export_vsn": xva.EXPORT_VSN}

    def build_ova(self, vm: Any, preserve: bool, with_disks: bool = True) -> tuple[bytes, list[xva.DiskSource]]:
        """``ova.xml`` of *vm* (its VBDs but CDs, their VDIs and SRs, VIFs and networks, metrics)
        and the disks to stream."""
        store, schema = self.api.store, self.api.schema
        ids: dict[str, str] = {}
        order: list[Any] = []
        disks: list[xva.DiskSource] = []

        def add(obj: Any) -> None:
            if obj is not None and obj.ref not in ids:
                ids[obj.ref] = f"Ref:{len(ids)}"
                order.append(obj)

        def add_vdi(ref: str) -> None:
            vdi = store.find(ref)
            if vdi is None or vdi.cls != "VDI" or ref in ids:
                return
            sr = store.get(vdi.fields["SR"])
            if sr.fields["type"] == "iso" or sr.fields["content_type"] == "iso":
                return
            if vdi.fields["location"].endswith(".qcow2"):
                raise XenAPIError("SR_OPERATION_NOT_SUPPORTED", sr.ref)
            add(vdi)
            add(sr)
            if with_disks:
                path = str(sr_driver(self._ctx(None), sr.ref).file(vdi.fields["location"]))
                disks.append(xva.DiskSource(ids[ref], path, int(vdi.fields["virtual_size"])))

        add(vm)
        for name in ("metrics", "guest_metrics"):
            add(store.find(vm.fields[name]))
        for vbd_ref in vm.fields["VBDs"]:
            vbd = store.get(vbd_ref)
            if vbd.fields["type"] == "CD":
                continue
            add(vbd)
            if not vbd.fields["empty"]:
                add_vdi(vbd.fields["VDI"])
        if preserve and vm.fields["power_state"] == "Suspended":
            add_vdi(vm.fields["suspend_VDI"])
        for vif_ref in vm.fields["VIFs"]:
            vif = store.get(vif_ref)
            add(vif)
            add(store.find(vif.fields["network"]))
        objects = []
        for obj in order:
            spec = schema.classes[obj.cls]
            record = {name: _remap(f.type, obj.fields[name], ids) for name, f in spec.fields.items()
                      if name in obj.fields}
            if obj.cls == "VM" and not preserve:
                record["power_state"] = "Halted"
            objects.append({"class": obj.cls, "id": ids[obj.ref], "snapshot": record})
        return xva.encode_ova(self._version(), objects), disks

    def _headers(self, task: str, length: int | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b"Cache-Control", b"no-cache, no-store"), (b"task-id", task.encode()),
                   (b"Content-Type", b"application/octet-stream"),
                   (b"Content-Disposition", b'attachment; filename="export.xva"')]
        if length is None:
            headers.append((b"Connection", b"close"))
        return headers

    async def _export(self, request: HttpRequest, params: dict[str, list[str]], caller: HttpCaller) -> HttpResponse:
        vm = self._vm(params)
        preserve = _flag(params, "preserve_power_state")
        compression = self._compression(params)
        check_vm_operation(vm, "export")
        if vm.fields["power_state"] == "Suspended" and not preserve:
            raise XenAPIError("VM_BAD_POWER_STATE", vm.ref, "halted", "suspended")
        ova, disks = self.build_ova(vm, preserve)
        if request.method == b"HEAD":
            return HttpResponse(200, b"", self._headers("OpaqueRef:NULL"))
        slot = self.slots.acquire(caller.user)
        try:
            task = self._task(params, caller, f"Export of VM: {vm.fields['uuid']}")
        except BaseException:
            slot.release()
            raise

        def stream(writer: BodyWriter) -> Deferred[None]:
            return Deferred.fromCoroutine(self._stream_export(writer, vm.ref, task, slot, ova, disks, compression))

        return HttpResponse(200, b"", self._headers(task), stream=stream)

    async def _stream_export(self, writer: BodyWriter, vm_ref: str, task: str, slot: Any, ova: bytes,
                             disks: list[xva.DiskSource], compression: str) -> None:
        producer = xva.XvaWriter(ova, disks, compression, piece=self.piece, mtime=self.api.clock(), clock=self.clock)
        ctx = self._ctx(task)
        total = max(producer.total, 1)
        try:
            async with operation(ctx, vm_ref, "export"):
                while True:
                    self.api.tasks.check_cancelled(task)
                    piece = await self.api.runner.run(producer.next_piece)
                    if not piece:
                        break
                    await writer.write(piece)
                    ctx.progress(min(0.99, producer.progressed / total))
            finish_task(self.api, task, {"status": "success", "progress": 1.0, "result": ""})
            log.info("exported VM {vm} (task {task})", vm=vm_ref, task=task)
        except BaseException as exc:  # the client went away, a disk failed, a cancel: the task says why
            error = self._fail_task(task, exc)
            log.info("export of VM {vm} failed: {error}", vm=vm_ref, error=error.description)
            raise
        finally:
            slot.release()
            producer.close()

    async def _export_metadata(self, request: HttpRequest, params: dict[str, list[str]],
                               caller: HttpCaller) -> HttpResponse:
        vm = self._vm(params)
        ova, _ = self.build_ova(vm, preserve=True, with_disks=False)
        body = xva.tar_file("ova.xml", ova, self.api.clock()) + xva.TAR_END
        task = self._task(params, caller, f"Export of metadata of VM: {vm.fields['uuid']}")
        finish_task(self.api, task, {"status": "success", "progress": 1.0, "result": ""})
        return HttpResponse(200, body, self._headers(task, len(body))[:-1] + [(b"Connection", b"close")])

    # ------------------------------------------------------------------------- import

    def _sr(self, params: dict[str, list[str]]) -> Any:
        store = self.api.store
        sr_id, sr_uuid = one(params, "sr_id"), one(params, "sr_uuid")
        if sr_id:
            sr = store.find(sr_id)
        elif sr_uuid:
            sr = store.by_uuid(sr_uuid)
        else:
            pool = store.find(self.api.pool_ref)
            sr = store.find(pool.fields["default_SR"]) if pool is not None else None
            if sr is None:
                raise HttpError(400, "no sr_id or sr_uuid, and the pool has no default SR")
        if sr is None or sr.cls != "SR":
            raise HttpError(404, f"no SR {sr_id or sr_uuid}"[:200])
        if sr.fields["content_type"] == "iso" or sr.fields["type"] == "iso":
            raise HttpError(400, "an ISO SR cannot hold imported disks")
        return sr

    async def _import(self, request: HttpRequest, params: dict[str, list[str]], caller: HttpCaller) -> Any:
        sr = self._sr(params)
        try:
            driver = sr_driver(self._ctx(None), sr.ref)
        except XenAPIError as error:
            raise HttpError(400, " ".join(error.description)[:300]) from None
        if driver.read_only or not isinstance(driver, FileSR):
            raise HttpError(400, "the SR cannot hold imported disks")
        slot = self.slots.acquire(caller.user)
        try:
            task = self._task(params, caller, "VM import")
        except BaseException:
            slot.release()
            raise
        log.info("importing a VM into SR {sr} for {user} (task {task})", sr=sr.ref, user=caller.user, task=task)
        return ImportSink(self, sr.ref, FileSR(driver.path, "raw"), task, slot,
                          restore=_flag(params, "restore"), force=_flag(params, "force"))


class _Plan:
    """What an import creates, checked before a byte of disk is written: field dicts per object."""

    def __init__(self) -> None:
        self.vdis: list[tuple[str, dict[str, Any]]] = []  # (Ref id, VDI fields)
        self.vms: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # (id, fields, the record)
        self.vbds: list[tuple[str, str, dict[str, Any]]] = []  # (VM id, VDI id or "", fields)
        self.vifs: list[tuple[str, str, dict[str, Any]]] = []  # (VM id, local network ref, fields)


class ImportSink:
    """The body of one ``PUT /import``: the XVA parser fed in the thread pool, one piece at a time."""

    def __init__(self, routes: XvaRoutes, sr: str, driver: FileSR, task: str, slot: Any, restore: bool,
                 force: bool) -> None:
        self.routes = routes
        self.api = routes.api
        self.sr = sr
        self.driver = driver
        self.task = task
        self.slot = slot
        self.restore = restore
        self.parser = xva.XvaParser(force)
        self.plan: _Plan | None = None
        self.created: list[tuple[str, str]] = []  # (Ref id, file location) of the disks made
        self.fds: list[int] = []
        self.total = 0
        self.error: XenAPIError | None = None
        self.result: list[str] | None = None  # the new VMs, once committed
        self.got_bytes = False
        self._busy: Deferred[Any] | None = None
        self._idle: list[Deferred[None]] = []
        self._cleaned = False
        # xapi's reply, sent before the body is read: the outcome is on the task only
        self.early: HttpResponse | None = HttpResponse(200, b"", [(b"task-id", task.encode()),
                                                                 (b"Content-Type", b"application/octet-stream")])

    @property
    def complete(self) -> bool:
        """The VM is imported (every disk arrived): the rest of the stream is not needed."""
        return self.result is not None

    # ---- thread work, one job at a time, tracked so that a cleanup waits for it

    def _run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.api.runner.run(fn, *args)
        self._busy = d

        def settled(result: Any) -> Any:
            if self._busy is d:
                self._busy = None
            waiting, self._idle = self._idle, []
            for w in waiting:
                w.callback(None)
            return result

        return d.addBoth(settled)

    def _quiet(self) -> Deferred[None]:
        if self._busy is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    # ---- BodySink

    def write(self, data: bytes) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write(bytes(data)))

    async def _write(self, data: bytes) -> None:
        if self.error is not None:
            raise HttpError(400, " ".join(self.error.description)[:300])
        if self.result is not None:
            return  # complete: the rest of the stream is ignored
        self.got_bytes = True
        try:
            self.api.tasks.check_cancelled(self.task)
            state = await self._run(self.parser.feed, data)
            if state == xva.NEED_DISKS:
                await self._prepare()
                state = await self._run(self.parser.feed, b"")
            if state == xva.DONE:
                await self._complete()
            elif self.total:
                self.api.tasks.progress(self.task, min(0.99, self.parser.received / self.total))
        except BaseException as exc:
            await self._failed(exc)
            assert self.error is not None
            raise HttpError(500 if self.error.code.startswith("INTERNAL") else 400,
                            " ".join(self.error.description)[:300]) from None

    async def _complete(self) -> None:
        """Every disk arrived: close them and create the objects (a client may cut the connection
        once it sent everything, as Xen Orchestra does for a body of unknown length)."""
        await self._run(self.parser.finish)
        sizes = await self._run(self._close_files)
        refs = self._commit_or_undo(sizes)
        self.result = refs
        await self.api.store.flush()
        finish_task(self.api, self.task, {"status": "success", "progress": 1.0,
                                             "result": encode_value(refs).decode()})
        self.slot.release()
        log.info("imported VM(s) {vms} (task {task})", vms=refs, task=self.task)

    def finish(self) -> Deferred[HttpResponse]:
        return Deferred.fromCoroutine(self._finish())

    async def _finish(self) -> HttpResponse:
        headers = [(b"task-id", self.task.encode()), (b"Content-Type", b"application/octet-stream")]
        try:
            if self.error is not None:
                raise self.error
            await self._quiet()
            if self.result is None:
                await self._complete()
            return HttpResponse(200, b"", headers)
        except BaseException as exc:
            await self._failed(exc)
            assert self.error is not None
            if not self.got_bytes:  # an empty body (a client probing for redirects): xapi's 200, the task failed
                return HttpResponse(200, b"", headers)
            status = 500 if self.error.code.startswith("INTERNAL") else 400
            return HttpResponse(status, (" ".join(self.error.description)[:1000] + "\n").encode(),
                                [TEXT, (b"task-id", self.task.encode())])

    def abort(self, reason: str) -> None:
        if self.result is not None:
            return  # the import is complete; the client only cut the rest
        log.info("import (task {task}) aborted: {reason}", task=self.task, reason=reason)
        Deferred.fromCoroutine(self._failed(xva.PrematureEnd(f"the import stream broke: {reason}"[:300])))

    # ---- the steps

    async def _failed(self, exc: BaseException) -> None:
        """Record the first failure on the task and remove every file made (once)."""
        if self.error is None:
            self.error = self.routes._fail_task(self.task, exc)
            log.info("import (task {task}) failed: {error}", task=self.task, error=self.error.description)
        if self._cleaned or self.result is not None:  # committed objects own their files
            return
        self._cleaned = True
        try:
            await self._quiet()
            await self._run(self._remove_files)
        except Exception:  # noqa: BLE001 - logged; nothing else can be done
            log.failure("cleaning up a failed import (task {task})", task=self.task)
        finally:
            self.slot.release()

    def _remove_files(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        for _, location in self.created:
            try:
                self.driver.mark_deleting(location)
                self.driver.purge(location)
            except StorageError:
                log.failure("removing {location} of a failed import", location=location)

    def _close_files(self) -> dict[str, int]:
        """fsync and close the disks; their allocated bytes by location."""
        for fd in self.fds:
            os.fsync(fd)
        for fd in list(self.fds):
            os.close(fd)
        self.fds = []
        return {loc: os.stat(self.driver.file(loc)).st_blocks * 512 for _, loc in self.created}

    async def _prepare(self) -> None:
        """After ova.xml: check every object, then create the disks' files and hand them over."""
        assert self.parser.ova is not None
        self.plan = self._plan(self.parser.ova[1])
        sizes = {ref_id: fields["virtual_size"] for ref_id, fields in self.plan.vdis}
        self.total = max(1, sum(sizes.values()))
        targets = []
        for ref_id, _ in self.plan.vdis:
            self.api.tasks.check_cancelled(self.task)
            disk = await self._run(self.driver.create, str(uuidlib.uuid4()), sizes[ref_id])
            self.created.append((ref_id, disk.location))
            fd = await self._run(os.open, str(self.driver.file(disk.location)), os.O_WRONLY)
            self.fds.append(fd)
            targets.append(xva.DiskTarget(ref_id, fd, sizes[ref_id]))
        self.parser.set_disks(targets)

    def _fields(self, cls: str, record: dict[str, Any], skip: set[str] = set()) -> dict[str, Any]:
        """The create fields of *record* (refs left out), coerced by the schema; IMPORT_ERROR when bad."""
        schema = self.api.schema
        limits = self.api.limits or DEFAULT_LIMITS
        out: dict[str, Any] = {}
        for f in schema.classes[cls].fields.values():
            if f.create == "no" or f.name in skip or f.name not in record or _has_ref(f.type):
                continue
            try:
                out[f.name] = coerce(f.type, record[f.name], f.name, schema.enums, limits)
            except XenAPIError as error:
                raise xva.XvaError(f"{cls} field {f.name}: {' '.join(error.description)[:200]}") from None
        return out

    def _network(self, record: dict[str, Any] | None) -> str:
        """The local network of an exported one: same name, else same bridge, else xenbr0's (or the first)."""
        networks = sorted(self.api.store.all("network"), key=lambda n: n.fields["name_label"])
        if not networks:
            raise xva.XvaError("this host has no network for the VM's network cards")
        if record is not None:
            for key in ("name_label", "bridge"):
                for net in networks:
                    if record.get(key) and net.fields[key] == record.get(key):
                        return str(net.ref)
        for net in networks:
            if net.fields["bridge"] == "xenbr0":
                return str(net.ref)
        return str(networks[0].ref)

    def _plan(self, objects: list[dict[str, Any]]) -> _Plan:
        if len(objects) > MAX_OBJECTS:
            raise xva.XvaError(f"ova.xml lists {len(objects)} objects (at most {MAX_OBJECTS})")
        by_id: dict[str, dict[str, Any]] = {}
        for obj in objects:
            if obj["id"] in by_id:
                raise xva.XvaError(f"ova.xml lists {obj['id'][:40]} twice")
            by_id[obj["id"]] = obj
        plan = _Plan()
        srs = {i: o["snapshot"] for i, o in by_id.items() if o["class"] == "SR"}

        def on_iso(record: dict[str, Any]) -> bool:
            sr = srs.get(str(record.get("SR", "")))
            return sr is not None and "iso" in (sr.get("type"), sr.get("content_type"))

        for ref_id, obj in by_id.items():
            if obj["class"] != "VDI" or on_iso(obj["snapshot"]):
                continue
            if not xva.is_ref_id(ref_id):
                raise xva.XvaError(f"a VDI id {ref_id[:40]!r} is not Ref:<n>")
            fields = self._fields("VDI", obj["snapshot"], {"SR"})
            size = fields.get("virtual_size", 0)
            if not 0 <= size <= MAX_DISK:
                raise xva.XvaError(f"VDI {ref_id} has a virtual size of {size} bytes (at most {MAX_DISK})")
            fields["virtual_size"] = size
            plan.vdis.append((ref_id, fields))
        if len(plan.vdis) > MAX_DISKS:
            raise xva.XvaError(f"the XVA holds {len(plan.vdis)} disks (at most {MAX_DISKS})")
        disk_ids = {ref_id for ref_id, _ in plan.vdis}
        for ref_id, obj in by_id.items():
            if obj["class"] == "VM":
                record = obj["snapshot"]
                if record.get("is_control_domain") in (True, "true", "1"):
                    raise xva.XvaError("the XVA holds a control domain")
                plan.vms.append((ref_id, self._fields("VM", record, _VM_SKIP), record))
        if not plan.vms:
            raise xva.XvaError("the XVA holds no VM")
        if len(plan.vms) > MAX_VMS:
            raise xva.XvaError(f"the XVA holds {len(plan.vms)} VMs (at most {MAX_VMS})")
        vm_ids = {ref_id for ref_id, _, _ in plan.vms}
        for obj in by_id.values():
            record = obj["snapshot"]
            if obj["class"] == "VBD" and record.get("VM") in vm_ids:
                fields = self._fields("VBD", record, {"empty", "currently_attached"})
                vdi = str(record.get("VDI", ""))
                if vdi not in disk_ids:
                    if fields.get("type") != "CD":
                        continue  # a disk whose data the XVA lacks: left out
                    vdi = ""
                plan.vbds.append((str(record["VM"]), vdi, fields))
            elif obj["class"] == "VIF" and record.get("VM") in vm_ids:
                fields = self._fields("VIF", record, {"currently_attached"})
                network = by_id.get(str(record.get("network", "")))
                fields["MAC"] = str(record.get("MAC", "")) if self.restore else ""
                plan.vifs.append((str(record["VM"]), self._network(network["snapshot"] if network else None), fields))
        return plan

    def _commit_or_undo(self, allocated: dict[str, int]) -> list[str]:
        """:meth:`_commit`, or (should a write fail half-way) none of its objects."""
        added: list[str] = []
        unsubscribe = self.api.store.subscribe(lambda change: added.append(change.ref) if change.op == "add" else None)
        try:
            return self._commit(allocated)
        except BaseException:
            with self.api.store.transaction():
                for ref in reversed(added):
                    if self.api.store.find(ref) is not None:
                        self.api.store.remove(ref)
            raise
        finally:
            unsubscribe()

    def _commit(self, allocated: dict[str, int]) -> list[str]:
        """Create the VDIs, VMs, VBDs and VIFs in one transaction; the new VM refs."""
        from xapid.objects.sr import update_sizes

        assert self.plan is not None
        store = self.api.store
        now = utc(self.api.clock())
        locations = dict(self.created)
        vdi_refs: dict[str, str] = {}
        vm_refs: dict[str, str] = {}
        with store.transaction():
            for ref_id, fields in self.plan.vdis:
                location = locations[ref_id]
                vdi_refs[ref_id] = store.add("VDI", {
                    **fields, "uuid": location.rsplit(".", 1)[0], "SR": self.sr, "location": location,
                    "physical_utilisation": allocated.get(location, 0), "sm_config": {"type": "raw"},
                    "read_only": False})
            for ref_id, fields, record in self.plan.vms:
                metrics = store.add("VM_metrics", {"install_time": now})
                vm_refs[ref_id] = store.add("VM", {**fields, "uuid": str(uuidlib.uuid4()), "power_state": "Halted",
                                                  "metrics": metrics})
            for ref_id, _, record in self.plan.vms:  # links between the imported VMs
                links = {k: vm_refs[record[k]] for k in ("snapshot_of", "parent") if record.get(k) in vm_refs}
                if links:
                    store.update(vm_refs[ref_id], links)
            for vm_id, vdi_id, fields in self.plan.vbds:
                store.add("VBD", {**fields, "VM": vm_refs[vm_id], "VDI": vdi_refs.get(vdi_id, NULL_REF),
                                  "empty": vdi_id == "", "currently_attached": False,
                                  "metrics": store.add("VBD_metrics", {})})
            for vm_id, network, fields in self.plan.vifs:
                mac = fields.pop("MAC", "") or random_mac(store)
                store.add("VIF", {**fields, "VM": vm_refs[vm_id], "network": network, "MAC": mac,
                                  "currently_attached": False, "metrics": store.add("VIF_metrics", {})})
            update_sizes(self.routes._ctx(None), self.sr)
        return [vm_refs[ref_id] for ref_id, _, _ in self.plan.vms]
