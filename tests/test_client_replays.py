"""Issue 16: real clients' call sequences, replayed call for call with the official SDK on a real daemon.

Each test cites the client source it mirrors (read at these commits; facts only, no code copied):

- Ansible ``community.general`` (ansible-collections/community.general @ ade4f3ec):
  ``plugins/modules/xenserver_guest.py`` (``XenServerVM.deploy``, ``reconfigure``, ``get_changes``,
  ``main``) and ``plugins/module_utils/_xenserver.py`` (``XAPI.connect``, ``XenServerObject.__init__``,
  ``get_object_ref``, ``gather_vm_params``, ``set_vm_power_state``, ``wait_for_vm_ip_address``,
  ``gather_vm_facts``).
- Xen Orchestra (vatesfr/xen-orchestra @ 9ef53890): ``packages/xo-server/src/xapi/mixins/vm.mjs``
  (``createVm``, ``_editVm``), ``packages/xo-server/src/xapi/index.mjs`` (``_cloneVm``, ``_copyVm``),
  ``@xen-orchestra/xapi/{vdi,vbd,vif,xoData}.mjs`` (``VDI_create``, ``VBD_create``, ``VIF_create``,
  ``xoData.set``), ``packages/xen-api/index.mjs`` (``callAsync``: ``Async.*``, wait, ``task.destroy``).
  The same flow through the npm connector itself is ``tests/test_npm_xen_api.py::test_connector_creates_from_template_and_reverts``.
- XenCenter (xenserver/xenadmin @ b210cd2c): ``XenModel/Network/XenConnection.cs``
  (``ConnectWorkerThread``: login, then ``XenObjectDownloader.GetAllObjects`` once, then ``GetEvents`` in a
  loop on a duplicate of the session), ``XenModel/XenObjectDownloader.cs`` (``role.get_all_records``, then
  ``event.from(["*"], "", 30)`` and the token loop), ``XenModel/XenAPI/Marshalling.cs``
  (``GetXenAPIType``: an event class is kept if ``XenAPI.<class>`` exists, case-insensitive),
  ``XenModel/XenAPI/JsonRpc.cs`` (JSON-RPC 2.0 on ``/jsonrpc``), ``XenModel/XenAPI/Converters.cs``
  (``XenDateTimeConverter``'s formats). The login part is ``tests/test_roles_local_root.py::xencenter_login``.
- ``xe vm-install``: xapi-project/xen-api ``ocaml/xapi-cli-server/cli_operations.ml`` ``vm_install_real`` and
  ``cli_util.ml`` ``rewrite_provisioning_xml`` (the sequence as in ``../shared/reference/wave2-facts.md`` §7).
- The SDK's ``xapi_local()`` over a UNIX socket: ``tests/test_roles_local_root.py::test_xapi_local_empty_credentials_as_root``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import xmlrpc.client
from datetime import datetime
from typing import Any

import pytest
import XenAPI
from support import PASSWORD
from test_roles_local_root import xencenter_login

from xapid.schema import load_schema

GiB = 1 << 30
MiB = 1 << 20
NULL = "OpaqueRef:NULL"


def sdk(daemon: Any, originator: str = "test") -> XenAPI.Session:
    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD, "2.21", originator)
    return s


def wait_until(predicate, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out")


def call_async(x: Any, method: str, *args: Any) -> Any:
    """The connector's ``callAsync``: ``Async.<method>``, wait for the task to settle, take its result (the
    XML-RPC ``<value>`` text xapi stores), then ``task.destroy`` whatever the outcome."""
    cls, name = method.split(".")
    task = getattr(getattr(x.Async, cls), name)(*args)
    try:
        status = wait_until(lambda: (s := x.task.get_status(task)) != "pending" and s)
        if status != "success":
            raise XenAPI.Failure(x.task.get_error_info(task))
        result = x.task.get_result(task)
        return xmlrpc.client.loads(f"<params><param>{result}</param></params>")[0][0] if result else ""
    finally:
        x.task.destroy(task)


# -- Ansible xenserver_guest: deploy from a template ----------------------------------------------


def test_ansible_xenserver_guest_deploy(daemon):
    """``xenserver_guest`` with ``state: poweredon``, ``template``, ``name_desc``, ``hardware`` (2 vCPUs, 2 cores
    per socket, 1024 MB), one disk (``size_gb``, ``sr`` by name), one network (by name) and
    ``wait_for_ip_address: true``, call for call (sources in the module docstring):

    connect (``login_with_password(user, pw, ANSIBLE_VERSION, "Ansible")``), ``pool.get_all``,
    ``pool.get_default_SR``, ``session.get_this_host`` + ``host.get_software_version`` (product_version split on
    dots, ``ValueError`` → 0.0.0); ``VM.get_by_name_label(name)`` finds nothing; ``deploy()``: template by name,
    ``VM.get_power_state`` must be halted, disk SR by name, ``VM.copy(template, name, sr)`` (``linked_clone``
    false), ``VM.set_name_description("")``, and because the *template's* ``other_config`` has
    ``default_template``, the copy's ``disks`` key is deleted (``VM.set_other_config``) so that ``VM.provision``
    creates no disk; ``gather_vm_params``; ``reconfigure()`` from ``get_changes()``; ``VM.start``;
    ``wait_for_vm_ip_address`` polls ``VM.get_guest_metrics`` + ``VM_guest_metrics.get_record`` for
    ``networks["0/ip"]``; ``gather_vm_facts``."""
    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD, "2.0", "Ansible")
    x = s.xenapi
    name, sr_name = "ansible-guest", None

    def software_version() -> list[int]:
        host = x.session.get_this_host(s._session)
        try:
            return [int(n) for n in x.host.get_software_version(host)["product_version"].split(".")]
        except ValueError:
            return [0, 0, 0]

    def gather_vm_params(vm: str) -> dict:
        params = x.VM.get_record(vm)
        params["affinity"] = x.host.get_record(params["affinity"]) if params["affinity"] != NULL else {}
        vbds = sorted((x.VBD.get_record(r) for r in params["VBDs"]), key=lambda v: int(v["userdevice"]))
        for vbd in vbds:
            vbd["VDI"] = x.VDI.get_record(vbd["VDI"]) if vbd["VDI"] != NULL else {}
        params["VBDs"] = vbds
        vifs = sorted((x.VIF.get_record(r) for r in params["VIFs"]), key=lambda v: int(v["device"]))
        for vif in vifs:
            vif["network"] = x.network.get_record(vif["network"]) if vif["network"] != NULL else {}
        params["VIFs"] = vifs
        gm = params["guest_metrics"]
        params["guest_metrics"] = x.VM_guest_metrics.get_record(gm) if gm != NULL else {}
        version = software_version()
        native = version[0] >= 7 and params["guest_metrics"] and "feature-static-ip-setting" in params["guest_metrics"]["other"]
        params["customization_agent"] = "native" if native else "custom"
        return params

    # XenServerObject.__init__
    pool = x.pool.get_all()[0]
    default_sr = x.pool.get_default_SR(pool)
    assert default_sr != NULL
    software_version()
    sr_name = x.SR.get_name_label(default_sr)  # the playbook names the pool's default SR
    # XenServerVM.__init__: get_object_ref(name, fail=False)
    assert x.VM.get_by_name_label(name) == []

    # deploy()
    (template,) = x.VM.get_by_name_label("Debian Bookworm 12")
    assert x.VM.get_power_state(template).lower() == "halted"
    (sr,) = x.SR.get_by_name_label(sr_name)
    vm = x.VM.copy(template, name, sr)
    x.VM.set_name_description(vm, "")
    template_other = x.VM.get_other_config(template)
    assert template_other.get("default_template")  # as xapi: the default templates carry it
    other = x.VM.get_other_config(vm)
    other.pop("disks", None)
    x.VM.set_other_config(vm, other)
    x.VM.provision(vm)
    params = gather_vm_params(vm)
    assert params["VBDs"] == [] and not params["is_a_template"]

    # reconfigure() → get_changes()
    assert params["is_a_template"] is False and params["is_a_snapshot"] is False
    vbd_allowed = x.VM.get_allowed_VBD_devices(vm)
    disk_userdevice = next(d for d in vbd_allowed if d != "3" and int(d) > -1)
    assert x.SR.get_by_name_label(sr_name)  # existence check of disks[0].sr
    vif_allowed = x.VM.get_allowed_VIF_devices(vm)
    assert "0" in vif_allowed  # the new NIC goes right above the highest existing one (none: "-1")
    # reconfigure(): changes in get_changes' order
    x.VM.set_name_description(vm, "deployed by Ansible")
    if 2 < int(params["VCPUs_at_startup"]):
        x.VM.set_VCPUs_at_startup(vm, "2")
        x.VM.set_VCPUs_max(vm, "2")
    else:
        x.VM.set_VCPUs_max(vm, "2")
        x.VM.set_VCPUs_at_startup(vm, "2")
    x.VM.remove_from_platform(vm, "cores-per-socket")
    x.VM.add_to_platform(vm, "cores-per-socket", "2")
    memory = 1024 * MiB
    x.VM.set_memory_limits(vm, str(min(memory, int(params["memory_static_min"]))), str(memory), str(memory),
                           str(memory))
    disk_sr = x.SR.get_by_name_label(sr_name)[0]
    vdi = x.VDI.create({"name_label": f"{params['name_label']}-0", "name_description": "", "SR": disk_sr,
                        "virtual_size": str(10 * GiB), "type": "user", "sharable": False, "read_only": False,
                        "other_config": {}})
    x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": disk_userdevice, "bootable": False, "mode": "RW",
                  "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                  "qos_algorithm_params": {}})
    network = x.network.get_by_name_label(x.network.get_name_label(
        next(n for n, r in x.network.get_all_records().items() if r["bridge"] == "xenbr0")))[0]
    x.VIF.create({"device": "0", "network": network, "VM": vm, "MAC": "", "MTU": x.network.get_MTU(network),
                  "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    params = gather_vm_params(vm)
    assert params["customization_agent"] == "custom"  # halted: no guest metrics yet

    # set_vm_power_state("poweredon")
    assert x.VM.get_power_state(vm).lower() == "halted"
    x.VM.start(vm, False, False)
    # wait_for_vm_ip_address
    assert x.VM.get_power_state(vm).lower() == "running"

    def ip() -> dict | None:
        gm = x.VM.get_guest_metrics(vm)
        if gm != NULL:
            record = x.VM_guest_metrics.get_record(gm)
            if "0/ip" in record["networks"]:
                return record
        return None

    guest = wait_until(ip, interval=0.5)
    assert guest["networks"]["0/ip"]
    # gather_vm_facts: the disks' SRs
    params = gather_vm_params(vm)
    for vbd in params["VBDs"]:
        if vbd["type"] == "Disk":
            assert x.SR.get_record(vbd["VDI"]["SR"])["uuid"] == x.SR.get_uuid(sr)
    assert params["VCPUs_max"] == "2" and params["platform"]["cores-per-socket"] == "2"
    assert params["memory_static_max"] == str(memory) and params["name_description"] == "deployed by Ansible"
    assert [v["VDI"]["virtual_size"] for v in params["VBDs"]] == [str(10 * GiB)]
    assert params["VIFs"][0]["network"]["bridge"] == "xenbr0"
    x.VM.hard_shutdown(vm)
    s.xenapi.session.logout()


# -- Xen Orchestra createVm ----------------------------------------------------------------------


def xo_create_vm(x: Any, template: str, name: str, sr: str, network: str, creator: str) -> str:
    """Numbers go as strings: the connector's XML-RPC transport (``transports/_prepareXmlRpcParams.mjs``)
    turns them into strings as well. ``createVm(templateId, {name_label, name_description, CPUs, memoryMax, vdis: [{size, SR, name_label,
    name_description}], vifs: [{network}]})`` with the defaults ``clone = true``, no install repository."""
    vm = call_async(x, "VM.clone", template, name)  # _cloneVm
    try:
        x.VM.remove_from_other_config(vm, "disks")  # ignoreErrors
    except XenAPI.Failure:
        pass
    call_async(x, "VM.provision", vm)
    record = x.VM.get_record(vm)  # _getOrWaitObject (the connector's cache)
    # xoData.set: add_to_other_config('xo:<uuid[:8]>', JSON)
    x.VM.add_to_other_config(vm, "xo:" + record["uuid"][:8],
                             json.dumps({"creation": {"date": "2025-01-01T00:00:00.000Z",
                                                      "template": x.VM.get_uuid(template), "user": creator}}))
    # _editVm(vm, {name_description, CPUs: 2, memoryMax: 2 GiB}); cpus is constrained by cpusStaticMax (gte):
    # VCPUs_max is raised first
    x.VM.set_name_description(vm, "made by XO")
    if int(record["VCPUs_max"]) < 2:
        x.VM.set_VCPUs_max(vm, "2")
    x.VM.set_VCPUs_at_startup(vm, "2")
    dynamic_max = 2 * GiB
    x.VM.set_memory_limits(vm, str(min(int(record["memory_static_min"]), dynamic_max)),
                           str(max(dynamic_max, int(record["memory_static_max"]))),
                           str(min(int(record["memory_dynamic_min"]), dynamic_max)), str(dynamic_max))
    # vdis: none has a userdevice, so each is created
    vbds = [x.VBD.get_record(r) for r in x.VM.get_VBDs(vm)]  # getField('VM', vmRef, 'VBDs')
    has_bootable = any(v["bootable"] for v in vbds)
    vdi = x.VDI.create({"name_description": "data", "name_label": f"{name} disk", "other_config": {},
                        "read_only": False, "sharable": False, "SR": sr, "type": "user",
                        "virtual_size": str(4 * GiB)})  # sm_config, tags, xenstore_data undefined: not sent
    allowed = x.VM.get_allowed_VBD_devices(vm)
    userdevice = allowed[1] if allowed[0] == "3" and len(allowed) > 1 else allowed[0]
    assert x.VM.get_power_state(vm) == "Halted"
    x.VBD.create({"bootable": not has_bootable, "empty": False, "mode": "RW", "other_config": {},
                  "qos_algorithm_params": {}, "qos_algorithm_type": "", "type": "Disk", "unpluggable": False,
                  "userdevice": userdevice, "VDI": vdi, "VM": vm})
    # vifs
    device = x.VM.get_allowed_VIF_devices(vm)[0]
    assert x.VM.get_power_state(vm) == "Halted"
    mtu = x.network.get_MTU(network)
    x.VIF.create({"device": device, "locking_mode": "network_default", "MAC": "", "MTU": mtu, "network": network,
                  "other_config": {}, "qos_algorithm_params": {}, "qos_algorithm_type": "", "VM": vm})
    return vm


def test_xen_orchestra_create_vm(daemon):
    """Xen Orchestra's ``createVm`` (``packages/xo-server/src/xapi/mixins/vm.mjs``), as its connector sends it:
    ``Async.VM.clone`` of the template (``_cloneVm``, ``index.mjs``), ``VM.remove_from_other_config(vm,
    "disks")`` (XO creates the disks itself), ``Async.VM.provision``, ``xoData.set`` (``add_to_other_config``
    of ``xo:<uuid prefix>``), ``_editVm`` (description, ``VCPUs_max`` then ``VCPUs_at_startup``,
    ``set_memory_limits``), then ``VDI_create`` / ``VBD_create`` (``@xen-orchestra/xapi/vdi.mjs``, ``vbd.mjs``:
    ``VM.get_allowed_VBD_devices``, ``VM.get_power_state``, the records as sent) and ``VIF_create``
    (``vif.mjs``: ``VM.get_allowed_VIF_devices``, ``network.get_MTU``); each ``callAsync`` ends with
    ``task.destroy``. The VM then starts and stops as XO's ``startVm`` / ``shutdownVm`` do (``callAsync``)."""
    s = sdk(daemon, "xo")
    x = s.xenapi
    template = x.VM.get_by_name_label("Rocky Linux 9")[0]
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    network = next(n for n, r in x.network.get_all_records().items() if r["bridge"] == "xenbr0")
    tasks_before = set(x.task.get_all())
    vm = xo_create_vm(x, template, "xo-created", sr, network, "user-1")
    rec = x.VM.get_record(vm)
    assert not rec["is_a_template"] and "disks" not in rec["other_config"]
    assert rec["other_config"]["base_template_name"] == "Rocky Linux 9"
    assert json.loads(rec["other_config"]["xo:" + rec["uuid"][:8]])["creation"]["user"] == "user-1"
    assert rec["VCPUs_max"] == rec["VCPUs_at_startup"] == "2" and rec["memory_dynamic_max"] == str(2 * GiB)
    (vbd,) = [x.VBD.get_record(r) for r in rec["VBDs"]]
    assert vbd["userdevice"] == "0" and vbd["bootable"] and x.VDI.get_virtual_size(vbd["VDI"]) == str(4 * GiB)
    (vif,) = [x.VIF.get_record(r) for r in rec["VIFs"]]
    assert vif["device"] == "0" and vif["network"] == network and vif["MAC"]
    assert set(x.task.get_all()) == tasks_before  # every task destroyed
    call_async(x, "VM.start", vm, False, False)
    assert x.VM.get_power_state(vm) == "Running"
    call_async(x, "VM.clean_shutdown", vm)
    assert x.VM.get_power_state(vm) == "Halted"
    s.xenapi.session.logout()


# -- XenCenter: login and cache fill ---------------------------------------------------------------

# XenModel/XenAPI/*.cs at xenadmin b210cd2c: the classes Marshalling.GetXenAPIType resolves
XENCENTER_TYPES = {n.lower() for n in ["Auth", "Blob", "Bond", "Certificate", "Cluster", "Cluster_host", "Console", "Crashdump", "DR_task", "Data_source", "Event", "Feature", "GPU_group", "Host", "Host_cpu", "Host_crashdump", "Host_metrics", "Host_patch", "LVHD", "Message", "Network", "Network_sriov", "Observer", "PBD", "PCI", "PGPU", "PIF", "PIF_metrics", "PUSB", "PVS_cache_storage", "PVS_proxy", "PVS_server", "PVS_site", "Pool", "Pool_patch", "Pool_update", "Probe_result", "Repository", "Role", "SDN_controller", "SM", "SR", "Secret", "Session", "Sr_stat", "Subject", "Task", "Tunnel", "USB_group", "User", "VBD", "VBD_metrics", "VDI", "VGPU", "VGPU_type", "VIF", "VIF_metrics", "VLAN", "VM", "VMPP", "VMSS", "VM_appliance", "VM_guest_metrics", "VM_metrics", "VTPM", "VUSB", "Vdi_nbd_server_info"]}
IGNORED = {"session", "event", "user", "secret"}  # XenObjectDownloader.ProcessEvent drops these
SCHEMA = load_schema()


def test_xencenter_cache_fill_and_event_loop(daemon):
    """XenCenter's ``ConnectWorkerThread``: the login (``xencenter_login``), then ``GetAllObjects`` —
    ``role.get_all_records`` (roles are not covered by event.from), ``event.from(["*"], "", 30.0)`` — then
    ``GetEvents`` in a loop with the returned token on a duplicate of the session (same session ref), and the
    heartbeat ``host.get_servertime``. Every event class XenCenter does not drop must be a XenAPI type it knows,
    every snapshot must be a whole record, and a change made elsewhere comes back on the next ``event.from``."""
    login = xencenter_login(daemon.url, "operator", PASSWORD)
    session = login["session"]
    x = session.xenapi
    roles = x.role.get_all_records()
    assert {r["name_label"] for r in roles.values() if r["subroles"]} == set(SCHEMA.roles)
    batch = getattr(x.event, "from")(["*"], "", 30.0)
    token = batch["token"]
    kept: dict[str, dict[str, dict]] = {}
    for event in batch["events"]:
        cls = event["class"].lower()
        assert event["operation"] == "add"
        if cls in IGNORED:
            continue
        assert cls in XENCENTER_TYPES, f"XenCenter has no type for event class {event['class']}"
        spec = next(c for c in SCHEMA.classes.values() if c.name.lower() == cls)
        assert set(spec.fields) <= set(event["snapshot"]), (cls, set(spec.fields) - set(event["snapshot"]))
        kept.setdefault(cls, {})[event["ref"]] = event["snapshot"]
    for cls in ("pool", "host", "vm", "sr", "vdi", "pbd", "network", "pif", "host_metrics", "host_cpu", "vm_metrics"):
        assert kept.get(cls), f"no {cls} in the cache fill"
    assert kept["vm"] == {ref: rec for ref, rec in x.VM.get_all_records().items()}
    pool = next(iter(kept["pool"].values()))
    assert isinstance(x.host.get_servertime(pool["master"]), xmlrpc.client.DateTime)

    # the event loop, on a duplicate session object sharing the session ref
    loop = XenAPI.Session(daemon.url)
    loop._session = session._session
    other = sdk(daemon)
    target = other.xenapi.VM.clone(other.xenapi.VM.get_by_name_label("Generic Linux PV")[0], "seen by XenCenter")
    seen: dict = {}
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        batch = getattr(loop.xenapi.event, "from")(["*"], token, 30.0)
        token = batch["token"]
        for event in batch["events"]:
            if event["class"].lower() == "vm" and event["ref"] == target and event["operation"] in ("add", "mod"):
                seen = event["snapshot"]
    assert seen["name_label"] == "seen by XenCenter"
    other.xenapi.VM.destroy(target)
    other.xenapi.session.logout()
    x.session.logout()


XENCENTER_UTC = ("%Y%m%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%SZ")  # Converters.cs XenDateTimeConverter
XENCENTER_OTHER = ("%Y%m%dT%H:%M:%S",)


def jsonrpc(url: str, method: str, params: list) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode()
    request = urllib.request.Request(url + "jsonrpc", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.loads(response.read())
    assert "error" not in reply, reply
    return reply["result"]


def test_xencenter_cache_fill_over_jsonrpc(daemon):
    """Today's XenCenter speaks JSON-RPC 2.0 on ``/jsonrpc`` (``XenModel/XenAPI/JsonRpc.cs``,
    ``Session.cs``): the same fill (``session.login_with_password`` with version and UserAgent,
    ``role.get_all_records``, ``event.from(["*"], "", 30)``), and every ``datetime`` field of every snapshot
    must parse with ``XenDateTimeConverter``'s formats (otherwise XenCenter reads ``DateTime.MinValue``)."""
    url = daemon.url
    session = jsonrpc(url, "session.login_with_password", ["operator", PASSWORD, "2.21", "XenAPI/2.21"])
    try:
        assert jsonrpc(url, "role.get_all_records", [session])
        batch = jsonrpc(url, "event.from", [session, ["*"], "", 30.0])
        dated = {(c.name.lower(), f.name) for c in SCHEMA.classes.values() for f in c.fields.values()
                 if f.type.kind == "datetime"}
        checked = 0
        for event in batch["events"]:
            for field, value in event["snapshot"].items():
                if (event["class"].lower(), field) in dated:
                    assert any(_parses(value, f) for f in XENCENTER_UTC + XENCENTER_OTHER), (event["class"], field, value)
                    checked += 1
        assert checked  # VM_metrics.start_time, host_metrics.last_updated, …
    finally:
        jsonrpc(url, "session.logout", [session])


def _parses(value: str, fmt: str) -> bool:
    try:
        datetime.strptime(value, fmt)
        return True
    except (TypeError, ValueError):
        return False


# -- xe vm-install ----------------------------------------------------------------------------------


def xe_vm_install(x: Any, template_name: str, new_name: str, sr_uuid: str | None = None) -> str:
    """``vm_install_real``: resolve the template; pick the SR (``sr-uuid=`` else the pool's ``default_SR``, an
    error if none and the template has ``disks``); ``VM.copy`` onto a given SR, else ``VM.clone``; set the
    description and ``suspend_SR``; rewrite ``sr=`` in every ``<disk>``; ``has_vendor_device`` from the
    recommendations; ``VM.provision``; on error destroy the new VM and re-raise."""
    templates = [r for r in x.VM.get_by_name_label(template_name) if x.VM.get_is_a_template(r)]
    assert len(templates) == 1, templates
    template = templates[0]
    if sr_uuid:
        sr = x.SR.get_by_uuid(sr_uuid)
    else:
        sr = x.pool.get_default_SR(x.pool.get_all()[0])
        if sr == NULL and "disks" in x.VM.get_other_config(template):
            raise AssertionError("no default SR")  # the CLI's own error
    vm = x.VM.copy(template, new_name, sr) if sr_uuid else x.VM.clone(template, new_name)
    try:
        x.VM.set_name_description(vm, "")
        x.VM.set_suspend_SR(vm, sr)
        other = x.VM.get_other_config(vm)
        if "disks" in other:
            disks = re.sub(r'sr="[^"]*"', f'sr="{x.SR.get_uuid(sr)}"', other["disks"])
            x.VM.remove_from_other_config(vm, "disks")
            x.VM.add_to_other_config(vm, "disks", disks)
        recommendations = x.VM.get_recommendations(vm)
        if 'field="has-vendor-device" value="true"' in recommendations:
            x.VM.set_has_vendor_device(vm, True)
        x.VM.provision(vm)
    except XenAPI.Failure:
        x.VM.destroy(vm)
        raise
    return x.VM.get_uuid(vm)


def test_xe_vm_install(daemon):
    """``xe vm-install template=… new-name-label=…`` (clone, default SR) and with ``sr-uuid=`` (copy onto
    that SR); the disks land on the chosen SR, ``suspend_SR`` is set; a provisioning failure destroys the
    new VM and leaves no disk behind."""
    s = sdk(daemon, "xe")
    x = s.xenapi
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    for sr_uuid in (None, x.SR.get_uuid(sr)):
        uuid = xe_vm_install(x, "Debian Bookworm 12", f"xe-{sr_uuid is None}", sr_uuid)
        vm = x.VM.get_by_uuid(uuid)
        rec = x.VM.get_record(vm)
        assert not rec["is_a_template"] and rec["suspend_SR"] == sr and "disks" not in rec["other_config"]
        (vbd,) = rec["VBDs"]
        assert x.VDI.get_SR(x.VBD.get_VDI(vbd)) == sr and x.VDI.get_virtual_size(x.VBD.get_VDI(vbd)) == str(10 * GiB)
    # a broken provisioning XML on a user template: provision fails, the CLI destroys the new VM
    bad = x.VM.clone(x.VM.get_by_name_label("Debian Bookworm 12")[0], "broken template")
    other = x.VM.get_other_config(bad)
    other["disks"] = '<provision><disk device="0" size="x" sr="" bootable="true"/></provision>'
    x.VM.set_other_config(bad, other)
    vms, vdis = set(x.VM.get_all()), set(x.VDI.get_all())
    with pytest.raises(XenAPI.Failure) as info:
        xe_vm_install(x, "broken template", "xe-broken")
    assert info.value.details[0] == "INTERNAL_ERROR"
    assert set(x.VM.get_all()) == vms and set(x.VDI.get_all()) == vdis
    assert x.VM.get_by_name_label("xe-broken") == []
    s.xenapi.session.logout()
