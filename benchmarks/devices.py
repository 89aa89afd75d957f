"""Devices for ``benchmarks/run.py``'s figure d: every VM gets 2 disks and 1 network card.

Each disk is a ``VDI.create`` in the pool's default SR (a real sparse file of ``DISK_SIZE`` bytes in
the SR directory) attached by a ``VBD.create`` (``userdevice`` 0 and 1); each card is a ``VIF.create``
(``device`` 0, generated MAC) on the network with bridge ``xenbr0``.  The VMs are shared out among
concurrent sessions, each creating its VMs' devices in turn.  None of this is timed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import XenAPI
from loadgen import success_value

DISKS_PER_VM = 2
NICS_PER_VM = 1
DISK_SIZE = 1 << 20  # 1 MiB: sparse, so 2000 of them cost the SR directory almost nothing
CLASSES = ("VM", "VBD", "VDI", "VIF")  # the four get_all_records of figure d, in the order they are fetched


def _vdi(sr: str, disk: int) -> dict[str, Any]:
    return {"SR": sr, "virtual_size": str(DISK_SIZE), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "name_label": f"bench-disk-{disk}", "name_description": ""}


def _vbd(vm: str, vdi: str, disk: int) -> dict[str, Any]:
    return {"VM": vm, "VDI": vdi, "userdevice": str(disk), "bootable": disk == 0, "mode": "RW", "type": "Disk",
            "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}


def _vif(vm: str, network: str, nic: int) -> dict[str, Any]:
    return {"device": str(nic), "network": network, "VM": vm, "MAC": "", "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def populate(connect: Callable[[], Any], vms: list[str], workers: int) -> None:
    """Give every VM in *vms* its disks and card, over *workers* concurrent sessions from *connect*.

    *connect* returns a logged-in ``XenAPI.Session``.  The first refusal stops it (RuntimeError).
    """
    admin = connect()
    try:
        api = admin.xenapi
        sr = api.pool.get_default_SR(api.pool.get_all()[0])
        networks = [ref for ref, rec in api.network.get_all_records().items() if rec["bridge"] == "xenbr0"]
    finally:
        admin.xenapi.session.logout()
    if not networks:
        raise RuntimeError("xapid has no network with bridge xenbr0 to put the VIFs on")
    network = networks[0]

    def equip(share: list[str]) -> None:
        session = connect()
        api = session.xenapi
        try:
            for vm in share:
                for disk in range(DISKS_PER_VM):
                    api.VBD.create(_vbd(vm, api.VDI.create(_vdi(sr, disk)), disk))
                for nic in range(NICS_PER_VM):
                    api.VIF.create(_vif(vm, network, nic))
        finally:
            api.session.logout()

    shares = [vms[i::workers] for i in range(workers)]
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(equip, [s for s in shares if s]))
    except XenAPI.Failure as exc:
        raise RuntimeError(f"creating the devices failed: {exc}") from None


def compare(replies: dict[str, dict[str, bytes]]) -> str:
    """Check that both servers' replies decode to the same records, class by class; a one-line note.

    *replies* maps a server name (``xapid``, ``stdlib``) to its reply body for each class in CLASSES.
    """
    notes, sizes = [], {name: 0 for name in replies}
    for cls in CLASSES:
        decoded = {name: success_value(bodies[cls]) for name, bodies in replies.items()}
        counts = {name: len(value) for name, value in decoded.items()}
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"the servers return different numbers of {cls} records: {counts}")
        same = "identical" if decoded["xapid"] == decoded["stdlib"] else "DIFFERENT"
        notes.append(f"{counts['xapid']} {cls} ({same})")
        for name, bodies in replies.items():
            sizes[name] += len(bodies[cls])
    total = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sizes.items())
    return f"both servers' replies decode to {', '.join(notes)}; reply sizes in all: {total}"
