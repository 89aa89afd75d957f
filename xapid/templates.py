"""The default templates, and the ``other_config:disks`` provisioning XML they carry.

xapi's default templates come from ``xenserver/guest-templates-json``: each JSON file is turned
into a VM record (blank template + platform + other_config + recommendations), imported, and
marked ``is_default_template``; on upgrade the installer replaces every default template.
xapid keeps the same facts here as data and reconciles them at every start
(:func:`install_defaults`): a default template is found by ``reference_label``, added when
missing, brought back to its definition when it differs, and removed when it left the set.
User templates (``is_default_template`` false) are never touched.

Memory follows guest-templates-json: ``min_memory`` is ``memory_static_min`` and the three other
limits are twice that.  Disk sizes and boot settings are those of the JSON files named in each
entry.  ``sr=""`` in the disks XML is what xapi ships: provisioning needs a real SR uuid there,
which ``xe vm-install``, Xen Orchestra and Ansible write before calling ``VM.provision``.
"""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from xapid.constants import GiB, MiB

log = Logger()

#: VDI types a <disk type=…> may name (xapi_templates.ml string2vdi_type); others fall back to system
DISK_TYPES = ("system", "user", "ephemeral", "suspend", "crashdump")
#: the platform keys blank_template.py gives every template (nx, acpi, apic, pae, hpet, secureboot)
_PLATFORM = {"nx": "true", "acpi": "1", "apic": "true", "pae": "true", "hpet": "true"}
_LINUX = {"linux_template": "true", "install-methods": "cdrom,nfs,http,ftp"}
_LINUX_DESCRIPTION = ("To use this template from the CLI, install your VM using vm-install, then set "
                      "other-config-install-repository to the path to your network repository, e.g. "
                      "http://<server>/<path> or nfs:server:/<path>")


def disks_xml(*sizes: int) -> str:
    """xapi's provisioning XML: one bootable system disk per size, devices 0, 1, …, sr left empty."""
    disks = "".join(f'<disk device="{i}" size="{size}" sr="" bootable="true" type="system"/>'
                    for i, size in enumerate(sizes))
    return f"<provision>{disks}</provision>"


def restrictions(memory_max: int, vcpus_max: int, hvm: bool) -> str:
    """The ``recommendations`` XML guest-templates-json writes (restrictions for UIs); its HVM
    templates here all declare BIOS, UEFI and Secure Boot support."""
    rows = [f'<restriction field="memory-static-max" max="{memory_max}"/>',
            f'<restriction field="vcpus-max" max="{vcpus_max}"/>',
            '<restriction field="has-vendor-device" value="false"/>']
    if hvm:
        rows += [f'<restriction field="{f}" value="yes"/>' for f in ("supports-bios", "supports-uefi",
                                                                      "supports-secure-boot")]
    rows += ['<restriction property="number-of-vbds" max="255"/>', '<restriction property="number-of-vifs" max="7"/>']
    return "<restrictions>" + "".join(rows) + "</restrictions>"


@dataclass(frozen=True)
class Template:
    reference_label: str
    uuid: str  # guest-templates-json's uuid, so a template keeps its identity across releases
    name_label: str
    name_description: str
    min_memory: int
    disks: tuple[int, ...]  # disk sizes in bytes (empty: no disks key)
    boot: str  # "bios", "uefi" (HVM) or "pv"
    other_config: tuple[tuple[str, str], ...]
    platform: tuple[tuple[str, str], ...]
    vcpus_max: int
    memory_max: int

    def fields(self) -> dict[str, Any]:
        """The VM record fields this template defines (compared and restored at every start)."""
        other = {"install-methods": "cdrom", **dict(self.other_config)}
        if self.disks:
            other["disks"] = disks_xml(*self.disks)
        other["default_template"] = "true"
        fields: dict[str, Any] = {
            "name_label": self.name_label, "name_description": self.name_description,
            "is_a_template": True, "is_default_template": True, "reference_label": self.reference_label,
            "user_version": 1, "VCPUs_max": 1, "VCPUs_at_startup": 1, "VCPUs_params": {},
            "memory_static_min": self.min_memory, "memory_static_max": 2 * self.min_memory,
            "memory_dynamic_min": 2 * self.min_memory, "memory_dynamic_max": 2 * self.min_memory,
            "actions_after_shutdown": "destroy", "actions_after_reboot": "restart",
            "actions_after_crash": "restart", "HVM_shadow_multiplier": 1.0, "has_vendor_device": False,
            "PV_kernel": "", "PV_ramdisk": "", "PV_args": "", "PV_bootloader_args": "", "PV_legacy_args": "",
            "platform": {**_PLATFORM, **dict(self.platform)},
            "recommendations": restrictions(self.memory_max, self.vcpus_max, self.boot != "pv"),
        }
        if self.boot == "pv":
            fields.update(HVM_boot_policy="", HVM_boot_params={}, PV_bootloader="pygrub", domain_type="pv")
        else:
            order = "cd" if self.reference_label == "other-install-media" else "cdn"
            fields.update(HVM_boot_policy="BIOS order", HVM_boot_params={"firmware": self.boot, "order": order},
                          PV_bootloader="", domain_type="hvm")
        return {**fields, "other_config": other}


def _hvm_linux(label: str, uuid: str, name: str, min_memory: int, disk: int) -> Template:
    """A distribution derived from base-linux-uefi.json (itself from base-hvmlinux.json)."""
    return Template(label, uuid, name, _LINUX_DESCRIPTION, min_memory, (disk,), "uefi", tuple(_LINUX.items()),
                    (("vga", "std"), ("videoram", "8"), ("viridian", "false"), ("device_id", "0001"),
                     ("secureboot", "auto")), 64, 1536 * GiB)


#: the default set (guest-templates-json: other-install-media, debian-12, ubuntu-22.04, ubuntu-24.04,
#: rocky-9, alma-9; and a generic PV Linux template, booted by pygrub from its disk, since xapid's
#: bootloader policy has pygrub only where base-pvlinux.json names XenServer's eliloader)
DEFAULT_TEMPLATES: tuple[Template, ...] = (
    Template("other-install-media", "552bce37-51b2-445d-84f2-5f33fa112d7e", "Other install media",
             "Template which allows VM installation from install media", 128 * MiB, (), "bios", (),
             (("viridian", "true"), ("secureboot", "false")), 64, 128 * GiB),
    Template("generic-linux-pv", "5a1d7ab0-1e0b-4c6f-9d39-7a9d2f0c3b11", "Generic Linux PV",
             "A paravirtualised Linux guest booted by pygrub from its first disk; install the guest on the disk "
             "(or import one), then start it.", 512 * MiB, (10 * GiB,), "pv", tuple(_LINUX.items()), (), 32,
             128 * GiB),
    _hvm_linux("debian-12", "07d91aaa-43f7-430a-bf84-0edb6714df0f", "Debian Bookworm 12", GiB, 10 * GiB),
    _hvm_linux("ubuntu-22.04", "df1a0e64-3799-482b-aa9f-1ed713c7dac5", "Ubuntu Jammy Jellyfish 22.04", GiB,
               10 * GiB),
    _hvm_linux("ubuntu-24.04", "ff1f3e17-84d9-4d72-962d-571c4ceb527b", "Ubuntu Noble Numbat 24.04", GiB,
               10 * GiB),
    _hvm_linux("rocky-9", "1a647cf9-99c1-4e9c-b3b4-6b9989c530be", "Rocky Linux 9", 2 * GiB, 15 * GiB),
    _hvm_linux("alma-9", "6ff2c2f1-92af-4396-b117-a9cc2cc76aa4", "AlmaLinux 9", 2 * GiB, 10 * GiB),
)


def install_defaults(store: Any, now: Any, templates: tuple[Template, ...] = DEFAULT_TEMPLATES) -> None:
    """Add, update and retire the default templates (inside the caller's transaction)."""
    wanted = {t.reference_label: t for t in templates}
    present: dict[str, Any] = {}
    for vm in store.all("VM"):
        f = vm.fields
        if not (f["is_default_template"] and f["is_a_template"]) or f["is_a_snapshot"]:
            continue
        label = f["reference_label"]
        if label not in wanted or label in present:
            log.info("default template {name!r} ({label}) is no longer in the set: removed",
                     name=f["name_label"], label=label)
            _remove(store, vm)
        else:
            present[label] = vm
    taken = {vm.fields["uuid"] for vm in store.all("VM")}
    for label, template in wanted.items():
        fields = template.fields()
        vm = present.get(label)
        if vm is None:
            uuid = template.uuid if template.uuid not in taken else str(uuidlib.uuid4())
            metrics = store.add("VM_metrics", {"install_time": now, "last_updated": now})
            other = {**fields["other_config"], "mac_seed": str(uuidlib.uuid4())}
            store.add("VM", {**fields, "other_config": other, "uuid": uuid, "metrics": metrics,
                             "power_state": "Halted", "domid": -1})
            continue
        other = {**fields["other_config"], "mac_seed": vm.fields["other_config"].get("mac_seed")
                 or str(uuidlib.uuid4())}
        changes = {k: v for k, v in {**fields, "other_config": other}.items() if vm.fields.get(k) != v}
        if changes:
            log.info("default template {label}: updated {fields}", label=label, fields=", ".join(sorted(changes)))
            store.update(vm.ref, changes)


def _remove(store: Any, vm: Any) -> None:
    from xapid.objects.devices import remove_device

    for device in [*vm.fields["VBDs"], *vm.fields["VIFs"]]:
        remove_device(store, device)
    if store.find(vm.fields["metrics"]) is not None:
        store.remove(vm.fields["metrics"])
    store.remove(vm.ref)


# -- other_config:disks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    device: str
    size: int
    sr: str
    bootable: bool
    type: str


class ParseFailure(Exception):
    """The disks XML is not what xapi_templates.ml accepts (xapi reports INTERNAL_ERROR)."""


def parse_disks(text: str) -> list[Disk]:
    """Parse ``<provision><disk device size sr bootable [type]/>…</provision>`` as xapi does: the root
    has no attributes, each disk no children, the four attributes are required, size is an integer,
    an unknown or missing type is system."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise ParseFailure(f"xml parse error: {error}") from None
    if root.tag != "provision" or root.attrib or (root.text or "").strip():
        raise ParseFailure("the root element must be <provision> with no attributes")
    disks = []
    for element in root:
        if element.tag != "disk" or len(element) or (element.text or "").strip() or (element.tail or "").strip():
            raise ParseFailure("<provision> may contain only empty <disk/> elements")
        a = element.attrib
        try:
            device, size, sr, bootable = a["device"], a["size"], a["sr"], a["bootable"]
        except KeyError as missing:
            raise ParseFailure(f"<disk> lacks the attribute {missing}") from None
        if not (size.isascii() and size.lstrip("-").isdigit() and len(size) <= 19):
            raise ParseFailure(f"size {size!r} is not an integer")
        kind = a.get("type", "system")
        disks.append(Disk(device, int(size), sr, bootable == "true", kind if kind in DISK_TYPES else "system"))
    return disks
