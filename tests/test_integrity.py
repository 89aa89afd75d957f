"""Reference integrity under random sequences of creates, destroys, power operations and restarts.

A hypothesis state machine drives the in-process API (sim driver, fake clock) on a fresh state
dir per example and checks, after every step, the whole store and the SR directories with
:mod:`invariants`: no dangling refs, inverse sets equal to what the other side says, one file
per VDI and one VDI per disk file.  Refusals must be the documented ones and change nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, \
    run_state_machine_as_test
from twisted.internet.task import Clock

import invariants
from support import ApiEnv, make_users, vm_record
from xapid.errors import XenAPIError

NULL = "OpaqueRef:NULL"
MiB = 1 << 20
_USERS: list[Path] = []

# object sets that must come back unchanged after a restart (tasks and users are not stored: users are
# mirrored from the users file at every start)
PERSISTENT = [c for c in invariants.listed_classes() if invariants.schema().classes[c].persist]


def users_file() -> Path:
    """A users file made once (hashing passwords is the slow part of making an ApiEnv)."""
    if not _USERS:
        path = Path(tempfile.mkdtemp(prefix="xapid-users-")) / "users"
        make_users(path)
        _USERS.append(path)
    return _USERS[0]


def new_env() -> tuple[Path, ApiEnv]:
    tmp = Path(tempfile.mkdtemp(prefix="xapid-integrity-"))
    shutil.copy(users_file(), tmp / "users")
    clock = Clock()
    clock.advance(1_700_000_000)
    return tmp, ApiEnv(tmp, clock)


def close_env(tmp: Path, env: ApiEnv) -> None:
    env.api.hypervisor.driver.close()
    env.api.database.close()
    shutil.rmtree(tmp, ignore_errors=True)


def vdi_record(sr: str, size: int) -> dict[str, Any]:
    return {"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": "disk"}


def vbd_record(vm: str, vdi: str, userdevice: str, kind: str) -> dict[str, Any]:
    cd = kind != "disk"
    return {"VM": vm, "VDI": NULL if kind == "empty_cd" else vdi, "userdevice": userdevice, "bootable": False,
            "mode": "RO" if cd else "RW", "type": "CD" if cd else "Disk", "empty": kind == "empty_cd",
            "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}


def vif_record(vm: str, network: str, device: str) -> dict[str, Any]:
    return {"device": device, "network": network, "VM": vm, "MAC": "", "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def ref_sets(records: dict[str, dict[str, dict[str, Any]]]) -> dict[str, set[str]]:
    return {cls: set(records[cls]) for cls in PERSISTENT}


index = st.integers(min_value=0, max_value=1 << 16)


@pytest.fixture(autouse=True)
def parsed_schema_once(monkeypatch):
    """Every (re)start of an ApiEnv reuses one parsed schema (it is immutable); parsing it is most of a start."""
    monkeypatch.setattr("xapid.server.load_schema", lambda path=None: invariants.schema())


class Integrity(RuleBasedStateMachine):
    """Random operations on VMs, disks, drives, NICs and networks; integrity checked after each."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp, self.env = new_env()
        self.admin = self.env.login()
        pool = self.admin("pool.get_all")[0]
        self.sr = self.admin("pool.get_default_SR", pool)
        records = invariants.read_all(self.admin)
        self.iso_sr = next(r for r, rec in records["SR"].items() if rec["content_type"] == "iso")
        iso_dir = invariants.sr_directories(records)[self.iso_sr][1]
        for name in ("tools.iso", "installer.iso"):
            with open(os.path.join(iso_dir, name), "wb") as f:
                f.write(b"\0" * 4096)
        self.admin("SR.scan", self.iso_sr)
        self.xenbr0 = next(r for r, rec in records["network"].items() if rec["bridge"] == "xenbr0")
        # every ref ever seen, per class, in the order first seen: picks include destroyed ones on purpose
        self.seen: dict[str, list[str]] = {"VM": [], "VDI": [], "VBD": [], "VIF": [], "network": []}
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.refresh()

    def teardown(self) -> None:
        close_env(self.tmp, self.env)

    # -- helpers ---------------------------------------------------------------------------

    def refresh(self) -> None:
        self.records = invariants.read_all(self.admin)
        for cls, refs in self.seen.items():
            for ref, record in self.records[cls].items():
                if ref not in refs and not record.get("is_control_domain", False) \
                        and not record.get("is_default_template", False):  # templates: test_templates_provision
                    refs.append(ref)

    def pick(self, cls: str, i: int) -> str:
        """Mostly a live object, the most recent first; one pick in eight a destroyed one (when any)."""
        live = [r for r in reversed(self.seen[cls]) if r in self.records[cls]]
        gone = [r for r in self.seen[cls] if r not in self.records[cls]]
        pool = gone if (i % 8 == 7 and gone) or not live else live
        return pool[(i // 8) % len(pool)]

    def attempt(self, allowed: set[str], method: str, *args: Any, refs: tuple[tuple[str, str], ...] = ()) -> Any:
        """Make a call; a refusal must be one of *allowed* (or HANDLE_INVALID for a ref we know is
        gone) and must neither add nor remove objects; a success on a destroyed ref is a bug."""
        stale = [(cls, ref) for cls, ref in refs if ref != NULL and ref not in self.records[cls]]
        before = ref_sets(self.records)
        try:
            result = self.admin(method, *args)
        except XenAPIError as error:
            code = error.description[0]
            assert code != "INTERNAL_ERROR", f"{method}{args}: {error.description}"
            if code == "HANDLE_INVALID":
                assert tuple(error.description[1:3]) in stale, \
                    f"{method}{args}: {error.description} but that object is live"
            else:
                assert code in allowed, f"{method}{args} failed unexpectedly: {error.description}"
            after = ref_sets(invariants.read_all(self.admin))
            changed = {cls: (before[cls] ^ after[cls]) for cls in before if before[cls] != after[cls]}
            assert not changed, f"{method}{args} was refused with {error.description} yet changed {changed}"
            return None
        assert not stale, f"{method}{args} succeeded although {stale} had been destroyed"
        return result

    # -- rules -----------------------------------------------------------------------------

    @initialize()
    def first_vm(self) -> None:
        self.attempt(set(), "VM.create", vm_record(name_label="vm"))

    @rule(hvm=st.booleans())
    def create_vm(self, hvm: bool) -> None:
        record = vm_record(HVM_boot_policy="BIOS order", HVM_boot_params={"order": "dc"}, PV_kernel="") \
            if hvm else vm_record()
        self.attempt(set(), "VM.create", record)

    @rule(size=st.integers(min_value=0, max_value=4 * MiB))
    def create_vdi(self, size: int) -> None:
        self.attempt(set(), "VDI.create", vdi_record(self.sr, size))

    @rule(name=st.sampled_from(["internal", "storage"]))
    def create_network(self, name: str) -> None:
        self.attempt(set(), "network.create", {"name_label": name, "other_config": {}})

    @precondition(lambda self: self.seen["VM"] and self.seen["VDI"])
    @rule(vm=index, vdi=index, kind=st.sampled_from(["disk", "empty_cd", "iso_cd"]),
          userdevice=st.sampled_from(["autodetect", "autodetect", "0", "1", "3", "15", "16"]))
    def create_vbd(self, vm: int, vdi: int, kind: str, userdevice: str) -> None:
        vm_ref, vdi_ref = self.pick("VM", vm), self.pick("VDI", vdi)
        refs = (("VM", vm_ref),) if kind == "empty_cd" else (("VM", vm_ref), ("VDI", vdi_ref))
        self.attempt({"DEVICE_ALREADY_EXISTS", "INVALID_VALUE", "VDI_READONLY"}, "VBD.create",
                     vbd_record(vm_ref, vdi_ref, userdevice, kind), refs=refs)

    @precondition(lambda self: self.seen["VM"])
    @rule(vm=index, network=index, device=st.integers(min_value=0, max_value=7), own=st.booleans())
    def create_vif(self, vm: int, network: int, device: int, own: bool) -> None:
        vm_ref = self.pick("VM", vm)
        net = self.pick("network", network) if own and self.seen["network"] else self.xenbr0
        self.attempt({"DEVICE_ALREADY_EXISTS", "INVALID_VALUE"}, "VIF.create", vif_record(vm_ref, net, str(device)),
                     refs=(("VM", vm_ref), ("network", net)))

    @precondition(lambda self: self.seen["VBD"])
    @rule(i=index)
    def destroy_vbd(self, i: int) -> None:
        ref = self.pick("VBD", i)
        self.attempt({"OPERATION_NOT_ALLOWED"}, "VBD.destroy", ref, refs=(("VBD", ref),))

    @precondition(lambda self: self.seen["VIF"])
    @rule(i=index)
    def destroy_vif(self, i: int) -> None:
        ref = self.pick("VIF", i)
        self.attempt({"OPERATION_NOT_ALLOWED"}, "VIF.destroy", ref, refs=(("VIF", ref),))

    @precondition(lambda self: self.seen["network"])
    @rule(i=index)
    def destroy_network(self, i: int) -> None:
        ref = self.pick("network", i)
        self.attempt({"NETWORK_CONTAINS_VIF", "NETWORK_CONTAINS_PIF"}, "network.destroy", ref, refs=(("network", ref),))

    @precondition(lambda self: self.seen["VDI"])
    @rule(i=index)
    def destroy_vdi(self, i: int) -> None:
        ref = self.pick("VDI", i)
        self.attempt({"VDI_IN_USE", "SR_OPERATION_NOT_SUPPORTED"}, "VDI.destroy", ref, refs=(("VDI", ref),))

    @precondition(lambda self: self.seen["VM"])
    @rule(i=index)
    def destroy_vm(self, i: int) -> None:
        ref = self.pick("VM", i)
        self.attempt({"VM_BAD_POWER_STATE"}, "VM.destroy", ref, refs=(("VM", ref),))

    @precondition(lambda self: self.seen["VM"])
    @rule(i=index)
    def start_vm(self, i: int) -> None:
        ref = self.pick("VM", i)
        # VM_IS_TEMPLATE: snapshots (and their clones) are templates, as in xapi
        self.attempt({"VM_BAD_POWER_STATE", "HOST_NOT_ENOUGH_FREE_MEMORY", "VM_IS_TEMPLATE"}, "VM.start", ref, False, False,
                     refs=(("VM", ref),))

    @precondition(lambda self: self.seen["VM"])
    @rule(i=index)
    def hard_shutdown_vm(self, i: int) -> None:
        ref = self.pick("VM", i)
        self.attempt({"VM_BAD_POWER_STATE", "VM_IS_TEMPLATE"}, "VM.hard_shutdown", ref, refs=(("VM", ref),))

    @precondition(lambda self: self.seen["VM"])
    @rule(i=index)
    def clone_vm(self, i: int) -> None:
        ref = self.pick("VM", i)
        self.attempt({"VM_BAD_POWER_STATE"}, "VM.clone", ref, "clone", refs=(("VM", ref),))

    @precondition(lambda self: self.seen["VM"])
    @rule(i=index)
    def snapshot_vm(self, i: int) -> None:
        ref = self.pick("VM", i)
        self.attempt(set(), "VM.snapshot", ref, "snap", [], refs=(("VM", ref),))

    @precondition(lambda self: self.seen["VDI"])
    @rule(i=index, snapshot=st.booleans())
    def copy_vdi(self, i: int, snapshot: bool) -> None:
        ref = self.pick("VDI", i)
        self.attempt({"SR_OPERATION_NOT_SUPPORTED"}, "VDI.snapshot" if snapshot else "VDI.clone", ref, {},
                     refs=(("VDI", ref),))

    @precondition(lambda self: self.seen["VBD"])
    @rule(i=index, plug=st.booleans())
    def hotplug_vbd(self, i: int, plug: bool) -> None:
        ref = self.pick("VBD", i)
        self.attempt({"VM_BAD_POWER_STATE", "DEVICE_ALREADY_ATTACHED", "DEVICE_ALREADY_DETACHED"},
                     "VBD.plug" if plug else "VBD.unplug", ref, refs=(("VBD", ref),))

    @precondition(lambda self: self.seen["VBD"])
    @rule(i=index, vdi=index, insert=st.booleans())
    def change_cd(self, i: int, vdi: int, insert: bool) -> None:
        ref = self.pick("VBD", i)
        allowed = {"VBD_NOT_REMOVABLE_MEDIA", "VBD_IS_EMPTY", "VBD_NOT_EMPTY", "VDI_IS_NOT_ISO"}
        if insert:
            vdi_ref = self.pick("VDI", vdi)
            self.attempt(allowed, "VBD.insert", ref, vdi_ref, refs=(("VBD", ref), ("VDI", vdi_ref)))
        else:
            self.attempt(allowed, "VBD.eject", ref, refs=(("VBD", ref),))

    @rule()
    def scan(self) -> None:
        before = ref_sets(self.records)
        self.admin("SR.scan", self.sr)
        self.admin("SR.scan", self.iso_sr)
        assert ref_sets(invariants.read_all(self.admin)) == before, "a scan of a consistent SR changed objects"

    @rule()
    def restart(self) -> None:
        before = self.records
        self.env.restart()
        self.admin = self.env.login()
        after = invariants.read_all(self.admin)
        assert ref_sets(after) == ref_sets(before), "objects did not survive the restart"
        for ref, record in before["VM"].items():
            assert after["VM"][ref]["uuid"] == record["uuid"]
            assert after["VM"][ref]["power_state"] == record["power_state"], f"{ref} changed state over restart"

    # -- checked after every step ----------------------------------------------------------

    @invariant()
    def integrity(self) -> None:
        self.refresh()
        found = invariants.reference_problems(self.records) + invariants.file_problems(self.records)
        assert not found, "\n".join(found)


def test_random_operations_keep_integrity():
    """Random create/destroy/start/stop/clone/plug/CD/restart sequences never leave a dangling ref, a
    stale inverse set, a VDI without its file or a file without its VDI, and refuse only as documented."""
    run_state_machine_as_test(Integrity, settings=settings(
        max_examples=30, stateful_step_count=30, deadline=None, derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_destroying_a_vm_rebases_its_clones():
    """VM.destroy gives the VM's children its own parent (xapi rebases them), so no parent ref dangles."""
    tmp, env = new_env()
    try:
        admin = env.login()
        grandparent = admin("VM.create", vm_record(name_label="grandparent"))
        parent = admin("VM.clone", grandparent, "parent")
        child = admin("VM.clone", parent, "child")
        assert admin("VM.get_parent", child) == parent and admin("VM.get_children", parent) == [child]
        admin("VM.destroy", parent)
        assert admin("VM.get_parent", child) == grandparent
        assert admin("VM.get_children", grandparent) == [child]
        admin("VM.destroy", grandparent)
        assert admin("VM.get_parent", child) == NULL
        assert invariants.problems(admin) == []
    finally:
        close_env(tmp, env)


def test_vdi_destroy_takes_its_detached_vbds_along():
    """Destroying a VDI with detached VBDs removes them and their metrics, and the VM forgets them."""
    tmp, env = new_env()
    try:
        admin = env.login()
        sr = admin("pool.get_default_SR", admin("pool.get_all")[0])
        vm = admin("VM.create", vm_record())
        vdi = admin("VDI.create", vdi_record(sr, MiB))
        vbd = admin("VBD.create", vbd_record(vm, vdi, "autodetect", "disk"))
        metrics = admin("VBD.get_metrics", vbd)
        admin("VDI.destroy", vdi)
        assert admin("VM.get_VBDs", vm) == []
        assert metrics not in admin("VBD_metrics.get_all")
        assert invariants.problems(admin) == []
    finally:
        close_env(tmp, env)
