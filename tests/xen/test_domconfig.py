"""VM specs as libxl domain configs: the generated JSON, and libxl itself (the real libxenlight
4.17, with a context through the fake host) parsing it and keeping every value."""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

import pytest

from xapid.backend.interface import DiskSpec, DomainSpec, InvalidSpec, NicSpec
from xapid.backend.xen import domconfig, xenlight
from xapid.backend.xen.toollog import QuietLogger
from xenfakes import XenFakes

MiB = 2**20


def spec(**changes: Any) -> DomainSpec:
    fields: dict[str, Any] = {
        "uuid": str(uuidlib.uuid4()), "name": "guest", "domain_type": "pv", "memory_static_max": 1024 * MiB,
        "memory_target": 512 * MiB, "vcpus_max": 4, "vcpus_at_startup": 2, "kernel": "/boot/vmlinuz",
        "ramdisk": "/boot/initrd.img", "cmdline": "root=/dev/xvda1 ro", "vcpu_weight": 512, "vcpu_cap": 25,
        "disks": (DiskSpec("xvda", "/srv/a.img", "w"), DiskSpec("xvdb", "/srv/b.qcow2", "r", format="qcow2")),
        "nics": (NicSpec(0, "00:16:3e:00:00:01", "xenbr0"), NicSpec(1, "00:16:3e:00:00:02", "xenbr1", mtu=9000)),
    }
    fields.update(changes)
    return DomainSpec(**fields)


MATRIX = {
    "pv-kernel": spec(),
    "pv-pygrub": spec(kernel="", ramdisk="", cmdline="", bootloader="pygrub", bootloader_args="-q --entry=0"),
    "hvm": spec(domain_type="hvm", kernel="", ramdisk="", cmdline="", boot_order="dc",
                platform=(("acpi", "1"), ("apic", "true"), ("hpet", "0"), ("nx", "true"), ("pae", "true"),
                          ("timeoffset", "-3600"), ("usb", "false"), ("vga", "std"), ("videoram", "16"),
                          ("viridian", "true"), ("unknown-key", "ignored")),
                disks=(DiskSpec("hda", "/srv/a.img", "w"), DiskSpec("hdc", "", "r", kind="cdrom")),
                on_crash="coredump_and_restart"),
    "hvm-uefi": spec(domain_type="hvm", kernel="", firmware="uefi", platform=(("vga", "cirrus"),), nics=()),
    "pvh": spec(domain_type="pvh", ramdisk="", vcpus_max=1, vcpus_at_startup=1, disks=(), nics=(),
                on_reboot="destroy", on_crash="preserve"),
    "actions": spec(on_poweroff="restart", on_reboot="destroy", on_crash="rename_restart"),
}


def test_pv_config() -> None:
    """A PV guest: kernel, ramdisk and cmdline in b_info, memory in KiB, vCPU bitmap, scheduler, devices."""
    s = MATRIX["pv-kernel"]
    config = domconfig.domain_config(s)
    assert config["c_info"] == {"type": "pv", "name": "guest", "uuid": s.uuid}
    assert config["b_info"] == {
        "max_vcpus": 4, "avail_vcpus": [0, 1], "max_memkb": 1048576, "target_memkb": 524288,
        "sched_params": {"weight": 512, "cap": 25}, "kernel": "/boot/vmlinuz", "ramdisk": "/boot/initrd.img",
        "cmdline": "root=/dev/xvda1 ro", "type.pv": {}}
    assert config["disks"] == [
        {"vdev": "xvda", "format": "raw", "readwrite": 1, "is_cdrom": 0, "pdev_path": "/srv/a.img"},
        {"vdev": "xvdb", "format": "qcow2", "readwrite": 0, "is_cdrom": 0, "pdev_path": "/srv/b.qcow2"}]
    assert config["nics"][1] == {"devid": 1, "mac": "00:16:3e:00:00:02", "bridge": "xenbr1", "mtu": 9000}
    assert (config["on_poweroff"], config["on_reboot"], config["on_crash"]) == ("destroy", "restart", "destroy")


def test_pygrub_config() -> None:
    """A bootloader guest has bootloader and its arguments split as a string list, no kernel."""
    build = domconfig.domain_config(MATRIX["pv-pygrub"])["b_info"]
    assert (build["bootloader"], build["bootloader_args"]) == ("pygrub", ["-q", "--entry=0"])
    assert "kernel" not in build


def test_hvm_config() -> None:
    """An HVM guest: platform flags as libxl defbools ("True"/"False"), VGA, video RAM, boot order, VNC."""
    config = domconfig.domain_config(MATRIX["hvm"])
    build = config["b_info"]
    assert (build["acpi"], build["apic"], build["video_memkb"], build["device_model_version"]) == (
        "True", "True", 16384, "qemu_xen")
    assert build["type.hvm"] == {
        "boot": "dc", "bios": "seabios", "serial": "pty",
        "vnc": {"enable": "True", "listen": "127.0.0.1", "findunused": "True"},
        "pae": "True", "nx": "True", "viridian": "True", "hpet": "False", "usb": "False", "vga": {"kind": "std"},
        "timeoffset": "-3600"}
    assert config["disks"][1] == {"vdev": "hdc", "format": "empty", "readwrite": 0, "is_cdrom": 1}
    assert config["on_crash"] == "coredump_restart"
    assert domconfig.domain_config(MATRIX["hvm-uefi"])["b_info"]["type.hvm"]["bios"] == "ovmf"


@pytest.mark.parametrize(("platform", "key"), [
    ((("acpi", "maybe"),), "platform:acpi"), ((("vga", "vesa"),), "platform:vga"),
    ((("videoram", "lots"),), "platform:videoram"), ((("timeoffset", "1.5"),), "platform:timeoffset"),
])
def test_bad_platform_values_name_the_key(platform: tuple[tuple[str, str], ...], key: str) -> None:
    """A known platform key with a bad value is refused with InvalidSpec naming it."""
    with pytest.raises(InvalidSpec) as caught:
        domconfig.domain_config(spec(domain_type="hvm", platform=platform))
    assert caught.value.details == (key,)


def test_unknown_action_is_refused() -> None:
    """An action libxl has no equivalent for is refused naming the field."""
    with pytest.raises(InvalidSpec) as caught:
        domconfig.domain_config(spec(on_crash="explode"))
    assert caught.value.details == ("actions_after_crash",)


DEFAULTS = {"readwrite": 0, "is_cdrom": 0, "on_poweroff": "destroy", "on_reboot": "destroy", "on_crash": "destroy"}


def not_kept(sent: Any, got: Any, path: str = "") -> list[str]:
    """Values of *sent* that libxl's canonical JSON *got* lost or changed (libxl omits defaults)."""
    if isinstance(sent, dict):
        lost = []
        for key, value in sent.items():
            if isinstance(got, dict) and key in got:
                lost += not_kept(value, got[key], f"{path}/{key}")
            elif not (DEFAULTS.get(key, object()) == value or value in ([], {})):
                lost.append(f"{path}/{key}")
        return lost
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [f"{path}: {sent!r} became {got!r}"]
        return [p for i, (a, b) in enumerate(zip(sent, got)) for p in not_kept(a, b, f"{path}[{i}]")]
    return [] if sent == got else [f"{path}: {sent!r} became {got!r}"]


@pytest.fixture
def libxl(xen_fakes: XenFakes) -> Iterator[xenlight.XenLight]:
    """The real libxenlight with a real context (reaching the hypervisor through the fake)."""
    logger = QuietLogger()
    xl = xenlight.XenLight(xenlight.load_xenlight(), logger.pointer)
    yield xl
    xl.close()
    logger.close()


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_libxl_parses_and_keeps_every_value(libxl: xenlight.XenLight, name: str) -> None:
    """Each generated config passes libxl_domain_config_from_json, and to_json gives every value back."""
    sent = domconfig.domain_config(MATRIX[name])
    got = json.loads(libxl.validate(json.dumps(sent)))
    assert not_kept(sent, got) == []


def test_libxl_refuses_a_bad_config_quietly(libxl: xenlight.XenLight, capfd: pytest.CaptureFixture[str]) -> None:
    """An enum value libxl does not know fails with ERROR_FAIL; the quiet logger prints nothing."""
    config = domconfig.domain_config(MATRIX["pv-kernel"])
    config["on_crash"] = "rename_restart"  # xapi's spelling, not libxl's
    with pytest.raises(xenlight.XenLightError) as caught:
        libxl.validate(json.dumps(config))
    assert (caught.value.code, caught.value.name) == (-3, "ERROR_FAIL")
    assert capfd.readouterr() == ("", "")


def test_true_json_booleans_would_be_lost(libxl: xenlight.XenLight) -> None:
    """Why defbools are strings: libxl ignores a JSON true, so the comparison above would catch it."""
    config = domconfig.domain_config(MATRIX["hvm"])
    config["b_info"]["type.hvm"]["pae"] = True
    got = json.loads(libxl.validate(json.dumps(config)))
    assert not_kept(config, got) == ["/b_info/type.hvm/pae"]
