"""Issue 13, ownership and revocation: whose tasks and sessions a user may touch, what a change
of the users file does to open sessions, and the caps on pending client tasks.

One test per finding; most run in-process on the fake clock, the revocation and one
ownership check also against a real daemon through the official XenAPI SDK.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest
import XenAPI
from twisted.python.failure import Failure

from support import PASSWORD, ROOT, USERS, ApiEnv, RealDaemon, vm_record
from xapid.config import ConfigError, parse_config
from xapid.auth.users import UsersFile

DENIED = "RBAC_PERMISSION_DENIED"


class ManualRunner:
    """Holds driver calls until released, so an Async task stays pending."""

    def __init__(self):
        self.calls = []

    def run(self, fn, *args, **kwargs):
        from twisted.internet.defer import Deferred

        d = Deferred()
        self.calls.append((d, fn, args, kwargs))
        return d

    def release_all(self):
        while self.calls:
            d, fn, args, kwargs = self.calls.pop(0)
            try:
                d.callback(fn(*args, **kwargs))
            except Exception:  # noqa: BLE001 - delivered as the thread pool does
                d.errback(Failure())


@pytest.fixture
def env(tmp_path: Path, clock) -> ApiEnv:
    """The API with one more user, a pool-operator."""
    users = UsersFile(tmp_path / "users", rounds=4)
    users.load()
    for name, role in {**USERS, "poolop": "pool-operator"}.items():
        users.add(name, role, PASSWORD)
    return ApiEnv(tmp_path, clock)


def edit_users(env: ApiEnv) -> UsersFile:
    """The users file as another process (``xapid user …``) would change it."""
    users = UsersFile(env.config.server.users, rounds=4)
    users.load()
    return users


def set_role(env: ApiEnv, name: str, role: str) -> None:
    path = Path(env.config.server.users)
    text = re.sub(rf"^{re.escape(name)}:[^:]*:", f"{name}:{role}:", path.read_text(), flags=re.M)
    path.write_text(text)


def pending_clone(env: ApiEnv, owner) -> tuple[str, str, ManualRunner]:
    """An Async.VM.clone task of *owner* (a VM with one disk), held pending at the disk copy."""
    vm = owner("VM.create", vm_record(PV_kernel=""))
    sr = owner("pool.get_default_SR", owner("pool.get_all")[0])
    vdi = owner("VDI.create", {"SR": sr, "virtual_size": str(1 << 20), "type": "user", "sharable": False,
                               "read_only": False, "other_config": {}, "name_label": "disk"})
    owner("VBD.create", {"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                         "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    runner = ManualRunner()
    env.api.runner = runner
    task = owner("Async.VM.clone", vm, "copy")
    assert owner("task.get_status", task) == "pending"
    return vm, task, runner


# -- task ownership ---------------------------------------------------------------------------


def test_read_only_cannot_touch_pool_admins_clone_task(env):
    """Every write on another user's task is RBAC_PERMISSION_DENIED [task.destroy/any, …];
    the task runs on and its result is the real one."""
    admin, reader = env.login("admin"), env.login("reader")
    vm, task, runner = pending_clone(env, admin)
    attempts = [
        ("task.cancel", task), ("task.destroy", task), ("task.set_status", task, "success"),
        ("task.set_result", task, f"<value>{vm}</value>"), ("task.set_progress", task, 1.0),
        ("task.set_error_info", task, ["FORGED"]), ("task.set_other_config", task, {"a": "b"}),
        ("task.add_to_other_config", task, "a", "b"), ("task.remove_from_other_config", task, "a"),
    ]
    for method, *args in attempts:
        error = reader.fails(method, *args)
        assert error[:2] == [DENIED, "task.destroy/any"], method
        assert "pool-operator, pool-admin" in error[2] and "read-only" in error[2]
    assert reader("task.get_record", task)["status"] == "pending"  # reads stay open, as in xapi
    runner.release_all()
    record = admin("task.get_record", task)
    assert record["status"] == "success" and record["other_config"] == {} and record["error_info"] == []
    clone = record["result"].removeprefix("<value>").removesuffix("</value>")
    assert clone != vm and admin("VM.get_name_label", clone) == "copy"


def test_owner_acts_on_its_own_tasks(env):
    """The creating user may cancel, set and destroy its tasks (Async and client)."""
    vmadmin = env.login("vmadmin")
    vm, task, runner = pending_clone(env, vmadmin)
    vmadmin("task.add_to_other_config", task, "note", "mine")
    vmadmin("task.cancel", task)
    assert vmadmin("task.get_status", task) == "cancelling"  # accepted (the copy in flight ends it)
    runner.release_all()
    vmadmin("task.destroy", task)
    reader = env.login("reader")
    own = reader("task.create", "backup", "")
    reader("task.set_progress", own, 0.5)
    reader("task.set_other_config", own, {"k": "v"})
    reader("task.set_result", own, "<value>done</value>")
    reader("task.set_status", own, "success")
    reader("task.destroy", own)


def test_pool_operator_and_admin_act_on_other_users_tasks(env):
    """task.destroy/any: pool-operator and pool-admin may act on anyone's task; vm-admin may not."""
    reader, vmadmin = env.login("reader"), env.login("vmadmin")
    poolop, admin = env.login("poolop"), env.login("admin")
    tasks = [reader("task.create", f"t{i}", "") for i in range(3)]
    assert vmadmin.fails("task.destroy", tasks[0])[0] == DENIED
    poolop("task.set_progress", tasks[0], 0.25)
    poolop("task.cancel", tasks[0])
    poolop("task.destroy", tasks[0])
    admin("task.set_status", tasks[1], "failure")
    admin("task.destroy", tasks[1])
    _, clone, runner = pending_clone(env, vmadmin)
    poolop("task.cancel", clone)
    assert poolop("task.get_status", clone) == "cancelling"
    runner.release_all()
    poolop("task.destroy", clone)


def test_a_user_logging_in_again_keeps_its_tasks(env):
    """Ownership follows the user name, not the session: a new session of the same user acts on
    the tasks of the old one (Async tasks even after the old session logged out)."""
    first = env.login("vmadmin")
    vm = first("VM.create", vm_record(PV_kernel=""))
    done = first("Async.VM.clone", vm, "c1")
    mine = first("task.create", "job", "")
    second = env.login("vmadmin")
    second("task.set_progress", mine, 0.5)
    second("task.destroy", mine)
    first("session.logout")
    third = env.login("vmadmin")
    third("task.add_to_other_config", done, "seen", "yes")
    third("task.destroy", done)
    assert env.login("admin").fails("task.get_record", done)[0] == "HANDLE_INVALID"


# -- session ownership ------------------------------------------------------------------------


def test_session_setters_only_on_the_callers_own_session(env):
    reader, operator = env.login("reader"), env.login("operator")
    other_reader = env.login("reader")
    for client, target in ((operator, reader.session), (other_reader, reader.session)):
        for method, *args in (("session.set_other_config", {"x": "y"}), ("session.add_to_other_config", "x", "y"),
                              ("session.remove_from_other_config", "x")):
            error = client.fails(method, target, *args)
            assert error[:2] == [DENIED, method.lower()] and "pool-admin" in error[2]
    reader("session.add_to_other_config", reader.session, "x", "y")  # its own: allowed
    assert reader("session.get_other_config", reader.session) == {"x": "y"}
    env.login("admin")("session.set_other_config", reader.session, {})  # pool-admin: allowed
    assert reader("session.get_other_config", reader.session) == {}


def test_reading_another_users_session_needs_pool_admin(env):
    reader, operator, admin = env.login("reader"), env.login("operator"), env.login("admin")
    uuid = admin("session.get_record", reader.session)["uuid"]  # pool-admin: allowed
    assert admin("session.get_by_uuid", uuid) == reader.session
    for method, arg in (("session.get_record", reader.session), ("session.get_by_uuid", uuid),
                        ("session.get_other_config", reader.session), ("session.get_uuid", reader.session)):
        assert operator.fails(method, arg)[:2] == [DENIED, method.lower()], method
    poolop = env.login("poolop")
    assert poolop.fails("session.get_record", reader.session)[0] == DENIED
    same_user = env.login("reader")  # another session of the same user may be read
    assert same_user("session.get_by_uuid", uuid) == reader.session
    assert same_user("session.get_record", reader.session)["auth_user_name"] == "reader"
    assert reader("session.get_record", reader.session)["uuid"] == uuid
    assert operator.fails("session.get_by_uuid", "no-such-uuid")[0] == "UUID_INVALID"


# -- revocation -------------------------------------------------------------------------------


def test_deleted_user_loses_its_sessions_at_once(env, clock):
    reader, admin = env.login("reader"), env.login("admin")
    reader("VM.get_all")
    edit_users(env).delete("reader")
    clock.advance(1)
    assert reader.fails("VM.get_all") == ["SESSION_INVALID", reader.session]
    admin("VM.get_all")  # other users are untouched


def test_password_change_ends_sessions_and_the_new_login_stays(env, clock):
    reader = env.login("reader")
    edit_users(env).set_password("reader", "a new one")
    clock.advance(1)
    assert reader.fails("VM.get_all")[0] == "SESSION_INVALID"
    fresh = env.login("reader", "a new one")
    clock.advance(5)
    fresh("VM.get_all")
    env.api.sessions.sweep()
    fresh("VM.get_all")


def test_revocation_by_the_housekeeping_sweep_ends_event_waits(env, clock):
    """Without any call, the periodic sweep revokes (and a waiting event.from ends)."""
    reader = env.login("reader")
    wait = env.dispatcher.call("event.from", [reader.session, ["vm"], reader("event.from", ["vm"], "", 0.0)["token"],
                                              30.0])
    edit_users(env).delete("reader")
    env.api.sessions.sweep()
    box = []
    wait.addBoth(box.append)
    assert box and isinstance(box[0], Failure) and box[0].value.description[0] == "SESSION_INVALID"
    assert env.api.sessions.get(reader.session) is None


def test_role_change_applies_to_open_sessions(env, clock):
    """A role change keeps the sessions and takes effect at their next call, both ways."""
    admin, reader = env.login("admin"), env.login("reader")
    admin("VM.create", vm_record(PV_kernel=""))
    set_role(env, "admin", "read-only")
    set_role(env, "reader", "vm-admin")
    clock.advance(1)
    assert admin.fails("VM.create", vm_record(PV_kernel=""))[:2] == [DENIED, "vm.create"]
    reader("VM.create", vm_record(PV_kernel=""))
    assert env.api.sessions.get(admin.session).role == "read-only"


# -- pending client tasks ---------------------------------------------------------------------


def test_pending_client_tasks_are_capped_per_session_and_per_user(env):
    env.api.tasks.max_pending_per_session = 3
    env.api.tasks.max_pending_per_user = 4
    first, second = env.login("reader"), env.login("reader")
    tasks = [first("task.create", f"t{i}", "") for i in range(3)]
    error = first.fails("task.create", "one too many", "")
    assert error[0] == "OPERATION_NOT_ALLOWED" and "max_pending_tasks_per_session" in error[1]
    first("task.set_status", tasks[0], "success")  # no longer pending: room for one more
    tasks.append(first("task.create", "t3", ""))
    second("task.create", "t4", "")
    error = second.fails("task.create", "t5", "")
    assert error[0] == "OPERATION_NOT_ALLOWED" and "max_pending_tasks_per_user" in error[1]
    assert first.fails("task.set_status", tasks[0], "pending")[0] == "OPERATION_NOT_ALLOWED"  # no way round
    env.login("operator")("task.create", "other user", "")  # another user has its own budget
    first("task.destroy", tasks[1])
    second("task.create", "t5", "")


def test_pending_task_limits_are_configured(tmp_path):
    config = parse_config("[limits]\nmax_pending_tasks_per_session = 7\nmax_pending_tasks_per_user = 9\n", "x.conf")
    assert (config.limits.max_pending_tasks_per_session, config.limits.max_pending_tasks_per_user) == (7, 9)
    with pytest.raises(ConfigError, match="max_pending_tasks_per_user"):
        parse_config("[limits]\nmax_pending_tasks_per_user = 0\n", "x.conf")
    shipped = (ROOT / "etc" / "xapid.conf").read_text()
    assert "max_pending_tasks_per_session = 100" in shipped and "max_pending_tasks_per_user = 1000" in shipped


def test_client_tasks_are_destroyed_with_their_session(env, clock):
    """Logout, expiry and revocation destroy the session's task.create tasks; Async tasks stay."""
    admin = env.login("admin")
    vmadmin = env.login("vmadmin")
    kept = vmadmin("Async.VM.create", vm_record(PV_kernel=""))
    by_logout = vmadmin("task.create", "a", "")
    vmadmin("session.logout")
    reader = env.login("reader")
    by_expiry = reader("task.create", "b", "")
    clock.advance(env.api.sessions.idle_timeout + 1)
    env.api.sessions.sweep()
    admin = env.login("admin")
    operator = env.login("operator")
    by_revocation = operator("task.create", "c", "")
    edit_users(env).delete("operator")
    clock.advance(1)
    all_tasks = admin("task.get_all")
    assert kept in all_tasks
    for gone in (by_logout, by_expiry, by_revocation):
        assert gone not in all_tasks
    assert env.api.tasks._client_tasks == {} and env.api.tasks._pending_by_user == {}


# -- a real daemon, through the official SDK ---------------------------------------------------


@pytest.fixture
def daemon(tmp_path):
    d = RealDaemon(tmp_path)
    yield d
    d.stop()


def sdk(daemon, user: str):
    s = XenAPI.Session(daemon.url)
    s.login_with_password(user, PASSWORD, "1.0", "test-security")
    return s


def test_sdk_read_only_cannot_destroy_admins_task(daemon):
    admin, reader = sdk(daemon, "admin"), sdk(daemon, "reader")
    vm = admin.xenapi.VM.create(vm_record(PV_kernel=""))
    task = admin.xenapi.Async.VM.clone(vm, "copy")
    with pytest.raises(XenAPI.Failure) as info:
        reader.xenapi.task.destroy(task)
    assert info.value.details[:2] == [DENIED, "task.destroy/any"]
    with pytest.raises(XenAPI.Failure) as info:
        reader.xenapi.session.get_record(admin._session)
    assert info.value.details[0] == DENIED
    admin.xenapi.task.destroy(task)
    admin.logout()
    reader.logout()


def test_sdk_user_del_ends_an_open_session(daemon):
    """`xapid user del` in another process: the open session's next call is SESSION_INVALID,
    its client tasks are gone, and the daemon logs the revocation."""
    reader, admin = sdk(daemon, "reader"), sdk(daemon, "admin")
    task = reader.xenapi.task.create("job", "")
    reader.xenapi.VM.get_all()
    done = subprocess.run([sys.executable, "-m", "xapid", "user", "del", "reader", "--users", str(daemon.users)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    time.sleep(1.1)  # the users file is looked at no more than once a second
    raw = xmlrpc.client.ServerProxy(daemon.url)
    assert raw.VM.get_all(reader._session)["ErrorDescription"] == ["SESSION_INVALID", reader._session]
    with pytest.raises(XenAPI.Failure) as info:  # the SDK logs in again on SESSION_INVALID: refused now
        reader.xenapi.VM.get_all()
    assert info.value.details[0] == "SESSION_AUTHENTICATION_FAILED"
    assert task not in admin.xenapi.task.get_all()
    assert "revoked 1 session(s) of user reader: user deleted" in daemon.log.read_text()
    admin.logout()
