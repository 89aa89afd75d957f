"""What every driver refuses in a domain spec, as a domain builder would: shared so that
the ``sim`` and ``xen`` drivers accept and refuse exactly the same specs."""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import asdict
from typing import Any

from xapid.backend.interface import DiskSpec, DomainSpec, InvalidSpec, NicSpec

MiB = 2**20
MIN_DOMAIN_MEMORY = 16 * MiB  # a real domain builder refuses less
MAX_VCPUS = 512
MAX_PV_DISKS = 16
MAX_HVM_DISKS = 4
MAX_NICS = 7
ACTIONS = frozenset({"destroy", "restart", "preserve", "rename_restart", "coredump_and_destroy",
                     "coredump_and_restart", "soft_reboot"})
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)


def validate_spec(spec: DomainSpec) -> None:
    """Raise InvalidSpec for a spec the domain builder refuses."""
    try:
        uuidlib.UUID(spec.uuid)
    except ValueError:
        raise InvalidSpec(f"invalid domain handle {spec.uuid!r}") from None
    if spec.domain_type not in ("pv", "hvm", "pvh"):
        raise InvalidSpec(f"unknown domain type {spec.domain_type!r}")
    if not 1 <= spec.vcpus_max <= MAX_VCPUS:
        raise InvalidSpec(f"vcpus_max {spec.vcpus_max} not in 1..{MAX_VCPUS}")
    if not 1 <= spec.vcpus_at_startup <= spec.vcpus_max:
        raise InvalidSpec(f"vcpus_at_startup {spec.vcpus_at_startup} not in 1..{spec.vcpus_max}")
    if spec.memory_static_max < MIN_DOMAIN_MEMORY:
        raise InvalidSpec(f"memory_static_max {spec.memory_static_max} below {MIN_DOMAIN_MEMORY}")
    if not MIN_DOMAIN_MEMORY <= spec.memory_target <= spec.memory_static_max:
        raise InvalidSpec(
            f"memory_target {spec.memory_target} not in {MIN_DOMAIN_MEMORY}..{spec.memory_static_max}"
        )
    if not 1 <= spec.vcpu_weight <= 65535 or spec.vcpu_cap < 0:
        raise InvalidSpec(f"bad scheduler parameters weight={spec.vcpu_weight} cap={spec.vcpu_cap}")
    if spec.firmware not in ("bios", "uefi"):
        raise InvalidSpec(f"unknown firmware {spec.firmware!r}")
    for name, action in (("on_poweroff", spec.on_poweroff), ("on_reboot", spec.on_reboot), ("on_crash", spec.on_crash)):
        if action not in ACTIONS:
            raise InvalidSpec(f"unknown {name} action {action!r}")
    if spec.domain_type != "hvm" and not (spec.kernel or spec.bootloader):
        raise InvalidSpec("no kernel or bootloader")
    for disk in spec.disks:
        validate_disk(disk)
    for nic in spec.nics:
        validate_nic(nic)
    if len({d.device for d in spec.disks}) != len(spec.disks):
        raise InvalidSpec("duplicate disk device name")
    check_limits(spec.domain_type, len(spec.disks), len(spec.nics))
    if len({n.devid for n in spec.nics}) != len(spec.nics):
        raise InvalidSpec("duplicate nic devid")


def check_limits(domain_type: str, disks: int, nics: int) -> None:
    """InvalidSpec beyond the device slots a guest has (xapi's allowed-device lists)."""
    max_disks = MAX_HVM_DISKS if domain_type == "hvm" else MAX_PV_DISKS
    if disks > max_disks:
        raise InvalidSpec(f"{disks} disks: a {domain_type} guest has {max_disks} disk slots")
    if nics > MAX_NICS:
        raise InvalidSpec(f"{nics} network cards: a guest has {MAX_NICS} slots")


def validate_disk(disk: DiskSpec) -> None:
    """Raise InvalidSpec for a disk the backend cannot build."""
    if not disk.device:
        raise InvalidSpec("disk without a device name")
    if disk.kind == "disk" and not disk.path:
        raise InvalidSpec(f"disk {disk.device} has no path (only a CD drive may be empty)")


def validate_nic(nic: NicSpec) -> None:
    """Raise InvalidSpec for a network card the backend cannot build."""
    if nic.devid < 0:
        raise InvalidSpec(f"negative nic devid {nic.devid}")
    if not _MAC.match(nic.mac):
        raise InvalidSpec(f"invalid MAC address {nic.mac!r}")


def spec_to_json(spec: DomainSpec) -> dict[str, Any]:
    """The spec as plain JSON types (lists, not tuples), as drivers keep it in their state files."""
    data = asdict(spec)
    data.update(platform=[list(entry) for entry in spec.platform], disks=list(data["disks"]), nics=list(data["nics"]))
    return data


def spec_from_json(data: dict[str, Any]) -> DomainSpec:
    """The spec :func:`spec_to_json` wrote."""
    fields = dict(data)
    fields["platform"] = tuple(tuple(p) for p in fields.get("platform", ()))
    fields["disks"] = tuple(DiskSpec(**d) for d in fields.get("disks", ()))
    fields["nics"] = tuple(NicSpec(**n) for n in fields.get("nics", ()))
    return DomainSpec(**fields)
