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

import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid.apitypes import NULL_REF, Type, format_datetime, utc
from xapid.auth.http import HttpCaller, HttpError, authenticate, internal_error, named_object, one, parse_query
from xapid.auth.roles import role_at_least
from xapid.backend.storage import FileSR, StorageError
from xapid.context import CallContext
from xapid.errors import XenAPIError, internal_error_with_id
from xapid.objects.devices import sr_driver, storage_error
from xapid.objects.vm_ops import check as check_vm_operation
from xapid.objects.vm_ops import operation
from xapid.transfer import xva
from xapid.transfer.xva_import import TEXT, ImportSink
from xapid.transfer.xva_import import has_ref as _has_ref
from xapid.transfer.limits import TransferLimitError, TransferSlots
from xapid.transfer.tasking import check_cancelled, fail_task, finish_task, open_task
from xapid.wire.http import BodyWriter, HttpRequest, HttpResponse

log = Logger()

EXPORT_ROLE = "vm-admin"  # xapi's http/get_export and http/get_export_metadata
IMPORT_ROLE = "vm-admin"  # xapi's http/put_import


def _flag(params: dict[str, list[str]], name: str) -> bool:
    value = one(params, name)
    return value is not None and value.lower() in ("", "true", "1", "yes", "on")


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
            return internal_error(request)

    def _ctx(self, task: str | None) -> CallContext:
        return CallContext(self.api, None, None, task)

    def _vm(self, params: dict[str, list[str]]) -> Any:
        obj, name = named_object(self.api.store, params, ("VM",), HttpError(400, "ref or uuid (the VM) is required"))
        if obj is None:
            raise HttpError(404, f"no VM {name}"[:200])
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
                    check_cancelled(self.api, task)
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
