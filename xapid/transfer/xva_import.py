"""The body of ``PUT /import`` (:mod:`xapid.transfer.xva_routes`): the XVA parsed in the thread
pool, every object checked before a disk file is made, the objects created in one transaction
once every disk arrived, every file removed on a failure or a cancel."""

from __future__ import annotations

import os
import uuid as uuidlib
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from xapid.apitypes import NULL_REF, Type, coerce, utc
from xapid.auth.http import HttpError
from xapid.backend.storage import PARTIAL, READY, FileSR, StorageError
from xapid.errors import XenAPIError
from xapid.objects.devices import random_mac
from xapid.transfer import xva
from xapid.transfer.limits import MAX_DISK
from xapid.transfer.tasking import check_cancelled, finish_task, publish_committed
from xapid.wire.http import HttpResponse
from xapid.wire.values import DEFAULT_LIMITS
from xapid.wire.xmlrpc import encode_value

if TYPE_CHECKING:
    from xapid.transfer.xva_routes import XvaRoutes

log = Logger()

TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
MAX_OBJECTS = 10_000  # objects in one ova.xml
MAX_VMS = 256
MAX_DISKS = 256  # disks in one XVA: each is a file held open until the import ends

# VM fields that describe one instance, never imported from a record
_VM_SKIP = {"uuid", "power_state", "suspend_VDI", "affinity", "suspend_SR", "snapshot_of", "parent",
            "is_control_domain", "domid", "resident_on"}


def has_ref(t: Type | None) -> bool:
    """Whether values of *t* hold refs (a ref, or a set or map of them)."""
    return t is not None and (t.kind == "ref" or has_ref(t.elem) or has_ref(t.key))


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
        """*fn* in the thread pool, tracked; refused once the import failed, so that nothing starts
        beside (or after) its cleanup: :meth:`_failed`'s cleanup uses :meth:`_track` itself."""
        if self.error is not None:
            return fail(self.error)
        return self._track(self.api.runner.run(fn, *args))

    def _alive(self) -> None:
        """Raise the recorded failure, if any: each step checks it after waiting on the pool,
        since the import may have failed (the client gone, a cancel) meanwhile."""
        if self.error is not None:
            raise self.error

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
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
            check_cancelled(self.api, self.task)
            state = await self._run(self.parser.feed, data)
            self._alive()
            if state == xva.NEED_DISKS:
                await self._prepare()
                state = await self._run(self.parser.feed, b"")
                self._alive()
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
        once it sent everything, as Xen Orchestra does for a body of unknown length).  The disks
        go under their names only once the objects are committed: a crash before leaves ``.ready``
        files without records (removed at the next start), a crash after leaves records whose
        ``.ready`` files the next start puts in place."""
        await self._run(self.parser.finish)
        sizes = await self._run(self._close_files)
        self._alive()  # failed while the disks were being closed: the cleanup owns them
        refs = self._commit_or_undo(sizes)
        self.result = refs
        await self.api.store.flush()
        await publish_committed(self.api, self.driver, [location for _, location in self.created])
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
            await self._track(self.api.runner.run(self._remove_files))
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
                self.driver.remove_partial(location + PARTIAL)  # not yet complete (the usual case)
                self.driver.remove_partial(location + READY)  # complete, the objects not created
                self.driver.mark_deleting(location)  # published, but the objects were not created
                self.driver.purge(location)
            except StorageError:
                log.failure("removing {location} of a failed import", location=location)

    def _close_files(self) -> dict[str, int]:
        """fsync and close the disks and mark them ready (whole, not yet under their names); their
        allocated bytes by location.  (A crash before this leaves only partial files, removed at
        the next start.)"""
        for fd in self.fds:
            os.fsync(fd)
        for fd in list(self.fds):
            os.close(fd)
        self.fds = []
        for _, location in self.created:
            self.driver.make_ready(location)
        return {loc: os.stat(self.driver.sibling(loc, READY)).st_blocks * 512 for _, loc in self.created}

    async def _prepare(self) -> None:
        """After ova.xml: check every object, then create the disks' files and hand them over."""
        assert self.parser.ova is not None
        self.plan = self._plan(self.parser.ova[1])
        sizes = {ref_id: fields["virtual_size"] for ref_id, fields in self.plan.vdis}
        self.total = max(1, sum(sizes.values()))
        targets = []
        for ref_id, _ in self.plan.vdis:
            check_cancelled(self.api, self.task)
            fd = await self._run(self._begin_disk, ref_id, sizes[ref_id])
            self._alive()  # failed meanwhile: the cleanup closes and removes what was made
            targets.append(xva.DiskTarget(ref_id, fd, sizes[ref_id]))
        self.parser.set_disks(targets)

    def _begin_disk(self, ref_id: str, size: int) -> int:
        """(In the thread) a new partial disk, recorded for the cleanup before this job ends."""
        location, fd = self.driver.begin(str(uuidlib.uuid4()), size)
        self.created.append((ref_id, location))
        self.fds.append(fd)
        return fd

    def _fields(self, cls: str, record: dict[str, Any], skip: set[str] = set()) -> dict[str, Any]:
        """The create fields of *record* (refs left out), coerced by the schema; IMPORT_ERROR when bad."""
        schema = self.api.schema
        limits = self.api.limits or DEFAULT_LIMITS
        out: dict[str, Any] = {}
        for f in schema.classes[cls].fields.values():
            if f.create == "no" or f.name in skip or f.name not in record or has_ref(f.type):
                continue
            try:
                out[f.name] = coerce(f.type, record[f.name], f.name, schema.enums, limits)
            except XenAPIError as error:
                raise xva.XvaError(f"{cls} field {f.name}: {' '.join(error.description)[:200]}") from None
        return out

    @staticmethod
    def _network(record: dict[str, Any] | None, networks: list[Any]) -> str:
        """The local network of an exported one: same name, else same bridge, else xenbr0's (or the
        first of *networks*, sorted by name)."""
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
        networks = sorted(self.api.store.all("network"), key=lambda n: n.fields["name_label"])
        for obj in by_id.values():
            record = obj["snapshot"]
            owner = record.get("VM")
            if not isinstance(owner, str) or owner not in vm_ids:  # another VM's, or not a Ref id at all
                continue
            if obj["class"] == "VBD":
                fields = self._fields("VBD", record, {"empty", "currently_attached"})
                vdi = str(record.get("VDI", ""))
                if vdi not in disk_ids:
                    if fields.get("type") != "CD":
                        continue  # a disk whose data the XVA lacks: left out
                    vdi = ""
                plan.vbds.append((owner, vdi, fields))
            elif obj["class"] == "VIF":
                fields = self._fields("VIF", record, {"currently_attached"})
                network = by_id.get(str(record.get("network", "")))
                fields["MAC"] = str(record.get("MAC", "")) if self.restore else ""
                plan.vifs.append((owner, self._network(network["snapshot"] if network else None, networks), fields))
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
                links = {k: vm_refs[v] for k in ("snapshot_of", "parent")
                         if isinstance(v := record.get(k), str) and v in vm_refs}
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
