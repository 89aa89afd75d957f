"""``allowed_operations`` of every class that has it, derived by the store on each write.

Each class's rules follow xapi's (``xapi_vdi.ml``, ``xapi_vbd_helpers.ml``,
``xapi_vif_helpers.ml``, ``xapi_sr_operations.ml``, ``xapi_host_helpers.ml``) as far as xapid's
state carries them; like xapi's, the field is advisory (the handlers make their own checks).
An operation is only ever listed when xapid serves a message that performs it
(:data:`OPERATION_MESSAGES`, checked against the loaded schema), so clients never offer an
action that would answer MESSAGE_METHOD_UNKNOWN.  VM rules live in :mod:`xapid.objects.vm_ops`
(registered here too); task allowed_operations are kept by :mod:`xapid.tasks`.

Derived fields depend on other objects (a VBD's on its VM's power state, a VDI's on its VBDs,
an SR's on its PBDs); :func:`register` declares those dependencies to the store, which derives
the dependents again whenever a source object is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xapid.backend.storage import SR_TYPES

if TYPE_CHECKING:
    from xapid.objects import Hooks

NULL = "OpaqueRef:NULL"

#: class -> operation -> messages (wire names) any of which performs it
OPERATION_MESSAGES: dict[str, dict[str, tuple[str, ...]]] = {
    "VM": {
        **{op: (f"VM.{op}",) for op in (
            "snapshot", "clone", "copy", "create_template", "revert", "checkpoint", "snapshot_with_quiesce",
            "provision", "start", "start_on", "pause", "unpause", "clean_shutdown", "clean_reboot",
            "hard_shutdown", "power_state_reset", "hard_reboot", "suspend", "csvm", "resume", "resume_on",
            "pool_migrate", "migrate_send", "get_boot_record", "send_sysrq", "send_trigger", "query_services",
            "shutdown", "call_plugin", "assert_operation_valid", "update_allowed_operations", "destroy",
            "import", "export", "sysprep")},
        "changing_memory_live": ("VM.set_memory_target_live",),
        "changing_dynamic_range": ("VM.set_memory_dynamic_range", "VM.set_memory_dynamic_max",
                                   "VM.set_memory_dynamic_min"),
        "changing_static_range": ("VM.set_memory_static_range", "VM.set_memory_static_max",
                                  "VM.set_memory_static_min"),
        "changing_memory_limits": ("VM.set_memory_limits", "VM.set_memory"),
        "changing_shadow_memory": ("VM.set_HVM_shadow_multiplier",),
        "changing_shadow_memory_live": ("VM.set_shadow_multiplier_live",),
        "changing_VCPUs": ("VM.set_VCPUs_max", "VM.set_VCPUs_at_startup"),
        "changing_VCPUs_live": ("VM.set_VCPUs_number_live",),
        "changing_NVRAM": ("VM.set_NVRAM", "VM.add_to_NVRAM", "VM.remove_from_NVRAM"),
        "data_source_op": ("VM.get_data_sources", "VM.query_data_source", "VM.record_data_source",
                           "VM.forget_data_source_archives"),
        "make_into_template": ("VM.set_is_a_template",),
        "reverting": ("VM.revert",),
        "create_vtpm": ("VTPM.create",),
        "metadata_export": (),  # an HTTP handler in xapi, not served by xapid
        "awaiting_memory_live": (),  # internal state of xapi's memory ballooning
    },
    "VDI": {op: (f"VDI.{op}",) for op in (
        "clone", "copy", "resize", "resize_online", "snapshot", "mirror", "destroy", "forget", "update",
        "force_unlock", "generate_config", "enable_cbt", "disable_cbt", "data_destroy", "list_changed_blocks",
        "set_on_boot", "revert_to", "revert_from", "blocked")},
    "VBD": {
        **{op: (f"VBD.{op}",) for op in ("eject", "insert", "plug", "unplug", "unplug_force", "pause",
                                         "unpause")},
        "attach": ("VBD.assert_attachable",),  # xapi checks `attach` there (and at VM start)
    },
    "VIF": {op: (f"VIF.{op}",) for op in ("plug", "unplug", "unplug_force", "move")} | {"attach": ()},
    "SR": {
        **{op: (f"SR.{op}",) for op in ("scan", "destroy", "forget", "update")},
        "plug": ("PBD.plug",), "unplug": ("PBD.unplug",), "pbd_create": ("PBD.create",),
        "pbd_destroy": ("PBD.destroy",),
        **{f"vdi_{op}": (f"VDI.{op}",) for op in (
            "create", "introduce", "destroy", "resize", "clone", "snapshot", "mirror", "enable_cbt",
            "disable_cbt", "data_destroy", "list_changed_blocks", "set_on_boot", "copy", "force_unlock",
            "forget", "generate_config", "resize_online", "update")},
        "vdi_blocked": (), "vdi_revert": ("VDI.revert",),
    },
    "host": {
        "provision": ("VM.provision",), "evacuate": ("host.evacuate",), "shutdown": ("host.shutdown",),
        "reboot": ("host.reboot",), "power_on": ("host.power_on",), "vm_start": ("VM.start", "VM.start_on"),
        "vm_resume": ("VM.resume", "VM.resume_on"), "vm_migrate": ("VM.pool_migrate", "VM.migrate_send"),
        "apply_updates": ("host.apply_updates",), "enable": ("host.enable",),
    },
    "pool": {op: (f"pool.{op}",) for op in (
        "ha_enable", "ha_disable", "cluster_create", "designate_new_master", "configure_repositories",
        "sync_updates", "get_updates", "apply_updates", "tls_verification_enable", "cert_refresh",
        "exchange_certificates_on_join", "exchange_ca_certificates_on_join", "copy_primary_host_certs", "eject",
        "sync_bundle")},
    "network": {"attaching": ("network.attach",)},
    "task": {"cancel": ("task.cancel",), "destroy": ("task.destroy",)},
}

_SERVED: dict[int, tuple[Any, dict[str, frozenset[str]]]] = {}


def served_operations(schema: Any, cls: str) -> frozenset[str]:
    """The operations of *cls* that a message served by *schema* performs."""
    entry = _SERVED.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = _SERVED[id(schema)] = (schema, {
            c: frozenset(op for op, msgs in table.items() if any(m in schema.messages for m in msgs))
            for c, table in OPERATION_MESSAGES.items()})
    return entry[1].get(cls, frozenset())


def _listed(store: Any, cls: str, ops: list[str]) -> dict[str, Any]:
    served = served_operations(store.schema, cls)
    return {"allowed_operations": [op for op in ops if op in served]}


def _obj(store: Any, ref: str, cls: str) -> Any:
    obj = store._objects.get(ref) if isinstance(ref, str) else None  # no compute-on-read refresh: plain fields
    return obj if obj is not None and obj.cls == cls else None


# -- VDI (xapi_vdi.check_operation_error) ---------------------------------------------------

VDI_OPS = ("snapshot", "copy", "clone", "destroy", "forget", "resize", "update")
VDI_LIVE_OPS = frozenset({"snapshot", "clone", "copy"})  # possible while a VBD has the disk attached


def vdi_allowed(store: Any, vdi: Any) -> list[str]:
    f = vdi.fields
    if f["current_operations"]:
        return []
    vbds = [v for v in (_obj(store, r, "VBD") for r in f["VBDs"]) if v is not None]
    if any(v.fields["current_operations"] for v in vbds):
        return []
    attached = any(v.fields["currently_attached"] or v.fields.get("reserved") for v in vbds)
    sr = _obj(store, f["SR"], "SR")
    driver = SR_TYPES.get(sr.fields["type"]) if sr is not None else None
    read_only_sr = driver is None or driver.read_only
    plugged = sr is not None and any(
        (p := _obj(store, r, "PBD")) is not None and p.fields["currently_attached"] for r in sr.fields["PBDs"])
    out = []
    for op in VDI_OPS:
        if attached and op not in VDI_LIVE_OPS:
            continue  # VDI_IN_USE
        if op in ("destroy", "resize") and (read_only_sr or f["read_only"]):
            continue  # SR_OPERATION_NOT_SUPPORTED (xapid never writes an ISO or an adopted file)
        if op in ("clone", "snapshot") and read_only_sr:
            continue  # the copy is made in the VDI's own SR
        if op == "resize" and not plugged:
            continue  # SR_NO_PBDS
        if op == "forget" and vbds:
            continue  # xapid: VDI_IN_USE while any VBD refers to it
        if op in ("snapshot", "clone", "copy", "resize", "update", "destroy") and not plugged:
            continue  # the SR's storage is reached through a plugged PBD
        out.append(op)
    return out


def _vm_state(store: Any, vm_ref: str) -> tuple[str, bool]:
    """A device's VM: its power state, and whether an operation that stops it is under way."""
    vm = _obj(store, vm_ref, "VM")
    if vm is None:
        return "Halted", False
    busy = any(op in ("clean_shutdown", "hard_shutdown", "shutdown", "suspend", "pause")
               for op in vm.fields["current_operations"].values())
    return vm.fields["power_state"], busy


# -- VBD (xapi_vbd_helpers.valid_operations) ------------------------------------------------

def vbd_allowed(store: Any, vbd: Any) -> list[str]:
    f = vbd.fields
    if f["current_operations"]:
        return []
    state, vm_busy = _vm_state(store, f["VM"])
    plugged = f["currently_attached"] or f.get("reserved", False)
    out = []
    if state == "Running" and not vm_busy:
        if not plugged:
            out.append("plug")
        else:
            if f["unpluggable"]:
                out.append("unplug")
            out.append("unplug_force")  # xapid's unplug_force ignores unpluggable
    if f["type"] == "CD" and state != "Suspended":
        out.append("insert" if f["empty"] else "eject")
    vdi = _obj(store, f["VDI"], "VDI") if not f["empty"] else None
    if f["empty"] or (vdi is not None and not vdi.fields["missing"] and not vdi.fields["current_operations"]
                      and not (f["mode"] == "RW" and vdi.fields["read_only"])):
        out.append("attach")  # else VDI_MISSING, OTHER_OPERATION_IN_PROGRESS, VDI_READONLY
    return out


# -- VIF (xapi_vif_helpers.valid_operations) ------------------------------------------------

def vif_allowed(store: Any, vif: Any) -> list[str]:
    f = vif.fields
    if f["current_operations"]:
        return []
    state, vm_busy = _vm_state(store, f["VM"])
    out = []
    if state == "Running" and not vm_busy:
        out += ["unplug", "unplug_force"] if f["currently_attached"] else ["plug"]
    out.append("attach")
    return out


# -- SR (xapi_sr_operations.valid_operations) -----------------------------------------------

SR_OPS = ("scan", "destroy", "forget", "plug", "unplug", "update", "vdi_create", "vdi_destroy", "vdi_resize",
          "vdi_clone", "vdi_snapshot", "vdi_copy", "vdi_introduce", "pbd_create", "pbd_destroy")
SR_NEEDS_WRITABLE = frozenset({"vdi_create", "vdi_destroy", "vdi_resize", "vdi_clone", "vdi_snapshot", "vdi_copy"})
SR_NEEDS_PLUGGED = frozenset({"scan", "update", "vdi_create", "vdi_destroy", "vdi_resize", "vdi_clone",
                              "vdi_snapshot", "vdi_copy"})


def sr_allowed(store: Any, sr: Any) -> list[str]:
    f = sr.fields
    if f["current_operations"]:
        return []
    pbds = [p for p in (_obj(store, r, "PBD") for r in f["PBDs"]) if p is not None]
    plugged = [p for p in pbds if p.fields["currently_attached"]]
    driver = SR_TYPES.get(f["type"])
    out = []
    for op in SR_OPS:
        if op in SR_NEEDS_WRITABLE and (driver is None or driver.read_only):
            continue  # SR_OPERATION_NOT_SUPPORTED
        if op in SR_NEEDS_PLUGGED and not plugged:
            continue
        if op in ("destroy", "forget") and plugged:
            continue  # SR_HAS_PBD
        if op == "destroy" and (not pbds or (f["VDIs"] and f["content_type"] != "iso")):
            continue  # SR_NO_PBDS, SR_NOT_EMPTY
        if op == "plug" and (not pbds or len(plugged) == len(pbds)):
            continue
        if op == "unplug" and not plugged:
            continue
        if op == "pbd_destroy" and len(plugged) == len(pbds):
            continue
        out.append(op)
    return out


# -- host, pool, network -------------------------------------------------------------------

def host_allowed(store: Any, host: Any) -> list[str]:
    f = host.fields
    current = set(f["current_operations"].values())
    creating, removing = {"provision", "vm_resume", "vm_migrate"}, {"evacuate", "reboot", "shutdown"}
    out = []
    for op in ("provision", "evacuate", "reboot", "shutdown", "vm_start", "vm_resume", "vm_migrate",
               "apply_updates", "enable"):
        if (op in creating and current & removing) or (op in removing and current & creating):
            continue
        if op in ("reboot", "shutdown", "apply_updates") and (f["enabled"] or current & {"reboot", "shutdown",
                                                                                        "apply_updates"}):
            continue  # HOST_NOT_DISABLED, OTHER_OPERATION_IN_PROGRESS
        if op == "provision" and "provision" in current:
            continue
        if op in ("vm_start", "vm_resume") and not f["enabled"]:
            continue  # xapid answers HOST_DISABLED
        if op == "enable" and f["enabled"]:
            continue
        out.append(op)
    return out


def pool_allowed(store: Any, pool: Any) -> list[str]:
    return [] if pool.fields["current_operations"] else list(OPERATION_MESSAGES["pool"])


def network_allowed(store: Any, network: Any) -> list[str]:
    return [] if network.fields["current_operations"] else ["attaching"]


def _deriver(cls: str, rule: Any) -> Any:
    def derive(store: Any, obj: Any) -> dict[str, Any]:
        return _listed(store, cls, rule(store, obj))
    derive.__name__ = f"derive_{cls}_allowed_operations"
    return derive


def _vdi_of_vbd(store: Any, vbd: Any) -> list[str]:
    return [vbd.fields["VDI"]]


def _vdis_of_pbd(store: Any, pbd: Any) -> list[str]:
    sr = _obj(store, pbd.fields["SR"], "SR")
    return list(sr.fields["VDIs"]) if sr is not None else []


def register(store: Any) -> None:
    """Have *store* derive allowed_operations for every class declaring it (VM included)."""
    from xapid.objects.vm_ops import derive as derive_vm

    classes = store.schema.classes
    rules: dict[str, tuple[Any, dict[str, Any]]] = {
        # no "SR" source: a VDI reads only its SR's type (static-RO) and PBDs (changed only by a
        # PBD add or remove, which the PBD source covers); every SR write (VDIs, utilisation)
        # would otherwise re-derive all of its VDIs, quadratic when filling an SR
        "VDI": (vdi_allowed, {"VBD": _vdi_of_vbd, "PBD": _vdis_of_pbd}),
        "VBD": (vbd_allowed, {"VM": lambda s, vm: vm.fields["VBDs"], "VDI": lambda s, vdi: vdi.fields["VBDs"]}),
        "VIF": (vif_allowed, {"VM": lambda s, vm: vm.fields["VIFs"]}),
        "SR": (sr_allowed, {"PBD": lambda s, pbd: [pbd.fields["SR"]]}),
        "host": (host_allowed, {}),
        "pool": (pool_allowed, {}),
        "network": (network_allowed, {}),
    }
    if "VM" in classes and "VM" not in store._derivers:
        store.derive("VM", derive_vm)
    for cls, (rule, depends) in rules.items():
        spec = classes.get(cls)
        if spec is not None and "allowed_operations" in spec.fields:
            store.derive(cls, _deriver(cls, rule), {src: fn for src, fn in depends.items() if src in classes})


def install(hooks: "Hooks") -> None:
    """The objects hook (:func:`xapid.objects.install`): derive allowed_operations from the store's first load."""
    hooks.setup_store(register)
