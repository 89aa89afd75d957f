"""ABI test: the ctypes structures and constants against gcc's view of the installed headers."""

from __future__ import annotations

import ctypes

from xapid.backend.xen import xenctrl, xenlight, xenstore

STRUCTS: dict[str, type[ctypes.Structure]] = {
    "xc_domaininfo_t": xenctrl.XcDomainInfo,
    "struct xen_arch_domainconfig": xenctrl.XenArchDomainConfig,
    "xc_physinfo_t": xenctrl.XcPhysInfo,
    "xc_vcpuinfo_t": xenctrl.XcVcpuInfo,
    "xc_cpuinfo_t": xenctrl.XcCpuInfo,
    "struct xen_domctl_sched_credit": xenctrl.SchedCredit,
    "struct xen_domctl_sched_credit2": xenctrl.SchedCredit,
    "xen_compile_info_t": xenctrl.CompileInfo,
    "struct xs_permissions": xenstore.XsPermissions,
    "libxl_domain_restore_params": xenlight.RestoreParams,
}
SCALARS: dict[str, int] = {
    "xs_transaction_t": ctypes.sizeof(ctypes.c_uint32),
    "xen_extraversion_t": 16,
    "xen_capabilities_info_t": 1024,
    "xen_changeset_info_t": 64,
    "libxl_domain_config": xenlight.DOMAIN_CONFIG_SIZE,
    "libxl_domain_restore_params": xenlight.RESTORE_PARAMS_SIZE,
    "libxl_device_disk": xenlight.DEVICE_DISK_SIZE,
    "libxl_device_nic": xenlight.DEVICE_NIC_SIZE,
}
CONSTANT_MODULES = (xenctrl, xenstore, xenlight)


def ctypes_layout() -> set[tuple[str, ...]]:
    """The same lines as the probe prints, computed from the ctypes structures."""
    lines: set[tuple[str, ...]] = set()
    for cname, struct in STRUCTS.items():
        lines.add(("S", cname, str(ctypes.sizeof(struct)), str(ctypes.alignment(struct))))
        for field, _ in struct._fields_:
            descr = getattr(struct, field)
            lines.add(("F", cname, field, str(descr.offset), str(descr.size)))
    return lines


def test_struct_layouts_match_headers(abi_probe: list[list[str]]) -> None:
    """Every ctypes structure has the headers' sizeof, alignment and field offsets/sizes."""
    lines = abi_probe
    probed = {tuple(line) for line in lines if line[0] in "SF" and line[1] in STRUCTS}
    assert probed == ctypes_layout()
    scalars = {line[1]: int(line[2]) for line in lines if line[0] == "S" and line[1] in SCALARS}
    assert scalars == SCALARS


def test_constants_match_headers(abi_probe: list[list[str]]) -> None:
    """Every constant the bindings hard-code has the headers' value."""
    constants = {line[1]: int(line[2]) for line in abi_probe if line[0] == "C"}
    ours = {
        name: next(getattr(mod, name) for mod in CONSTANT_MODULES if hasattr(mod, name)) for name in constants
    }
    assert ours == constants


def test_libxl_error_names_match_headers(abi_probe: list[list[str]]) -> None:
    """libxl's error codes, by name, as the bindings report them."""
    probed = {int(line[2]): line[1] for line in abi_probe if line[0] == "E"}
    assert probed == xenlight.ERRORS
