"""Xen Orchestra's npm connector ``xen-api`` 4.7 against a real daemon, over both of its transports.

The connector is installed with npm into a temp dir once per module (node_modules is never kept in
the tree); ``tests/npm/xen_api_check.mjs`` connects, calls, disconnects and prints one JSON line.
No node, npm or registry is a failure, not a skip.  One test per transport also watches events:
the object cache, a VM started elsewhere seen within a second, and callAsync through task events.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

from support import PASSWORD, vm_record

NPM_DIR = Path(__file__).resolve().parent / "npm"
SCRIPT = "xen_api_check.mjs"
PACKAGE = "xen-api@4.7"
NODE_TIMEOUT = 60  # seconds; the node process must exit by itself after disconnect()
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def xen_api(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp dir holding the check script and node_modules/xen-api (4.7.x), installed once."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail("node and npm are required for the xen-api connector test")
    prefix = tmp_path_factory.mktemp("npm-xen-api")
    shutil.copy(NPM_DIR / "package.json", prefix)
    shutil.copy(NPM_DIR / SCRIPT, prefix)
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), PACKAGE]
    try:
        proc = subprocess.run(command, cwd=prefix, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} did not finish within 600 s")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    manifest = json.loads((prefix / "node_modules" / "xen-api" / "package.json").read_text())
    assert manifest["version"].startswith("4.7."), manifest["version"]
    return prefix


def run_check(xen_api: Path, daemon: Any, transport: str, record: dict[str, Any]) -> dict[str, Any]:
    """Run the node check; it must exit 0 by itself within NODE_TIMEOUT and print one JSON line."""
    args = ["node", SCRIPT, daemon.url, "admin", PASSWORD, transport, json.dumps(record)]
    proc = subprocess.Popen(args, cwd=xen_api, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"node did not exit by itself within {NODE_TIMEOUT} s after disconnect()\n"
                    f"stdout: {stdout}\nstderr: {stderr[-3000:]}")
    elapsed = time.monotonic() - start
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON output (rc {proc.returncode})\nstdout: {stdout}\nstderr: {stderr[-3000:]}"
    out = json.loads(lines[-1])
    out["_stderr"], out["_elapsed"] = stderr, elapsed
    assert proc.returncode == 0 and "error" not in out, f"{out}\nstderr: {stderr[-3000:]}"
    return out


def truth(daemon: Any) -> dict[str, Any]:
    """What the daemon holds, read with Python's stdlib XML-RPC client for comparison."""
    server = xmlrpc.client.ServerProxy(daemon.url)
    session = server.session.login_with_password("reader", PASSWORD)["Value"]
    try:
        pools = server.pool.get_all_records(session)["Value"]
        pool_ref, pool = next(iter(pools.items()))
        return {"pool_ref": pool_ref, "pool": pool,
                "host": server.host.get_record(session, pool["master"])["Value"],
                "vms": server.VM.get_all_records(session)["Value"]}
    finally:
        server.session.logout(session)


@pytest.mark.parametrize("transport", ["auto", "xml-rpc"], ids=["default-jsonrpc", "xml-rpc"])
def test_xen_api_connector(xen_api, daemon, transport):
    """xen-api 4.7 connects, reads the pool, VMs and host, gets HANDLE_INVALID as XapiError, disconnects and exits."""
    expected = truth(daemon)
    name = f"npm-{transport}"
    out = run_check(xen_api, daemon, transport, vm_record(name_label=name))
    context = f"stderr: {out['_stderr'][-3000:]}"
    # ints arrive as numbers on JSON-RPC and as digit strings on XML-RPC: this also proves that the
    # default transport settled on JSON-RPC (/jsonrpc) rather than falling back to XML-RPC
    as_int = int if transport == "auto" else str

    assert out["status"] == "connected", context
    assert out["sessionIdIsString"] is True
    assert out["statusAfterDisconnect"] == "disconnected"

    pool = out["pool"]
    assert pool["ref"] == expected["pool_ref"] and pool["type"] == "pool"
    assert UUID.fullmatch(pool["uuid"]) and pool["id"] == pool["uuid"] == expected["pool"]["uuid"]
    assert pool["master"] == expected["pool"]["master"] and pool["other_config"] == expected["pool"]["other_config"]

    vms = {vm["ref"]: vm for vm in out["vms"]}
    assert set(vms) == set(expected["vms"]), "the listed VMs differ from the daemon's"
    dom0 = [vm for vm in vms.values() if vm["is_control_domain"]]
    assert len(dom0) == 1, out["vms"]
    dom0 = dom0[0]
    assert dom0["power_state"] == "Running" and dom0["resident_on"] == pool["master"]
    assert dom0["uuid"] == expected["vms"][dom0["ref"]]["uuid"]
    assert type(dom0["memory_static_max"]) is as_int
    assert dom0["memory_static_max"] == as_int(expected["vms"][dom0["ref"]]["memory_static_max"])
    assert type(dom0["VCPUs_max"]) is as_int and int(dom0["VCPUs_max"]) >= 1

    host = out["host"]
    want = expected["host"]
    assert host["uuid"] == want["uuid"] and host["name_label"] == want["name_label"]
    assert host["API_version_major"] == as_int(want["API_version_major"])
    assert host["API_version_minor"] == as_int(want["API_version_minor"])
    assert host["enabled"] is True and host["address"] == want["address"]
    assert host["control_domain"] == dom0["ref"] and dom0["ref"] in host["resident_VMs"]
    assert {"product_version", "product_brand", "platform_version"} <= set(host["software_version"])
    assert {"cpu_count", "socket_count"} <= set(host["cpu_info"])
    assert len(host["host_CPUs"]) == int(host["cpu_info"]["cpu_count"])
    assert host["metrics"].startswith("OpaqueRef:")
    assert out["wrappedHost"] == {"ref": pool["master"], "id": want["uuid"], "type": "host"}

    assert out["failure"] == {"name": "XapiError", "code": "HANDLE_INVALID", "params": ["VM", "OpaqueRef:nope"],
                              "message": "HANDLE_INVALID(VM, OpaqueRef:nope)"}, context

    created = out["created"]
    assert created["ref"].startswith("OpaqueRef:") and created["ref"] not in expected["vms"]
    assert created["name_label"] == name and created["power_state"] == "Halted"
    assert created["memory_static_max"] == as_int(512 << 20) and created["is_a_template"] is False
    assert created["destroyed"] is True
    assert set(truth(daemon)["vms"]) == set(expected["vms"])


@pytest.mark.parametrize("transport", ["auto", "xml-rpc"])
def test_connector_watches_events(xen_api, daemon, transport):
    """The connector caches every VM, sees a VM started through the SDK within a second through
    event.from, and callAsync('VM.clean_shutdown') resolves through task events."""
    import XenAPI

    shutil.copy(NPM_DIR / "xen_api_watch.mjs", xen_api)
    sdk = XenAPI.Session(daemon.url)
    sdk.login_with_password("admin", PASSWORD)
    vm = sdk.xenapi.VM.create(vm_record(name_label=f"watched-{transport}"))
    uuid = sdk.xenapi.VM.get_uuid(vm)
    proc = subprocess.Popen(["node", "xen_api_watch.mjs", daemon.url, "admin", PASSWORD, transport, uuid],
                            cwd=xen_api, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fetched = json.loads(proc.stdout.readline())
        assert fetched["stage"] == "fetched", fetched
        assert uuid in [v["uuid"] for v in fetched["vms"]]
        assert {"VM", "VM_metrics", "host", "host_cpu", "pool", "SR", "PBD", "network", "PIF"} <= set(fetched["types"])
        sdk.xenapi.VM.start(vm, False, False)
        started = time.time()
        seen = json.loads(proc.stdout.readline())
        assert seen["stage"] == "running", seen
        assert seen["at"] / 1000 - started < 1.0
        stopped = json.loads(proc.stdout.readline())
        assert stopped["stage"] == "stopped", stopped
        assert any(t["name_label"] == "Async.VM.clean_shutdown" and t["status"] == "success"
                   for t in stopped["tasks"]), stopped["tasks"]
        assert proc.wait(NODE_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert sdk.xenapi.VM.get_power_state(vm) == "Halted"
    assert not [t for t in sdk.xenapi.task.get_all_records().values() if t["name_label"] == "Async.VM.clean_shutdown"]
    sdk.xenapi.VM.destroy(vm)


@pytest.mark.parametrize("transport", ["auto", "xml-rpc"])
def test_connector_creates_from_template_and_reverts(xen_api, daemon, transport):
    """``tests/npm/xen_api_template.mjs``: Xen Orchestra's ``createVm`` through the connector (``callAsync``
    ``VM.clone`` and ``VM.provision``, ``call`` for the rest; xo-server ``src/xapi/mixins/vm.mjs``), then its
    ``VM_snapshot`` (``@xen-orchestra/xapi/vm.mjs``: ``Async.VM.snapshot``, ``set_is_a_template false``) and
    ``revertVm`` (``callAsync('VM.revert')``) after changing fields and adding a disk."""
    shutil.copy(NPM_DIR / "xen_api_template.mjs", xen_api)
    proc = subprocess.run(["node", "xen_api_template.mjs", daemon.url, "admin", PASSWORD, transport, "Debian Bookworm 12"],
                          cwd=xen_api, capture_output=True, text=True, timeout=NODE_TIMEOUT, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rc {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in out, f"{out}\nstderr: {proc.stderr[-3000:]}"
    as_int = int if transport == "auto" else str
    created = out["created"]
    assert created["is_a_template"] is False and "disks" not in created["other_config"]
    assert created["other_config"]["base_template_name"] == "Debian Bookworm 12"
    assert any(k.startswith("xo:") for k in created["other_config"])
    assert created["VCPUs_max"] == as_int(2) and created["memory_dynamic_max"] == as_int(2 << 30)
    assert created["VBDs"] == 1 and created["VIFs"] == 1 and created["name_description"] == "created by xen-api"
    assert out["tasksLeft"] <= 0  # callAsync destroyed its tasks
    reverted = out["reverted"]
    assert reverted["name_description"] == "created by xen-api" and reverted["VCPUs_at_startup"] == as_int(2)
    assert reverted["parent"] == reverted["snapshot"] and reverted["power_state"] == "Halted"
    assert reverted["VBDs"] == 1 and reverted["diskReplaced"] is True and reverted["snapshotIsSnapshot"] is True
