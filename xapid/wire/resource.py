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
from dataclasses import replace
from typing import Any, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid import fanout
from xapid.apitypes import SharedValue
from xapid.errors import XenAPIError, internal_error_with_id
from xapid.wire import jsonrpc, xmlrpc
from xapid.wire.http import BodySink, HttpFactory, HttpRequest, HttpResponse, HttpSettings
from xapid.wire.origins import AllowedOrigins
from xapid.wire.values import Limits, WireError

log = Logger()

_R = TypeVar("_R")

LIST_METHODS = "system.listMethods"
XML = [(b"Content-Type", b"text/xml")]
JSON = [(b"Content-Type", b"application/json")]
ALLOW_HEADERS = (b"Access-Control-Allow-Headers", b"X-Requested-With, Content-Type, Authorization")
ALLOW_METHODS = (b"Access-Control-Allow-Methods", b"GET, POST, OPTIONS")


Route = Callable[[HttpRequest], "HttpResponse | Deferred[Any]"]
#: a streamed-body route: where the body goes (a sink), or the answer before any of it is read
SinkRoute = Callable[[HttpRequest], "BodySink | HttpResponse | Deferred[Any]"]


def _with_headers(response: _R, headers: list[tuple[bytes, bytes]]) -> _R:
    if isinstance(response, HttpResponse):  # a copy: responses and their header lists may be shared
        return cast(_R, replace(response, headers=[*response.headers, *headers], heads=None))
    return response


class _CorsSink:
    """A sink whose final reply carries the CORS headers."""

    def __init__(self, sink: BodySink, headers: list[tuple[bytes, bytes]]) -> None:
        self.sink = sink
        self.headers = headers

    def write(self, data: bytes) -> Deferred[None] | None:
        return self.sink.write(data)

    def finish(self) -> HttpResponse | Deferred[HttpResponse]:
        result = self.sink.finish()
        if isinstance(result, Deferred):
            return result.addCallback(_with_headers, self.headers)
        return _with_headers(result, self.headers)

    def abort(self, reason: str) -> None:
        self.sink.abort(reason)

    @property
    def early(self) -> HttpResponse | None:
        """The wrapped sink's early reply head, with the CORS headers."""
        early = getattr(self.sink, "early", None)
        return _with_headers(early, self.headers) if isinstance(early, HttpResponse) else None

    @property
    def complete(self) -> bool:
        return bool(getattr(self.sink, "complete", False))


def _sink_with_headers(result: Any, headers: list[tuple[bytes, bytes]]) -> BodySink | HttpResponse | Deferred[Any]:
    if isinstance(result, HttpResponse):
        return _with_headers(result, headers)
    if isinstance(result, BodySink):
        return _CorsSink(result, headers)
    return cast("BodySink | HttpResponse | Deferred[Any]", result)


def _headless(response: HttpResponse) -> HttpResponse:
    return replace(response, body=b"", heads=None)


class ApiHandler:
    """Answers one HTTP request: a call, a CORS pre-flight, a GET route, or a short note.

    *routes* maps a GET path (no query, no trailing slash) to its handler; the wiring supplies
    them (the wire knows no endpoint).  GET / is the note; other unknown paths are 404.
    *stream_routes* maps ``(method, path)`` to a route whose request body is streamed
    (:meth:`sink_for`); *connect_routes* maps a path to the handler of ``CONNECT path?query``
    (which answers with a takeover); CONNECT to any other target is 404, and never a call.
    """

    def __init__(self, dispatcher: Any, limits: Limits, routes: dict[bytes, Route] | None = None,
                 cors_origins: tuple[str, ...] = (), put_routes: dict[bytes, Route] | None = None,
                 stream_routes: dict[tuple[bytes, bytes], SinkRoute] | None = None,
                 connect_routes: dict[bytes, Route] | None = None):
        self.dispatcher = dispatcher
        self.limits = limits
        self.routes = dict(routes or {})
        self.put_routes = dict(put_routes or {})  # PUT paths (/blob, /messages), as xapi serves them
        self.stream_routes = dict(stream_routes or {})  # (method, path): a streamed body (/import_raw_vdi)
        self.connect_routes = dict(connect_routes or {})  # CONNECT paths (/console)
        self.cors = AllowedOrigins(cors_origins)

    def __call__(self, request: HttpRequest) -> HttpResponse | Deferred[Any]:
        return self._with_cors(request, self._route(request), _with_headers)

    def sink_for(self, request: HttpRequest) -> BodySink | HttpResponse | Deferred[Any] | None:
        """Where the body of a streamed route goes (called before the body is read); None for the
        other requests, whose body is buffered and given to :meth:`__call__`."""
        if not self.stream_routes:
            return None
        route = self.stream_routes.get((request.method, request.path.rstrip(b"/") or b"/"))
        if route is None:
            return None
        return self._with_cors(request, route(request), _sink_with_headers)

    def _with_cors(self, request: HttpRequest, result: _R, add: Callable[[Any, list[tuple[bytes, bytes]]], Any]) -> _R:
        """*result*, given by *add* the CORS headers a reply to *request* carries (when its Deferred
        fires, if it is one); *result* itself when there are none."""
        if not self.cors:
            return result
        origin = request.headers.get(b"origin")
        if origin is None or not self.cors.allows(origin):
            return result
        allow = [(b"Access-Control-Allow-Origin", b"*" if self.cors.any else origin), ALLOW_HEADERS]
        if not self.cors.any:
            allow.append((b"Vary", b"Origin"))
        if isinstance(result, Deferred):
            if isinstance(result, fanout.Wait):
                result.encode = None  # the headers change the reply: no express lane
            return cast(_R, result.addCallback(add, allow))
        return cast(_R, add(result, allow))

    def _route(self, request: HttpRequest) -> HttpResponse | Deferred[Any]:
        if request.method == b"POST":
            return self._call(request)
        if request.method == b"OPTIONS":
            return HttpResponse(200, b"", [ALLOW_METHODS, (b"Allow", b"GET, HEAD, POST, OPTIONS")])
        if request.method in (b"GET", b"HEAD"):
            return self._get(request)
        if request.method == b"PUT" and (request.path.rstrip(b"/") or b"/") in self.put_routes:
            return self.put_routes[request.path.rstrip(b"/") or b"/"](request)
        if request.method == b"CONNECT" and self.connect_routes:
            route = self.connect_routes.get(request.path.rstrip(b"/") or b"/") if request.path[:1] == b"/" else None
            if route is None:
                return HttpResponse(404, b"not found\n", [(b"Content-Type", b"text/plain")])
            return route(request)
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
            if isinstance(value, SharedValue):
                return shared_xmlrpc(value)
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
        encode: Callable[[Any], Any] = lambda value: safely(value, reply)
        if isinstance(d, fanout.Wait):  # woken with many others: the connection may send the reply early
            if is_json:  # a reply of its own (its id): the lane and the callback share it
                encode = d.encode = _once(encode)
            else:  # the one shared response: the callback finds the same
                d.encode = express_xmlrpc
        answers: Deferred[Any] = d.addCallbacks(encode, lambda f: safely(f, fail))
        return answers


def _once(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """*build*, giving the same object again when called again with the same value."""
    last: list[Any] = []

    def built(value: Any) -> Any:
        if last and last[0] is value:
            return last[1]
        result = build(value)
        last[:] = (value, result)
        return result

    return built


def express_xmlrpc(value: Any) -> HttpResponse | None:
    """:func:`shared_xmlrpc` of *value* when it is shared (the express lane's encoder), else None;
    None too when it cannot be encoded: the callback then tries again and answers the error (logged once)."""
    if not isinstance(value, SharedValue):
        return None
    try:
        return shared_xmlrpc(value)
    except Exception:  # noqa: BLE001 - reported by the callback's own encoding
        return None


def shared_xmlrpc(value: SharedValue) -> HttpResponse:
    """The XML-RPC reply carrying *value*, answered to many (event.from): built once per value, with
    its heads (:attr:`HttpResponse.heads`)."""
    shared = value.replies.get("xmlrpc")
    if shared is None:
        shared = value.replies["xmlrpc"] = HttpResponse(200, xmlrpc.success(value), XML, heads={})
    return cast(HttpResponse, shared)


def make_factory(handler: ApiHandler, settings: HttpSettings, clock: Any, admission: Any = None) -> HttpFactory:
    """The protocol factory a listening endpoint serves."""
    return HttpFactory(handler, settings, clock, admission)
