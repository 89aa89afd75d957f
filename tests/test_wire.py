"""The XML-RPC and JSON-RPC codecs: exact reply bytes and tolerant, hardened request parsing."""

from __future__ import annotations

import random
import re
import xmlrpc.client as stdlib_xmlrpc
from datetime import datetime, timezone

import pytest

from xapid.wire import jsonrpc, xmlrpc
from xapid.wire.values import Int32, Limits, WireError

LIMITS = Limits(max_body=1 << 16, max_depth=8, max_elements=500)


def test_success_envelope_is_compact_xapi_form():
    """A success reply is one line with xapi's declaration and the Status/Value struct."""
    body = xmlrpc.success("OpaqueRef:abc")
    assert body == (b'<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status'
                    b'</name><value>Success</value></member><member><name>Value</name><value>OpaqueRef:abc'
                    b'</value></member></struct></value></param></params></methodResponse>')


def test_failure_envelope():
    """A failure reply carries ErrorDescription as an array of strings, never a <fault>."""
    body = xmlrpc.failure(["HANDLE_INVALID", "VM", "OpaqueRef:nope"])
    assert b"<fault>" not in body
    assert b"<name>ErrorDescription</name><value><array><data><value>HANDLE_INVALID</value><value>VM</value>" in body


def test_value_encodings():
    """Ints are untyped digits, empty strings <value></value>, Int32 <i4>, datetimes xapi-style."""
    assert xmlrpc.encode_value(1 << 40) == b"<value>1099511627776</value>"
    assert xmlrpc.encode_value("") == b"<value></value>"
    assert xmlrpc.encode_value(Int32(3)) == b"<value><i4>3</i4></value>"
    assert xmlrpc.encode_value(True) == b"<value><boolean>1</boolean></value>"
    assert xmlrpc.encode_value(0.25) == b"<value><double>0.25</double></value>"
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert xmlrpc.encode_value(when) == b"<value><dateTime.iso8601>20240102T03:04:05Z</dateTime.iso8601></value>"
    assert b"<i8>" not in xmlrpc.encode_value({"a": [1 << 62]})


def test_strings_are_escaped_and_control_characters_dropped():
    """Markup is escaped; control characters XML cannot carry are dropped."""
    assert xmlrpc.encode_value('a<b>&"c\x01\td') == b"<value>a&lt;b&gt;&amp;&quot;c\td</value>"


def test_stdlib_client_reads_our_replies():
    """The stdlib unmarshaller (used by the XenAPI SDK) reads every value we produce."""
    value = {"n": 5, "big": 1 << 40, "s": "x&y", "l": ["a", True, 1.5], "m": {}, "e": ""}
    (decoded,), _ = stdlib_xmlrpc.loads(xmlrpc.success(value))
    assert decoded["Value"] == {"n": "5", "big": str(1 << 40), "s": "x&y", "l": ["a", True, 1.5], "m": {}, "e": ""}


def test_struct_members_of_every_kind_keep_their_order_and_values():
    """A struct mixing scalar and nested members (as metrics maps and records do) reads back
    member by member, in order, with markup in names and values escaped."""
    value = {"f": 0.1, "n": -3, "s": "a<b", "e": "", "b": False, "x": None, "d": {"in": 2.5, "deep": ["q"]},
             "<k&>": 1e300, 7: "seven", "t": 1.5, "l": [{"z": 0.5}]}
    (decoded,), _ = stdlib_xmlrpc.loads(xmlrpc.success(value), use_builtin_types=True)
    assert list(decoded["Value"].items()) == [
        ("f", 0.1), ("n", "-3"), ("s", "a<b"), ("e", ""), ("b", False), ("x", None),
        ("d", {"in": 2.5, "deep": ["q"]}), ("<k&>", 1e300), ("7", "seven"), ("t", 1.5), ("l", [{"z": 0.5}])]


def test_decode_forms_clients_send():
    """Typed and untyped strings, ints, nil, self-closing containers and pretty XML all decode."""
    pretty = stdlib_xmlrpc.dumps(("OpaqueRef:x", 5, None, [], {}), "VM.start", allow_none=True).encode()
    method, params = xmlrpc.decode_call(pretty, LIMITS)
    assert method == "VM.start" and params == ["OpaqueRef:x", 5, None, [], {}]
    compact = (b'<?xml version="1.0"?><methodCall><methodName>x.y</methodName><params><param><value>s</value>'
               b'</param><param><value/></param><param><value><array><data /></array></value></param><param>'
               b'<value><struct /></value></param><param><value><nil /></value></param><param><value><i8>'
               b'4294967296</i8></value></param></params></methodCall>')
    assert xmlrpc.decode_call(compact, LIMITS) == ("x.y", ["s", "", [], {}, None, 4294967296])


def _flat_bodies() -> list[bytes]:
    """Flat calls as clients write them, in the forms the fast path must read exactly as lxml does."""
    rng = random.Random(7)
    alphabet = "abcXYZ019 :,._-/\té€😀\n"

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))

    def scalar() -> object:
        return rng.choice([text, lambda: rng.randrange(-(1 << 31), 1 << 31), lambda: rng.random() * 1e6,
                           lambda: rng.random() < 0.5])()

    bodies = []
    for _ in range(300):
        params = tuple(scalar() if rng.random() < 0.7 else [text() for _ in range(rng.randrange(0, 4))]
                       for _ in range(rng.randrange(0, 5)))
        body = stdlib_xmlrpc.dumps(params, rng.choice(["event.from", "VM.get_record", "session.login_with_password"]))
        variant = rng.randrange(4)
        if variant == 1:  # compact, with xapi's declaration
            body = '<?xml version="1.0"?>' + body.split("?>", 1)[1].replace("\n", "")
        elif variant == 2:  # CRLF line ends, encoding declared
            body = body.replace("<?xml version='1.0'?>", '<?xml version="1.0" encoding="UTF-8"?>').replace("\n", "\r\n")
        elif variant == 3:  # no declaration, untyped strings
            body = body.split("?>", 1)[1].replace("<string>", "").replace("</string>", "")
        bodies.append(body.encode())
    return bodies


def test_fast_path_reads_flat_calls_exactly_as_lxml():
    """Every flat call takes the fast path and decodes to what the general lxml path gives."""
    for body in _flat_bodies():
        fast = xmlrpc._fast_call(body, LIMITS)
        assert fast is not None, body
        assert fast == xmlrpc._lxml_call(body, LIMITS), body


@pytest.mark.parametrize("body", [
    b"<?xml version='1.0'?><methodCall><methodName>a</methodName><params><param><value>x&amp;y</value></param>"
    b"</params></methodCall>",  # a reference
    b"<methodCall><methodName>a</methodName><params><param><value><struct><member><name>k</name><value>1</value>"
    b"</member></struct></value></param></params></methodCall>",  # a struct
    b"<methodCall><methodName>a</methodName><!-- c --><params/></methodCall>",  # a comment
    b"<methodCall><methodName>a</methodName><params><param><value><![CDATA[<x>]]></value></param></params>"
    b"</methodCall>",  # CDATA
    b"<methodCall x='1'><methodName>a</methodName></methodCall>",  # an attribute
    b" <?xml version='1.0'?><methodCall><methodName>a</methodName></methodCall>",  # text before the declaration
    b"<?xml version='1.0' encoding='latin-1'?><methodCall><methodName>\xe9</methodName></methodCall>",
    b"<methodCall><methodName>a</methodName><params><param><value><int>x</int></value></param></params></methodCall>",
    b"<methodCall><methodName>a</methodName><params><param><value>\x01</value></param></params></methodCall>",
    b"<methodCall><methodName>a</methodName><params><param><value>]]></value></param></params></methodCall>",
    b"<methodCall><methodName>a</methodName><params><param><value>\xef\xbf\xbe</value></param></params></methodCall>",
    b"<methodCall><methodName>a</methodName><params><param><value>x</value></params></methodCall>",  # unclosed
    b"<methodCall><methodName>a</methodName></methodCall><methodCall/>",  # two roots
])
def test_fast_path_leaves_everything_else_to_lxml(body):
    """Bodies outside the flat plain subset are not read by the fast path; the general path decides."""
    assert xmlrpc._fast_call(body, LIMITS) is None
    try:
        expected = xmlrpc._lxml_call(body, LIMITS)
    except WireError as error:
        with pytest.raises(WireError, match=re.escape(str(error))):
            xmlrpc.decode_call(body, LIMITS)
    else:
        assert xmlrpc.decode_call(body, LIMITS) == expected


@pytest.mark.parametrize("body, reason", [
    (b"not xml", "not well-formed"),
    (b"<methodResponse/>", "expected <methodCall>"),
    (b"<methodCall><params/></methodCall>", "without methodName"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><methodCall><methodName>&a;</methodName>'
     b"</methodCall>", "document type"),
    (b"<methodCall><methodName>a</methodName><params><param><value><foo/></value></param></params></methodCall>",
     "unknown value type"),
    (b"<methodCall><methodName>a</methodName><params><param><value><int>x</int></value></param></params>"
     b"</methodCall>", "bad <int>"),
])
def test_hostile_or_broken_xml(body, reason):
    """Broken, entity-laden or ill-typed bodies raise WireError with a clear reason."""
    with pytest.raises(WireError, match=reason):
        xmlrpc.decode_call(body, LIMITS)


def test_depth_and_size_limits():
    """Deep nesting, too many elements and oversized bodies are refused."""
    deep = "<value><array><data>" * 10 + "<value>x</value>" + "</data></array></value>" * 10
    body = f"<methodCall><methodName>a</methodName><params><param>{deep}</param></params></methodCall>".encode()
    with pytest.raises(WireError, match="nested deeper"):
        xmlrpc.decode_call(body, LIMITS)
    many = "<value>x</value>" * 600
    body = (f"<methodCall><methodName>a</methodName><params><param><value><array><data>{many}</data></array>"
            f"</value></param></params></methodCall>").encode()
    with pytest.raises(WireError, match="more than 500"):
        xmlrpc.decode_call(body, LIMITS)
    with pytest.raises(WireError, match="larger than"):
        xmlrpc.decode_call(b" " * (LIMITS.max_body + 1), LIMITS)


def test_jsonrpc_v1_and_v2_shapes():
    """v1 carries error:null on success; v2 has no error key on success and xapi's error object."""
    v1 = jsonrpc.decode_call(b'{"method":"VM.get_all","params":["s"],"id":1}', LIMITS)
    assert jsonrpc.success(v1, ["a"]) == b'{"result":["a"],"error":null,"id":1}'
    assert jsonrpc.failure(v1, ["HANDLE_INVALID", "VM", "x"]) == \
        b'{"result":null,"error":["HANDLE_INVALID","VM","x"],"id":1}'
    v2 = jsonrpc.decode_call(b'{"jsonrpc":"2.0","method":"VM.get_all","params":["s"],"id":"q"}', LIMITS)
    assert jsonrpc.success(v2, {"n": 1 << 40, "i": Int32(2)}) == \
        b'{"jsonrpc":"2.0","result":{"n":1099511627776,"i":2},"id":"q"}'
    assert jsonrpc.failure(v2, ["SESSION_INVALID", "s"]) == \
        b'{"jsonrpc":"2.0","error":{"code":1,"message":"SESSION_INVALID","data":["s"]},"id":"q"}'


@pytest.mark.parametrize("body, reason", [
    (b"{", "malformed JSON"),
    (b"[1]", "must be an object"),
    (b'{"params":[]}', "without a method"),
    (b'{"method":"a","params":[]}', "notifications"),
    (b'{"method":"a","params":5,"id":1}', "params must be an array"),
    (b'{"method":"a","params":' + b"[" * 30 + b"]" * 30 + b',"id":1}', "nested deeper"),
])
def test_broken_jsonrpc(body, reason):
    """Malformed JSON-RPC raises WireError with the reason."""
    with pytest.raises(WireError, match=reason):
        jsonrpc.decode_call(body, LIMITS)
