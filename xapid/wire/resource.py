"""The HTTP face of the API: which path speaks which protocol, and the reply envelopes.

``POST /jsonrpc`` is JSON-RPC; a POST on any other path is XML-RPC (as xapi resolves
handlers).  Replies carry exactly ``text/xml`` or ``application/json``.  API failures are
ordinary 200 replies; a body that is not a call gets HTTP 500 with a one-line reason.

Cross-origin calls from web pages (CORS) are allowed only from the configured origins
(``[server] cors_origins``): a request whose ``Origin`` is one of them (or any, with ``*``)
gets ``Access-Control-Allow-Origin`` naming it; no other reply carries the header.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid.errors import XenAPIError, internal_error_with_id
from xapid.wire import jsonrpc, xmlrpc
from xapid.wire.http import HttpFactory, HttpRequest, HttpResponse, HttpSettings
from xapid.wire.values import Limits, WireError

log = Logger()

_R = TypeVar("_R")

LIST_METHODS = "system.listMethods"
XML = [(b"Content-Type", b"text/xml")]
JSON = [(b"Content-Type", b"application/json")]
ALLOW_HEADERS = (b"Access-Control-Allow-Headers", b"X-Requested-With, Content-Type, Authorization")
ALLOW_METHODS = (b"Access-Control-Allow-Methods", b"GET, POST, OPTIONS")


Route = Callable[[HttpRequest], "HttpResponse | Deferred[Any]"]


def _with_headers(response: _R, headers: list[tuple[bytes, bytes]]) -> _R:
    if isinstance(response, HttpResponse):
        response.headers = [*response.headers, *headers]  # a copy: XML and JSON are shared lists
    return response


def _headless(response: HttpResponse) -> HttpResponse:
    response.body = b""
    return response


class ApiHandler:
    """Answers one HTTP request: a call, a CORS pre-flight, a GET route, or a short note.

    *routes* maps a GET path (no query, no trailing slash) to its handler; the wiring supplies
    them (the wire knows no endpoint).  GET / is the note; other unknown paths are 404.
    """

    def __init__(self, dispatcher: Any, limits: Limits, routes: dict[bytes, Route] | None = None,
                 cors_origins: tuple[str, ...] = (), put_routes: dict[bytes, Route] | None = None):
        self.dispatcher = dispatcher
        self.limits = limits
        self.routes = dict(routes or {})
        self.put_routes = dict(put_routes or {})  # PUT paths (/blob, /messages), as xapi serves them
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o.encode() for o in cors_origins if o != "*")

    def __call__(self, request: HttpRequest) -> HttpResponse | Deferred[Any]:
        result = self._route(request)
        if (self.any_origin or self.origins) and b"origin" in request.headers:
            origin = request.headers[b"origin"]
            if self.any_origin or origin in self.origins:
                allow = [(b"Access-Control-Allow-Origin", b"*" if self.any_origin else origin), ALLOW_HEADERS]
                if not self.any_origin:
                    allow.append((b"Vary", b"Origin"))
                if isinstance(result, Deferred):
                    return result.addCallback(_with_headers, allow)
                return _with_headers(result, allow)
        return result

    def _route(self, request: HttpRequest) -> HttpResponse | Deferred[Any]:
        if request.method == b"POST":
            return self._call(request)
        if request.method == b"OPTIONS":
            return HttpResponse(200, b"", [ALLOW_METHODS, (b"Allow", b"GET, HEAD, POST, OPTIONS")])
        if request.method in (b"GET", b"HEAD"):
            return self._get(request)
        if request.method == b"PUT" and (request.path.rstrip(b"/") or b"/") in self.put_routes:
            return self.put_routes[request.path.rstrip(b"/") or b"/"](request)
        return HttpResponse(405, b"method not allowed\n", [(b"Content-Type", b"text/plain"),
                                                          (b"Allow", b"GET, HEAD, POST, OPTIONS")])

    def _get(self, request: HttpRequest) -> HttpResponse | Deferred[Any]:
        path = request.path.rstrip(b"/") or b"/"
        route = self.routes.get(path)
        if route is not None:
            response = route(request)
            if request.method == b"HEAD":
                return response.addCallback(_headless) if isinstance(response, Deferred) else _headless(response)
            return response
        if path == b"/":
            body = b"xapid: the Xen-API is served by POST (XML-RPC on any path, JSON-RPC on /jsonrpc)\n"
            status = 200
        else:
            body, status = b"not found\n", 404
        return HttpResponse(status, b"" if request.method == b"HEAD" else body, [(b"Content-Type", b"text/plain")])

    def _call(self, request: HttpRequest) -> HttpResponse | Deferred[Any]:
        is_json = request.path.rstrip(b"/") == b"/jsonrpc"
        try:
            if is_json:
                call = jsonrpc.decode_call(request.body, self.limits)
                method, params = call.method, call.params
            else:
                method, params = xmlrpc.decode_call(request.body, self.limits)
        except WireError as exc:
            log.info("refused a request from {peer}: {reason}", peer=request.peer, reason=str(exc))
            return HttpResponse(500, (f"<html><head><title>500 Internal Server Error</title></head><body>"
                                      f"<h1>Internal Server Error</h1><p>{html.escape(str(exc))}</p></body></html>\n"
                                      ).encode(), [(b"Content-Type", b"text/html")])

        def reply(value: Any) -> HttpResponse:
            if is_json:
                return HttpResponse(200, jsonrpc.success(call, value), JSON)
            if method == LIST_METHODS:
                return HttpResponse(200, xmlrpc.bare(value), XML)
            return HttpResponse(200, xmlrpc.success(value), XML)

        def fail(failure: Failure) -> HttpResponse | Failure:
            if failure.check(CancelledError):
                return failure  # the client went away
            error = failure.value if failure.check(XenAPIError) else None
            if error is None:
                incident, error = internal_error_with_id()
                log.failure("unexpected failure answering {method} (internal error id {incident})", failure,
                            method=method, incident=incident)
            if is_json:
                return HttpResponse(200, jsonrpc.failure(call, error.description), JSON)
            return HttpResponse(200, xmlrpc.failure(error.description), XML)

        def safely(outcome: Any, build: Any) -> Any:
            try:
                return build(outcome)
            except Exception:  # noqa: BLE001 - an unencodable value must not hang the request
                log.failure("encoding the reply to {method} failed", method=method)
                try:
                    return fail(Failure(XenAPIError("INTERNAL_ERROR", "the reply could not be encoded")))
                except Exception:  # noqa: BLE001 - not even the failure encodes
                    return HttpResponse(500, b"the reply could not be encoded\n", [(b"Content-Type", b"text/plain")])

        d = self.dispatcher.call(method, params, request.client)
        if d.called:  # most calls finish at once: answer without another Deferred hop
            box: list[Any] = []
            d.addBoth(box.append)
            outcome = box[0]
            answer: HttpResponse = safely(outcome, fail if isinstance(outcome, Failure) else reply)
            return answer
        answers: Deferred[Any] = d.addCallbacks(lambda v: safely(v, reply), lambda f: safely(f, fail))
        return answers


def make_factory(handler: ApiHandler, settings: HttpSettings, clock: Any, admission: Any = None) -> HttpFactory:
    """The protocol factory a listening endpoint serves."""
    return HttpFactory(handler, settings, clock, admission)
