"""``/console``: a VM's console over the API port, as xapi serves it (``xapi/console.ml``).

``CONNECT /console?ref=…`` (or ``uuid=``; a VM, whose first ``rfb`` console is used, else its
``vt100`` one, or a console) answers ``HTTP/1.1 200 OK``, ``Connection: keep-alive``,
``Cache-Control: no-cache, no-store`` and then relays raw bytes both ways.  ``GET /console``
with a WebSocket upgrade does the same with binary WebSocket frames (the ``binary``
subprotocol when offered, as noVNC does).

Credentials as for every HTTP handler (:mod:`xapid.auth.http`): ``session_id`` query parameter
or cookie, or HTTP Basic.  Role vm-operator; the control domain's console pool-admin.  A
WebSocket upgrade from a web page (an ``Origin`` header) without a ``session_id`` parameter
must come from the daemon's own origin or one of ``[server] cors_origins``: a cookie or
cached Basic credentials are not enough for another site's page (cross-site WebSocket
hijacking).

Refusals as xapi: no ``ref``/``uuid``, or a VM that is not running, 500; an unknown object or a
VM without such a console, 404; no or bad credentials, 401; a role too low, 403; too many
console sessions (``[limits] max_consoles``, ``max_consoles_per_vm``, ``max_consoles_per_user``),
503 with ``Retry-After``; a bad upgrade,
400 (426 for another WebSocket version); ``GET`` without an upgrade, 400.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid.auth.http import HttpCaller, HttpError, authenticate, internal_error, named_object, one, parse_query
from xapid.auth.roles import ROLES, role_at_least
from xapid.backend.interface import BackendError, BadDomainState, ConsoleEndpoint, NoConsole, NoSuchDomain
from xapid.console import websocket as ws
from xapid.console.relay import ConsoleLimits, ConsoleSession
from xapid.constants import DOM0_UUID
from xapid.wire.http import HttpRequest, HttpResponse
from xapid.wire.origins import AllowedOrigins, normal

log = Logger()

CONSOLE_ROLE = "vm-operator"
HOST_CONSOLE_ROLE = "pool-admin"  # xapi's http/connect_console/host_console
CONNECTED = [(b"Connection", b"keep-alive"), (b"Cache-Control", b"no-cache, no-store")]


class ConsoleRoutes:
    """The ``/console`` handlers of the API port (CONNECT and the GET upgrade)."""

    def __init__(self, api: Any, limits: ConsoleLimits, cors_origins: tuple[str, ...] = ()) -> None:
        self.api = api
        self.limits = limits
        self.cors = AllowedOrigins(cors_origins)

    def connect_routes(self) -> dict[bytes, Any]:
        return {b"/console": self.connect}

    def get_routes(self) -> dict[bytes, Any]:
        return {b"/console": self.get}

    def connect(self, request: HttpRequest) -> Deferred[HttpResponse]:
        return Deferred.fromCoroutine(self._serve(request, websocket=False))

    def get(self, request: HttpRequest) -> Deferred[HttpResponse]:
        return Deferred.fromCoroutine(self._serve(request, websocket=True))

    async def _serve(self, request: HttpRequest, websocket: bool) -> HttpResponse:
        try:
            return await self._open(request, websocket)
        except HttpError as error:
            return error.response()
        except Exception:  # noqa: BLE001 - never a traceback to the client
            return internal_error(request)

    async def _open(self, request: HttpRequest, websocket: bool) -> HttpResponse:
        params = parse_query(request)
        caller = await authenticate(self.api, request, params)
        if caller.role not in ROLES or not role_at_least(caller.role, CONSOLE_ROLE):
            raise HttpError(403, f"role {caller.role} may not open consoles: it needs {CONSOLE_ROLE}")
        upgrade: list[tuple[bytes, bytes]] = []
        if websocket:
            if not ws.is_upgrade(request.headers):
                raise HttpError(400, "GET /console needs a WebSocket upgrade (or use CONNECT)")
            self._check_origin(request, params)
            try:
                upgrade = ws.accept(request.method, request.version, request.headers)
            except ws.HandshakeError as exc:
                raise HttpError(exc.status, str(exc), exc.headers) from None
        vm, protocol = self._target(params)
        control = bool(vm.fields["is_control_domain"])
        if control and not role_at_least(caller.role, HOST_CONSOLE_ROLE):
            raise HttpError(403, f"role {caller.role} may not open the control domain's console: "
                                 f"it needs {HOST_CONSOLE_ROLE}")
        if vm.fields["power_state"] != "Running":
            raise HttpError(500, f"VM {vm.fields['uuid']} is {vm.fields['power_state']}, not Running")
        if protocol is None:
            raise HttpError(404, f"VM {vm.fields['uuid']} has no console")
        # callers without a name share one per-user count; a pool-admin (Xen Orchestra's one
        # connection proxies every XO user's consoles) counts in the total and per VM only
        user = None if role_at_least(caller.role, HOST_CONSOLE_ROLE) else caller.user or ""
        why = self.limits.full(vm.ref, user)  # before the driver's look-up, which scans /proc in a worker thread
        if why:
            raise HttpError(503, why, ((b"Retry-After", b"10"),))
        endpoint = await self._endpoint(DOM0_UUID if control else vm.fields["uuid"], protocol)
        label = f"{vm.fields['uuid']}/{protocol} for {caller.user or '?'}"
        self._log(caller, vm, protocol, websocket, request)
        reactor, limits, ref = self.api.reactor, self.limits, vm.ref

        def session() -> ConsoleSession:
            return ConsoleSession(endpoint, reactor, limits, ref, websocket=websocket, label=label, user=user)

        if websocket:
            return HttpResponse(101, b"", upgrade, takeover=session)
        return HttpResponse(200, b"", list(CONNECTED), takeover=session)

    def _target(self, params: dict[str, list[str]]) -> tuple[Any, str | None]:
        """The VM and the console protocol named by ``ref``/``uuid`` (None: the VM has no console)."""
        store = self.api.store
        obj, name = named_object(store, params, ("VM", "console"),
                                 HttpError(500, "a ref or uuid parameter naming a VM or a console is needed"))
        if obj is None:
            raise HttpError(404, f"no VM or console {name}")
        if obj.cls == "console":
            vm = store.find(obj.fields["VM"])
            if vm is None:
                raise HttpError(404, f"console {obj.fields['uuid']} belongs to no VM")
            return vm, obj.fields["protocol"]
        if obj.fields["is_a_template"] or obj.fields["is_a_snapshot"]:
            raise HttpError(500, f"{obj.fields['uuid']} is a template or snapshot: it has no console")
        protocols = [store.get(c, "console").fields["protocol"] for c in obj.fields["consoles"]]
        if "rfb" in protocols:
            return obj, "rfb"
        if protocols or obj.fields["is_control_domain"]:
            return obj, protocols[0] if protocols else "vt100"
        return obj, None

    async def _endpoint(self, domain: str, protocol: str) -> ConsoleEndpoint:
        try:
            return await self.api.hypervisor.console_endpoint(domain, protocol)
        except NoConsole as exc:
            raise HttpError(404, exc.message) from None
        except (BadDomainState, NoSuchDomain) as exc:
            raise HttpError(500, f"the VM is not running here: {exc.message}") from None
        except BackendError as exc:
            log.warn("console of {domain}: driver failure: {error}", domain=domain, error=exc.message)
            raise HttpError(500, f"the console cannot be found: {exc.message}") from None

    def _check_origin(self, request: HttpRequest, params: dict[str, list[str]]) -> None:
        """A browser page of another origin must name the session itself (see the module doc)."""
        origin = request.headers.get(b"origin")
        if origin is None or one(params, "session_id") or self.cors.allows(origin):
            return
        text = normal(origin.decode("latin-1"))
        host = request.headers.get(b"host", b"").decode("latin-1").lower()
        try:
            netloc = urlsplit(text).netloc
        except ValueError:
            netloc = ""
        if host and netloc == host:
            return
        raise HttpError(403, f"WebSocket from origin {text[:100]!r} refused: pass session_id in the query, "
                             f"or list the origin in [server] cors_origins")

    def _log(self, caller: HttpCaller, vm: Any, protocol: str, websocket: bool, request: HttpRequest) -> None:
        log.info("{user} ({role}) opens the {protocol} console of VM {vm} by {how} from {peer}", user=caller.user,
                 role=caller.role, protocol=protocol, vm=vm.fields["uuid"], how="WebSocket" if websocket else "CONNECT",
                 peer=request.peer)
        audit = getattr(self.api, "audit", None)
        if audit is None:
            return
        try:
            client = getattr(request, "client", None)
            audit.record(method=f"HTTP {request.method.decode('latin-1')} /console", user=caller.user, role=caller.role,
                         originator=None, peer=client.address if client is not None else None,
                         args={"vm": vm.ref, "protocol": protocol}, outcome="success")
        except Exception:  # noqa: BLE001 - the audit never changes the answer
            log.failure("writing an audit line failed")
