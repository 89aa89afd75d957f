"""Raw HTTP against a real daemon (http.client, curl and bare sockets): paths, envelopes, headers,
both JSON-RPC versions, the request forms real clients send, and hostile input."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import Any

import pytest

from support import PASSWORD, vm_record
from xapid.schema import load_schema

MAX_BODY = 8 << 20  # the default [limits] max_body_bytes
XML_HEAD = b'<?xml version="1.0"?><methodResponse>'
NPM_DECL = '<?xml version="1.0" encoding="UTF-8"?>'  # what npm xen-api's formatter writes
XML_PATHS = ["/", "/RPC2", "/xmlrpc", "/anything/else", "/json"]


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        """Every value of header *name* (so that a duplicated header is noticed)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def xml(self) -> Any:
        """The single param of an XML-RPC methodResponse."""
        return xmlrpc.client.loads(self.body)[0][0]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


# -- clients -------------------------------------------------------------------------------------


def post(daemon, path: str, body: bytes | str, content_type: str = "text/xml",
         headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
    try:
        conn.request("POST", path, body.encode() if isinstance(body, str) else body,
                     {"Content-Type": content_type, **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def curl(daemon, path: str, body: bytes | str, *extra: str) -> Reply:
    """``curl -sS -i -X POST --data-binary @- URL`` with *body* on stdin."""
    assert shutil.which("curl"), "curl is required"
    proc = subprocess.run(["curl", "-sS", "-i", "-X", "POST", "--data-binary", "@-", *extra,
                           f"http://127.0.0.1:{daemon.port}{path}"],
                          input=body.encode() if isinstance(body, str) else body, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return parse_http_response(proc.stdout)


def parse_http_response(raw: bytes) -> Reply:
    """Split ``curl -i`` / raw-socket output into status, headers and body (skipping 1xx blocks)."""
    while True:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete HTTP header block in {raw[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if 100 <= status < 200:
            raw = rest
            continue
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
        return Reply(status, headers, rest)


def xml_body(method: str, *params: Any) -> str:
    """A request the way the XenAPI SDK writes it (xmlrpc.client: pretty, one element per line)."""
    return xmlrpc.client.dumps(params, method, allow_none=True)


def npm_value(value: Any) -> str:
    """One value the way npm xen-api's XML-RPC transport writes it (compact, untyped strings,
    integers stringified, self-closing empty containers and nil)."""
    if value is None:
        return "<value><nil /></value>"
    if isinstance(value, bool):
        return f"<value><boolean>{int(value)}</boolean></value>"
    if isinstance(value, int):
        return f"<value>{value}</value>"
    if isinstance(value, float):
        return f"<value><double>{value}</double></value>"
    if isinstance(value, str):
        text = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return f"<value>{text}</value>"
    if isinstance(value, list):
        if not value:
            return "<value><array><data /></array></value>"
        return "<value><array><data>" + "".join(npm_value(v) for v in value) + "</data></array></value>"
    if isinstance(value, dict):
        if not value:
            return "<value><struct /></value>"
        return "<value><struct>" + "".join(
            f"<member><name>{k}</name>{npm_value(v)}</member>" for k, v in value.items()) + "</struct></value>"
    raise TypeError(value)


def npm_body(method: str, *params: Any) -> str:
    if not params:
        return f"{NPM_DECL}<methodCall><methodName>{method}</methodName><params /></methodCall>"
    return (f"{NPM_DECL}<methodCall><methodName>{method}</methodName><params>"
            + "".join(f"<param>{npm_value(p)}</param>" for p in params) + "</params></methodCall>")


def jrpc(daemon, method: str, params: list[Any] | None = None, ident: Any = 0, v2: bool = True) -> Reply:
    doc: dict[str, Any] = {"method": method, "id": ident}
    if v2:
        doc["jsonrpc"] = "2.0"
    if params is not None:
        doc["params"] = params
    return post(daemon, "/jsonrpc", json.dumps(doc), "application/json")


def xml_call(daemon, method: str, *params: Any, path: str = "/") -> Any:
    """Value of a successful XML-RPC call (asserting the envelope)."""
    reply = post(daemon, path, xml_body(method, *params))
    assert_xml_reply(reply)
    result = reply.xml
    assert result["Status"] == "Success", result
    return result["Value"]


def login(daemon) -> str:
    return xml_call(daemon, "session.login_with_password", "admin", PASSWORD)


# -- assertions --------------------------------------------------------------------------------


def assert_cors(reply: Reply) -> None:
    """No cross-origin access unless the operator configured origins ([server] cors_origins)."""
    assert reply.header("Access-Control-Allow-Origin") == []


def assert_xml_reply(reply: Reply) -> None:
    """An XML-RPC reply as xapi writes it: 200, exact text/xml, one line, no typed ints, no <fault>."""
    assert reply.status == 200, reply
    assert reply.header("Content-Type") == ["text/xml"]
    assert_cors(reply)
    body = reply.body
    assert body.startswith(XML_HEAD), body[:100]
    assert body.endswith(b"</methodResponse>"), body[-100:]
    assert not re.search(rb">\s+<", body), "whitespace between elements"
    for tag in (b"<i8>", b"<int>", b"<i4>", b"<string>", b"<fault>", b"<value/>"):
        assert tag not in body, tag


def assert_json_reply(reply: Reply) -> None:
    assert reply.status == 200, reply
    assert reply.header("Content-Type") == ["application/json"]
    assert_cors(reply)


def assert_refused(reply: Reply, status: int = 500) -> str:
    """An HTTP error page with a one-line reason (xapi: 500 HTML); returns the reason."""
    assert reply.status == status, reply
    assert reply.header("Content-Type") == ["text/html"]
    found = re.search(rb"<p>(.+?)</p>", reply.body)
    assert found and found.group(1).strip(), reply.body
    return found.group(1).decode()


def assert_daemon_up(daemon) -> None:
    """The daemon process still runs and answers a normal call on a fresh connection."""
    assert daemon.proc.poll() is None, f"daemon died: {daemon.log.read_text()[-3000:]}"
    session = login(daemon)
    assert xml_call(daemon, "VM.get_all", session)
    xml_call(daemon, "session.logout", session)


def send_raw(daemon, chunks: list[bytes], timeout: float = 10) -> tuple[bytes, OSError | None]:
    """Write *chunks* on a bare TCP connection, then read until the server closes it."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout)
    error: OSError | None = None
    data = b""
    try:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the server may refuse and close before everything is written
            error = exc
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
        except OSError as exc:
            error = error or exc
    finally:
        sock.close()
    return data, error


@pytest.fixture(scope="module")
def session(daemon) -> str:
    return login(daemon)


@pytest.fixture(scope="module")
def vms(daemon, session) -> dict[str, Any]:
    return xml_call(daemon, "VM.get_all_records", session)


# -- XML-RPC ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", XML_PATHS)
def test_xmlrpc_on_any_path(daemon, path):
    """Any POST path other than /jsonrpc is XML-RPC: login then a call, with xapi's exact reply format."""
    login_reply = post(daemon, path, xml_body("session.login_with_password", "admin", PASSWORD))
    assert_xml_reply(login_reply)
    assert b"\n" not in login_reply.body
    result = login_reply.xml
    assert result["Status"] == "Success" and result["Value"].startswith("OpaqueRef:")
    reply = post(daemon, path, xml_body("pool.get_all_records", result["Value"]))
    assert_xml_reply(reply)
    pools = reply.xml["Value"]
    assert len(pools) == 1 and next(iter(pools)).startswith("OpaqueRef:")


@pytest.mark.parametrize("path", ["/", "/RPC2", "/xmlrpc", "/anything/else"])
def test_xmlrpc_with_curl(daemon, path):
    """curl (form content type, no keep-alive) gets the same one-line text/xml replies on every path."""
    reply = curl(daemon, path, xml_body("session.login_with_password", "admin", PASSWORD))
    assert_xml_reply(reply)
    session = reply.xml["Value"]
    reply = curl(daemon, path, npm_body("VM.get_all", session), "-H", "Content-Type: text/xml")
    assert_xml_reply(reply)
    assert reply.xml["Status"] == "Success" and reply.xml["Value"]
    bad = curl(daemon, path, npm_body("VM.get_all", "OpaqueRef:bad"))
    assert_xml_reply(bad)
    assert bad.xml == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", "OpaqueRef:bad"]}


def test_xmlrpc_values_as_xapi_writes_them(daemon, session, vms):
    """Ints are untyped decimal text, bools <boolean>, datetimes YYYYMMDDTHH:MM:SSZ, empty strings <value></value>."""
    pool = next(iter(xml_call(daemon, "pool.get_all_records", session).values()))
    reply = post(daemon, "/", xml_body("host.get_record", session, pool["master"]))
    assert_xml_reply(reply)
    assert b"<member><name>API_version_major</name><value>2</value></member>" in reply.body
    assert b"<member><name>enabled</name><value><boolean>1</boolean></value></member>" in reply.body
    assert b"<member><name>name_description</name><value></value></member>" in reply.body
    host = reply.xml["Value"]
    assert host["API_version_major"] == "2" and host["enabled"] is True
    dom0 = next(ref for ref, vm in vms.items() if vm["is_control_domain"])
    reply = post(daemon, "/", xml_body("VM.get_record", session, dom0))
    assert_xml_reply(reply)
    memory = reply.xml["Value"]["memory_static_max"]
    assert f"<name>memory_static_max</name><value>{memory}</value>".encode() in reply.body
    reply = post(daemon, "/", xml_body("host_metrics.get_record", session, host["metrics"]))
    assert_xml_reply(reply)
    total = reply.xml["Value"]["memory_total"]
    assert re.fullmatch(r"\d+", total) and int(total) > 2**31  # beyond int32: would need <i8> if typed
    assert f"<name>memory_total</name><value>{total}</value>".encode() in reply.body
    stamps = re.findall(rb"<dateTime\.iso8601>([^<]*)</dateTime\.iso8601>", reply.body)
    assert stamps and all(re.fullmatch(rb"\d{8}T\d\d:\d\d:\d\dZ", s) for s in stamps), stamps


def test_xmlrpc_bad_session_is_a_failure_reply(daemon):
    """A bad session is a 200 text/xml reply with Status Failure and [SESSION_INVALID, ref], never <fault>."""
    reply = post(daemon, "/RPC2", xml_body("VM.get_all_records", "OpaqueRef:nope"))
    assert_xml_reply(reply)
    assert b"\n" not in reply.body
    assert reply.xml == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", "OpaqueRef:nope"]}


def test_xmlrpc_unknown_method_is_a_failure_reply(daemon, session):
    """An unknown method is a 200 Failure MESSAGE_METHOD_UNKNOWN [method]."""
    reply = post(daemon, "/", xml_body("VM.no_such_call", session))
    assert_xml_reply(reply)
    assert reply.xml == {"Status": "Failure", "ErrorDescription": ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_call"]}


def test_keep_alive_connection_serves_several_calls(daemon):
    """One HTTP/1.1 connection (as the SDK keeps, with Accept-Encoding: gzip) carries several calls."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
    headers = {"Content-Type": "text/xml", "Accept-Encoding": "gzip", "User-Agent": "Python-xmlrpc/3.11"}
    try:
        conn.request("POST", "/", xml_body("session.login_with_password", "admin", PASSWORD), headers)
        resp = conn.getresponse()
        session = xmlrpc.client.loads(resp.read())[0][0]["Value"]
        assert resp.status == 200 and not resp.will_close
        for _ in range(3):
            conn.request("POST", "/", xml_body("VM.get_all", session), headers)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and resp.getheader("Content-Encoding") in (None, "gzip")
            assert xmlrpc.client.loads(body)[0][0]["Status"] == "Success"
    finally:
        conn.close()


def test_pipelined_big_and_small_replies_arrive_whole_and_in_order(daemon, session):
    """Replies larger than a socket takes at once, pipelined with small ones on one connection
    while the client reads nothing, all arrive complete and in request order."""
    big = "d" * (600 << 10)
    vm = xml_call(daemon, "VM.create", session, vm_record(name_label="pipelined", name_description=big))
    try:
        calls = [("VM.get_record", vm), ("VM.get_name_label", vm)] * 3
        raw, error = send_raw(daemon, [b"".join(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), b"Connection: close\r\n" if i == len(calls) - 1 else b"", body)
            for i, body in enumerate(xml_body(method, session, ref).encode() for method, ref in calls))],
            timeout=30)
        assert error is None
        values = []
        while raw:
            head, _, rest = raw.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            values.append(xmlrpc.client.loads(rest[:length])[0][0]["Value"])
            raw = rest[length:]
        assert len(values) == len(calls)
        for record, label in zip(values[::2], values[1::2]):
            assert record["name_description"] == big and label == "pipelined"
    finally:
        xml_call(daemon, "VM.destroy", session, vm)


# -- system.listMethods ------------------------------------------------------------------------


def test_list_methods_is_a_bare_array(daemon):
    """system.listMethods without params answers the bare name array (no Status struct) on XML-RPC."""
    messages = load_schema().messages
    for body in (xml_body("system.listMethods"), npm_body("system.listMethods")):
        reply = post(daemon, "/xmlrpc", body)
        assert_xml_reply(reply)
        assert reply.body.startswith(XML_HEAD + b"<params><param><value><array><data>")
        names = reply.xml
        assert isinstance(names, list) and len(names) == len(set(names))
        assert "VM.get_all_records" in names and "pool.get_all_records" in names
        assert ("task.get_all_records" in names) == ("task.get_all_records" in messages)
        assert set(names) <= set(messages)
    json_reply = jrpc(daemon, "system.listMethods", [])
    assert_json_reply(json_reply)
    assert json_reply.json == {"jsonrpc": "2.0", "result": names, "id": 0}


def test_every_listed_get_all_records_answers(daemon, session):
    """Every <Class>.get_all_records that listMethods announces (npm caches them all) answers a map."""
    names = post(daemon, "/", xml_body("system.listMethods")).xml
    listed = [n for n in names if n.endswith(".get_all_records")]
    assert listed
    for name in listed:
        reply = post(daemon, "/", xml_body(name, session))
        assert_xml_reply(reply)
        result = reply.xml
        if result["Status"] == "Failure":
            assert result["ErrorDescription"][0] == "MESSAGE_REMOVED", (name, result)
        else:
            assert isinstance(result["Value"], dict), name
        reply = jrpc(daemon, name, [session])
        assert_json_reply(reply)
        assert "result" in reply.json or reply.json["error"]["message"] == "MESSAGE_REMOVED", (name, reply.json)


# -- JSON-RPC ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ident", [0, 42, "abc-1", ""])
def test_jsonrpc_v2_success(daemon, session, ident):
    """v2 success: {"jsonrpc":"2.0","result":…,"id":…} with no error key; the id is echoed unchanged."""
    reply = jrpc(daemon, "VM.get_all", [session], ident)
    assert_json_reply(reply)
    doc = reply.json
    assert set(doc) == {"jsonrpc", "result", "id"}
    assert doc["jsonrpc"] == "2.0" and doc["id"] == ident and type(doc["id"]) is type(ident)
    assert doc["result"] and all(r.startswith("OpaqueRef:") for r in doc["result"])


@pytest.mark.parametrize("ident", [7, "q"])
def test_jsonrpc_v2_failure(daemon, ident):
    """v2 failure: {"jsonrpc":"2.0","error":{"code":1,"message":CODE,"data":[params]},"id":…}."""
    reply = jrpc(daemon, "VM.get_all", ["OpaqueRef:bad"], ident)
    assert_json_reply(reply)
    assert reply.json == {"jsonrpc": "2.0", "error": {"code": 1, "message": "SESSION_INVALID",
                                                      "data": ["OpaqueRef:bad"]}, "id": ident}


def test_jsonrpc_v1_shapes(daemon, session):
    """v1: success {"result":…,"error":null,"id"}; failure {"result":null,"error":[CODE, params…],"id"}."""
    reply = jrpc(daemon, "VM.get_all", [session], 3, v2=False)
    assert_json_reply(reply)
    doc = reply.json
    assert set(doc) == {"result", "error", "id"} and doc["error"] is None and doc["id"] == 3
    assert doc["result"]
    reply = jrpc(daemon, "VM.get_record", [session, "OpaqueRef:x"], "v1", v2=False)
    assert_json_reply(reply)
    assert reply.json == {"result": None, "error": ["HANDLE_INVALID", "VM", "OpaqueRef:x"], "id": "v1"}


def test_jsonrpc_values(daemon, session, vms):
    """Ints and int fields are JSON numbers, bools true/false, datetimes strings, maps objects."""
    pool = next(iter(jrpc(daemon, "pool.get_all_records", [session]).json["result"].values()))
    host = jrpc(daemon, "host.get_record", [session, pool["master"]]).json["result"]
    assert type(host["API_version_major"]) is int and host["API_version_major"] == 2
    assert host["enabled"] is True and isinstance(host["software_version"], dict)
    dom0 = next(ref for ref, vm in vms.items() if vm["is_control_domain"])
    reply = jrpc(daemon, "VM.get_record", [session, dom0])
    assert_json_reply(reply)
    vm = reply.json["result"]
    assert type(vm["memory_static_max"]) is int and vm["memory_static_max"] == int(vms[dom0]["memory_static_max"])
    assert vm["is_control_domain"] is True and vm["resident_on"] == pool["master"]
    metrics = jrpc(daemon, "host_metrics.get_record", [session, host["metrics"]]).json["result"]
    assert re.fullmatch(r"\d{8}T\d\d:\d\d:\d\dZ", metrics["last_updated"])
    assert re.search(rb'"memory_static_max":\d+[,}]', reply.body)


def test_sessions_shared_between_transports(daemon):
    """A session made over XML-RPC works on JSON-RPC and one made over JSON-RPC works on XML-RPC."""
    from_xml = login(daemon)
    reply = jrpc(daemon, "VM.get_all", [from_xml])
    assert "result" in reply.json, reply.json
    reply = jrpc(daemon, "session.login_with_password", ["admin", PASSWORD], "login")
    from_json = reply.json["result"]
    assert from_json.startswith("OpaqueRef:") and from_json != from_xml
    assert xml_call(daemon, "VM.get_all", from_json)
    assert jrpc(daemon, "session.logout", [from_json]).json == {"jsonrpc": "2.0", "result": "", "id": 0}
    assert post(daemon, "/", xml_body("VM.get_all", from_json)).xml["ErrorDescription"] == \
        ["SESSION_INVALID", from_json]


def test_jsonrpc_params_may_be_omitted(daemon):
    """A v2 request without params is a call with no arguments (system.listMethods)."""
    reply = jrpc(daemon, "system.listMethods", None, "np")
    assert_json_reply(reply)
    assert "VM.get_all_records" in reply.json["result"] and reply.json["id"] == "np"


def test_jsonrpc_with_curl(daemon, session):
    """curl on /jsonrpc (any request content type; /jsonrpc/ too) gets application/json replies."""
    body = json.dumps({"jsonrpc": "2.0", "method": "VM.get_all", "params": [session], "id": 9})
    for path in ("/jsonrpc", "/jsonrpc/"):
        reply = curl(daemon, path, body)
        assert_json_reply(reply)
        assert set(reply.json) == {"jsonrpc", "result", "id"} and reply.json["id"] == 9
    reply = curl(daemon, "/jsonrpc", json.dumps({"jsonrpc": "2.0", "method": "VM.get_all", "params": ["x"], "id": 1}),
                 "-H", "Content-Type: application/json")
    assert_json_reply(reply)
    assert reply.json["error"] == {"code": 1, "message": "SESSION_INVALID", "data": ["x"]}


def test_options_preflight(daemon):
    """OPTIONS /jsonrpc (CORS pre-flight) answers 200, allowing no origin when none is configured."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
    try:
        conn.request("OPTIONS", "/jsonrpc", headers={"Origin": "http://example.org",
                                                     "Access-Control-Request-Method": "POST"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Access-Control-Allow-Origin") is None
    finally:
        conn.close()
    proc = subprocess.run(["curl", "-sS", "-i", "-X", "OPTIONS", f"http://127.0.0.1:{daemon.port}/jsonrpc"],
                          capture_output=True, timeout=30)
    reply = parse_http_response(proc.stdout)
    assert reply.status == 200 and reply.header("Access-Control-Allow-Origin") == []


# -- request forms real clients send -----------------------------------------------------------


def test_sdk_pretty_request(daemon, session):
    """Pretty-printed requests (xmlrpc.client: newlines, <string>, <int>, <boolean>, <nil/>) are parsed."""
    body = xml_body("VM.create", session, vm_record(name_label="pretty", VCPUs_max=2, VCPUs_at_startup=1))
    assert "\n<param>\n" in body and "<int>2</int>" in body and "<boolean>0</boolean>" in body
    vm = xml_call(daemon, "VM.create", session, vm_record(name_label="pretty", VCPUs_max=2, VCPUs_at_startup=1))
    try:
        record = xml_call(daemon, "VM.get_record", session, vm)
        assert record["name_label"] == "pretty" and record["VCPUs_max"] == "2"
        indented = ("<?xml version='1.0'?>\n<methodCall>\n  <methodName>VM.get_name_label</methodName>\n"
                    "  <params>\n    <param>\n      <value>\n        <string>" + session + "</string>\n"
                    "      </value>\n    </param>\n    <param>\n      <value><string>" + vm + "</string></value>\n"
                    "    </param>\n  </params>\n</methodCall>\n")
        reply = post(daemon, "/", indented)
        assert_xml_reply(reply)
        assert reply.xml == {"Status": "Success", "Value": "pretty"}
    finally:
        xml_call(daemon, "VM.destroy", session, vm)
    nil = post(daemon, "/", xml_body("VM.get_all", None))
    assert_xml_reply(nil)
    assert nil.xml["Status"] == "Failure"


def test_npm_compact_request(daemon, session):
    """Compact requests (npm xen-api: untyped strings, stringified ints, <params />, <struct />, <data />, <nil />)."""
    record = vm_record(name_label="compact", VCPUs_max=2, VCPUs_at_startup=1, tags=[])
    body = npm_body("VM.create", session, record)
    assert "\n" not in body and "<struct />" in body and "<data />" in body and "<value>2</value>" in body
    reply = post(daemon, "/xmlrpc", body)
    assert_xml_reply(reply)
    assert reply.xml["Status"] == "Success", reply.xml
    vm = reply.xml["Value"]
    try:
        reply = post(daemon, "/xmlrpc", npm_body("VM.get_record", session, vm))
        assert_xml_reply(reply)
        record = reply.xml["Value"]
        assert record["name_label"] == "compact" and record["VCPUs_params"] == {} and record["tags"] == []
        reply = post(daemon, "/xmlrpc", npm_body("VM.set_name_description", session, vm, "a & <b>"))
        assert_xml_reply(reply)
        assert reply.xml == {"Status": "Success", "Value": ""}
        reply = post(daemon, "/xmlrpc", npm_body("VM.get_name_description", session, vm))
        assert b"<value>a &amp; &lt;b&gt;</value>" in reply.body
        # a <nil /> where a string is expected is an API failure, not an unparsable request
        reply = post(daemon, "/xmlrpc", npm_body("VM.set_name_description", session, vm, None))
        assert_xml_reply(reply)
        assert reply.xml["Status"] == "Failure"
    finally:
        xml_call(daemon, "VM.destroy", session, vm)
    reply = post(daemon, "/xmlrpc", npm_body("system.listMethods"))
    assert_xml_reply(reply)
    assert "VM.get_all_records" in reply.xml


def test_request_value_forms(daemon, session):
    """Every int form (<i8>, <i4>, <int>, digits), empty-string form and float form a client may send is accepted."""
    vm = xml_call(daemon, "VM.create", session, vm_record(name_label="forms"))

    def call(method: str, *values: str) -> Any:
        body = (f'<?xml version="1.0"?><methodCall><methodName>{method}</methodName><params>'
                f"<param><value>{session}</value></param><param><value>{vm}</value></param>"
                + "".join(f"<param>{v}</param>" for v in values) + "</params></methodCall>")
        reply = post(daemon, "/", body)
        assert_xml_reply(reply)
        return reply

    try:
        for form, number in [("<value><i8>4</i8></value>", "4"), ("<value><i4>3</i4></value>", "3"),
                             ("<value><int>2</int></value>", "2"), ("<value>4</value>", "4"),
                             ("<value><string>3</string></value>", "3")]:
            assert call("VM.set_VCPUs_max", form).xml == {"Status": "Success", "Value": ""}, form
            assert call("VM.get_VCPUs_max").xml["Value"] == number, form
        six_gib = str(6 << 30)
        limits = (f"<value><i8>{128 << 20}</i8></value>", f"<value><i8>{six_gib}</i8></value>",
                  f"<value>{256 << 20}</value>", f"<value>{six_gib}</value>")
        assert call("VM.set_memory_limits", *limits).xml["Status"] == "Success"
        assert call("VM.get_memory_static_max").body.endswith(
            f"<name>Value</name><value>{six_gib}</value></member></struct></value></param></params>"
            f"</methodResponse>".encode())
        for form in ("<value></value>", "<value/>", "<value><string></string></value>", "<value><string/></value>"):
            call("VM.set_name_description", "<value>x</value>")
            assert call("VM.set_name_description", form).xml["Status"] == "Success", form
            assert call("VM.get_name_description").xml == {"Status": "Success", "Value": ""}, form
        for form, number in [("<value><double>1.5</double></value>", 1.5), ("<value><int>2</int></value>", 2.0),
                             ("<value>2.5</value>", 2.5)]:
            assert call("VM.set_HVM_shadow_multiplier", form).xml["Status"] == "Success", form
            reply = call("VM.get_HVM_shadow_multiplier")
            assert reply.xml["Value"] == number and b"<value><double>" in reply.body, form
    finally:
        xml_call(daemon, "VM.destroy", session, vm)


# -- hostile input -----------------------------------------------------------------------------

LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
          + ']><methodCall><methodName>&lol9;</methodName><params><param><value>&lol9;</value></param>'
          '</params></methodCall>')
XXE = ('<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]><methodCall>'
       '<methodName>session.login_with_password</methodName><params><param><value><string>&x;</string>'
       '</value></param><param><value>x</value></param></params></methodCall>')


def test_billion_laughs(daemon):
    """An entity-expansion bomb is refused with 500 and a reason; the daemon stays up."""
    reply = post(daemon, "/", LAUGHS)
    assert "lollol" not in assert_refused(reply)
    assert b"lollollol" not in reply.body
    assert_daemon_up(daemon)


def test_external_entity(daemon):
    """An external entity naming /etc/passwd is refused with 500 and the file is never read into a reply."""
    reply = post(daemon, "/", XXE)
    assert_refused(reply)
    assert b"root:" not in reply.body
    assert_daemon_up(daemon)


@pytest.mark.parametrize("doc", [XXE, LAUGHS], ids=["xxe", "laughs"])
def test_entities_never_expand_in_utf16(daemon, doc):
    """In a UTF-16 body too, no entity is ever expanded (no file content, no bomb) and the daemon stays up."""
    body = doc.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>').encode("utf-16")
    reply = post(daemon, "/", body)
    assert b"root:" not in reply.body and b"lollol" not in reply.body
    assert reply.status in (200, 500)
    assert_daemon_up(daemon)


def test_doctype_refused_in_any_encoding(daemon):
    """A DTD is refused with 500 whatever the body's encoding (as it is in UTF-8), not run with entities dropped."""
    body = XXE.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>').encode("utf-16")
    assert_refused(post(daemon, "/", body))


@pytest.mark.parametrize("kind", ["values", "elements"])
def test_deep_nesting(daemon, session, kind):
    """XML nested 10 000 deep is refused with 500 quickly; the daemon stays up."""
    if kind == "values":
        inner = "<value><array><data>" * 10_000 + "</data></array></value>" * 10_000
    else:
        inner = "<value><x>" + "<y>" * 10_000 + "</y>" * 10_000 + "</x></value>"
    body = (f'<?xml version="1.0"?><methodCall><methodName>VM.get_all</methodName><params>'
            f"<param><value>{session}</value></param><param>{inner}</param></params></methodCall>")
    start = time.monotonic()
    assert_refused(post(daemon, "/", body))
    assert time.monotonic() - start < 5
    assert_daemon_up(daemon)


def test_deep_json(daemon):
    """JSON nested 100 000 deep is refused with 500; the daemon stays up."""
    body = '{"jsonrpc":"2.0","method":"VM.get_all","params":' + "[" * 100_000 + "]" * 100_000 + ',"id":1}'
    assert_refused(post(daemon, "/jsonrpc", body, "application/json"))
    assert_daemon_up(daemon)


def test_body_over_limit_by_content_length(daemon):
    """A Content-Length over max_body_bytes gets 413 at once (before any body is sent); daemon stays up."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
    try:
        conn.putrequest("POST", "/")
        conn.putheader("Content-Type", "text/xml")
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 413
    finally:
        conn.close()
    reply = curl(daemon, "/jsonrpc", b"x" * (MAX_BODY + 1))
    assert reply.status == 413
    assert_daemon_up(daemon)


def test_body_over_limit_chunked(daemon):
    """A chunked body growing past max_body_bytes gets 413 (or a closed connection); daemon stays up."""
    chunk = b"<" * (1 << 20)
    frames = [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"]
    frames += [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_BODY // len(chunk) + 2) + [b"0\r\n\r\n"]
    data, error = send_raw(daemon, frames)
    assert data.startswith(b"HTTP/1.1 413 ") or (data == b"" and error is not None), (data[:200], error)
    reply = curl(daemon, "/", b"<" * (MAX_BODY + 1), "-H", "Transfer-Encoding: chunked")
    assert reply.status == 413
    assert_daemon_up(daemon)


def test_body_at_limit_is_parsed(daemon, session):
    """A body just under max_body_bytes (padding between elements: one string may hold at most
    [limits] max_string_bytes, see test_security_values) is still read and answered."""
    body = npm_body("VM.get_by_name_label", session, "nothing")
    body = body.replace("<params>", "<params>" + " " * (MAX_BODY - 400 - len(body)), 1)
    assert len(body) < MAX_BODY
    reply = post(daemon, "/", body)
    assert_xml_reply(reply)
    assert reply.xml == {"Status": "Success", "Value": []}


def test_invalid_utf8(daemon):
    """Invalid UTF-8 bytes in an XML-RPC or JSON-RPC body are refused with 500 and a reason."""
    xml = (b'<?xml version="1.0"?><methodCall><methodName>session.login_with_password</methodName><params>'
           b"<param><value>\xff\xfe\xc3</value></param><param><value>x</value></param></params></methodCall>")
    assert_refused(post(daemon, "/", xml))
    body = b'{"jsonrpc":"2.0","method":"session.login_with_password","params":["\xff\xfe","x"],"id":1}'
    assert_refused(post(daemon, "/jsonrpc", body, "application/json"))
    assert_daemon_up(daemon)


LONE = "a\\ud800b"  # JSON text for a string holding a lone surrogate: valid JSON, not encodable as UTF-8


def test_lone_surrogate_string(daemon, session):
    """A string holding a lone surrogate (JSON "\\ud800") is refused with INVALID_VALUE and breaks no later read."""
    vm = xml_call(daemon, "VM.create", session, vm_record(name_label="surrogate"))
    record = json.dumps(vm_record(name_label="X")).replace('"X"', f'"{LONE}"')
    calls = [("VM.set_name_label", f'"{session}","{vm}","{LONE}"'),
             ("VM.add_to_other_config", f'"{session}","{vm}","{LONE}","v"'),
             ("VM.add_to_other_config", f'"{session}","{vm}","k","{LONE}"'),
             ("VM.set_other_config", f'"{session}","{vm}",{{"{LONE}":"v"}}'),
             ("VM.create", f'"{session}",{record}')]
    try:
        for method, params in calls:
            body = f'{{"jsonrpc":"2.0","method":"{method}","params":[{params}],"id":1}}'
            reply = post(daemon, "/jsonrpc", body, "application/json")
            assert_json_reply(reply)
            records = jrpc(daemon, "VM.get_all_records", [session]).json
            assert "result" in records, (method, params, records)
            assert reply.json["error"]["message"] == "INVALID_VALUE", (method, params, reply.json)
    finally:
        xml_call(daemon, "VM.destroy", session, vm)


def test_jsonrpc_unencodable_id_gets_an_answer(daemon):
    """A JSON-RPC id holding a lone surrogate still gets an answer (a refusal or the id echoed), never a hang."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=3)
    try:
        conn.request("POST", "/jsonrpc", f'{{"jsonrpc":"2.0","method":"system.listMethods","params":[],"id":"{LONE}"}}',
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status in (200, 500), resp.status
    if resp.status == 200:
        assert json.loads(body)["id"] == "a\ud800b"
    assert_daemon_up(daemon)


@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","method":',
    b"[1, 2, 3]",
    b'[{"jsonrpc":"2.0","method":"system.listMethods","params":[],"id":1}]',
    b'{"jsonrpc":"2.0","params":[],"id":1}',
    b'{"jsonrpc":"2.0","method":"VM.get_all","params":"OpaqueRef:x","id":1}',
    b"<methodCall><methodName>system.listMethods</methodName></methodCall>",
    b"",
], ids=["truncated", "array", "batch", "no-method", "params-string", "xml-on-jsonrpc", "empty"])
def test_malformed_jsonrpc(daemon, body):
    """A body that is not one JSON-RPC request object gets 500 with a reason; the daemon stays up."""
    assert_refused(post(daemon, "/jsonrpc", body, "application/json"))
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("doc", [
    {"jsonrpc": "2.0", "method": "system.listMethods", "params": []},
    {"jsonrpc": "2.0", "method": "system.listMethods", "params": [], "id": None},
    {"method": "system.listMethods", "params": []},
], ids=["v2-no-id", "v2-null-id", "v1-no-id"])
def test_jsonrpc_notification_refused(daemon, doc):
    """A JSON-RPC notification (no id) is refused with 500; the daemon stays up."""
    reason = assert_refused(post(daemon, "/jsonrpc", json.dumps(doc), "application/json"))
    assert "id" in reason
    assert_daemon_up(daemon)


@pytest.mark.parametrize("body", [
    b"not xml at all",
    b'<?xml version="1.0"?><methodResponse><params/></methodResponse>',
    b"<methodCall><params/></methodCall>",
    b"<methodCall><methodName>VM.get_all</methodName><params><param><value><bogus>1</bogus></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>VM.get_all</methodName><params><param><value><int>12x</int></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>VM.get_all</methodName>",
    b"",
], ids=["text", "response", "no-name", "bad-type", "bad-int", "truncated", "empty"])
def test_malformed_xmlrpc(daemon, body):
    """A body that is not a well-formed methodCall gets 500 (HTML, reason) — never a 200 or a <fault>."""
    reply = post(daemon, "/", body)
    assert_refused(reply)
    assert b"<fault>" not in reply.body
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",  # a TLS ClientHello
    b"GARBAGE GARBAGE GARBAGE\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"\x00" * 100_000,
], ids=["tls", "words", "negative-length", "nul-flood"])
def test_garbage_on_the_socket(daemon, garbage):
    """Non-HTTP bytes get a 400 or a closed connection, promptly; the daemon stays up."""
    start = time.monotonic()
    data, _ = send_raw(daemon, [garbage])
    assert time.monotonic() - start < 5
    assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:200]
    assert_daemon_up(daemon)
