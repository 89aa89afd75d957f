"""The metrics over HTTP: /rrd_updates, /host_rrd, /vm_rrd and /metrics, their formats and their auth."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from lxml import etree
from prometheus_client.parser import text_string_to_metric_families
from support import PASSWORD, ApiEnv, RealDaemon, resolve
from test_stats import T0, host_uuid, running_vm, tick
from twisted.internet.defer import Deferred

from xapid.stats.http import HttpExports
from xapid.stats.export import num
from xapid.wire.http import HttpRequest, HttpResponse


def get(env: ApiEnv, target: str, headers: dict[bytes, bytes] | None = None) -> HttpResponse:
    """GET *target* through the API port's routes, in process."""
    path = target.split("?", 1)[0].encode()
    route = HttpExports(env.api).routes()[path]
    result = route(HttpRequest(b"GET", target.encode(), b"HTTP/1.1", headers or {}, peer="test"))
    return resolve(result, env.clock) if isinstance(result, Deferred) else result


def session(admin: Any) -> str:
    return admin.session


def basic(user: str, password: str) -> dict[bytes, bytes]:
    return {b"authorization": b"Basic " + base64.b64encode(f"{user}:{password}".encode())}


@pytest.fixture
def loaded(env, admin):
    """A VM at load 0.5 and 12 ticks (one full minute) of samples; returns (vm uuid, host uuid)."""
    _, uuid = running_vm(admin, env, 0.5)
    for _ in range(12):
        tick(env)
    return uuid, host_uuid(admin)


def test_rrd_updates_xml_exact_values(env, admin, loaded):
    """5-s rows of a VM, newest first, with exact values, xapi's legend and meta."""
    uuid, _ = loaded
    reply = get(env, f"/rrd_updates?session_id={session(admin)}&start={T0 + 30}&cf=AVERAGE&vm_uuid={uuid}")
    assert reply.status == 200
    assert dict(reply.headers)[b"Content-Type"] == b"text/xml"
    doc = etree.fromstring(reply.body)
    legend = [e.text for e in doc.iterfind("meta/legend/entry")]
    assert f"AVERAGE:vm:{uuid}:cpu0" in legend and f"AVERAGE:vm:{uuid}:memory" in legend
    assert doc.findtext("meta/step") == "5"
    assert int(doc.findtext("meta/columns")) == len(legend)
    times = [int(r.findtext("t")) for r in doc.iterfind("data/row")]
    assert times == list(range(T0 + 60, T0 + 25, -5))  # rows from start to the last update, newest first
    assert (doc.findtext("meta/start"), doc.findtext("meta/end")) == (str(T0 + 30), str(T0 + 60))
    cpu = legend.index(f"AVERAGE:vm:{uuid}:cpu0")
    memory = legend.index(f"AVERAGE:vm:{uuid}:memory")
    for row in doc.iterfind("data/row"):
        values = [v.text for v in row.iterfind("v")]
        assert values[cpu] == "0.5"
        assert values[memory] == str(512 << 20)


def test_rrd_updates_json_is_strings_and_minute_rows(env, admin, loaded):
    """json=true: every leaf a string; interval=60 picks the 1-min archive with AVERAGE, MIN and MAX."""
    uuid, huuid = loaded
    reply = get(env, f"/rrd_updates?session_id={session(admin)}&start={T0}&interval=60&host=true&json=true")
    assert dict(reply.headers)[b"Content-Type"] == b"application/json"
    data = json.loads(reply.body)
    meta = data["meta"]
    minute = (T0 + 60) // 60 * 60  # rows are aligned to absolute minutes: the newest complete one
    assert (meta["step"], meta["rows"], meta["end"]) == ("60", "1", str(minute))
    legend = meta["legend"]
    assert {f"AVERAGE:host:{huuid}:cpu_avg", f"MIN:vm:{uuid}:cpu0", f"MAX:vm:{uuid}:cpu0"} <= set(legend)
    assert meta["columns"] == str(len(legend))
    row = data["data"][0]
    assert row["t"] == str(minute)
    assert all(isinstance(v, str) for v in row["values"])
    assert row["values"][legend.index(f"MAX:vm:{uuid}:cpu0")] == "0.5"
    assert float(row["values"][legend.index(f"AVERAGE:host:{huuid}:cpu_avg")]) == pytest.approx(0.05 + 0.5 / 4)


def test_rrd_updates_accept_header_and_defaults(env, admin, loaded):
    """Without json=, Accept chooses; the default VM set is every resident VM; the host only with host=true."""
    uuid, _ = loaded
    reply = get(env, f"/rrd_updates?session_id={session(admin)}&start=-10", {b"accept": b"application/json"})
    legend = json.loads(reply.body)["meta"]["legend"]
    assert any(e.startswith(f"AVERAGE:vm:{uuid}:") for e in legend)
    assert not any(":host:" in e for e in legend)
    xml = get(env, f"/rrd_updates?session_id={session(admin)}&start=-10",
              {b"accept": b"text/xml, application/json;q=0.5"})
    assert xml.body.startswith(b'<?xml version="1.0" encoding="UTF-8"?><xport>')


@pytest.mark.parametrize(("query", "reason"), [
    ("", "start is required"),
    ("start=soon", "start must be a number"),
    ("start=0&cf=LAST", "cf 'LAST' is not archived"),
    ("start=0&interval=nan", "interval must be a number"),
])
def test_rrd_updates_bad_parameters(env, admin, query, reason):
    """Bad parameters are 400 with one line naming the problem."""
    reply = get(env, f"/rrd_updates?session_id={session(admin)}&{query}")
    assert reply.status == 400
    assert reason in reply.body.decode() and reply.body.count(b"\n") == 1


def test_vm_rrd_dump_matches_the_archives(env, admin, loaded):
    """/vm_rrd is an rrdtool dump: every ds, four archives (AVERAGE, then AVERAGE/MIN/MAX), rows oldest first,
    unknown rows as NaN."""
    uuid, _ = loaded
    reply = get(env, f"/vm_rrd?session_id={session(admin)}&uuid={uuid}")
    doc = etree.fromstring(reply.body)
    assert (doc.findtext("version"), doc.findtext("step"), doc.findtext("lastupdate")) == ("0003", "5", str(T0 + 60))
    names = [d.findtext("name") for d in doc.iterfind("ds")]
    assert "cpu0" in names and "memory" in names
    rras = doc.findall("rra")
    assert [(r.findtext("cf"), r.findtext("pdp_per_row")) for r in rras] == [
        ("AVERAGE", "1")] + [(cf, ppr) for ppr in ("12", "720", "17280") for cf in ("AVERAGE", "MIN", "MAX")]
    rows = rras[0].findall("database/row")
    assert len(rows) == 120
    cpu = names.index("cpu0")
    column = [row.findall("v")[cpu].text for row in rows]
    assert column[-11:] == ["0.5"] * 11  # the last eleven 5-s steps (the first tick only sets a baseline)
    assert column[0] == "NaN"
    table_rows = env.api.stats.table.dump(f"vm:{uuid}")["rra"][0]["database"]
    assert column == [num(r[cpu]) for r in table_rows]


def test_host_rrd_json_and_unknown_vm(env, admin, loaded):
    """/host_rrd?json=true is the same tree with string leaves; an unknown VM is 404; uuid is required."""
    data = json.loads(get(env, f"/host_rrd?session_id={session(admin)}&json=true").body)
    assert data["step"] == "5" and {d["name"] for d in data["ds"]} >= {"cpu0", "memory_free_kib"}
    assert all(isinstance(v, str) for row in data["rra"][0]["database"] for v in row)
    assert get(env, f"/vm_rrd?session_id={session(admin)}&uuid=no-such-vm").status == 404
    assert get(env, f"/vm_rrd?session_id={session(admin)}").status == 400


@pytest.mark.parametrize("path", ["/rrd_updates?start=0", "/host_rrd", "/vm_rrd?uuid=x", "/metrics"])
def test_every_endpoint_needs_credentials(env, path):
    """No credentials or a bad session: 401 with a Basic challenge."""
    for headers, target in (({}, path), ({}, f"{path}{'&' if '?' in path else '?'}session_id=OpaqueRef:nope"),
                            ({b"cookie": b"session_id=OpaqueRef:nope"}, path)):
        reply = get(env, target, headers)
        assert reply.status == 401, target
        assert dict(reply.headers)[b"WWW-Authenticate"] == b'Basic realm="xapid"'


def test_session_cookie_and_basic_auth(env, admin, loaded):
    """A session cookie and HTTP Basic both work; a wrong password or malformed header is 401."""
    assert get(env, "/host_rrd", {b"cookie": f"session_id={session(admin)}".encode()}).status == 200
    assert get(env, "/host_rrd", basic("admin", PASSWORD)).status == 200
    assert get(env, "/host_rrd", basic("admin", "wrong")).status == 401
    assert get(env, "/host_rrd", basic("nobody", PASSWORD)).status == 401
    assert get(env, "/host_rrd", {b"authorization": b"Basic !!!"}).status == 401
    assert get(env, "/host_rrd", {b"authorization": b"Bearer token"}).status == 401


def test_read_only_user_may_read_metrics(env, loaded):
    """Reading metrics needs only the read-only role."""
    assert get(env, "/host_rrd", basic("reader", PASSWORD)).status == 200


def test_logged_out_session_is_refused(env, admin, loaded):
    """A session that logged out no longer opens the exports."""
    ref = session(admin)
    admin("session.logout")
    assert get(env, f"/host_rrd?session_id={ref}").status == 401


def test_prometheus_exposition(env, admin, loaded):
    """/metrics: host and per-VM gauges with uuid, name and device labels, parsed by prometheus_client."""
    uuid, huuid = loaded
    reply = get(env, f"/metrics?session_id={session(admin)}")
    assert dict(reply.headers)[b"Content-Type"].startswith(b"text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(reply.body.decode()) for s in family.samples}
    vm = (("vm", "vm"), ("vm_uuid", uuid))
    assert samples[("xapid_vm_cpu_usage", vm)] == pytest.approx(0.5)
    assert samples[("xapid_vm_vcpu_utilisation", tuple(sorted(vm + (("vcpu", "0"),))))] == pytest.approx(0.5)
    assert samples[("xapid_vm_memory_bytes", vm)] == 512 << 20
    host = (("host", "xapid-sim"), ("host_uuid", huuid))
    assert samples[("xapid_host_memory_total_bytes", host)] == 16 << 30
    assert samples[("xapid_host_cpu_utilisation", tuple(sorted(host + (("cpu", "3"),))))] == pytest.approx(
        0.05 + 0.5 / 4)
    assert samples[("xapid_vms", (("power_state", "Running"),))] == 1


def test_head_and_unknown_paths(env, admin):
    """GET / is the note, an unknown path 404; HEAD of a route has no body."""
    from xapid.wire.resource import ApiHandler

    handler = ApiHandler(None, None, HttpExports(env.api).routes())
    assert handler(HttpRequest(b"GET", b"/", b"HTTP/1.1", {})).status == 200
    assert handler(HttpRequest(b"GET", b"/nothing-here", b"HTTP/1.1", {})).status == 404
    head = resolve(handler(HttpRequest(b"HEAD", f"/host_rrd?session_id={session(admin)}".encode(),
                                       b"HTTP/1.1", {})), env.clock)
    assert (head.status, head.body) == (404, b"")  # no archives before the first tick


# -- a real daemon, read as Xen Orchestra and Prometheus do ------------------------------------


@pytest.fixture(scope="module")
def metrics_daemon(tmp_path_factory):
    d = RealDaemon(tmp_path_factory.mktemp("metrics-daemon"),
                   config="[stats]\nperiod = 1\nprometheus_listen = tcp:0:interface=127.0.0.1\n")
    yield d
    d.stop()


def _fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_xen_orchestra_style_rrd_updates(metrics_daemon):
    """XO's query (task_id, session_id, json=true, interval=5) parses with strict JSON into numbers."""
    import XenAPI

    s = XenAPI.Session(metrics_daemon.url)
    s.xenapi.login_with_password("admin", PASSWORD, "1.0", "xo-test")
    try:
        task = s.xenapi.task.create("stats", "")
        ref = s._session
        deadline = time.monotonic() + 20
        while True:
            status, headers, body = _fetch(
                f"{metrics_daemon.url}rrd_updates?cf=AVERAGE&host=true&interval=5&json=true"
                f"&start={int(time.time()) - 60}&session_id={ref}&task_id={task}")
            assert status == 200 and headers["Content-Type"] == "application/json"
            data = json.loads(body, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
            legend = data["meta"]["legend"]
            cpu = [i for i, e in enumerate(legend) if re.fullmatch(r"AVERAGE:host:[0-9a-f-]+:cpu0", e)]
            # as XO does: parseFloat every string
            values = [float(row["values"][cpu[0]]) for row in data["data"]] if cpu else []
            if sum(0 < v < 1 for v in values) >= 2:
                break
            assert time.monotonic() < deadline, body[:300]
            time.sleep(0.5)
        assert data["meta"]["columns"] == str(len(legend)) and data["meta"]["step"] == "5"
        s.xenapi.task.destroy(task)
    finally:
        s.xenapi.session.logout()


def test_prometheus_scrape_and_open_endpoint(metrics_daemon):
    """/metrics on the API port needs credentials; the prometheus_listen endpoint serves it without."""
    status, headers, _ = _fetch(f"{metrics_daemon.url}metrics")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="xapid"'
    auth = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    status, _, body = _fetch(f"{metrics_daemon.url}metrics", {"Authorization": auth})
    assert status == 200 and b"xapid_vms" in body
    port = re.findall(r"prometheus_listen: serving /metrics without authentication on 127\.0\.0\.1:(\d+)",
                      metrics_daemon.log.read_text())[-1]
    deadline = time.monotonic() + 20
    while True:
        status, _, body = _fetch(f"http://127.0.0.1:{port}/metrics")
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        if "xapid_host_memory_free_bytes" in names:
            break
        assert time.monotonic() < deadline, body[:500]
        time.sleep(0.5)
    assert status == 200
    assert _fetch(f"http://127.0.0.1:{port}/rrd_updates?start=0")[0] == 404  # only /metrics there
