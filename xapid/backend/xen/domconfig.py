"""A :class:`DomainSpec` as libxl's JSON domain config (the serialisation of libxl's IDL).

Facts this relies on, checked against the real libxenlight 4.17 by
``tests/xen/test_domconfig.py`` (every value set here survives libxl's own parse and
re-serialisation):

* keyed unions are spelled ``"type.pv"``/``"type.hvm"``/``"type.pvh"``; enums are
  lower-case strings (``"restart_rename"``, ``"std"``);
* ``libxl_defbool`` fields take the strings ``"True"``/``"False"`` — a JSON ``true`` is
  silently ignored, so it is never emitted;
* kernel, ramdisk, cmdline and bootloader live in ``b_info`` itself for every guest type;
  ``acpi`` and ``apic`` too; the other HVM platform flags in ``"type.hvm"``;
* ``avail_vcpus`` is a bitmap written as the list of set bit numbers.

xapi's ``platform`` keys understood: ``acpi``, ``apic``, ``pae``, ``nx``, ``viridian``,
``hpet``, ``usb`` (booleans: true/false/1/0), ``vga`` (std, cirrus, none), ``videoram``
(MiB), ``timeoffset`` (seconds).  Other keys are ignored, as xapi ignores keys it does not
know; a known key with a bad value is refused with :class:`InvalidSpec` naming it.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from xapid.backend.interface import DiskSpec, DomainSpec, InvalidSpec, NicSpec
from xapid.constants import KiB

#: xapi's actions_after_* → libxl_action_on_shutdown
ACTIONS = {
    "destroy": "destroy",
    "restart": "restart",
    "preserve": "preserve",
    "rename_restart": "restart_rename",
    "coredump_and_destroy": "coredump_destroy",
    "coredump_and_restart": "coredump_restart",
    "soft_reboot": "soft_reset",
}
TRUE = frozenset({"true", "1", "on", "yes"})
FALSE = frozenset({"false", "0", "off", "no"})
HVM_FLAGS = ("pae", "nx", "viridian", "hpet", "usb")  # in "type.hvm"
BUILD_FLAGS = ("acpi", "apic")  # in b_info
VGA = {"std": "std", "stdvga": "std", "cirrus": "cirrus", "none": "none"}
FIRMWARE = {"bios": "seabios", "uefi": "ovmf"}


def _defbool(key: str, value: str) -> str:
    lowered = value.strip().lower()
    if lowered in TRUE:
        return "True"
    if lowered in FALSE:
        return "False"
    raise InvalidSpec(f"platform:{key} must be true or false, not {value!r}", f"platform:{key}")


def _int(key: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise InvalidSpec(f"platform:{key} must be an integer in {low}..{high}, not {value!r}", f"platform:{key}")
    return number


def _action(field: str, value: str) -> str:
    try:
        return ACTIONS[value]
    except KeyError:
        raise InvalidSpec(f"{field} {value!r} is not one of {', '.join(ACTIONS)}", field) from None


def disk_config(disk: DiskSpec) -> dict[str, Any]:
    """One disk as a ``libxl_device_disk`` (an empty CD drive has no ``pdev_path``)."""
    config: dict[str, Any] = {
        "vdev": disk.device,
        "format": disk.format if disk.path else "empty",
        "readwrite": 1 if disk.mode == "w" else 0,
        "is_cdrom": 1 if disk.kind == "cdrom" else 0,
    }
    if disk.path:
        config["pdev_path"] = disk.path
    return config


def nic_config(nic: NicSpec) -> dict[str, Any]:
    """One network card as a ``libxl_device_nic``."""
    return {"devid": nic.devid, "mac": nic.mac, "bridge": nic.bridge, "mtu": nic.mtu}


def _hvm(spec: DomainSpec, platform: dict[str, str], build: dict[str, Any]) -> dict[str, Any]:
    hvm: dict[str, Any] = {
        "boot": spec.boot_order or "cd",
        "bios": FIRMWARE[spec.firmware],
        "serial": "pty",
        "vnc": {"enable": "True", "listen": "127.0.0.1", "findunused": "True"},
    }
    for key in HVM_FLAGS:
        if key in platform:
            hvm[key] = _defbool(key, platform[key])
    if "vga" in platform:
        kind = VGA.get(platform["vga"].strip().lower())
        if kind is None:
            raise InvalidSpec(f"platform:vga must be one of std, cirrus, none, not {platform['vga']!r}", "platform:vga")
        hvm["vga"] = {"kind": kind}
    if "timeoffset" in platform:
        hvm["timeoffset"] = str(_int("timeoffset", platform["timeoffset"], -(2**31), 2**31 - 1))
    if "videoram" in platform:
        build["video_memkb"] = _int("videoram", platform["videoram"], 1, 256) * KiB
    build["device_model_version"] = "qemu_xen"
    return hvm


def domain_config(spec: DomainSpec) -> dict[str, Any]:
    """The libxl domain config for *spec*; InvalidSpec for what libxl cannot express."""
    if spec.domain_type not in ("pv", "hvm", "pvh"):
        raise InvalidSpec(f"unknown domain type {spec.domain_type!r}", "domain_type")
    if spec.firmware not in FIRMWARE:
        raise InvalidSpec(f"firmware {spec.firmware!r} is not bios or uefi", "firmware")
    platform = dict(spec.platform)
    build: dict[str, Any] = {
        "max_vcpus": spec.vcpus_max,
        "avail_vcpus": list(range(spec.vcpus_at_startup)),
        "max_memkb": spec.memory_static_max // KiB,
        "target_memkb": spec.memory_target // KiB,
        "sched_params": {"weight": spec.vcpu_weight, "cap": spec.vcpu_cap},
    }
    for key in BUILD_FLAGS:
        if key in platform:
            build[key] = _defbool(key, platform[key])
    if spec.domain_type == "hvm":
        build["type.hvm"] = _hvm(spec, platform, build)
    else:
        for key, value in (("kernel", spec.kernel), ("ramdisk", spec.ramdisk), ("cmdline", spec.cmdline)):
            if value:
                build[key] = value
        if spec.bootloader and spec.domain_type == "pv":
            build["bootloader"] = spec.bootloader
            if spec.bootloader_args:
                build["bootloader_args"] = shlex.split(spec.bootloader_args)
        build[f"type.{spec.domain_type}"] = {}
    return {
        "c_info": {"type": spec.domain_type, "name": spec.name, "uuid": spec.uuid},
        "b_info": build,
        "disks": [disk_config(d) for d in spec.disks],
        "nics": [nic_config(n) for n in spec.nics],
        "on_poweroff": _action("actions_after_shutdown", spec.on_poweroff),
        "on_reboot": _action("actions_after_reboot", spec.on_reboot),
        "on_crash": _action("actions_after_crash", spec.on_crash),
    }


def domain_config_json(spec: DomainSpec) -> str:
    """:func:`domain_config` as the JSON text libxl parses."""
    return json.dumps(domain_config(spec))


def disk_json(disk: DiskSpec) -> str:
    """:func:`disk_config` as JSON (for hot-plug)."""
    return json.dumps(disk_config(disk))


def nic_json(nic: NicSpec) -> str:
    """:func:`nic_config` as JSON (for hot-plug)."""
    return json.dumps(nic_config(nic))
