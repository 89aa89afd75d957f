"""A :class:`DomainSpec` as libxl's JSON domain config (libxl's IDL serialisation)."""

from __future__ import annotations

import json
from typing import Any

from xapid.backend.interface import DiskSpec, DomainSpec, NicSpec

KiB = 1024
ACTIONS = {"destroy": "destroy", "restart": "restart", "preserve": "preserve",
           "coredump_and_destroy": "coredump_destroy", "coredump_and_restart": "coredump_restart",
           "rename_restart": "rename_restart", "soft_reboot": "soft_reset"}


def disk_config(disk: DiskSpec) -> dict[str, Any]:
    """One disk as a ``libxl_device_disk``."""
    config: dict[str, Any] = {"vdev": disk.device, "format": disk.format if disk.path else "empty",
                              "readwrite": 1 if disk.mode == "w" else 0, "is_cdrom": 1 if disk.kind == "cdrom" else 0}
    if disk.path:
        config["pdev_path"] = disk.path
    return config


def nic_config(nic: NicSpec) -> dict[str, Any]:
    """One network card as a ``libxl_device_nic``."""
    return {"devid": nic.devid, "mac": nic.mac, "bridge": nic.bridge, "mtu": nic.mtu}


def domain_config(spec: DomainSpec) -> dict[str, Any]:
    """The libxl domain config for *spec*."""
    kind: dict[str, Any]
    if spec.domain_type == "hvm":
        kind = {"boot": spec.boot_order or "cd"}
    else:
        kind = {k: v for k, v in (("kernel", spec.kernel), ("ramdisk", spec.ramdisk), ("cmdline", spec.cmdline),
                                  ("bootloader", spec.bootloader)) if v}
    return {
        "c_info": {"type": spec.domain_type, "name": spec.name, "uuid": spec.uuid},
        "b_info": {"max_vcpus": spec.vcpus_max, "avail_vcpus": list(range(spec.vcpus_at_startup)),
                   "max_memkb": spec.memory_static_max // KiB, "target_memkb": spec.memory_target // KiB,
                   "sched_params": {"weight": spec.vcpu_weight, "cap": spec.vcpu_cap},
                   f"type.{spec.domain_type}": kind},
        "disks": [disk_config(d) for d in spec.disks],
        "nics": [nic_config(n) for n in spec.nics],
        "on_poweroff": ACTIONS.get(spec.on_poweroff, "destroy"),
        "on_reboot": ACTIONS.get(spec.on_reboot, "restart"),
        "on_crash": ACTIONS.get(spec.on_crash, "destroy"),
    }


def domain_config_json(spec: DomainSpec) -> str:
    return json.dumps(domain_config(spec))


def disk_json(disk: DiskSpec) -> str:
    return json.dumps(disk_config(disk))


def nic_json(nic: NicSpec) -> str:
    return json.dumps(nic_config(nic))
