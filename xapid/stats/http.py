"""The GET endpoints of the API port: the metrics exports, authenticated as xapi does.

============================  ==============================================================
``/rrd_updates``              xapi's xport rows: ``start`` (required; negative = relative),
                              ``cf``, ``interval``, ``host=true``, ``vm_uuid`` (repeatable),
                              ``json=true`` (or ``Accept: application/json``)
``/host_rrd``                 the host's whole RRD, rrdtool-dump XML (``json=true``: JSON)
``/vm_rrd?uuid=``             one VM's whole RRD; 404 when it has none
``/metrics``                  Prometheus text exposition (also on ``[stats] prometheus_listen``,
                              without authentication)
``/audit_log``                the audit log's current file as text, pool-admin only;
                              ``since=`` ISO 8601 time (or Unix seconds) keeps later lines
``/blob?ref=`` (or ``uuid=``)  a blob's data with its MIME type; a public blob without
                              credentials (xapi); ``PUT`` writes it (the role of the owner's
                              ``create_new_blob``; at most ``[limits] max_blob_bytes``)
``/messages``                 messages in xapi's message XML (``cls=``, ``uuid=``, ``since=``
                              filter); ``PUT /messages?cls=&uuid=`` imports them as xapi
                              does (vm-power-admin)
============================  ==============================================================

Credentials: ``session_id`` as a query parameter or a cookie (a live API session), or HTTP
Basic ``user:password`` checked against the users file by the API's
:class:`~xapid.auth.login.PasswordChecker`, with the same per-source limits as ``session.login*`` (a
failure waits ``auth_failure_delay`` like a failed login).  None or a bad one is 401 with
``WWW-Authenticate: Basic realm="xapid"``; a role below read-only would be 403.  ``task_id`` is
accepted (Xen Orchestra sends one) and not needed.  Bad parameters are 400 with one line.
"""

from __future__ import annotations

from datetime import datetime, timezone
import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid.apitypes import utc
from xapid.audit import parse_since
from xapid.auth.http import TEXT, HttpError, authenticate, internal_error, named_object, one, parse_query
from xapid.auth.roles import ROLES, role_at_least
from xapid.stats import export, prometheus
from xapid.wire.http import HttpRequest, HttpResponse

log = Logger()

READ_ROLE = "read-only"
AUDIT_ROLE = "pool-admin"
MESSAGES_PUT_ROLE = "vm-power-admin"  # xapi's put_messages


def _number(params: dict[str, list[str]], name: str, default: float | None = None) -> float | None:
    text = one(params, name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise HttpError(400, f"{name} must be a number, not {text!r}")
    return value


def _flag(params: dict[str, list[str]], name: str) -> bool:
    return (one(params, name) or "").lower() in ("true", "1", "yes", "on")


def _wants_json(request: HttpRequest, params: dict[str, list[str]]) -> bool:
    """``json=true``, else the Accept header's preference between application/json and text/xml."""
    if "json" in params:
        return _flag(params, "json") or one(params, "json") == ""
    accept = request.headers.get(b"accept", b"").decode("latin-1")
    best_json = best_xml = -1.0
    for item in accept.split(","):
        kind, _, rest = item.strip().partition(";")
        quality = 1.0
        for param in rest.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        kind = kind.strip().lower()
        if kind in ("application/json", "*/*"):
            best_json = max(best_json, quality)
        elif kind in ("text/xml", "application/xml"):
            best_xml = max(best_xml, quality)
    return best_json > best_xml


class HttpExports:
    """Builds the GET routes from the API (sessions, users, runner, metrics engine, store)."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.registry = prometheus.registry_for(
            prometheus.MetricsCollector(api.stats.table, self._owner_names, self._power_states))

    def routes(self) -> dict[bytes, Callable[[HttpRequest], HttpResponse | Deferred]]:
        """The authenticated routes of the API port."""
        return {b"/rrd_updates": self._guarded(self._rrd_updates), b"/host_rrd": self._guarded(self._host_rrd),
                b"/vm_rrd": self._guarded(self._vm_rrd), b"/metrics": self._guarded(self._metrics),
                b"/audit_log": self._guarded(self._audit_log, AUDIT_ROLE),
                b"/blob": lambda request: Deferred.fromCoroutine(self._serve(request, self._get_blob, False)),
                b"/messages": self._guarded(self._get_messages)}

    def put_routes(self) -> dict[bytes, Callable[[HttpRequest], HttpResponse | Deferred]]:
        """The PUT routes (xapi's put_blob and put_messages)."""
        return {b"/blob": lambda request: Deferred.fromCoroutine(self._serve(request, self._put_blob, False)),
                b"/messages": self._guarded(self._put_messages, MESSAGES_PUT_ROLE)}

    def open_routes(self) -> dict[bytes, Callable[[HttpRequest], HttpResponse | Deferred]]:
        """``/metrics`` without authentication, for a dedicated Prometheus endpoint."""
        return {b"/metrics": lambda request: self._answer_now(request, self._metrics)}

    # ---------------------------------------------------------------------------- plumbing

    def _answer_now(self, request: HttpRequest, handler: Callable[..., Any]) -> HttpResponse | Deferred:
        return Deferred.fromCoroutine(self._serve(request, handler, authenticate=False))

    def _guarded(self, handler: Callable[..., Any], need: str = READ_ROLE) -> Callable[[HttpRequest], Deferred]:
        return lambda request: Deferred.fromCoroutine(self._serve(request, handler, authenticate=True, need=need))

    async def _serve(self, request: HttpRequest, handler: Callable[..., Any], authenticate: bool,
                     need: str = READ_ROLE) -> HttpResponse:
        try:
            params = parse_query(request)
            if authenticate:
                await self._authenticate(request, params, need)
            return await handler(request, params)
        except HttpError as error:
            return error.response()
        except Exception:  # noqa: BLE001 - never a traceback to the client, never a dead connection
            return internal_error(request)

    async def _authenticate(self, request: HttpRequest, params: dict[str, list[str]], need: str = READ_ROLE) -> str:
        """The caller's role, from a session (query or cookie) or HTTP Basic; HttpError otherwise."""
        role = (await authenticate(self.api, request, params)).role
        if role not in ROLES or not role_at_least(role, READ_ROLE):
            raise HttpError(403, f"role {role} may not read metrics")
        if not role_at_least(role, need):
            raise HttpError(403, f"role {role} may not read {request.path.decode('latin-1')}: it needs {need}")
        return role

    def _owner_names(self) -> dict[str, str]:
        store = self.api.store
        names = {f"vm:{vm.fields['uuid']}": vm.fields["name_label"] for vm in store.all("VM")}
        names.update({f"host:{h.fields['uuid']}": h.fields["hostname"] for h in store.all("host")})
        return names

    def _power_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for vm in self.api.store.all("VM"):
            f = vm.fields
            if not f["is_a_template"] and not f["is_control_domain"] and not f["is_a_snapshot"]:
                counts[f["power_state"]] = counts.get(f["power_state"], 0) + 1
        return counts

    def _reply(self, body: bytes, as_json: bool) -> HttpResponse:
        kind = b"application/json" if as_json else b"text/xml"
        return HttpResponse(200, body, [(b"Content-Type", kind)])

    # ---------------------------------------------------------------------------- endpoints

    async def _rrd_updates(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        start = _number(params, "start")
        if start is None:
            raise HttpError(400, "start is required (Unix seconds; negative: relative to the last update)")
        interval = _number(params, "interval", 0.0) or 0.0
        cf = one(params, "cf") or None
        as_json = _wants_json(request, params)
        table = self.api.stats.table
        owners: list[str] = []
        if _flag(params, "host"):
            owners.append(f"host:{self.api.store.get(self.api.host_ref).fields['uuid']}")
        wanted = params.get("vm_uuid")
        if wanted:
            owners += [f"vm:{u}" for u in dict.fromkeys(wanted)]
        else:
            owners += [f"vm:{vm.fields['uuid']}" for vm in self.api.store.all("VM")
                       if vm.fields["power_state"] in ("Running", "Paused")]
        known = set(table.owners())
        keys = [(owner, ds.name) for owner in owners if owner in known for ds in table.sources(owner)]
        try:
            rows = export.xport_rows(table, keys, start, interval, cf.upper() if cf else None)
        except export.ExportError as exc:
            raise HttpError(400, str(exc)) from None
        body = await self.api.runner.run(export.render_xport, rows, as_json)
        return self._reply(body, as_json)

    async def _dump(self, owner: str, as_json: bool, missing: str) -> HttpResponse:
        try:
            rrd = self.api.stats.table.dump(owner)
        except KeyError:
            raise HttpError(404, missing) from None
        return self._reply(await self.api.runner.run(export.render_dump, rrd, as_json), as_json)

    async def _host_rrd(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        host_uuid = self.api.store.get(self.api.host_ref).fields["uuid"]
        return await self._dump(f"host:{host_uuid}", _flag(params, "json"), "the host has no metrics archives yet")

    async def _vm_rrd(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        uuid = one(params, "uuid")
        if not uuid:
            raise HttpError(400, "uuid is required")
        return await self._dump(f"vm:{uuid}", _flag(params, "json"), f"no metrics archives for VM {uuid}")

    async def _audit_log(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        """The audit log's current file as text (xapi's /audit_log); ``since=`` an ISO 8601 time
        (no zone: UTC) or Unix seconds keeps the lines at or after it."""
        text = one(params, "since")
        since = None
        if text:
            try:
                since = parse_since(text)
            except (ValueError, OverflowError, OSError):
                raise HttpError(400, f"since must be an ISO 8601 time or Unix seconds, not {text!r}") from None
        body = await self.api.runner.run(self.api.audit.read, since) if self.api.audit is not None else b""
        return HttpResponse(200, body, [TEXT])

    async def _metrics(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        body = prometheus.exposition(self.registry)
        return HttpResponse(200, body, [(b"Content-Type", prometheus.CONTENT_TYPE)])

    # ---------------------------------------------------------------------------- blobs, messages

    def _blob(self, params: dict[str, list[str]]) -> Any:
        obj, _ = named_object(self.api.store, params, ("blob",), HttpError(400, "ref or uuid is required"))
        if obj is None:
            raise HttpError(404, "Unknown reference")
        return obj

    async def _get_blob(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        """A blob's data (xapi's get_blob: public blobs need no credentials)."""
        from xapid.objects.blob import blob_path, read_data

        obj = self._blob(params)
        if not obj.fields["public"]:
            await self._authenticate(request, params)
        data = await self.api.runner.run(read_data, blob_path(self.api, obj.fields["uuid"]))
        if data is None:
            raise HttpError(404, "the blob has no data")
        return HttpResponse(200, data, [(b"Content-Type", obj.fields["mime_type"].encode("ascii")),
                                        (b"X-Content-Type-Options", b"nosniff"),
                                        (b"Content-Security-Policy", b"sandbox; default-src 'none'")])

    async def _put_blob(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        """Replace a blob's data; the caller needs the role of the owner's create_new_blob."""
        from xapid.objects.blob import blob_path, put_role, write_data

        obj = self._blob(params)
        await self._authenticate(request, params, put_role(self.api, obj.ref))
        limit = self.api.max_blob_bytes
        if len(request.body) > limit:
            raise HttpError(413, f"a blob holds at most {limit} bytes ([limits] max_blob_bytes)")
        await self.api.runner.run(write_data, blob_path(self.api, obj.fields["uuid"]), bytes(request.body))
        store = self.api.store
        if store.exists(obj.ref, "blob"):
            store.update(obj.ref, {"size": len(request.body),
                                   "last_updated": utc(self.api.clock())})
            await store.flush()
        return HttpResponse(200, b"", [TEXT])

    async def _get_messages(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        """Messages in xapi's message XML, oldest first; cls=, uuid= and since= filter them."""
        from xapid.objects.messages import export_xml

        cls, uuid, text = one(params, "cls"), one(params, "uuid"), one(params, "since")
        since = None
        if text:
            try:
                since = _seconds(text)
            except (ValueError, OverflowError):
                raise HttpError(400, f"since must be an ISO 8601 time or Unix seconds, not {text!r}") from None
        objs = [o for o in self.api.store.all("message")
                if (not cls or o.fields["cls"] == cls) and (not uuid or o.fields["obj_uuid"] == uuid)
                and (since is None or o.fields["timestamp"].timestamp() >= since)]
        objs.sort(key=lambda o: o.fields["timestamp"])
        return HttpResponse(200, export_xml(objs), [(b"Content-Type", b"text/xml")])

    async def _put_messages(self, request: HttpRequest, params: dict[str, list[str]]) -> HttpResponse:
        """xapi's put_messages: messages (its XML) about the object uuid= of class cls=."""
        from xapid.objects.messages import CLASSES, import_xml, object_exists

        cls, uuid = one(params, "cls"), one(params, "uuid")
        if not cls or not uuid:
            raise HttpError(400, "cls and uuid are required")
        if cls not in CLASSES:
            raise HttpError(400, f"bad class {cls!r}")
        if not object_exists(self.api.store, cls, uuid):
            raise HttpError(400, f"bad uuid {uuid!r}")
        try:
            count = import_xml(self.api, bytes(request.body))
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        await self.api.store.flush()
        return HttpResponse(200, f"{count} messages imported\n".encode(), [TEXT])


def _seconds(text: str) -> float:
    """ISO 8601 (no zone: UTC) or Unix seconds; ValueError for anything else."""
    try:
        seconds = float(text)
    except ValueError:
        when = datetime.fromisoformat(text.strip())
        seconds = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if not math.isfinite(seconds):
        raise ValueError(text)
    return seconds
