"""The baseline for ``benchmarks/run.py``: xend's architecture, a stdlib threaded XML-RPC server.

``SimpleXMLRPCServer`` with ``socketserver.ThreadingMixIn`` (a thread per connection), the request
handler on HTTP/1.1 keep-alive, no request logging, one session lookup (a dict) per call, and every
reply marshalled by ``xmlrpc.client.dumps`` inside the Xen-API envelope
``{"Status": "Success", "Value": v}``.

It serves a copy of a running xapid's data (VM, VBD, VDI, VIF, host and pool records), fetched at start
through XML-RPC, so both servers answer with the same records::

    echo PASSWORD | python benchmarks/stdlib_server.py --copy-from http://127.0.0.1:PORT/ --user NAME

The password is one line on stdin; the same credentials log in to this server.  It listens on a
free loopback port and logs ``listening on 127.0.0.1:PORT`` on stderr, as xapid does.
"""

from __future__ import annotations

import argparse
import socketserver
import sys
import uuid
import xmlrpc.client
from dataclasses import dataclass
from typing import Any, Callable
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer


RECORD_CLASSES = ("VM", "VBD", "VDI", "VIF")  # served by <class>.get_all_records


@dataclass(frozen=True)
class Inventory:
    """The data served: records by ref of each class in RECORD_CLASSES, host records by ref, pool refs."""

    records: dict[str, dict[str, dict[str, Any]]]
    hosts: dict[str, dict[str, Any]]
    pools: list[str]


class ApiFailure(Exception):
    """A Xen-API error: ``description`` is ``[code, params…]``."""

    def __init__(self, *description: str):
        super().__init__(*description)
        self.description = list(description)


def _value(result: Any) -> Any:
    """The ``Value`` of a Xen-API success envelope; exits on anything else."""
    if not isinstance(result, dict) or result.get("Status") != "Success":
        raise SystemExit(f"stdlib_server: copying from xapid failed: {result!r:.300}")
    return result["Value"]


def copy_inventory(url: str, user: str, password: str) -> Inventory:
    """Fetch the VMs, disks, disk images, network cards, hosts and pools of the Xen-API server at *url*."""
    proxy = xmlrpc.client.ServerProxy(url, allow_none=True)
    session = _value(proxy.session.login_with_password(user, password, "1.0", "stdlib-baseline"))
    try:
        return Inventory(records={cls: _value(getattr(proxy, cls).get_all_records(session))
                                  for cls in RECORD_CLASSES},
                         hosts=_value(proxy.host.get_all_records(session)),
                         pools=_value(proxy.pool.get_all(session)))
    finally:
        proxy.session.logout(session)


class XenApi:
    """The served messages.  ``_dispatch`` is what ``SimpleXMLRPCServer`` calls for an instance."""

    def __init__(self, inventory: Inventory, user: str, password: str):
        self.inventory = inventory
        self.credentials = (user, password)
        self.sessions: dict[str, str] = {}
        self.messages: dict[str, Callable[..., Any]] = {
            "session.logout": self.logout,
            "VM.get_power_state": self.vm_get_power_state,
            "pool.get_all": self.pool_get_all,
            "host.get_record": self.host_get_record,
        }
        for cls in RECORD_CLASSES:
            self.messages[f"{cls}.get_all_records"] = self._get_all_records(cls)

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> dict[str, Any]:
        try:
            return {"Status": "Success", "Value": self._call(method, params)}
        except ApiFailure as exc:
            return {"Status": "Failure", "ErrorDescription": exc.description}

    def _call(self, method: str, params: tuple[Any, ...]) -> Any:
        if method == "session.login_with_password":
            return self.login(*params)
        handler = self.messages.get(method)
        if handler is None:
            raise ApiFailure("MESSAGE_METHOD_UNKNOWN", method)
        session = params[0] if params else ""
        if session not in self.sessions:
            raise ApiFailure("SESSION_INVALID", str(session))
        return handler(session, *params[1:])

    def login(self, uname: str, pwd: str, version: str = "", originator: str = "") -> str:
        if (uname, pwd) != self.credentials:
            raise ApiFailure("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
        ref = f"OpaqueRef:{uuid.uuid4()}"
        self.sessions[ref] = uname
        return ref

    def logout(self, session: str) -> str:
        self.sessions.pop(session, None)
        return ""

    def vm_get_power_state(self, session: str, vm: str) -> str:
        return self._record(self.inventory.records["VM"], "VM", vm)["power_state"]

    def _get_all_records(self, cls: str) -> Callable[[str], dict[str, dict[str, Any]]]:
        records = self.inventory.records[cls]

        def get_all_records(session: str) -> dict[str, dict[str, Any]]:
            return records

        return get_all_records

    def pool_get_all(self, session: str) -> list[str]:
        return self.inventory.pools

    def host_get_record(self, session: str, host: str) -> dict[str, Any]:
        return self._record(self.inventory.hosts, "host", host)

    @staticmethod
    def _record(records: dict[str, dict[str, Any]], cls: str, ref: str) -> dict[str, Any]:
        record = records.get(ref)
        if record is None:
            raise ApiFailure("HANDLE_INVALID", cls, str(ref))
        return record


class KeepAliveHandler(SimpleXMLRPCRequestHandler):
    """HTTP/1.1 keep-alive; any POST path is XML-RPC, as in xapi."""

    protocol_version = "HTTP/1.1"
    rpc_paths = ()


class ThreadedXMLRPCServer(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    """A thread per connection.  The listen backlog is Twisted's (50), not socketserver's 5."""

    daemon_threads = True
    request_queue_size = 50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copy-from", required=True, metavar="URL", help="the xapid whose data to serve")
    parser.add_argument("--user", required=True, help="user to log in to xapid with (and to accept here)")
    args = parser.parse_args(argv)
    password = sys.stdin.readline().removesuffix("\n")
    api = XenApi(copy_inventory(args.copy_from, args.user, password), args.user, password)
    server = ThreadedXMLRPCServer(("127.0.0.1", 0), requestHandler=KeepAliveHandler, logRequests=False,
                                  allow_none=True)
    server.register_instance(api)
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
