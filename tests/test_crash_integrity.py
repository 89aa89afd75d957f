"""kill -9 while clients create (and destroy) VMs with disks: after a restart on the same state dir
every acknowledged write is there and the store and the SR directories agree (see :mod:`invariants`)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import XenAPI

import invariants
from support import PASSWORD, RealDaemon, vm_record

MiB = 1 << 20
THREADS = 4
TOTAL_VMS = 100
MAYBE = "?"  # in Load.acked: a destroy was sent but not (yet) acknowledged


def vdi_record(sr: str, size: int) -> dict[str, Any]:
    return {"SR": sr, "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": "crash-disk"}


def vbd_record(vm: str, vdi: str) -> dict[str, Any]:
    return {"VM": vm, "VDI": vdi, "userdevice": "autodetect", "bootable": True, "mode": "RW", "type": "Disk",
            "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}


def session(d: RealDaemon) -> XenAPI.Session:
    s = XenAPI.Session(d.url)
    s.login_with_password("admin", PASSWORD)
    return s


class Load:
    """Jobs run by THREADS SDK sessions at once; every acknowledged write is recorded as it returns.

    A worker stops at the first connection error (the daemon was killed under it); a XenAPI
    failure is kept, since no job here should be refused.
    """

    def __init__(self, d: RealDaemon, jobs: list[Any], action: Callable[..., None]):
        self.url = d.url
        self.action = action
        self.jobs: queue.Queue = queue.Queue()
        for job in jobs:
            self.jobs.put(job)
        # (class, ref, uuid) created, (class, ref, "") destroyed, (class, ref, MAYBE) destroy sent
        self.acked: list[tuple[str, str, str]] = []
        self.failures: list[list[str]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(THREADS)]
        for t in self.threads:
            t.start()

    def ack(self, cls: str, ref: str, uuid: str) -> None:
        with self.lock:
            self.acked.append((cls, ref, uuid))

    def count(self, cls: str, destroyed: bool = False) -> int:
        with self.lock:
            return sum(1 for c, _, uuid in self.acked if c == cls and (uuid == "") == destroyed)

    def worker(self) -> None:
        try:
            s = XenAPI.Session(self.url)
            s.login_with_password("admin", PASSWORD)
        except Exception:  # noqa: BLE001 - killed before we got going
            return
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            try:
                self.action(s.xenapi, job, self.ack)
            except XenAPI.Failure as failure:
                self.failures.append(failure.details)
                return
            except Exception:  # noqa: BLE001 - the connection died with the daemon
                return

    def join(self) -> None:
        for t in self.threads:
            t.join(20)
            assert not t.is_alive(), "a client thread hung after the kill"


def create_vm_with_disk(sr: str) -> Callable[..., None]:
    def action(x: Any, i: int, ack: Callable[[str, str, str], None]) -> None:
        vm = x.VM.create(vm_record(name_label=f"crash-{i}"))
        ack("VM", vm, x.VM.get_uuid(vm))
        vdi = x.VDI.create(vdi_record(sr, (1 + i % 4) * MiB))
        ack("VDI", vdi, x.VDI.get_uuid(vdi))
        vbd = x.VBD.create(vbd_record(vm, vdi))
        ack("VBD", vbd, x.VBD.get_uuid(vbd))
    return action


def destroy_vm_and_disks(x: Any, vm: str, ack: Callable[[str, str, str], None]) -> None:
    vbds = x.VM.get_VBDs(vm)
    disks = [x.VBD.get_VDI(vbd) for vbd in vbds]
    for cls, ref in [("VM", vm), *[("VBD", vbd) for vbd in vbds]]:  # VM.destroy takes its VBDs along
        ack(cls, ref, MAYBE)
    x.VM.destroy(vm)
    for cls, ref in [("VM", vm), *[("VBD", vbd) for vbd in vbds]]:
        ack(cls, ref, "")
    for vdi in disks:
        ack("VDI", vdi, MAYBE)
        x.VDI.destroy(vdi)
        ack("VDI", vdi, "")


def kill_when(d: RealDaemon, ready: Callable[[], bool], load: Load) -> None:
    """kill -9 the daemon as soon as *ready()* (writes are still in flight then), and restart it."""
    deadline = time.monotonic() + 20
    while not ready():
        assert time.monotonic() < deadline, f"the load never got there: {load.acked[-3:]} {load.failures}"
        assert load.jobs.qsize() > 0 or any(t.is_alive() for t in load.threads), "the load finished first"
        time.sleep(0.002)
    d.proc.kill()
    d.proc.wait()
    d.logfile.close()
    load.join()
    assert load.failures == []
    d.start()


def check_after_restart(d: RealDaemon, acked: list[tuple[str, str, str]]) -> dict[str, dict[str, dict]]:
    """Every acknowledged create is there with its ref and uuid, every acknowledged destroy is gone,
    and the whole store and the SR directories pass the integrity checks."""
    s = session(d)
    try:
        x = s.xenapi
        destroyed = {(cls, ref) for cls, ref, uuid in acked if not uuid}
        doubtful = {(cls, ref) for cls, ref, uuid in acked if uuid == MAYBE} - destroyed
        for cls, ref, uuid in acked:
            api = getattr(x, cls)
            if (cls, ref) in destroyed:
                assert ref not in api.get_all(), f"destroyed {cls} {ref} came back"
            elif (cls, ref) not in doubtful and uuid != MAYBE:
                assert api.get_by_uuid(uuid) == ref, f"acknowledged {cls} {ref} lost"
        call = invariants.sdk_caller(s)
        found = invariants.problems(call)
        assert found == [], "\n".join(found)
        return invariants.read_all(call)
    finally:
        s.logout()


def test_kill_9_while_creating_and_destroying_vms_with_disks(tmp_path):
    """kill -9 in the middle of 4 clients creating 100 VMs with disks (twice), and of destroying them,
    loses no acknowledged object and leaves no dangling ref, no VDI without its file, no disk file
    without its VDI and no partial or half-deleted file; an idle kill -9 keeps every object."""
    d = RealDaemon(tmp_path)
    try:
        s = session(d)
        sr = s.xenapi.pool.get_default_SR(s.xenapi.pool.get_all()[0])
        s.logout()
        acked: list[tuple[str, str, str]] = []

        # 1. kill after ~40 acknowledged VMs with disks, 2. after ~75 (resuming where round 1 stopped)
        made = 0  # VMs with their disk plugged so far
        for target in (40, 75):
            load = Load(d, list(range(made, TOTAL_VMS)), create_vm_with_disk(sr))
            kill_when(d, lambda: made + load.count("VBD") >= target, load)
            acked += load.acked
            made += load.count("VBD")
            records = check_after_restart(d, acked)

        # 3. kill while four clients destroy the VMs and their disks
        victims = [ref for ref, rec in records["VM"].items() if rec["name_label"].startswith("crash-")]
        load = Load(d, victims, destroy_vm_and_disks)
        kill_when(d, lambda: load.count("VDI", destroyed=True) >= len(victims) // 3, load)
        acked += load.acked
        records = check_after_restart(d, acked)

        # 4. an idle kill -9: every stored object comes back as it was
        d.proc.kill()
        d.proc.wait()
        d.logfile.close()
        d.start()
        s = session(d)
        again = invariants.read_all(invariants.sdk_caller(s))
        s.logout()
        for cls in invariants.listed_classes():
            if invariants.schema().classes[cls].persist:
                assert set(again[cls]) == set(records[cls]), cls
                assert {r: rec.get("uuid") for r, rec in again[cls].items()} == \
                    {r: rec.get("uuid") for r, rec in records[cls].items()}, cls
        assert {r: rec["VBDs"] for r, rec in again["VDI"].items()} == \
            {r: rec["VBDs"] for r, rec in records["VDI"].items()}
        log = d.log.read_text()
        assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    finally:
        d.stop()


# -- durable means committed (issue 13) ------------------------------------------------------------

def sigkill(d: RealDaemon) -> None:
    d.proc.kill()
    d.proc.wait()
    d.logfile.close()


def committed(d: RealDaemon) -> dict[str, tuple[str, dict[str, Any]]]:
    """What the (killed) daemon's database holds, read with a connection of our own."""
    from xapid.store import Database

    db = Database(d.state / "xapid.db")
    try:
        return {ref: (cls, data) for cls, ref, data in db.read_all()}
    finally:
        db.close()


def test_kill_9_right_after_async_clone_reports_success_keeps_the_clone(tmp_path):
    """The SDK polls task.get_status of Async.VM.clone and SIGKILLs the daemon the moment it says
    success: after a restart the clone is there with its VBDs and their (new) VDIs."""
    d = RealDaemon(tmp_path)
    try:
        for round_ in range(3):
            s = session(d)
            x = s.xenapi
            sr = x.pool.get_default_SR(x.pool.get_all()[0])
            source = x.VM.create(vm_record(name_label=f"source-{round_}"))
            disks = []
            for _ in range(2):
                disks.append(x.VDI.create(vdi_record(sr, 4 * MiB)))
                x.VBD.create(vbd_record(source, disks[-1]))
            task = x.Async.VM.clone(source, f"clone-{round_}")
            deadline = time.monotonic() + 30
            while (status := x.task.get_status(task)) != "success":
                assert status == "pending", x.task.get_error_info(task)
                assert time.monotonic() < deadline, "the clone never finished"
            sigkill(d)
            d.start()
            s = session(d)
            x = s.xenapi
            clones = x.VM.get_by_name_label(f"clone-{round_}")
            assert len(clones) == 1, f"round {round_}: the clone reported as success was lost"
            vbds = x.VM.get_VBDs(clones[0])
            assert len(vbds) == 2
            copies = [x.VBD.get_VDI(vbd) for vbd in vbds]
            assert all(x.VDI.get_SR(vdi) == sr for vdi in copies) and not set(copies) & set(disks)
            found = invariants.problems(invariants.sdk_caller(s))
            assert found == [], "\n".join(found)
            s.logout()
    finally:
        d.stop()


def test_domain_watch_write_is_committed_without_any_call(tmp_path):
    """A guest that powered off while the daemon was down: at start the domain watch applies
    actions_after_shutdown (destroy → Halted), a write no call follows; a kill -9 shortly after
    finds it in the database."""
    import json

    d = RealDaemon(tmp_path)
    try:
        s = session(d)
        x = s.xenapi
        vm = x.VM.create(vm_record(name_label="watched", actions_after_shutdown="destroy"))
        x.VM.start(vm, False, False)
        uuid = x.VM.get_uuid(vm)
        s.logout()
        sigkill(d)
        state_file = d.state / "sim" / "sim-state.json"
        state = json.loads(state_file.read_text())
        for domain in state["domains"]:
            if domain["uuid"] == uuid:
                domain["state"], domain["shutdown_reason"] = "shutdown", "poweroff"
        state_file.write_text(json.dumps(state))
        assert committed(d)[vm][1]["power_state"] == "Running"
        d.start()
        deadline = time.monotonic() + 10
        while f"VM {uuid} domain" not in d.log.read_text():
            assert time.monotonic() < deadline, d.log.read_text()[-2000:]
            time.sleep(0.02)
        time.sleep(0.5)  # no call at all: the store commits on its own
        sigkill(d)
        record = committed(d)[vm][1]
        assert (record["power_state"], record["domid"]) == ("Halted", -1)
        d.start()
    finally:
        d.stop()


def private_tmpfs(mountpoint: Any, size: str) -> Any:
    """A process holding a private mount namespace in which a tmpfs of *size* is mounted on
    *mountpoint*, or None where that cannot be done (not root, no unshare/nsenter)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        return None
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o "size=$2,mode=700" xapid-test "$1" && echo mounted && exec sleep 3600', "sh",
         str(mountpoint), size], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if holder.stdout.readline().strip() != "mounted":
        holder.kill()
        holder.wait()
        return None
    return holder


class NamespacedDaemon(RealDaemon):
    """A RealDaemon run inside the mount namespace of *holder* (where its state dir is a tmpfs)."""

    def __init__(self, tmp: Any, holder: Any):
        self.holder = holder
        super().__init__(tmp)

    def start(self) -> None:
        if self.args[0] != "nsenter":
            self.args = ["nsenter", "-t", str(self.holder.pid), "-m", "--", *self.args]
        super().start()


def test_disk_full_refuses_the_write_undoes_it_and_keeps_serving(tmp_path):
    """The state dir on a small tmpfs (private mount namespace) filled up: VM.create answers an
    INTERNAL_ERROR saying the disk is full, the VM is not visible, the daemon keeps serving, and
    after space returns and a kill -9 and restart the refused VM is gone while the others stay."""
    import errno
    import os

    import pytest

    (tmp_path / "state").mkdir()
    holder = private_tmpfs(tmp_path / "state", "24m")
    if holder is None:
        pytest.skip("no private tmpfs here (needs root, unshare, nsenter); test_durability.py injects ENOSPC")
    d = None
    try:
        d = NamespacedDaemon(tmp_path, holder)
        s = session(d)
        x = s.xenapi
        kept = x.VM.create(vm_record(name_label="kept"))
        filler = f"/proc/{holder.pid}/root{tmp_path / 'state'}/filler"
        with open(filler, "wb", buffering=0) as f:
            for chunk in (1 << 16, 4096, 1):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        acked, refused = [], None
        for i in range(50):  # the WAL may still have room for a write or two
            try:
                acked.append(x.VM.create(vm_record(name_label=f"full-{i}", name_description="x" * 4000)))
            except XenAPI.Failure as failure:
                refused = f"full-{i}"
                assert failure.details[0] == "INTERNAL_ERROR" and "disk" in failure.details[1] \
                    and "full" in failure.details[1], failure.details
                break
        assert refused is not None, "no write failed on the full disk"
        assert x.VM.get_by_name_label(refused) == []
        assert kept in x.VM.get_all() and x.VM.get_name_label(kept) == "kept"  # still serving
        s2 = session(d)
        s2.logout()
        os.unlink(filler)  # space is back
        after = x.VM.create(vm_record(name_label="after"))
        sigkill(d)
        d.start()
        s = session(d)
        x = s.xenapi
        assert x.VM.get_by_name_label(refused) == [], "the refused write came back"
        for vm in [kept, after, *acked]:
            assert x.VM.get_uuid(vm)
        found = invariants.problems(invariants.sdk_caller(s), files=False)  # the SR dirs are in the namespace
        assert found == [], "\n".join(found)
        log = d.log.read_text()
        assert "cannot rollback" not in log and "the disk is full" in log
    finally:
        if d is not None:
            d.stop()
        holder.kill()
        holder.wait()
