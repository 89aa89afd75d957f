"""The HTTP face: one leaf resource for every path.

``POST /jsonrpc`` is JSON-RPC; a POST on any other path is XML-RPC (as xapi resolves
handlers).  Replies carry exactly ``text/xml`` or ``application/json``.  API failures are
ordinary 200 replies; a body that is not a call gets HTTP 500 with a one-line reason.
"""

from __future__ import annotations

import html
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from xapid.errors import XenAPIError
from xapid.wire import jsonrpc, xmlrpc
from xapid.wire.values import Limits, WireError

log = Logger()

LIST_METHODS = "system.listMethods"


def _cors(request: server.Request) -> None:
    request.setHeader(b"Access-Control-Allow-Origin", b"*")
    request.setHeader(b"Access-Control-Allow-Headers", b"X-Requested-With, Content-Type")


class ApiResource(resource.Resource):
    isLeaf = True

    def __init__(self, dispatcher: Any, limits: Limits):
        super().__init__()
        self.dispatcher = dispatcher
        self.limits = limits

    def render_OPTIONS(self, request: server.Request) -> bytes:
        _cors(request)
        request.setHeader(b"Access-Control-Allow-Methods", b"POST, OPTIONS")
        request.setResponseCode(http.OK)
        return b""

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"xapid: the Xen-API is served by POST (XML-RPC on any path, JSON-RPC on /jsonrpc)\n"

    def render_POST(self, request: server.Request) -> Any:
        body = request.content.read(self.limits.max_body + 1)
        is_json = request.path.rstrip(b"/") == b"/jsonrpc"
        try:
            if is_json:
                call = jsonrpc.decode_call(body, self.limits)
                method, params = call.method, call.params
            else:
                method, params = xmlrpc.decode_call(body, self.limits)
        except WireError as exc:
            return self._bad_request(request, str(exc))
        d = self.dispatcher.call(method, params)
        finished = [False]

        def gone(_: Any) -> None:
            finished[0] = True
            if not d.called:
                d.cancel()  # the client went away: stop waiting (e.g. an abandoned event.from)

        request.notifyFinish().addBoth(gone)

        def reply(value: Any) -> None:
            if is_json:
                self._send(request, b"application/json", jsonrpc.success(call, value))
            elif method == LIST_METHODS:
                self._send(request, b"text/xml", xmlrpc.bare(value))
            else:
                self._send(request, b"text/xml", xmlrpc.success(value))

        def fail(failure: Failure) -> None:
            if failure.check(CancelledError) and finished[0]:
                return
            error = failure.value if failure.check(XenAPIError) else None
            if error is None:
                log.failure("unexpected failure answering {method}", failure, method=method)
                error = XenAPIError("INTERNAL_ERROR", str(failure.value))
            if is_json:
                self._send(request, b"application/json", jsonrpc.failure(call, error.description))
            else:
                self._send(request, b"text/xml", xmlrpc.failure(error.description))

        def send_safely(result: Any, handler: Any) -> None:
            if finished[0]:
                return  # the client went away (e.g. a long poll it abandoned)
            try:
                handler(result)
            except Exception:  # noqa: BLE001 - an unencodable value must not kill the request
                log.failure("encoding the reply to {method} failed", method=method)
                try:
                    fail(Failure(XenAPIError("INTERNAL_ERROR", "the reply could not be encoded")))
                except Exception:  # noqa: BLE001 - not even the failure encodes: end the request
                    request.setResponseCode(http.INTERNAL_SERVER_ERROR)
                    request.finish()

        d.addCallbacks(lambda v: send_safely(v, reply), lambda f: send_safely(f, fail))
        return server.NOT_DONE_YET

    def _send(self, request: server.Request, content_type: bytes, body: bytes) -> None:
        request.setResponseCode(http.OK)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", str(len(body)).encode())
        _cors(request)
        request.write(body)
        request.finish()

    def _bad_request(self, request: server.Request, reason: str) -> bytes:
        log.info("refused a request from {peer}: {reason}", peer=str(request.getClientAddress()), reason=reason)
        request.setResponseCode(http.INTERNAL_SERVER_ERROR)
        request.setHeader(b"Content-Type", b"text/html")
        return (f"<html><head><title>500 Internal Server Error</title></head><body>"
                f"<h1>Internal Server Error</h1><p>{html.escape(reason)}</p></body></html>\n").encode()


class LimitedRequest(server.Request):
    """A request whose body may not exceed the configured size: larger ones get 413 and a close."""

    max_body = 8 << 20

    def gotLength(self, length: int | None) -> None:
        self._received = 0
        self._refused = length is not None and length > self.max_body
        if self._refused:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refused = True
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        transport = self.channel.transport if self.channel else None
        if transport is not None:
            transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain\r\n"
                            b"Content-Length: 28\r\nConnection: close\r\n\r\nrequest body is too large.\r\n")
            transport.loseConnection()


def make_site(api_resource: ApiResource, max_body: int) -> server.Site:
    """A Site whose requests enforce *max_body*; access logging off (calls are logged by dispatch)."""
    request_class = type("Request", (LimitedRequest,), {"max_body": max_body})
    # Bodies are XML or JSON, never HTML forms: skip Twisted's per-request form parsing.
    site = server.Site(api_resource, logPath=None, parsePOSTFormSubmission=False)
    site.requestFactory = request_class
    site.displayTracebacks = False
    site.timeOut = 3700  # idle connections close after an hour (longer than any event.from wait)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
