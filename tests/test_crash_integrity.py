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
