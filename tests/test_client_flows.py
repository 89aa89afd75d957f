"""Issue 16, "the rest clients call at connect or in their main flows": messages, blobs,
get_all_records_where, the management interface, start times, auto-power-on, call_plugin,
VIF.configure_ipv4/ipv6 and host.software_version; in-process and through the official SDK."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
import xmlrpc.client
from pathlib import Path

import pytest
import XenAPI
from support import PASSWORD, RealDaemon, vm_record

from xapid import where
from xapid.errors import XenAPIError

# -- the expression language ---------------------------------------------------------------------


def match(expr: str, **fields) -> bool:
    return where.evaluate(where.compile_where(expr), where.field_lookup(fields))


def test_where_basic_forms():
    """field = literal, literal = field, and/or/not, true/false, parentheses, xapi's __ names."""
    assert match('field "name__label" = "a"', name_label="a")
    assert match('"a" = field "name_label"', name_label="a")
    assert not match('field "name__label" = "a"', name_label="b")
    assert match('field "x" = "1" and field "y" = "2"', x=1, y=2)
    assert match('field "x" = "9" or field "y" = "2"', x=1, y=2)
    assert match('not field "x" = "9"', x=1)
    assert match('true') and not match('false')
    assert match('(field "x" = "1") and (true)', x=1)
    assert match('field "b" = "true" and field "t" = "(\'a\' \'b\')"', b=True, t=["a", "b"])


def test_where_precedence_is_xapis():
    """and/or are left-associative at one level; not takes the whole rest (declared lowest in xapi)."""
    assert match('true or false and false') is False  # (true or false) and false
    assert match('false and false or true') is True  # (false and false) or true
    assert match('not false and false') is True  # not (false and false)
    assert match('true and not true or true') is False  # true and not (true or true)


@pytest.mark.parametrize("expr", ['field "x" =', '= "a"', '"a" "b"', 'field "x" = "a" and', '(true', 'true)',
                                  'field x = "a"', '"unterminated', 'truex', '', 'field "a" = "b" = "c"'])
def test_where_refuses_bad_expressions(expr):
    with pytest.raises(XenAPIError) as info:
        where.compile_where(expr)
    assert info.value.description[0] == "INVALID_VALUE" and info.value.description[1] == expr


def test_where_hostile_input_is_bounded_and_linear():
    """Deep nesting is refused quickly; long flat chains parse and evaluate in linear time."""
    deep = "(" * 100_000 + "true" + ")" * 100_000
    with pytest.raises(XenAPIError):
        where.compile_where(deep)
    with pytest.raises(XenAPIError):
        where.compile_where("not " * 10_000 + "true")
    assert where.parse("(" * 64 + "true" + ")" * 64).value is True
    with pytest.raises(XenAPIError) as info:
        where.compile_where("true or " * 20_000 + "true")  # longer than MAX_LENGTH
    assert "longer than" in info.value.description[2]
    n = where.MAX_LENGTH // 40
    chain = " or ".join(f'field "u" = "{i:08d}"' for i in range(n))
    assert len(chain) <= where.MAX_LENGTH
    started = time.monotonic()
    tree = where.compile_where(chain)
    assert where.evaluate(tree, where.field_lookup({"u": f"{n - 1:08d}"}))
    assert time.monotonic() - started < 2.0


def test_where_unknown_field_is_xapis_internal_error():
    with pytest.raises(XenAPIError) as info:
        match('field "nope" = "a"', name_label="a")
    assert info.value.description == ["INTERNAL_ERROR", "missing field", "nope", ""]
    assert match('false and field "nope" = "a"') is False  # short-circuit, as xapi


def test_get_all_records_where_in_process(admin):
    a = admin("VM.create", vm_record(name_label="alpha"))
    admin("VM.create", vm_record(name_label="beta"))
    found = admin("VM.get_all_records_where", 'field "name__label" = "alpha"')
    assert list(found) == [a] and found[a]["name_label"] == "alpha"
    both = admin("VM.get_all_where", 'field "name__label" = "alpha" or field "name__label" = "beta"')
    assert len(both) == 2
    none = admin("VM.get_all_records_where", 'field "is_a_template" = "false" and (not field "power_state" = "Halted")'
                                             ' and field "is_control_domain" = "false"')
    assert none == {}
    # without the parentheses not takes the rest of the chain (xapi's precedence): dom0 matches
    dom0 = admin("VM.get_all_records_where", 'field "is_a_template" = "false" and not field "power_state" = "Halted"'
                                             ' and field "is_control_domain" = "false"')
    assert [r["is_control_domain"] for r in dom0.values()] == [True]
    assert admin.fails("VM.get_all_records_where", "bogus")[:2] == ["INVALID_VALUE", "bogus"]
    assert admin("host.get_all_records_where", "true").keys() == set(admin("host.get_all"))


# -- messages ---------------------------------------------------------------------------------------


def test_messages_in_process(env, admin):
    host = admin("host.get_all")[0]
    host_uuid = admin("host.get_uuid", host)
    ref = admin("message.create", "TEST_ALERT", 3, "Host", host_uuid, "hello")
    record = admin("message.get_record", ref)
    assert record["name"] == "TEST_ALERT" and record["cls"] == "Host" and record["priority"] == 3
    assert admin("message.get_by_uuid", record["uuid"]) == ref
    assert ref in admin("message.get_all") and ref in admin("message.get_all_records")
    assert ref in admin("message.get_since", record["timestamp"])
    assert ref in admin("message.get", "Host", host_uuid, record["timestamp"])
    assert list(admin("message.get_all_records_where", 'field "name" = "TEST_ALERT"')) == [ref]
    assert admin.fails("message.create", "X", 1, "VM", host_uuid, "") == ["UUID_INVALID", "VM", host_uuid]
    assert env.login("vmadmin").fails("message.create", "X", 1, "Host", host_uuid, "")[0] == "RBAC_PERMISSION_DENIED"
    admin("message.destroy", ref)
    assert ref not in admin("message.get_all")


def test_messages_are_bounded_and_persist(env, admin):
    host_uuid = admin("host.get_uuid", admin("host.get_all")[0])
    env.api.max_messages = 3
    refs = []
    for i in range(5):
        refs.append(admin("message.create", f"M{i}", 1, "Host", host_uuid, ""))
        env.clock.advance(1)
    assert set(admin("message.get_all")) == set(refs[2:])
    env.restart()
    admin = env.login("admin")
    assert set(admin("message.get_all")) == set(refs[2:])


# -- blobs, management interface, start times, VIF IP configuration --------------------------------


def test_blobs_in_process(env, admin):
    vm = admin("VM.create", vm_record())
    blob = admin("VM.create_new_blob", vm, "notes", "text/plain", False)
    assert admin("VM.get_blobs", vm) == {"notes": blob}
    assert admin("blob.get_mime_type", blob) == "text/plain" and admin("blob.get_size", blob) == 0
    assert admin.fails("VM.create_new_blob", vm, "notes", "", False)[0] == "MAP_DUPLICATE_KEY"
    assert admin.fails("VM.create_new_blob", vm, "x", "text/plain\r\nX-Evil: 1", False)[0] == "INVALID_VALUE"
    for cls in ("host", "pool", "SR", "network"):
        owner = admin(f"{cls}.get_all")[0]
        b = admin(f"{cls}.create_new_blob", owner, "n", "", True)
        assert admin("blob.get_mime_type", b) == "application/octet-stream"
    admin("blob.destroy", blob)
    assert admin("VM.get_blobs", vm) == {}


def test_management_interface_and_start_times(env, admin):
    host = admin("host.get_all")[0]
    pif = admin("host.get_management_interface", host)
    assert admin("PIF.get_management", pif) is True and admin("PIF.get_host", pif) == host
    other = admin("host.get_other_config", host)
    assert other["agent_start_time"] == f"{int(env.clock.seconds())}."
    assert other["boot_time"].endswith(".") and int(other["boot_time"][:-1]) > 0


def test_configure_ip_in_process(env, admin):
    vm = admin("VM.create", vm_record())
    network = admin("network.get_all")[0]
    vif = admin("VIF.create", {"device": "0", "network": network, "VM": vm, "MAC": "", "MTU": "1500",
                               "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert admin.fails("VIF.configure_ipv4", vif, "Static", "10.0.0.2/24", "10.0.0.1") == ["VM_LACKS_FEATURE", vm]
    with env.api.store.transaction():
        metrics = env.api.store.add("VM_guest_metrics", {"other": {"feature-static-ip-setting": "1"}})
        env.api.store.update(vm, {"guest_metrics": metrics})
    assert admin.fails("VIF.configure_ipv4", vif, "Static", "10.0.0.2", "") == \
        ["INVALID_CIDR_ADDRESS_SPECIFIED", "address"]
    assert admin.fails("VIF.configure_ipv4", vif, "Static", "10.0.0.2/24", "nope") == \
        ["INVALID_IP_ADDRESS_SPECIFIED", "gateway"]
    admin("VIF.configure_ipv4", vif, "Static", "10.0.0.2/24", "10.0.0.1")
    record = admin("VIF.get_record", vif)
    assert (record["ipv4_configuration_mode"], record["ipv4_addresses"], record["ipv4_gateway"]) == \
        ("Static", ["10.0.0.2/24"], "10.0.0.1")
    admin("VIF.configure_ipv6", vif, "Static", "fd00::2/64", "")
    assert admin("VIF.get_ipv6_addresses", vif) == ["fd00::2/64"]
    assert admin.fails("VIF.configure_ipv6", vif, "Static", "10.0.0.2/24")[0] == "INVALID_CIDR_ADDRESS_SPECIFIED"


# -- call_plugin ---------------------------------------------------------------------------------------

GOOD_PLUGIN = """#!/usr/bin/env python3
import sys, xmlrpc.client
params, fn = xmlrpc.client.loads(sys.argv[1])
session, args = params
if fn == "fail":
    sys.exit(3)
if fn == "xenapi_error":
    print(xmlrpc.client.dumps(({"Status": "Failure", "ErrorDescription": ["SR_BACKEND_FAILURE", "x", "y"]},),
                              methodresponse=True))
    sys.exit(0)
print(xmlrpc.client.dumps((fn + ":" + ",".join(f"{k}={v}" for k, v in sorted(args.items())),), methodresponse=True))
"""


@pytest.fixture
def plugins(tmp_path: Path, env):
    d = tmp_path / "plugins"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    good = d / "echo"
    good.write_text(GOOD_PLUGIN)
    os.chmod(good, 0o755)
    env.api.plugin_dir = str(d)
    return d


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plugins must be owned by root")


@needs_root
def test_call_plugin_runs_a_good_plugin(admin, plugins):
    host = admin("host.get_all")[0]
    assert admin("host.call_plugin", host, "echo", "hello", {"a": "1", "b": "two"}) == "hello:a=1,b=two"
    assert admin.fails("host.call_plugin", host, "echo", "fail", {})[:2] == ["XENAPI_PLUGIN_FAILURE", "non-zero exit"]
    assert admin.fails("host.call_plugin", host, "echo", "xenapi_error", {}) == ["SR_BACKEND_FAILURE", "x", "y"]


@needs_root
def test_call_plugin_refuses_anything_else(env, admin, plugins, tmp_path):
    host = admin("host.get_all")[0]
    for name in ("missing", "../plugins/echo", "/bin/true", ".", "..", "", "sub/echo"):
        assert admin.fails("host.call_plugin", host, name, "f", {}) == ["XENAPI_MISSING_PLUGIN", name]
    bad = plugins / "notroot"
    bad.write_text(GOOD_PLUGIN)
    os.chmod(bad, 0o755)
    os.chown(bad, 65534, 65534)
    gw = plugins / "groupwritable"
    gw.write_text(GOOD_PLUGIN)
    os.chmod(gw, 0o775)
    noexec = plugins / "noexec"
    noexec.write_text(GOOD_PLUGIN)
    os.chmod(noexec, 0o644)
    (plugins / "link").symlink_to(plugins / "echo")
    (plugins / "adir").mkdir()
    for name in ("notroot", "groupwritable", "noexec", "link", "adir"):
        assert admin.fails("host.call_plugin", host, name, "f", {}) == ["XENAPI_MISSING_PLUGIN", name]
    assert env.login("vmadmin").fails("host.call_plugin", host, "echo", "f", {})[0] == "RBAC_PERMISSION_DENIED"
    os.chmod(plugins, 0o777)  # a directory others may write to is not trusted at all
    assert admin.fails("host.call_plugin", host, "echo", "f", {}) == ["XENAPI_MISSING_PLUGIN", "echo"]


# -- auto-power-on -------------------------------------------------------------------------------------


def test_auto_poweron_in_process(env, admin):
    on = admin("VM.create", vm_record(name_label="on", other_config={"auto_poweron": "true"}))
    off = admin("VM.create", vm_record(name_label="off"))
    pool = admin("pool.get_all")[0]
    env.restart()
    env.settle()
    admin = env.login("admin")
    assert admin("VM.get_power_state", on) == "Halted"  # the pool flag is not set
    admin("pool.add_to_other_config", pool, "auto_poweron", "true")
    env.restart()
    env.settle()
    admin = env.login("admin")
    assert admin("VM.get_power_state", on) == "Running"
    assert admin("VM.get_power_state", off) == "Halted"


# -- through the official SDK against a real daemon ----------------------------------------------------


@pytest.fixture(scope="module")
def flows_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flows")
    plugin_dir = tmp / "plugins"
    plugin_dir.mkdir()
    os.chmod(plugin_dir, 0o755)
    (plugin_dir / "echo").write_text(GOOD_PLUGIN)
    os.chmod(plugin_dir / "echo", 0o755)
    d = RealDaemon(tmp, config=f"[security]\nplugin_dir = {plugin_dir}\n[limits]\nmax_blob_bytes = 1024\n")
    yield d
    d.stop()


def sdk(d: RealDaemon, user: str = "admin") -> XenAPI.Session:
    s = XenAPI.Session(d.url)
    s.login_with_password(user, PASSWORD, "1.0", "xapid-tests")
    return s


def http(d: RealDaemon, method: str, path: str, body: bytes | None = None, user: str | None = None):
    request = urllib.request.Request(d.url.rstrip("/") + path, data=body, method=method)
    if user:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def test_sdk_messages_and_http(flows_daemon):
    s = sdk(flows_daemon)
    x = s.xenapi
    host = x.host.get_all()[0]
    host_uuid = x.host.get_uuid(host)
    since = x.host.get_servertime(host)
    ref = x.message.create("SDK_ALERT", "2", "Host", host_uuid, "<b>body</b>")
    got = x.message.get_since(since)
    assert ref in got and got[ref]["body"] == "<b>body</b>" and got[ref]["priority"] == "2"
    assert ref in x.message.get_all_records_where(f'field "obj_uuid" = "{host_uuid}"')
    status, body, _ = http(flows_daemon, "GET", f"/messages?session_id={s._session}&cls=Host")
    assert status == 200 and b"<name>SDK_ALERT</name>" in body and b"&lt;b&gt;" in body
    x.message.destroy(ref)
    status, _, _ = http(flows_daemon, "PUT", f"/messages?session_id={s._session}&cls=Host&uuid={host_uuid}", body)
    assert status == 200
    assert ref in x.message.get_all()  # imported back with its ref, as xapi does
    s.logout()


def test_sdk_blobs_over_http(flows_daemon):
    s = sdk(flows_daemon)
    x = s.xenapi
    vm = x.VM.create(vm_record(name_label="blob-vm"))
    private = x.VM.create_new_blob(vm, "private", "text/plain")
    public = x.VM.create_new_blob(vm, "public", "image/png", True)
    assert http(flows_daemon, "PUT", f"/blob?ref={private}", b"secret")[0] == 401
    assert http(flows_daemon, "PUT", f"/blob?ref={private}", b"secret", user="operator")[0] == 403
    assert http(flows_daemon, "PUT", f"/blob?ref={private}&session_id={s._session}", b"secret")[0] == 200
    assert http(flows_daemon, "PUT", f"/blob?ref={public}&session_id={s._session}", b"png!")[0] == 200
    assert http(flows_daemon, "PUT", f"/blob?ref={public}&session_id={s._session}", b"x" * 2000)[0] == 413
    assert x.blob.get_size(private) == "6"
    assert http(flows_daemon, "GET", f"/blob?ref={private}")[0] == 401
    status, body, headers = http(flows_daemon, "GET", f"/blob?ref={private}", user="reader")
    assert (status, body, headers["Content-Type"]) == (200, b"secret", "text/plain")
    uuid = x.blob.get_uuid(public)
    status, body, headers = http(flows_daemon, "GET", f"/blob?uuid={uuid}")  # public: no credentials
    assert (status, body, headers["Content-Type"]) == (200, b"png!", "image/png")
    path = flows_daemon.state / "blobs" / x.blob.get_uuid(private)
    assert path.read_bytes() == b"secret" and (path.stat().st_mode & 0o777) == 0o600
    assert http(flows_daemon, "GET", "/blob?ref=OpaqueRef:nope", user="reader")[0] == 404
    x.blob.destroy(private)
    assert not path.exists() and x.VM.get_blobs(vm) == {"public": public}
    s.logout()


def test_sdk_host_calls_and_software_version(flows_daemon):
    s = sdk(flows_daemon)
    x = s.xenapi
    host = x.host.get_all()[0]
    pif = x.host.get_management_interface(host)
    assert x.PIF.get_management(pif) is True
    assert x.host.call_plugin(host, "echo", "f", {"k": "v"}) == "f:k=v"
    with pytest.raises(XenAPI.Failure) as info:
        x.host.call_plugin(host, "../echo", "f", {})
    assert info.value.details == ["XENAPI_MISSING_PLUGIN", "../echo"]
    other = x.host.get_other_config(host)
    assert {"boot_time", "agent_start_time"} <= set(other)
    sv = x.host.get_software_version(host)
    assert sv["product_brand"] == "xapid"
    for key in ("product_version", "product_version_text", "product_version_text_short", "platform_name",
                "platform_version", "build_number", "hostname", "date", "dbv", "xapi", "xapi_build", "xen", "linux",
                "xencenter_min", "xencenter_max", "network_backend", "db_schema"):
        assert sv[key], key
    assert [int(p) for p in sv["platform_version"].split(".")] == [3, 4, 0]
    assert [int(p) for p in sv["product_version"].split(".")]
    assert sv["xencenter_max"] == s.API_version
    assert len(x.VM.get_all_records_where('field "is_control_domain" = "true"')) == 1
    s.logout()


def test_sdk_auto_poweron_across_restart(tmp_path):
    d = RealDaemon(tmp_path)
    try:
        s = sdk(d)
        x = s.xenapi
        vm = x.VM.create(vm_record(name_label="autostart", other_config={"auto_poweron": "true"}))
        x.pool.add_to_other_config(x.pool.get_all()[0], "auto_poweron", "true")
        s.logout()
        d.stop()
        d.start()
        s = sdk(d)
        deadline = time.monotonic() + 15
        while s.xenapi.VM.get_power_state(vm) != "Running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.xenapi.VM.get_power_state(vm) == "Running"
        s.logout()
    finally:
        d.stop()


def test_plugin_call_encoding_is_xapis():
    """The plugin's argument is an XML-RPC methodCall of fn with the session and the args struct."""
    from xapid.objects.plugin import decode_answer, encode_call

    params, fn = xmlrpc.client.loads(encode_call("OpaqueRef:s", "f", {"a": "b"}))
    assert (fn, params) == ("f", ("OpaqueRef:s", {"a": "b"}))
    assert decode_answer(xmlrpc.client.dumps(("ok",), methodresponse=True)) == "ok"
    with pytest.raises(XenAPIError) as info:
        decode_answer(xmlrpc.client.dumps(xmlrpc.client.Fault(7, "no"), methodresponse=True))
    assert info.value.description == ["XENAPI_PLUGIN_FAILURE", "fault", "7", "no"]
    with pytest.raises(XenAPIError) as info:
        decode_answer("not xml")
    assert info.value.description[:2] == ["XENAPI_PLUGIN_FAILURE", "failed to parse plugin output"]
