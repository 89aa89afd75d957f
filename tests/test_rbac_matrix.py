"""Issue 13, the RBAC matrix: for every message the schema declares (implicit and explicit, and the
``Async.`` form of every async one) and every role, a call is refused with RBAC_PERMISSION_DENIED
exactly when the role is below the message's role, and is never refused by role otherwise.

Generated from ``xapid/data/xenapi.xml``: nothing here names the messages one by one, so a new message is
covered as soon as it is declared.  One test per class runs on its own fresh API (sim driver, fake
clock) with a world holding one object of every class the calls need; each call gets arguments that
pass the type and ref checks (refs of live objects of the right class, the caller's own session and a
task the caller created, as the ownership checks of ``xapid/auth/ownership.py`` would otherwise refuse
other users' ones).  An allowed call may still fail for state reasons (a VM already running, a
destroyed object re-created for the next role); only a role refusal counts against it.

Also: completeness (the plan covers every message the schema and ``system.listMethods`` declare),
unauthenticated calls (SESSION_INVALID before any handler), and a sample over real sockets, through
the official XenAPI SDK (XML-RPC) and raw JSON-RPC posts, with a user of every role.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import XenAPI
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from support import PASSWORD, USERS, ApiEnv, RealDaemon, vm_record
from xapid.apitypes import Type
from xapid.errors import XenAPIError
from xapid.schema import MessageSpec, load_schema
from xapid.auth.users import UsersFile

DENIED = "RBAC_PERMISSION_DENIED"
NULL = "OpaqueRef:NULL"
SCHEMA = load_schema()
ROLES = SCHEMA.roles  # least to most privileged

# support.USERS has no vm-power-admin or pool-operator: this module's users files add them.
EXTRA_USERS = {"poweradmin": "vm-power-admin", "poolop": "pool-operator"}
ALL_USERS = {**USERS, **EXTRA_USERS}
ROLE_USER = {role: next(name for name, r in ALL_USERS.items() if r == role) for role in ROLES}

# Calls that end the caller's session get a session of their own.
SESSION_ENDERS = {"session.logout", "session.local_logout"}
# Destructive kinds run after everything else in their class.
LAST_KINDS = ("destroy", "forget", "logout", "local_logout", "power_state_reset")


def write_users(path: Path, users: dict[str, str] = ALL_USERS) -> None:
    users_file = UsersFile(path, rounds=4)
    users_file.load()
    for name, role in users.items():
        users_file.add(name, role, PASSWORD)


def forms(spec: MessageSpec) -> list[str]:
    """The wire names a message is served under."""
    return [spec.wire_name, *([f"Async.{spec.wire_name}"] if spec.is_async else [])]


def plan() -> dict[str, list[tuple[str, MessageSpec]]]:
    """class -> [(wire name, message)], destructive messages last: what the matrix calls."""
    out: dict[str, list[tuple[str, MessageSpec]]] = {cls: [] for cls in SCHEMA.classes}
    for spec in SCHEMA.messages.values():
        if spec.removed:  # MESSAGE_REMOVED for every role (tests/test_templates_provision.py)
            continue
        for form in forms(spec):
            out[spec.cls].append((form, spec))
    for calls in out.values():
        calls.sort(key=lambda c: (c[1].name.startswith(LAST_KINDS), c[1].wire_name, c[0]))
    return out


PLAN = plan()


def allowed(role: str, spec: MessageSpec) -> bool:
    """What the schema says: a role holds every permission of the roles below it."""
    return ROLES.index(role) >= ROLES.index(spec.role)


# -- the in-process world --------------------------------------------------------------------


def outcome(env: ApiEnv, method: str, params: list[Any]) -> tuple[str, Any]:
    """("OK", value), ("ERROR", description), ("PENDING", None) for a call still waiting after
    a while on the fake clock (it reached its handler: a refusal would have failed at once), or
    ("EXCEPTION", text) for anything that is not a Xen-API error."""
    d = env.dispatcher.call(method, params)
    box: list[Any] = []
    d.addBoth(box.append)
    for i in range(120):
        if box:
            break
        env.clock.advance(0 if i < 10 else 1)
    if not box:
        d.cancel()
        return "PENDING", None
    result = box[0]
    if isinstance(result, Failure):
        if result.check(XenAPIError):
            return "ERROR", list(result.value.description)
        return "EXCEPTION", repr(result.value)
    return "OK", getattr(result, "value", result)


class World:
    """One live object of every class a parameter can name, re-created when a call removed it."""

    def __init__(self, env: ApiEnv):
        self.env = env
        self.store = env.api.store
        self.sessions: dict[str, str] = {}  # role -> session ref
        self.tasks: dict[str, str] = {}  # role -> a task that role's user created
        self.refs: dict[str, str] = {}
        self.serial = 0
        admin = self.admin
        self.pool = admin("pool.get_all")[0]
        self.host = env.api.host_ref
        self.base_sr = admin("pool.get_default_SR", self.pool)  # for VDIs; never handed to a call
        self.base_network = next(r for r, rec in admin("network.get_all_records").items() if rec["PIFs"])

    def session(self, role: str) -> str:
        ref = self.sessions.get(role)
        if ref is None or self.env.api.sessions.get(ref) is None:
            ref = self.sessions[role] = self.login(role)
        return ref

    def login(self, role: str) -> str:
        return self.env.raw("session.login_with_password", [ROLE_USER[role], PASSWORD, "1.0", "rbac-matrix"])

    def admin(self, method: str, *args: Any) -> Any:
        return self.env.raw(method, [self.session("pool-admin"), *args])

    def name(self, what: str) -> str:
        self.serial += 1
        return f"rbac-{what}-{self.serial}"

    # refs

    def ref(self, cls: str, role: str) -> str:
        if cls == "session":
            return self.session(role)
        if cls == "task":
            task = self.tasks.get(role)
            if task is None or not self.store.exists(task, "task"):
                task = self.tasks[role] = self.env.raw("task.create", [self.session(role), self.name("task"), ""])
            return task
        if cls not in SCHEMA.classes:
            return NULL  # a ref to a class the schema does not serve is stored verbatim
        ref = self.refs.get(cls)
        if ref is None or not self.store.exists(ref, cls):
            ref = self.refs[cls] = self.make(cls)
            assert self.store.exists(ref, cls), (cls, ref)
        return ref

    def linked(self, owner_cls: str, field: str, cls: str) -> str:
        """The *cls* object the world's *owner_cls* names in *field*, or a stored one."""
        ref = self.store.get(self.ref(owner_cls, "pool-admin"), owner_cls).fields.get(field, NULL)
        return ref if self.store.exists(ref, cls) else self.store.add(cls, {})

    def make(self, cls: str) -> str:
        admin = self.admin
        if cls == "VM":
            return admin("VM.create", vm_record(name_label=self.name("vm")))
        if cls == "VDI":
            return admin("VDI.create", self.record("VDI"))
        if cls == "VBD":
            return admin("VBD.create", self.record("VBD"))
        if cls == "VIF":
            return admin("VIF.create", self.record("VIF"))
        if cls == "network":
            return admin("network.create", self.record("network"))
        if cls == "SR":
            self.refs.pop("PBD", None)
            return admin("SR.create", self.host, {"location": str(self.env.api.state_dir / self.name("sr"))}, "0",
                         self.name("sr"), "", "file", "user", False, {})
        if cls == "PBD":
            pbds = [p for p in admin("SR.get_PBDs", self.ref("SR", "pool-admin")) if self.store.exists(p, "PBD")]
            if pbds:
                return pbds[0]
            self.refs.pop("SR", None)  # a fresh SR comes with its PBD
            return admin("SR.get_PBDs", self.ref("SR", "pool-admin"))[0]
        if cls == "VM_metrics":
            return self.linked("VM", "metrics", cls)
        if cls == "VBD_metrics":
            return self.linked("VBD", "metrics", cls)
        if cls == "VIF_metrics":
            return self.linked("VIF", "metrics", cls)
        if cls == "PIF_metrics":
            return self.linked("PIF", "metrics", cls)
        # Classes no API call creates (the host's own objects, users) are found; the ones that only
        # the hypervisor side makes (console, guest metrics, crash dumps) are stored directly.
        fields = {"console": {"VM": self.ref("VM", "pool-admin"), "protocol": "vt100"},
                  "crashdump": {"VM": self.ref("VM", "pool-admin"), "VDI": self.ref("VDI", "pool-admin")}}
        if cls not in fields:
            existing = [o.ref for o in self.store.all(cls)]
            if existing:
                return existing[0]
        return self.store.add(cls, fields.get(cls, {}))

    # values

    def record(self, cls: str) -> dict[str, Any]:
        if cls == "VM":
            return vm_record(name_label=self.name("vm"))
        if cls == "VDI":
            return {**vdi_record(self.base_sr), "name_label": self.name("vdi")}
        if cls == "VBD":
            vdi = self.admin("VDI.create", self.record("VDI"))  # a disk of its own, attachable
            return {"VM": self.ref("VM", "pool-admin"), "VDI": vdi, "userdevice": "autodetect", "bootable": False,
                    "mode": "RW", "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                    "qos_algorithm_params": {}}
        if cls == "VIF":
            vm = self.ref("VM", "pool-admin")
            devices = self.admin("VM.get_allowed_VIF_devices", vm)
            return {"device": devices[0] if devices else "0", "network": self.base_network, "VM": vm, "MAC": "",
                    "MTU": "1500", "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}
        if cls == "network":
            return {"name_label": self.name("net"), "name_description": "", "other_config": {}}
        # Any other class: every field the create record requires, typed.
        return {f.name: self.value(None, f.name, f.type, "pool-admin") for f in SCHEMA.classes[cls].fields.values()
                if f.create == "required"}

    def value(self, spec: MessageSpec | None, name: str, t: Type, role: str) -> Any:
        if t.kind == "ref":
            return self.ref(t.name, role)
        if t.kind == "record":
            return self.record(t.name)
        if t.kind == "string":
            if spec is not None and spec.kind == "get_by_uuid":
                return self.store.get(self.ref(spec.cls, role)).fields["uuid"]
            if spec is not None and spec.wire_name == "event.inject":
                return {"class": "VM", "ref": self.ref("VM", role)}.get(name, "")
            if name == "token":
                return ""  # event.from: from the beginning
            return "rbac"
        if t.kind == "enum":
            return SCHEMA.enums[t.name][0]
        return {"int": 1, "float": 0.0, "bool": False, "datetime": "19700101T00:00:00Z", "set": [],
                "map": {}}[t.kind]

    def params(self, spec: MessageSpec, role: str) -> list[Any]:
        """The call's parameters after the session (credentials for the session-less login calls)."""
        if spec.wire_name == "session.login_with_password":
            return [ROLE_USER[role], PASSWORD, "1.0", "rbac-matrix"]
        if spec.wire_name == "session.slave_local_login_with_password":
            return [ROLE_USER[role], PASSWORD]
        return [self.value(spec, p.name, p.type, role) for p in spec.params]


def new_env(tmp_path: Path) -> ApiEnv:
    clock = Clock()
    clock.advance(1_700_000_000)
    write_users(tmp_path / "users")  # ApiEnv keeps an existing users file
    return ApiEnv(tmp_path, clock)


def run_call(world: World, form: str, spec: MessageSpec, role: str) -> tuple[str, Any, bool]:
    """Call *form* as *role*: (kind, value or description, whether the store changed)."""
    env = world.env
    args = world.params(spec, role)
    if not spec.session:
        params = args
    elif spec.wire_name in SESSION_ENDERS:
        params = [world.login(role), *args]
    else:
        params = [world.session(role), *args]
    seq = env.api.store.seq
    kind, value = outcome(env, form, params)
    wrote = env.api.store.seq != seq
    if kind == "OK" and form.startswith("Async."):  # the work runs in a task: its own outcome counts
        env.settle()
        task = env.api.store.find(value)
        if task is not None and task.fields["status"] == "failure":
            kind, value = "ERROR", list(task.fields["error_info"])
    return kind, value, wrote


@pytest.mark.parametrize("cls", [c for c in SCHEMA.classes if PLAN[c]])
def test_rbac_matrix_for_class(tmp_path, cls):
    """Every message of *cls* (and its Async form) × every role, on a fresh API: denied exactly
    below the message's role (at once, nothing written), never denied by role at or above it."""
    world = World(new_env(tmp_path))
    wrong, internal, calls = [], [], 0
    for form, spec in PLAN[cls]:
        for role in ROLES:
            kind, value, wrote = run_call(world, form, spec, role)
            calls += 1
            denied = kind == "ERROR" and value[0] == DENIED
            if kind == "EXCEPTION" or (kind == "ERROR" and value[0] == "INTERNAL_ERROR"):
                internal.append(f"{form} as {role}: {kind} {value}")
            if allowed(role, spec):
                if denied:
                    wrong.append(f"{form} as {role} (schema role {spec.role}): denied {value}")
            elif not denied or value[1] != spec.wire_name.lower() or wrote:
                wrong.append(f"{form} as {role} (schema role {spec.role}): expected {DENIED} "
                             f"[{spec.wire_name.lower()}] without writes, got {kind} {value} (wrote: {wrote})")
    assert calls == len(PLAN[cls]) * len(ROLES)
    assert not wrong, "\n".join(wrong)
    assert not internal, "\n".join(internal)


def test_rbac_matrix_covers_every_message():
    """The matrix calls every message the schema declares, in both forms where async, and every
    role: adding a message to the schema adds it to the matrix."""
    planned = [form for calls in PLAN.values() for form, _ in calls]
    assert len(planned) == len(set(planned))
    expected = {f for spec in SCHEMA.messages.values() if not spec.removed for f in forms(spec)}
    assert set(planned) == expected
    assert len(planned) == sum(1 + s.is_async for s in SCHEMA.messages.values() if not s.removed)
    assert sorted(ROLE_USER) == sorted(ROLES) and len(ROLES) == 6


def test_rbac_matrix_covers_what_the_daemon_serves(tmp_path):
    """… and exactly what the running API lists in system.listMethods (the Async forms aside)."""
    env = new_env(tmp_path)
    served = set(env.raw("system.listMethods", []))
    removed = {spec.wire_name for spec in SCHEMA.messages.values() if spec.removed}  # listed, MESSAGE_REMOVED
    assert served == {spec.wire_name for calls in PLAN.values() for _, spec in calls} | removed
    assert {s.wire_name for s in SCHEMA.messages.values() if s.explicit} == set(env.dispatcher.handlers)


# -- no valid session ------------------------------------------------------------------------


def test_every_message_without_a_valid_session_is_session_invalid(tmp_path):
    """Every message that takes a session, called with an unknown, an empty, a NULL and a
    logged-out session ref (and otherwise valid arguments): SESSION_INVALID naming that ref, no
    handler reached and nothing written."""
    env = new_env(tmp_path)
    world = World(env)
    ended = world.login("read-only")
    env.raw("session.logout", [ended])
    reached: list[str] = []
    probing = [False]
    real_invoke = env.dispatcher._invoke

    def invoke(spec, *args, **kwargs):
        if probing[0]:
            reached.append(spec.wire_name)
        return real_invoke(spec, *args, **kwargs)

    env.dispatcher._invoke = invoke
    bad_sessions = [f"OpaqueRef:{uuid.uuid4()}", "", NULL, ended]
    wrong, calls = [], 0
    for form, spec in (c for cs in PLAN.values() for c in cs):
        if not spec.session:
            continue
        args = world.params(spec, "pool-admin")
        for bad in bad_sessions:
            seq, probing[0] = env.api.store.seq, True
            kind, value = outcome(env, form, [bad, *args])
            probing[0] = False
            calls += 1
            if kind != "ERROR" or value != ["SESSION_INVALID", bad] or env.api.store.seq != seq:
                wrong.append(f"{form} with session {bad!r}: {kind} {value}")
    assert not wrong, "\n".join(wrong[:50])
    assert not reached
    sessionless = {s.wire_name for s in SCHEMA.messages.values() if not s.session}
    assert sessionless == {"session.login_with_password", "session.slave_local_login_with_password",
                           "system.listMethods"}
    assert calls == 4 * sum(len(forms(s)) for s in SCHEMA.messages.values() if s.session and not s.removed)


# -- real sockets: the official SDK and raw JSON-RPC ------------------------------------------

def vdi_record(sr: str) -> dict[str, Any]:
    return {"SR": sr, "virtual_size": str(1 << 20), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": "rbac"}


# (message, arguments built from the daemon's objects): every role's boundary, several classes.
SAMPLE = [
    ("VM.get_all_records", lambda o: []),
    ("task.create", lambda o: ["rbac", ""]),
    ("host.get_servertime", lambda o: [o["host"]]),
    ("VM.start", lambda o: [o["vm"], False, False]),
    ("VBD.eject", lambda o: [o["vbd"]]),
    ("VM.set_name_description", lambda o: [o["vm"], "rbac"]),
    ("VDI.create", lambda o: [vdi_record(o["sr"])]),
    ("network.create", lambda o: [{"name_label": "rbac", "name_description": "", "other_config": {}}]),
    ("Async.VM.clone", lambda o: [o["template"], "rbac-clone"]),
    ("VM.power_state_reset", lambda o: [o["vm"]]),
    ("SR.scan", lambda o: [o["sr"]]),
    ("host.record_data_source", lambda o: [o["host"], "cpu0"]),
    ("pool.set_name_description", lambda o: [o["pool"], "rbac"]),
    ("user.set_fullname", lambda o: [o["user"], "rbac"]),
]


def spec_of(method: str) -> MessageSpec:
    return SCHEMA.messages[method.removeprefix("Async.")]


def test_sample_spans_every_role():
    assert {spec_of(m).role for m, _ in SAMPLE} == set(ROLES)
    assert len({spec_of(m).cls for m, _ in SAMPLE}) >= 8


@pytest.fixture(scope="module")
def rbac_daemon(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rbac-daemon")
    write_users(tmp / "users", EXTRA_USERS)  # RealDaemon adds support.USERS to it
    d = RealDaemon(tmp)
    yield d
    d.stop()


def jsonrpc(url: str, method: str, params: list[Any]) -> tuple[str, Any]:
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode()
    request = urllib.request.Request(url + "jsonrpc", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer = json.loads(reply.read())
    if "error" in answer:
        return "ERROR", [answer["error"]["message"], *answer["error"]["data"]]
    return "OK", answer["result"]


def xmlrpc(session: XenAPI.Session, method: str, params: list[Any]) -> tuple[str, Any]:
    try:
        return "OK", functools.reduce(getattr, method.split("."), session.xenapi)(*params)
    except XenAPI.Failure as failure:
        return "ERROR", list(failure.details)


def task_outcome(admin: XenAPI.Session, task: str) -> tuple[str, Any]:
    deadline = time.monotonic() + 30
    while admin.xenapi.task.get_status(task) == "pending":
        assert time.monotonic() < deadline, "the task never finished"
        time.sleep(0.02)
    record = admin.xenapi.task.get_record(task)
    return ("ERROR", record["error_info"]) if record["status"] == "failure" else ("OK", record["result"])


def test_rbac_sample_over_real_sockets(rbac_daemon):
    """A sample of messages × every role over XML-RPC (the XenAPI SDK) and JSON-RPC (raw POSTs
    to /jsonrpc) on a real daemon: the same allowed/denied outcome as the schema."""
    url = rbac_daemon.url
    admin = XenAPI.Session(url)
    admin.xenapi.login_with_password("admin", PASSWORD, "1.0", "rbac-matrix")
    x = admin.xenapi
    objects = {"host": x.host.get_all()[0], "pool": x.pool.get_all()[0], "user": x.user.get_all()[0]}
    objects["sr"] = x.pool.get_default_SR(objects["pool"])
    objects["vm"] = x.VM.create(vm_record(name_label="rbac-vm"))
    objects["template"] = x.VM.create(vm_record(name_label="rbac-template"))
    vdi = x.VDI.create(vdi_record(objects["sr"]))
    objects["vbd"] = x.VBD.create({"VM": objects["vm"], "VDI": vdi, "userdevice": "autodetect", "bootable": False,
                                   "mode": "RO", "type": "CD", "empty": False, "other_config": {},
                                   "qos_algorithm_type": "", "qos_algorithm_params": {}})
    wrong, calls = [], 0
    try:
        for role in ROLES:
            sdk = XenAPI.Session(url)
            sdk.xenapi.login_with_password(ROLE_USER[role], PASSWORD, "1.0", "rbac-matrix")
            kind, json_session = jsonrpc(url, "session.login_with_password", [ROLE_USER[role], PASSWORD, "1.0", "rbac"])
            assert kind == "OK", json_session
            try:
                for method, make_args in SAMPLE:
                    spec = spec_of(method)
                    for wire, (kind, value) in (
                            ("xml-rpc", xmlrpc(sdk, method, make_args(objects))),
                            ("json-rpc", jsonrpc(url, method, [json_session, *make_args(objects)]))):
                        calls += 1
                        if kind == "OK" and method.startswith("Async."):
                            kind, value = task_outcome(admin, value)
                        denied = kind == "ERROR" and value[0] == DENIED
                        if allowed(role, spec) == denied or (denied and value[1] != spec.wire_name.lower()):
                            wrong.append(f"{wire} {method} as {role} (schema role {spec.role}): {kind} {value}")
            finally:
                sdk.xenapi.session.logout()
                jsonrpc(url, "session.logout", [json_session])
    finally:
        admin.xenapi.session.logout()
    assert not wrong, "\n".join(wrong)
    assert calls == len(SAMPLE) * len(ROLES) * 2
