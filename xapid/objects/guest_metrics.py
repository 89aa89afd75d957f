"""``VM_guest_metrics`` from the guest agent, and the console records' real location.

Every stats period (``[stats] period``, the metrics sampler's) the daemon asks the driver for
each running VM's :class:`~xapid.backend.interface.GuestData` (:func:`refresh`): on Xen the keys
the guest agent (xe-guest-utilities, xen-guest-agent) writes in xenstore, on the sim those of
its simulated agent.  The keys are mapped as xapi maps them (``xapi_guest_metrics``):

* ``os_version``: ``data/os_name`` → ``name``, ``data/os_uname`` → ``uname``, ``data/os_distro``
  → ``distro``, ``data/os_majorver``/``os_minorver`` → ``major``/``minor``, ``attr/os/spmajor``/
  ``spminor`` → ``spmajor``/``spminor``;
* ``PV_drivers_version``: ``attr/PVAddons/{Major,Minor,Micro,Build}Version`` → ``major``,
  ``minor``, ``micro``, ``build``, ``attr/PVAddons/Application`` → ``application``,
  ``drivers/xen{evtchn,vbd,net}`` → ``xenevtchn``…; ``micro`` is ``-1`` when the agent gives a
  version without it;
* ``networks``: ``attr/vif/<N>/ipv4/<M>`` → ``<N>/ipv4/<M>`` and ``attr/vif/<N>/ipv6/<M>`` →
  ``<N>/ipv6/<M>``, the lowest-numbered IPv4 address also as ``<N>/ip``; from older agents
  (no ``attr/vif``), ``attr/eth<N>/ip`` → ``<N>/ip`` and ``<N>/ipv4/0``,
  ``attr/eth<N>/ipv6/<M>/addr`` → ``<N>/ipv6/<M>`` (also ``xenbr``, ``eno``, ``ens``, ``emp``,
  ``enx`` names); SR-IOV VFs likewise from ``xenserver/attr/net-sriov-vf``;
* ``other``: one key per ``control/<feature>`` node (``feature-poweroff`` …), ``data/ts`` as
  ``data-ts``, ``data/cant_suspend_reason`` as ``data-cant-suspend-reason`` instead of
  ``feature-suspend``;
* ``memory``: ``data/meminfo_free``/``meminfo_total`` (KiB) → ``free``/``total`` (xapi leaves this
  deprecated field empty and keeps the values in RRDs; xapid shows them);
* ``can_use_hotplug_vbd``/``vif`` from ``feature/hotplug/vbd``/``vif`` ("1" yes, "0" no);
* ``PV_drivers_detected`` (and the deprecated ``PV_drivers_up_to_date``, its equal in xapi): a
  device frontend of the guest is connected.

As in xapi the agent's data counts only once it wrote ``data/updated``; the object is created
then, and ``VM.guest_metrics`` points at it.  Nothing is written when nothing changed (so a tick
costs no event); ``last_updated`` is the time of the last change.  When the agent's keys vanish
(the guest rebooted, the agent stopped) the object stays with ``live`` false until the agent
reports again.  When the VM halts or suspends the object is destroyed and ``VM.guest_metrics``
is NULL again (as xapi's power-state reset does).

Consoles: the ``location`` stays the URL this daemon serves (``https://<host>/console?uuid=…``,
as xapi; clients such as Xen Orchestra connect there).  xapi keeps the real VNC port in a
hidden field (``console.port``, not on the wire); xapid shows the real location in the
console's ``other_config`` instead: ``tty`` (the dom0 pty of the guest's text console),
``vnc_port`` and ``vnc_listen`` (the device model's VNC server), each present only while known;
the client's own keys are kept.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid.apitypes import NULL_REF, utc
from xapid.backend.interface import GuestData
from xapid.errors import XenAPIError

if TYPE_CHECKING:
    from xapid.objects import Hooks

log = Logger()

OS_VERSION = {
    "data/os_name": "name", "data/os_uname": "uname", "data/os_distro": "distro", "data/os_majorver": "major",
    "data/os_minorver": "minor", "attr/os/spmajor": "spmajor", "attr/os/spminor": "spminor",
}
PV_DRIVERS_VERSION = {
    "drivers/xenevtchn": "xenevtchn", "drivers/xenvbd": "xenvbd", "drivers/xennet": "xennet",
    "attr/PVAddons/MajorVersion": "major", "attr/PVAddons/MinorVersion": "minor",
    "attr/PVAddons/MicroVersion": "micro", "attr/PVAddons/BuildVersion": "build",
    "attr/PVAddons/Application": "application",
}
MEMORY = {"data/meminfo_free": "free", "data/meminfo_total": "total"}
TRISTATE = {"1": "yes", "0": "no"}
#: The console ``other_config`` keys xapid maintains.
CONSOLE_KEYS = ("tty", "vnc_port", "vnc_listen")

_ETH = re.compile(r"(?:eth|xenbr|eno|ens|emp|enx)(.*)")


def _pick(agent: dict[str, str], table: dict[str, str]) -> dict[str, str]:
    return {name: agent[key] for key, name in table.items() if key in agent}


def networks(agent: dict[str, str]) -> dict[str, str]:
    """xapi's ``VM_guest_metrics.networks`` from the agent's ``attr`` keys."""
    out: dict[str, str] = {}
    for tree, kind in (("attr", "vif"), ("xenserver/attr", "net-sriov-vf")):
        found: dict[str, dict[str, list[tuple[int, str]]]] = {}  # vif → version → [(index, address)]
        prefix = f"{tree}/{kind}/"
        for key, value in agent.items():
            if key.startswith(prefix):
                parts = key[len(prefix):].split("/")
                if len(parts) == 3 and parts[1] in ("ipv4", "ipv6") and parts[2].isdigit():
                    found.setdefault(parts[0], {}).setdefault(parts[1], []).append((int(parts[2]), value))
        if found:
            for vif, versions in found.items():
                for version, addresses in versions.items():
                    addresses.sort()
                    if version == "ipv4":
                        out[f"{vif}/ip"] = addresses[0][1]
                    for index, address in addresses:
                        out[f"{vif}/{version}/{index}"] = address
            continue
        for key, value in agent.items():  # older agents: attr/eth0/ip, attr/eth0/ipv6/0/addr
            if not key.startswith(f"{tree}/"):
                continue
            parts = key[len(tree) + 1:].split("/")
            eth = _ETH.fullmatch(parts[0])
            if eth is None:
                continue
            n = eth.group(1)
            if parts[1:] == ["ip"]:
                out[f"{n}/ip"] = out[f"{n}/ipv4/0"] = value
            elif len(parts) == 4 and parts[1] == "ipv6" and parts[3] == "addr":
                out[f"{n}/ipv6/{parts[2]}"] = value
    return out


def metrics_fields(data: GuestData) -> dict[str, Any] | None:
    """The ``VM_guest_metrics`` fields the agent's data gives; None until it wrote ``data/updated``."""
    agent = data.agent
    if "data/updated" not in agent:
        return None
    pv = _pick(agent, PV_DRIVERS_VERSION)
    if pv and "micro" not in pv:
        pv["micro"] = "-1"
    other = {}
    for key, value in agent.items():
        if key.startswith("control/") and key.count("/") == 1:
            other[key[len("control/"):]] = value
    if "feature-suspend" in other and "data/cant_suspend_reason" in agent:
        del other["feature-suspend"]
        other["data-cant-suspend-reason"] = agent["data/cant_suspend_reason"]
    if "data/ts" in agent:
        other["data-ts"] = agent["data/ts"]
    return {
        "os_version": _pick(agent, OS_VERSION), "PV_drivers_version": pv, "networks": networks(agent),
        "other": other, "memory": _pick(agent, MEMORY),
        "PV_drivers_detected": data.pv_drivers_detected, "PV_drivers_up_to_date": data.pv_drivers_detected,
        "can_use_hotplug_vbd": TRISTATE.get(agent.get("feature/hotplug/vbd", ""), "unspecified"),
        "can_use_hotplug_vif": TRISTATE.get(agent.get("feature/hotplug/vif", ""), "unspecified"),
        "live": True,
    }


def console_config(data: GuestData) -> dict[str, str]:
    """The console ``other_config`` keys known from the driver (:data:`CONSOLE_KEYS`)."""
    known = {"tty": data.tty, "vnc_port": str(data.vnc_port) if data.vnc_port >= 0 else "",
             "vnc_listen": data.vnc_listen}
    return {k: v for k, v in known.items() if v}


def apply(store: Any, vm_ref: str, data: GuestData, now: datetime) -> None:
    """Bring the VM's guest metrics and console records up to date with *data* (writes only changes)."""
    vm = store.get(vm_ref, "VM")
    with store.transaction():
        config = console_config(data)
        for console in vm.fields["consoles"]:
            current = store.get(console, "console").fields["other_config"]
            wanted = {**{k: v for k, v in current.items() if k not in CONSOLE_KEYS}, **config}
            if wanted != current:
                store.update(console, {"other_config": wanted})
        fields = metrics_fields(data)
        gm = vm.fields["guest_metrics"]
        exists = store.exists(gm, "VM_guest_metrics")
        if fields is None:
            if exists and not data.agent and store.get(gm).fields["live"]:
                store.update(gm, {"live": False, "last_updated": now})  # the agent's data is gone
            return
        if not exists:
            store.update(vm_ref, {"guest_metrics": store.add("VM_guest_metrics", {**fields, "last_updated": now})})
            return
        current = store.get(gm).fields
        if any(current.get(k) != v for k, v in fields.items()):
            store.update(gm, {**fields, "last_updated": now})


def clear(store: Any, vm_ref: str) -> None:
    """The VM has no domain any more: destroy its guest metrics (as xapi), NULL its reference."""
    gm = store.get(vm_ref, "VM").fields["guest_metrics"]
    if gm != NULL_REF:
        store.update(vm_ref, {"guest_metrics": NULL_REF})
        if store.exists(gm, "VM_guest_metrics"):
            store.remove(gm)


async def refresh(api: Any) -> int:
    """Read the guest data of every running VM and apply it; returns how many VMs were read.

    A VM whose read fails (its domain just went away, a driver error) is skipped until the next
    call; the others are still read."""
    store = api.store
    read = 0
    for vm in store.all("VM"):
        f = vm.fields
        if f["power_state"] not in ("Running", "Paused") or f["is_control_domain"]:
            continue
        ref, uuid, domid = vm.ref, f["uuid"], f["domid"]
        try:
            data = await api.hypervisor.guest_data(uuid, vm=ref)
        except XenAPIError as exc:
            log.debug("no guest data for VM {uuid}: {error}", uuid=uuid, error=str(exc))
            continue
        now = store.find(ref)
        if now is None or now.fields["power_state"] not in ("Running", "Paused") or now.fields["domid"] != domid:
            continue  # halted or rebuilt meanwhile: the next call reads the new domain
        apply(store, ref, data, utc(api.clock()))
        read += 1
    return read


def tick(api: Any) -> Deferred:
    """One :func:`refresh` for a LoopingCall; a failure is logged, never stops the loop."""
    d = Deferred.fromCoroutine(refresh(api))
    d.addErrback(lambda f: log.failure("reading the guests' agent data failed", f))
    return d


def install(hooks: "Hooks") -> None:
    """The objects hook (:func:`xapid.objects.install`): read the guests' agent data every stats period."""
    hooks.every_stats_period(tick)
