"""Issue 16: roles, subjects and auth as xapi serves them, and the local superuser.

- ``role`` objects generated from the schema: xapi's six roles, one permission per served message
  (lower-cased wire name), refs and uuids as xapi makes them (``OpaqueRef:`` + the MD5 of the name),
  the same after a restart; ``role.get_permissions*`` and ``get_by_permission*``.
- ``session.rbac_permissions`` (role name, then its permissions, as xapi fills it for a subject),
  ``is_local_superuser``; ``subject`` and ``auth`` answer as xapi with external authentication off.
- XenCenter's login sequence and the SDK's ``xapi_local()`` replayed with the official SDK on a real
  daemon; uid 0 over a UNIX socket logs in with any credentials, over TCP it does not, and another
  uid over the UNIX socket needs a valid password.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import XenAPI

from support import PASSWORD, ApiEnv, RealDaemon, resolve
from xapid.auth import rbac
from xapid.errors import XenAPIError
from xapid.schema import load_schema

SCHEMA = load_schema()
ROLES = SCHEMA.roles  # least to most privileged


def md5_uuid(name: str) -> str:
    return str(uuid.UUID(bytes=hashlib.md5(name.encode()).digest()))


# -- the role table, in process ------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, clock):
    return ApiEnv(tmp_path, clock)


def records(client) -> dict[str, dict]:
    return client("role.get_all_records")


def test_six_roles_with_xapi_refs_and_uuids(env):
    admin = env.login()
    all_records = records(admin)
    composite = {r["name_label"]: (ref, r) for ref, r in all_records.items() if r["subroles"]}
    assert sorted(composite) == sorted(ROLES)
    # xapi's fixed pool-admin uuid is the MD5 of its name (Constants.rbac_pool_admin_uuid)
    assert composite["pool-admin"][1]["uuid"] == "0165f154-ba3e-034e-6b27-5d271af109ba"
    for name, (ref, record) in composite.items():
        assert record["uuid"] == md5_uuid(name) and ref == f"OpaqueRef:{md5_uuid(name)}"
        assert record["is_internal"] is False and record["name_description"]
        assert admin("role.get_by_name_label", name) == [ref]
        assert admin("role.get_by_uuid", record["uuid"]) == ref
    permissions = {r["name_label"]: (ref, r) for ref, r in all_records.items() if not r["subroles"]}
    ref, start = permissions["vm.start"]
    assert start == {"uuid": md5_uuid("VM.start"), "name_label": "vm.start", "name_description": "A basic permission",
                     "subroles": [], "is_internal": True}
    assert ref == f"OpaqueRef:{md5_uuid('VM.start')}"
    assert len(all_records) == len(permissions) + len(ROLES)
    assert sorted(admin("role.get_all")) == sorted(all_records)


def test_permissions_follow_the_schema(env):
    """Each role's permissions are the messages whose declared role it reaches; the roles nest."""
    reader = env.login("reader")
    by_name = {r["name_label"]: ref for ref, r in records(reader).items()}
    names = {role: set(reader("role.get_permissions_name_label", by_name[role])) for role in ROLES}
    for lower, higher in zip(ROLES, ROLES[1:]):
        assert names[lower] < names[higher], (lower, higher)
    served = {m.lower() for m, spec in SCHEMA.messages.items() if not SCHEMA.classes[spec.cls].removed
              and not spec.removed}
    removed = {m.lower() for m, spec in SCHEMA.messages.items() if spec.removed}  # listed, MESSAGE_REMOVED
    listed = {m.lower() for m in env.raw("system.listMethods", []) if not m.startswith("Async.")} - removed
    assert served <= names["pool-admin"] and listed <= names["pool-admin"]
    assert names["pool-admin"] == served | {"task.destroy/any"}
    for role in ROLES:
        expected = {m.lower() for m, spec in SCHEMA.messages.items()
                    if not SCHEMA.classes[spec.cls].removed and not spec.removed
                    and SCHEMA.role_allows(role, spec.role)}
        assert names[role] - {"task.destroy/any"} == expected
    assert "vm.start" in names["vm-operator"] and "vm.start" not in names["read-only"]
    assert "session.login_with_password" in names["read-only"]  # XenCenter's CommonSessionApiList
    assert "task.destroy/any" in names["pool-operator"] and "task.destroy/any" not in names["vm-power-admin"]
    # get_permissions returns the permission objects, whose names are those
    refs = reader("role.get_permissions", by_name["vm-operator"])
    assert {reader("role.get_name_label", r) for r in refs} == names["vm-operator"]
    # a permission is its own permission
    assert reader("role.get_permissions", by_name["vm.start"]) == [by_name["vm.start"]]
    # which roles hold a permission
    holders = ROLES[ROLES.index(SCHEMA.messages["VM.start"].role):]
    assert sorted(reader("role.get_by_permission", by_name["vm.start"])) == sorted(by_name[r] for r in holders)
    assert sorted(reader("role.get_by_permission_name_label", "vm.start")) == sorted(by_name[r] for r in holders)
    assert reader("role.get_by_permission_name_label", "no.such_call") == []
    assert reader("role.get_by_permission", by_name["pool-admin"]) == []


def test_roles_are_read_only_and_stable_across_restart(env):
    admin = env.login()
    before = records(admin)
    assert admin.fails("role.set_name_label", next(iter(before)), "x")[0] == "MESSAGE_METHOD_UNKNOWN"
    env.restart()
    assert records(env.login()) == before


def test_session_fields_and_rbac_permissions(env):
    table = rbac.build(SCHEMA)
    for user, role in (("reader", "read-only"), ("operator", "vm-operator"), ("admin", "pool-admin")):
        client = env.login(user)
        record = client("session.get_record", client.session)
        assert record["is_local_superuser"] is False
        assert record["rbac_permissions"] == [role, *table.permissions[role]]
        assert client("session.get_rbac_permissions", client.session) == record["rbac_permissions"]
        assert record["subject"] == "OpaqueRef:NULL" and record["auth_user_sid"] == ""
        assert record["auth_user_name"] == user


def test_role_change_updates_rbac_permissions(env, clock):
    """xapid applies a users-file role change to open sessions (README, Revocation); their
    rbac_permissions follow."""
    reader = env.login("reader")
    path = Path(env.config.server.users)
    path.write_text(re.sub(r"^reader:[^:]*:", "reader:vm-admin:", path.read_text(), flags=re.M))
    clock.advance(2)
    assert reader("session.get_rbac_permissions", reader.session) == rbac.build(SCHEMA).session_permissions("vm-admin")


def test_subject_and_auth_without_external_auth(env):
    """xapi with host.external_auth_type "" (xapi_auth.ml, extauth.ml): no subjects; subject.create and
    the auth queries answer AUTH_IS_DISABLED."""
    admin, reader = env.login(), env.login("reader")
    assert admin("subject.get_all") == [] and admin("subject.get_all_records") == {}
    assert admin.fails("subject.create", {"subject_identifier": "S-1-5-21", "other_config": {}}) == ["AUTH_IS_DISABLED"]
    assert reader.fails("subject.create", {"subject_identifier": "x"})[0] == "RBAC_PERMISSION_DENIED"
    for call, arg in (("auth.get_subject_identifier", "alice"),
                      ("auth.get_subject_information_from_identifier", ""),
                      ("auth.get_group_membership", "")):
        assert reader.fails(call, arg) == ["AUTH_IS_DISABLED"]


def test_local_superuser_in_process(env):
    """A uid-0 UNIX client: any credentials, pool-admin, is_local_superuser, no permissions listed;
    a uid-0 claim on a TCP client is never made (uid stays None there)."""
    from xapid.wire.http import Client

    root = Client("unix", uid=0)
    ref = resolve(env.dispatcher.call("session.login_with_password", ["", ""], root), env.clock)
    record = env.raw("session.get_record", [ref, ref])
    assert record["is_local_superuser"] is True and record["rbac_permissions"] == []
    assert record["this_user"] == "OpaqueRef:NULL" and record["auth_user_name"] == ""
    assert env.api.sessions.get(ref).role == "pool-admin"
    assert env.raw("host.disable", [ref, env.api.host_ref]) == ""  # pool-operator call allowed
    audit = [json.loads(line) for line in (env.api.state_dir / "audit.log").read_text().splitlines()]
    login = next(e for e in audit if e["method"] == "session.login_with_password")
    assert login["local_superuser"] is True and login["user"] == "(local superuser)" and login["peer"] == "unix"
    nobody = Client("unix", uid=65534)
    with pytest.raises(XenAPIError) as info:
        resolve(env.dispatcher.call("session.login_with_password", ["", ""], nobody), env.clock)
    assert info.value.description[0] == "SESSION_AUTHENTICATION_FAILED"
    ok = resolve(env.dispatcher.call("session.login_with_password", ["reader", PASSWORD], nobody), env.clock)
    assert env.raw("session.get_is_local_superuser", [ok, ok]) is False


# -- real daemons ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon on TCP and on a UNIX socket of mode 666, in a directory other users may traverse (the
    pytest temp dirs are 700), so that a client running as nobody can connect."""
    tmp = tmp_path_factory.mktemp("roles")
    sockdir = Path(f"/tmp/xapid-sock-{uuid.uuid4().hex}")
    sockdir.mkdir(mode=0o755)
    sockdir.chmod(0o755)
    sock = sockdir / "xapi.sock"
    d = RealDaemon(tmp, extra=["--listen", f"unix:{sock}:mode=666"])
    d.sock = sock
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield d
    d.stop()
    shutil.rmtree(sockdir, ignore_errors=True)


def uds_url(sock: Path) -> str:
    """The SDK's URL for a UNIX socket: ``UDSHTTPConnection`` connects to the URL's host with every ``_``
    read as ``/`` (``xapi_local()`` uses ``http://_var_lib_xcp_xapi/``)."""
    assert "_" not in str(sock)
    return "http://" + str(sock).replace("/", "_") + "/"


def xencenter_login(url: str, user: str, password: str, transport=None) -> dict:
    """XenCenter's login, call for call, as ``XenModel/XenAPI/Session.cs`` (xenserver/xenadmin) does it:
    ``login_with_password(user, password, version, UserAgent)``, then ``SetAPIVersion`` (``pool.get_all_records``,
    ``host.get_record`` of the master), then ``SetADDetails``: ``session.get_is_local_superuser``; unless a
    superuser, ``get_subject``, ``get_auth_user_sid``, ``UserDetails.UpdateDetails`` (``XenModel/XenAPI/UserDetails.cs``:
    ``auth.get_subject_information_from_identifier`` twice and ``auth.get_group_membership``, failures caught),
    ``session.get_rbac_permissions`` and ``role.get_all_records``, whose composite roles named in the permissions
    become the session's roles."""
    session = XenAPI.Session(url, transport=transport) if transport else XenAPI.Session(url)
    session.login_with_password(user, password, "2.21", "XenAPI/2.21")
    x = session.xenapi
    me = session._session
    pools = x.pool.get_all_records()
    master = x.host.get_record(next(iter(pools.values()))["master"])
    assert int(master["API_version_major"]) >= 1
    out = {"superuser": x.session.get_is_local_superuser(me), "roles": [], "session": session}
    if out["superuser"]:
        return out
    assert x.session.get_subject(me) == "OpaqueRef:NULL"
    sid = x.session.get_auth_user_sid(me)
    for call in (lambda: x.auth.get_subject_information_from_identifier(sid),
                 lambda: x.auth.get_subject_information_from_identifier(sid),
                 lambda: x.auth.get_group_membership(sid)):
        with pytest.raises(XenAPI.Failure):  # XenCenter catches Failure here
            call()
    permissions = x.session.get_rbac_permissions(me)
    all_roles = x.role.get_all_records()
    for name in permissions:
        for role in all_roles.values():
            if role["subroles"] and role["name_label"] == name:
                out["roles"].append(role["name_label"])
                break
    out["permissions"] = permissions
    return out


@pytest.mark.parametrize("user,role", [("admin", "pool-admin"), ("reader", "read-only"), ("operator", "vm-operator")])
def test_xencenter_login_sequence(daemon, user, role):
    result = xencenter_login(daemon.url, user, PASSWORD)
    assert result["superuser"] is False and result["roles"] == [role]
    assert "vm.get_all_records" in result["permissions"]
    result["session"].xenapi.session.logout()


def test_xencenter_login_as_local_root_over_unix_socket(daemon):
    result = xencenter_login(uds_url(daemon.sock), "root", "", XenAPI.UDSTransport())
    assert result["superuser"] is True
    result["session"].xenapi.session.logout()


def xapi_local(sock: Path) -> XenAPI.Session:
    """``XenAPI.xapi_local()`` (python3/examples/XenAPI/XenAPI.py in xapi-project/xen-api) is
    ``Session("http://_var_lib_xcp_xapi/", transport=UDSTransport())``; the same, on this daemon's socket."""
    return XenAPI.Session(uds_url(sock), transport=XenAPI.UDSTransport())


@pytest.mark.skipif(os.geteuid() != 0, reason="the local superuser is uid 0")
def test_xapi_local_empty_credentials_as_root(daemon):
    """As dom0 scripts do (xapi's ``python3/libexec/link-vms-by-sr.py``): ``login_with_password("", "", "1.0", name)``."""
    session = xapi_local(daemon.sock)
    session.xenapi.login_with_password("", "", "1.0", "test-script")
    me = session._session
    record = session.xenapi.session.get_record(me)
    assert record["is_local_superuser"] is True and record["rbac_permissions"] == []
    assert record["originator"] == "test-script"
    vm = session.xenapi.VM.get_all()[0]
    session.xenapi.VM.add_to_other_config(vm, "local-root", "yes")  # a write: pool-admin
    session.xenapi.VM.remove_from_other_config(vm, "local-root")
    session.xenapi.session.logout()
    audit = [json.loads(line) for line in (daemon.state / "audit.log").read_text().splitlines()]
    assert any(e["method"] == "session.login_with_password" and e.get("local_superuser") and e["peer"] == "unix"
               for e in audit)


@pytest.mark.skipif(os.geteuid() != 0, reason="the local superuser is uid 0")
def test_same_login_over_tcp_fails(daemon):
    session = XenAPI.Session(daemon.url)
    with pytest.raises(XenAPI.Failure) as info:
        session.xenapi.login_with_password("", "", "1.0", "test-script")
    assert info.value.details[0] == "SESSION_AUTHENTICATION_FAILED"
    with pytest.raises(XenAPI.Failure) as info:
        session.xenapi.login_with_password("root", "", "1.0", "test-script")
    assert info.value.details[0] == "SESSION_AUTHENTICATION_FAILED"


NOBODY_CLIENT = textwrap.dedent("""
    import json, os, sys
    import XenAPI
    os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))
    out = {}
    for name, user, pw in (("empty", "", ""), ("wrong", "admin", "nope"), ("right", "reader", sys.argv[4])):
        s = XenAPI.Session(sys.argv[1], transport=XenAPI.UDSTransport())
        try:
            s.xenapi.login_with_password(user, pw, "1.0", "nobody")
            out[name] = s.xenapi.session.get_is_local_superuser(s._session)
        except XenAPI.Failure as e:
            out[name] = e.details[0]
    print(json.dumps(out))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="setuid to nobody needs root")
def test_non_root_peer_over_unix_socket_needs_a_password(daemon):
    nobody = pwd.getpwnam("nobody")
    run = subprocess.run([sys.executable, "-c", NOBODY_CLIENT, uds_url(daemon.sock), str(nobody.pw_uid),
                          str(nobody.pw_gid), PASSWORD], capture_output=True, text=True, timeout=60,
                         cwd="/")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"empty": "SESSION_AUTHENTICATION_FAILED",
                                      "wrong": "SESSION_AUTHENTICATION_FAILED", "right": False}
