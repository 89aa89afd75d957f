"""VM operations: which are allowed in which state, and the checks xapi makes before one.

``allowed_operations`` is derived by the store on every VM write (see :func:`derive`), so it
is always in step with ``power_state``, ``current_operations`` and ``is_a_template``.
"""

from __future__ import annotations

import uuid as uuidlib
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from xapid.context import CallContext
from xapid.errors import XenAPIError, operation_not_allowed, vm_bad_power_state

H, P, S, R = "Halted", "Paused", "Suspended", "Running"
ANY = (H, P, S, R)

# operation -> power states it is allowed from (xapi's table)
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "start": (H,), "start_on": (H,), "provision": (H,), "make_into_template": (H,),
    "changing_shadow_memory": (H,), "changing_NVRAM": (H,), "create_vtpm": (H,),
    "pause": (R,), "unpause": (P,), "suspend": (R,), "resume": (S,), "resume_on": (S,), "csvm": (S,),
    "clean_shutdown": (R,), "clean_reboot": (R,),
    "send_sysrq": (R,), "send_trigger": (R,), "pool_migrate": (R,), "changing_VCPUs_live": (R,),
    "changing_memory_live": (R,), "call_plugin": (R,), "data_source_op": (R,), "snapshot_with_quiesce": (R,),
    "hard_shutdown": (R, P, S), "shutdown": (R, P, S), "hard_reboot": (R, P),
    "checkpoint": (R, P, S), "get_boot_record": (R, P, S),
    "changing_dynamic_range": (H, R),
    "changing_static_range": (H,), "changing_memory_limits": (H,), "changing_VCPUs": (H,),
    "clone": (H,), "copy": (H,),
    "destroy": (H, S), "export": (H, S), "create_template": (H, S),
    "migrate_send": (H, S, R),
    "snapshot": ANY, "revert": ANY, "power_state_reset": ANY, "metadata_export": ANY,
    "assert_operation_valid": ANY, "update_allowed_operations": ANY, "query_services": ANY,
}

# what stays possible on templates and on the control domain
TEMPLATE_OPS = frozenset({"clone", "copy", "destroy", "export", "provision", "metadata_export", "snapshot",
                          "changing_dynamic_range", "changing_static_range", "changing_memory_limits",
                          "changing_VCPUs", "changing_shadow_memory", "assert_operation_valid",
                          "update_allowed_operations"})
CONTROL_DOMAIN_OPS = frozenset({"changing_dynamic_range", "changing_memory_live", "changing_VCPUs_live",
                                "data_source_op", "assert_operation_valid", "update_allowed_operations",
                                "query_services", "metadata_export"})
# allowed beside another operation in progress
CONCURRENT_OPS = frozenset({"assert_operation_valid", "update_allowed_operations", "data_source_op",
                            "query_services", "metadata_export"})


def _state_allows(fields: dict[str, Any], op: str) -> bool:
    state = fields["power_state"]
    if fields["is_control_domain"]:
        return op in CONTROL_DOMAIN_OPS and (state in ALLOWED_FROM[op] or op in ("changing_static_range",
                                                                                    "changing_VCPUs"))
    return state in ALLOWED_FROM[op]


def _kind_refuses(fields: dict[str, Any], op: str) -> str | None:
    """xapi's template and snapshot rules: provision only on templates (ONLY_PROVISION_TEMPLATE),
    revert only on snapshots (ONLY_REVERT_SNAPSHOT; a snapshot is a template), and templates allow
    only TEMPLATE_OPS (VM_IS_TEMPLATE)."""
    if op == "provision" and not fields["is_a_template"]:
        return "ONLY_PROVISION_TEMPLATE"
    if op == "revert":
        return None if fields["is_a_snapshot"] else "ONLY_REVERT_SNAPSHOT"
    if fields["is_a_template"] and op not in TEMPLATE_OPS:
        return "VM_IS_TEMPLATE"
    return None


def allowed_operations(fields: dict[str, Any]) -> list[str]:
    """The operations that would be accepted now."""
    busy = bool(fields["current_operations"])
    out = []
    for op in ALLOWED_FROM:
        if _kind_refuses(fields, op) is not None:
            continue
        if busy and op not in CONCURRENT_OPS:
            continue
        if op in fields["blocked_operations"]:
            continue
        if _state_allows(fields, op):
            out.append(op)
    return out


def derive(store: Any, obj: Any) -> dict[str, Any]:
    """Store deriver for VM objects: only operations whose message xapid serves are listed."""
    from xapid.objects.allowed_ops import served_operations

    served = served_operations(store.schema, "VM")
    return {"allowed_operations": [op for op in allowed_operations(obj.fields) if op in served]}


def check(vm: Any, op: str) -> None:
    """Raise xapi's error when *op* is not allowed on *vm* now (in xapi's order of checks)."""
    fields = vm.fields
    if fields["is_control_domain"] and op not in CONTROL_DOMAIN_OPS:
        raise operation_not_allowed(f"{op} is not allowed on the control domain")
    refused = _kind_refuses(fields, op)
    if refused is not None:
        raise XenAPIError(refused, vm.ref, op) if refused == "VM_IS_TEMPLATE" else XenAPIError(refused)
    if op in fields["blocked_operations"]:
        raise XenAPIError("OPERATION_BLOCKED", vm.ref, fields["blocked_operations"][op])
    if fields["current_operations"] and op not in CONCURRENT_OPS:
        task, other = next(iter(fields["current_operations"].items()))
        raise XenAPIError("OTHER_OPERATION_IN_PROGRESS", "VM", vm.ref, other, task)
    if not _state_allows(fields, op):
        raise vm_bad_power_state(vm.ref, list(ALLOWED_FROM[op]), fields["power_state"])


@asynccontextmanager
async def operation(ctx: CallContext, ref: str, op: str) -> AsyncIterator[Any]:
    """Check *op* on VM *ref*, list it in ``current_operations`` while it runs, then drop it."""
    store = ctx.store
    vm = store.get(ref, "VM")
    check(vm, op)
    key = ctx.task or f"OpaqueRef:{uuidlib.uuid4()}"
    store.update(ref, {"current_operations": {**vm.fields["current_operations"], key: op}})
    try:
        yield vm
    finally:
        live = store.find(ref)
        if live is not None:
            remaining = {k: v for k, v in live.fields["current_operations"].items() if k != key}
            store.update(ref, {"current_operations": remaining})
