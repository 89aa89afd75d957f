"""Disk and network-card hot-plug of the ``xen`` driver, and the devices' ids."""

from __future__ import annotations

import errno
from dataclasses import replace

from xapid.backend.interface import DiskSpec, DomainInfo, InvalidSpec, NicSpec
from xapid.backend.specs import check_limits, validate_disk, validate_nic
from xapid.backend.xen import domconfig
from xapid.backend.xen.core import XenCore
from xapid.backend.xen.libs import XenError


def disk_devid(vdev: str) -> int:
    """Linux's device number of a guest disk name, as blkback names its statistics directory."""
    letters = vdev[3:] if vdev.startswith("xvd") else vdev[2:]
    index = 0
    for char in letters:
        if not "a" <= char <= "z":
            return -1
        index = index * 26 + ord(char) - ord("a") + 1
    index -= 1
    if index < 0:
        return -1
    if vdev.startswith("xvd"):
        return (202 << 8) | (index << 4) if index < 16 else (1 << 28) | (index << 8)
    if vdev.startswith("hd") and index < 4:
        return ((3 if index < 2 else 22) << 8) | ((index & 1) << 6)
    if vdev.startswith("sd") and index < 16:
        return (8 << 8) | (index << 4)
    return -1


class Devices(XenCore):
    """Attaches and detaches disks and network cards through libxl; lists a domain's devices."""

    # -- devices -----------------------------------------------------------------------

    def _backends(self, domid: int, kind: str) -> dict[str, str]:
        """The domain's devices of *kind* (``vbd``/``vif``): devid -> backend path."""
        base = f"/local/domain/0/backend/{kind}/{domid}"
        try:
            return {devid: f"{base}/{devid}" for devid in self._store().directory(base)}
        except XenError as exc:
            if exc.errno == errno.ENOENT:
                return {}
            raise

    def _disks(self, domid: int) -> dict[str, str]:
        """The domain's disks: guest device name -> devid."""
        disks = {}
        for devid, path in self._backends(domid, "vbd").items():
            try:
                disks[self._store().read(f"{path}/dev").decode()] = devid
            except XenError:
                continue
        return disks

    def attach_disk(self, uuid: str, disk: DiskSpec) -> None:
        """Hot-plug a disk (libxl device add)."""
        raw = self._guest(uuid, "attach a disk to")
        validate_disk(disk)
        disks = self._disks(raw.domain)
        if disk.device in disks:
            raise InvalidSpec(f"disk {disk.device} already attached", uuid)
        check_limits(self._kind(raw), len(disks) + 1, 0)
        with self._libxl(f"libxl could not attach {disk.device}"):
            self._light().disk_add(raw.domain, domconfig.disk_json(disk))
        self._spec_update(uuid, lambda s: replace(s, disks=(*s.disks, disk)))

    def detach_disk(self, uuid: str, device: str) -> None:
        """Hot-unplug a disk."""
        raw = self._guest(uuid, "detach a disk from")
        if device not in self._disks(raw.domain):
            raise InvalidSpec(f"no disk {device}", uuid)
        with self._libxl(f"libxl could not detach {device}"):
            self._light().disk_remove(raw.domain, domconfig.disk_json(DiskSpec(device=device, path="", mode="r",
                                                                              kind="cdrom")))
        self._spec_update(uuid, lambda s: replace(s, disks=tuple(d for d in s.disks if d.device != device)))

    def attach_nic(self, uuid: str, nic: NicSpec) -> None:
        """Hot-plug a network card."""
        raw = self._guest(uuid, "attach a network card to")
        validate_nic(nic)
        nics = self._backends(raw.domain, "vif")
        if str(nic.devid) in nics:
            raise InvalidSpec(f"network card {nic.devid} already attached", uuid)
        check_limits(self._kind(raw), 0, len(nics) + 1)
        with self._libxl(f"libxl could not attach network card {nic.devid}"):
            self._light().nic_add(raw.domain, domconfig.nic_json(nic))
        self._spec_update(uuid, lambda s: replace(s, nics=(*s.nics, nic)))

    def detach_nic(self, uuid: str, devid: int) -> None:
        """Hot-unplug a network card."""
        raw = self._guest(uuid, "detach a network card from")
        if str(devid) not in self._backends(raw.domain, "vif"):
            raise InvalidSpec(f"no network card {devid}", uuid)
        with self._libxl(f"libxl could not detach network card {devid}"):
            self._light().nic_remove(raw.domain, domconfig.nic_json(NicSpec(devid=devid, mac="00:00:00:00:00:00",
                                                                            bridge="")))
        self._spec_update(uuid, lambda s: replace(s, nics=tuple(n for n in s.nics if n.devid != devid)))

    def _device_ids(self, dom: DomainInfo) -> dict[str, str]:
        """Disk name -> devid: from the build record without asking xenstore, else from xenstore."""
        spec = self._record(dom.uuid).get("spec")
        if spec is None:
            return self._disks(dom.domid)
        return {d["device"]: str(disk_devid(d["device"])) for d in spec.get("disks", ())}

    def _nic_ids(self, dom: DomainInfo) -> list[str]:
        spec = self._record(dom.uuid).get("spec")
        if spec is None:
            return list(self._backends(dom.domid, "vif"))
        return [str(n["devid"]) for n in spec.get("nics", ())]
