"""Null references accepted where xapi accepts them (declared per parameter in the schema), and
allowed_operations derived for every class that has the field (issue 16)."""

from __future__ import annotations

import pytest
import XenAPI

from support import PASSWORD, vm_record
from test_devices import default_sr, iso_sr, network, vbd_record, vdi_record, vif_record
from xapid.objects.allowed_ops import OPERATION_MESSAGES, served_operations
from xapid.schema import load_schema

NULL = "OpaqueRef:NULL"

# (message, how to build its args from (admin, env), the position of the NULL argument)
NULLABLE_SETTERS = [
    ("VM.set_affinity", "vm"), ("VM.set_suspend_SR", "vm"), ("VM.set_suspend_VDI", "vm"),
    ("pool.set_default_SR", "pool"), ("pool.set_suspend_image_SR", "pool"), ("pool.set_crash_dump_SR", "pool"),
    ("host.set_suspend_image_sr", "host"), ("host.set_crash_dump_sr", "host"),
]


def _owner(admin, env, kind):
    if kind == "vm":
        return admin("VM.create", vm_record())
    if kind == "pool":
        return admin("pool.get_all")[0]
    return env.api.host_ref


# -- the schema declares it ----------------------------------------------------------------

def test_schema_declares_nullable_refs():
    schema = load_schema()
    nullable = {m for m, s in schema.messages.items() for p in s.params if p.null}
    for method, _ in NULLABLE_SETTERS:
        assert method in nullable, method
    assert "VM.copy" in nullable
    # refs that must name an object stay strict
    for method in ("VM.start_on", "VBD.insert", "VIF.move", "VDI.copy", "VM.clean_shutdown", "VBD.plug"):
        assert method not in nullable, method
    assert schema.classes["VBD"].fields["VDI"].null and not schema.classes["VBD"].fields["VM"].null
    assert not schema.classes["PBD"].fields["SR"].null and not schema.classes["VIF"].fields["network"].null


# -- in process ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,kind", NULLABLE_SETTERS)
def test_nullable_setter_clears(admin, env, method, kind):
    owner = _owner(admin, env, kind)
    getter = method.replace(".set_", ".get_")
    target = env.api.host_ref if "affinity" in method else None
    if target is None and method.endswith(("SR", "sr")):
        target = default_sr(admin)
    if target is not None:
        admin(method, owner, target)
        assert admin(getter, owner) == target
    admin(method, owner, NULL)
    assert admin(getter, owner) == NULL
    # a ref that names nothing is still refused
    assert admin.fails(method, owner, "OpaqueRef:00000000-0000-0000-0000-000000000000")[0] == "HANDLE_INVALID"


def test_strict_refs_refuse_null(admin, env):
    vm = admin("VM.create", vm_record())
    assert admin.fails("VM.start_on", vm, NULL, False, False)[:2] == ["HANDLE_INVALID", "host"]
    assert admin.fails("VM.get_record", NULL)[:2] == ["HANDLE_INVALID", "VM"]
    vdi = admin("VDI.create", vdi_record(default_sr(admin)))
    assert admin.fails("VDI.copy", vdi, NULL)[:2] == ["HANDLE_INVALID", "SR"]
    cd = admin("VBD.create", vbd_record(vm, NULL, type="CD", mode="RO", empty=True))
    assert admin.fails("VBD.insert", cd, NULL)[:2] == ["HANDLE_INVALID", "VDI"]
    vif = admin("VIF.create", vif_record(vm, network(admin)))
    assert admin.fails("VIF.move", vif, NULL)[:2] == ["HANDLE_INVALID", "network"]


def test_create_records_follow_field_declarations(admin, env):
    """NULL is a valid value of a null="true" field in a create record, HANDLE_INVALID elsewhere."""
    vm = admin("VM.create", vm_record(affinity=NULL, suspend_SR=NULL))
    assert admin("VM.get_affinity", vm) == NULL
    assert admin.fails("VIF.create", vif_record(vm, NULL))[:2] == ["HANDLE_INVALID", "network"]
    assert admin.fails("VBD.create", vbd_record(NULL, NULL, type="CD", mode="RO", empty=True))[:2] == \
        ["HANDLE_INVALID", "VM"]
    assert admin.fails("VDI.create", vdi_record(NULL))[:2] == ["HANDLE_INVALID", "SR"]
    assert admin.fails("PBD.create", {"host": NULL, "SR": default_sr(admin), "device_config": {}})[:2] == \
        ["HANDLE_INVALID", "host"]


def test_vm_copy_null_sr_keeps_each_disk_sr(admin):
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record())
    vdi = admin("VDI.create", vdi_record(sr))
    admin("VBD.create", vbd_record(vm, vdi))
    copy = admin("VM.copy", vm, "copy", NULL)
    disks = [admin("VBD.get_VDI", v) for v in admin("VM.get_VBDs", copy)]
    assert len(disks) == 1 and disks[0] != vdi and admin("VDI.get_SR", disks[0]) == sr


# -- allowed_operations --------------------------------------------------------------------

def ops(admin, cls, ref):
    return set(admin(f"{cls}.get_allowed_operations", ref))


def test_vbd_vif_vdi_follow_vm_power_and_plug(admin):
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record())
    vdi = admin("VDI.create", vdi_record(sr))
    vbd = admin("VBD.create", vbd_record(vm, vdi, unpluggable=True))
    vif = admin("VIF.create", vif_record(vm, network(admin)))
    assert {"plug", "unplug"}.isdisjoint(ops(admin, "VBD", vbd)) and "attach" in ops(admin, "VBD", vbd)
    assert {"plug", "unplug"}.isdisjoint(ops(admin, "VIF", vif))
    assert {"destroy", "resize", "clone", "snapshot", "copy"} <= ops(admin, "VDI", vdi)
    assert "forget" not in ops(admin, "VDI", vdi)  # a VBD refers to it
    admin("VM.start", vm, False, False)
    assert "unplug" in ops(admin, "VBD", vbd) and "plug" not in ops(admin, "VBD", vbd)
    assert "unplug" in ops(admin, "VIF", vif) and "plug" not in ops(admin, "VIF", vif)
    # attached to a running VM: only the live operations (xapi's VDI_IN_USE for the others)
    assert ops(admin, "VDI", vdi) == {"snapshot", "clone", "copy"}
    admin("VBD.unplug", vbd)
    assert "plug" in ops(admin, "VBD", vbd) and "unplug" not in ops(admin, "VBD", vbd)
    assert "destroy" in ops(admin, "VDI", vdi) and "resize" in ops(admin, "VDI", vdi)
    admin("VBD.plug", vbd)
    admin("VIF.unplug", vif)
    assert "plug" in ops(admin, "VIF", vif)
    assert "destroy" not in ops(admin, "VDI", vdi)
    admin("VM.hard_shutdown", vm)
    assert {"plug", "unplug"}.isdisjoint(ops(admin, "VBD", vbd) | ops(admin, "VIF", vif))
    assert "destroy" in ops(admin, "VDI", vdi)


def test_cd_insert_eject(admin):
    vm = admin("VM.create", vm_record())
    cd = admin("VBD.create", vbd_record(vm, NULL, type="CD", mode="RO", empty=True))
    assert "insert" in ops(admin, "VBD", cd) and "eject" not in ops(admin, "VBD", cd)
    iso = admin("SR.get_VDIs", iso_sr(admin))
    if iso:
        admin("VBD.insert", cd, iso[0])
        assert "eject" in ops(admin, "VBD", cd) and "insert" not in ops(admin, "VBD", cd)
    disk = admin("VBD.create", vbd_record(vm, admin("VDI.create", vdi_record(default_sr(admin)))))
    assert {"insert", "eject"}.isdisjoint(ops(admin, "VBD", disk))


def test_sr_follows_pbds_and_contents(admin, env):
    sr = admin("SR.create", env.api.host_ref, {"location": str(env.api.state_dir / "extra")}, "0", "extra", "",
               "file", "user", False, {})
    assert {"scan", "vdi_create", "unplug"} <= ops(admin, "SR", sr)
    assert {"destroy", "forget", "plug"}.isdisjoint(ops(admin, "SR", sr))
    pbd = admin("SR.get_PBDs", sr)[0]
    admin("PBD.unplug", pbd)
    assert {"destroy", "forget", "plug"} <= ops(admin, "SR", sr)
    assert {"scan", "vdi_create", "unplug"}.isdisjoint(ops(admin, "SR", sr))
    admin("PBD.plug", pbd)
    admin("VDI.create", vdi_record(sr))
    admin("PBD.unplug", pbd)
    assert "destroy" not in ops(admin, "SR", sr) and "forget" in ops(admin, "SR", sr)  # SR_NOT_EMPTY
    assert "vdi_create" not in ops(admin, "SR", iso_sr(admin))  # read-only library


def test_host_follows_enabled(admin, env):
    host = env.api.host_ref
    assert "vm_start" in ops(admin, "host", host) and "enable" not in ops(admin, "host", host)
    admin("host.disable", host, False)
    assert "enable" in ops(admin, "host", host) and "vm_start" not in ops(admin, "host", host)
    admin("host.enable", host)
    assert "vm_start" in ops(admin, "host", host)


def test_vm_lists_only_served_operations(admin, env):
    schema = env.api.schema
    vm = admin("VM.create", vm_record())
    listed = ops(admin, "VM", vm)
    assert "start" in listed and "clone" in listed
    for op in listed:
        assert any(m in schema.messages for m in OPERATION_MESSAGES["VM"][op]), op
    assert "export" not in listed and "metadata_export" not in listed  # no message serves them


def test_every_listed_operation_has_a_served_message(admin, env):
    """The VM rule generalised: for every class with allowed_operations, each operation listed in
    any record (after exercising devices and power states) is performed by a served message."""
    sr = default_sr(admin)
    vm = admin("VM.create", vm_record())
    vdi = admin("VDI.create", vdi_record(sr))
    admin("VBD.create", vbd_record(vm, vdi))
    admin("VBD.create", vbd_record(vm, NULL, type="CD", mode="RO", empty=True))
    admin("VIF.create", vif_record(vm, network(admin)))
    admin("task.create", "t", "")
    seen: dict[str, set[str]] = {}

    def collect():
        for cls, spec in schema.classes.items():
            if "allowed_operations" in spec.fields and spec.get_all:
                for rec in admin(f"{cls}.get_all_records").values():
                    seen.setdefault(cls, set()).update(rec["allowed_operations"])

    schema = env.api.schema
    collect()
    admin("VM.start", vm, False, False)
    collect()
    admin("VM.suspend", vm)
    collect()
    classes = {c for c, s in schema.classes.items() if "allowed_operations" in s.fields}
    assert {"VM", "VDI", "VBD", "VIF", "SR", "host", "pool", "network", "task"} <= classes
    for cls in classes:
        assert cls in OPERATION_MESSAGES, cls
        for op in seen.get(cls, ()):
            messages = OPERATION_MESSAGES[cls].get(op, ())
            assert any(m in schema.messages for m in messages), f"{cls} lists {op}, which no served message performs"
            assert op in served_operations(schema, cls)
        # every enum value of the class's operations has a mapping (served or not)
        enum = schema.classes[cls].fields["allowed_operations"].type.elem.name
        assert set(schema.enums[enum]) <= set(OPERATION_MESSAGES[cls]) | {"attach"}, cls
    assert seen["VBD"] and seen["VDI"] and seen["SR"] and seen["host"]


def test_derived_again_after_restart(admin, env):
    vm = admin("VM.create", vm_record())
    vbd = admin("VBD.create", vbd_record(vm, admin("VDI.create", vdi_record(default_sr(admin)))))
    before = ops(admin, "VBD", vbd)
    env.restart()
    again = env.login()
    assert set(again("VBD.get_allowed_operations", vbd)) == before


# -- through the official SDK on a real daemon -------------------------------------------------

@pytest.fixture(scope="module")
def x(daemon):
    s = XenAPI.Session(daemon.url)
    s.login_with_password("admin", PASSWORD, "1.0", "xapid-null-tests")
    yield s.xenapi
    s.logout()


def test_sdk_clears_affinity_and_pool_default_sr(x):
    vm = x.VM.create(vm_record(name_label="null-sdk"))
    host = x.host.get_all()[0]
    x.VM.set_affinity(vm, host)
    x.VM.set_affinity(vm, NULL)
    assert x.VM.get_affinity(vm) == NULL
    pool = x.pool.get_all()[0]
    sr = x.pool.get_default_SR(pool)
    x.pool.set_default_SR(pool, NULL)
    assert x.pool.get_default_SR(pool) == NULL
    x.pool.set_default_SR(pool, sr)
    with pytest.raises(XenAPI.Failure) as info:
        x.VM.start_on(vm, NULL, False, False)
    assert info.value.details[:2] == ["HANDLE_INVALID", "host"]
    x.VM.destroy(vm)


def test_sdk_allowed_operations_follow_state(x):
    vm = x.VM.create(vm_record(name_label="ops-sdk"))
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vdi = x.VDI.create(vdi_record(sr, size=1 << 20))
    vbd = x.VBD.create(vbd_record(vm, vdi, unpluggable=True))
    assert "plug" not in x.VBD.get_allowed_operations(vbd) and "destroy" in x.VDI.get_allowed_operations(vdi)
    x.VM.start(vm, False, False)
    try:
        assert "unplug" in x.VBD.get_allowed_operations(vbd)
        assert "destroy" not in x.VDI.get_allowed_operations(vdi)
    finally:
        x.VM.hard_shutdown(vm)
    assert "destroy" in x.VDI.get_allowed_operations(vdi)
