"""What every driver refuses in a domain spec, as a domain builder would: shared so that
the ``sim`` and ``xen`` drivers accept and refuse exactly the same specs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import uuid as uuidlib
from dataclasses import asdict, dataclass, replace
from typing import Any

from xapid.backend.interface import DiskSpec, DomainSpec, InvalidSpec, NicSpec
from xapid.constants import HVM_DISK_SLOTS, NIC_SLOTS, PV_DISK_SLOTS, MiB

MIN_DOMAIN_MEMORY = 16 * MiB  # a real domain builder refuses less
MAX_VCPUS = 512
ACTIONS = frozenset({"destroy", "restart", "preserve", "rename_restart", "coredump_and_destroy",
                     "coredump_and_restart", "soft_reboot"})
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)


def validate_spec(spec: DomainSpec, boot: BootPolicy | None = None) -> None:
    """Raise InvalidSpec for a spec the domain builder refuses (host paths judged by *boot*)."""
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
    check_boot(spec, boot)
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
    max_disks = HVM_DISK_SLOTS if domain_type == "hvm" else PV_DISK_SLOTS
    if disks > max_disks:
        raise InvalidSpec(f"{disks} disks: a {domain_type} guest has {max_disks} disk slots")
    if nics > NIC_SLOTS:
        raise InvalidSpec(f"{nics} network cards: a guest has {NIC_SLOTS} slots")


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


# -- host paths a spec may name: kernels, ramdisks, bootloaders (issue 13) ----------------------

#: xapi's guest-kernel directory (xapi_xenops ``allowed_dom0_directories_for_boot_files``)
XAPI_KERNEL_DIRS = ("/var/lib/xcp/guest",)
#: where a bootloader named without a path is looked for after PATH (Debian's Xen packages)
BOOTLOADER_DIRS = ("/usr/lib/xen-4.17/bin", "/usr/lib/xen/bin", "/usr/bin")
MAX_BOOTLOADER_ARGS = 1024
#: pygrub options a user may pass (``--opt=value`` form only); the rest (``--output*``, ``--runas``,
#: ``--isconfig``, positional arguments) would let the caller choose files pygrub reads or writes as root
PYGRUB_FLAGS = frozenset({"-q", "--quiet", "-n", "--not-really", "--debug"})
PYGRUB_VALUES = ("--entry=", "--kernel=", "--ramdisk=", "--args=")


def _resolve_program(name: str) -> str:
    """The real absolute path of bootloader *name* (a bare name or an absolute path); "" if unusable."""
    if name.startswith("/"):
        candidates = [name]
    elif name and "/" not in name:
        found = shutil.which(name)
        candidates = ([found] if found else []) + [f"{d}/{name}" for d in BOOTLOADER_DIRS]
    else:
        return ""
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if os.path.isfile(real) and os.access(real, os.X_OK):
            return real
    return ""


@dataclass(frozen=True)
class BootPolicy:
    """The bootloaders and kernel directories a domain may use, every path already resolved.

    ``bootloaders`` maps each accepted spelling (the configured name or path, and the real path)
    to the real path handed to libxl; ``kernel_dirs`` are real directory paths.
    """

    bootloaders: tuple[tuple[str, str], ...] = ()
    kernel_dirs: tuple[str, ...] = ()

    @classmethod
    def build(cls, bootloaders: tuple[str, ...], kernel_dirs: tuple[str, ...], state_dir: str | None = None
              ) -> BootPolicy:
        """The policy for configured *bootloaders* (names resolved as the docs say; one that does not
        resolve is left out) and *kernel_dirs* (plus ``<state_dir>/kernels``)."""
        loaders: dict[str, str] = {}
        for name in bootloaders:
            real = _resolve_program(name)
            if real:
                loaders[name] = real
                loaders[real] = real
        dirs = [*kernel_dirs, *([os.path.join(state_dir, "kernels")] if state_dir else [])]
        return cls(tuple(sorted(loaders.items())), tuple(dict.fromkeys(os.path.realpath(d) for d in dirs)))

    @classmethod
    def default(cls, state_dir: str | None = None) -> BootPolicy:
        return cls.build(("pygrub",), XAPI_KERNEL_DIRS, state_dir)

    def bootloader(self, value: str) -> str:
        """The real path of bootloader *value* ("" for none); PathRefused when not configured."""
        if not value:
            return ""
        loaders = dict(self.bootloaders)
        real = loaders.get(value) or (loaders.get(os.path.realpath(value)) if value.startswith("/") else None)
        if real is None:
            allowed = ", ".join(sorted({k for k in loaders if "/" not in k} | set(loaders.values()))) or "none"
            raise PathRefused("PV_bootloader", value, f"not a configured bootloader (allowed: {allowed})")
        return real

    def boot_file(self, field: str, value: str) -> str:
        """The real path of kernel or ramdisk *value* ("" for none); PathRefused outside the kernel dirs."""
        if not value:
            return ""
        if "\0" in value or not value.startswith("/"):
            raise PathRefused(field, value, "not an absolute path")
        real = os.path.realpath(value)
        if not any(real.startswith(d.rstrip("/") + "/") for d in self.kernel_dirs):
            raise PathRefused(field, value, "is not in any of the allowed kernel directories: ["
                              + "; ".join(self.kernel_dirs) + "]")
        return real

    def bootloader_args(self, value: str) -> str:
        """*value* if it is safe to pass to a bootloader; PathRefused otherwise."""
        if len(value) > MAX_BOOTLOADER_ARGS:
            raise PathRefused("PV_bootloader_args", value[:64], f"longer than {MAX_BOOTLOADER_ARGS} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise PathRefused("PV_bootloader_args", value, "contains a control character (NUL, newline …)")
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise PathRefused("PV_bootloader_args", value, f"cannot be split into words: {exc}") from None
        for word in words:  # pygrub's safe options, whatever the bootloader (one rule at set and build time)
            if word not in PYGRUB_FLAGS and not word.startswith(PYGRUB_VALUES):
                raise PathRefused("PV_bootloader_args", value, f"bootloader option {word!r} is not allowed "
                                  "(allowed: -q, -n, --debug, --entry=, --kernel=, --ramdisk=, --args=)")
        return value

    def check(self, spec: DomainSpec) -> DomainSpec:
        """*spec* with its boot paths resolved; PathRefused (an InvalidSpec) naming the field otherwise."""
        return replace(spec, kernel=self.boot_file("PV_kernel", spec.kernel),
                       ramdisk=self.boot_file("PV_ramdisk", spec.ramdisk),
                       bootloader=self.bootloader(spec.bootloader),
                       bootloader_args=self.bootloader_args(spec.bootloader_args))


class PathRefused(InvalidSpec):
    """A host path in a spec that the boot policy refuses: details are (field, value, reason)."""

    def __init__(self, field: str, value: str, reason: str):
        super().__init__(f"{field} {value!r}: {reason}", field, value, reason)
        self.field, self.value, self.reason = field, value, reason


def check_boot(spec: DomainSpec, policy: BootPolicy | None) -> DomainSpec:
    """What every driver's build runs: *spec* with resolved boot paths, or PathRefused."""
    return (policy or BootPolicy.default()).check(spec)
