"""The host's own objects, created on first start and reconciled with the driver on every start.

First start: one pool, one host with its host_cpus and host_metrics, the control domain
as a VM.  Every start: host facts refreshed from the driver, host_cpus matched to the
physical CPUs, users mirrored from the users file, and every VM's runtime fields
(power_state, domid, resident_on, current_operations, metrics) set from the domains
that really exist — domains that vanished make their VMs Halted, domains without a VM are
reported and left alone.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from twisted.logger import Logger

from xapid import __version__
from xapid.apitypes import NULL_REF, utc
from xapid.backend.interface import DomainInfo, HostInfo
from xapid.context import CallContext
from xapid.errors import XenAPIError

log = Logger()

API_VERSION = (2, 21)


#: the Xen-API platform level of API 2.21 (XenServer 8 / XCP-ng 8.3: platform 3.4.0), and the xapi
#: release line whose behaviour xapid follows (xapid/data/xenapi.xml: the 26.x datamodel)
PLATFORM_VERSION = "3.4.0"
XAPI_LINE = "26.0"
RELEASE_DATE = "2026-12-01"  # the date of the xapid release named by __version__ (bump them together)


def software_version(info: HostInfo) -> dict[str, str]:
    """host.software_version: xapi's keys, each with a value meaning what xapid serves (README,
    "host.software_version")."""
    api = f"{API_VERSION[0]}.{API_VERSION[1]}"
    return {
        "product_brand": "xapid", "product_version": __version__, "product_version_text": __version__,
        "product_version_text_short": __version__, "build_number": __version__, "xapid": __version__,
        "platform_name": "XCP", "platform_version": PLATFORM_VERSION, "xapi": XAPI_LINE, "xapi_build": __version__,
        "date": RELEASE_DATE, "dbv": RELEASE_DATE[:4] + "." + RELEASE_DATE[5:7] + RELEASE_DATE[8:10],
        "hostname": "unknown", "xen": info.xen_version, "linux": os.uname().release,
        "xencenter_min": api, "xencenter_max": api, "network_backend": "bridge", "db_schema": api,
    }


def host_fields(info: HostInfo) -> dict[str, Any]:
    """Host record fields that come from the driver."""
    return {
        "name_label": info.hostname, "hostname": info.hostname, "address": info.address,
        "API_version_major": API_VERSION[0], "API_version_minor": API_VERSION[1],
        "API_version_vendor": "XenSource", "API_version_vendor_implementation": {"xapid": __version__},
        "software_version": software_version(info),
        "capabilities": list(info.capabilities), "sched_policy": info.sched_policy,
        "cpu_info": {
            "cpu_count": str(info.cpu_count), "socket_count": str(info.socket_count),
            "vendor": info.cpu_vendor, "speed": f"{info.cpu_speed_mhz:.3f}", "modelname": info.cpu_model_name,
            "family": str(info.cpu_family), "model": str(info.cpu_model), "stepping": str(info.cpu_stepping),
            "flags": info.cpu_flags, "features": info.cpu_features,
        },
        "cpu_configuration": {"nr_cpus": str(info.cpu_count), "cores_per_socket": str(info.cores_per_socket),
                              "threads_per_core": str(info.threads_per_core)},
        "bios_strings": dict(info.bios_strings), "edition": "xapid", "editions": ["xapid"],
        "license_params": {"sku_type": "free", "restrict_ha": "true"},
        "supported_bootloaders": ["pygrub", "eliloader"], "virtual_hardware_platform_versions": [0, 1, 2],
    }


async def initialise(api: Any) -> None:
    """Create or refresh the inventory and reconcile VMs with the driver's domains."""
    hv, store = api.hypervisor, api.store
    info: HostInfo = await hv.host_info()
    pcpus = await hv.physical_cpus()
    nics = await hv.physical_nics()
    domains: list[DomainInfo] = await hv.list_domains()
    free = await hv.free_memory()
    now = utc(api.clock())
    with store.transaction():
        hosts = store.refs("host")
        if hosts:
            host = hosts[0]
            fields = host_fields(info)
            other = dict(store.get(host).fields["other_config"])
            if other.pop("xapid_auto_enable", "false") == "true":  # set by host.disable(auto_enable=true)
                fields.update(enabled=True, other_config=other)
            store.update(host, fields)
        else:
            host = store.add("host", {**host_fields(info), "enabled": True})
            log.info("initialised a new inventory for host {hostname}", hostname=info.hostname)
        api.host_ref = host
        _start_times(store, host, api.clock())
        pools = store.refs("pool")
        api.pool_ref = pools[0] if pools else store.add("pool", {"master": host})
        store.update(api.pool_ref, {"master": host, "cpu_info": {
            "cpu_count": str(info.cpu_count), "socket_count": str(info.socket_count),
            "vendor": info.cpu_vendor}})
        _host_metrics(store, host, info, free, now)
        _host_cpus(store, host, info, pcpus)
        _pifs(store, host, nics, now)
        _mirror_users(api)
        _roles(api)
        _reconcile(api, host, domains, now)
        _templates(store, now)
    await _storage(api)


def _host_metrics(store: Any, host: str, info: HostInfo, free: int, now: datetime) -> None:
    fields = {"memory_total": info.total_memory, "memory_free": free, "live": True, "last_updated": now}
    metrics = store.get(host).fields["metrics"]
    if store.exists(metrics, "host_metrics"):
        store.update(metrics, fields)
    else:
        store.update(host, {"metrics": store.add("host_metrics", fields)})


def _host_cpus(store: Any, host: str, info: HostInfo, pcpus: list[Any]) -> None:
    by_number = {o.fields["number"]: o.ref for o in store.all("host_cpu")}
    wanted = {c.number for c in pcpus}
    for number, ref in by_number.items():
        if number not in wanted:
            store.remove(ref)
    for cpu in pcpus:
        fields = {"host": host, "number": cpu.number, "vendor": info.cpu_vendor, "speed": info.cpu_speed_mhz,
                  "modelname": info.cpu_model_name, "family": info.cpu_family, "model": info.cpu_model,
                  "stepping": str(info.cpu_stepping), "flags": info.cpu_flags, "features": info.cpu_features}
        if cpu.number in by_number:
            store.update(by_number[cpu.number], fields)
        else:
            store.add("host_cpu", fields)


def _pifs(store: Any, host: str, nics: list[Any], now: datetime) -> None:
    """One PIF per physical NIC; on first sight each gets a network (xenbr<N>) and metrics."""
    by_device = {o.fields["device"]: o for o in store.all("PIF") if o.fields["physical"]}
    for index, nic in enumerate(nics):
        metrics = {"carrier": nic.carrier, "speed": nic.speed, "duplex": nic.duplex, "vendor_name": nic.vendor_name,
                   "device_name": nic.device_name, "pci_bus_path": nic.pci_bus_path, "last_updated": now}
        pif = by_device.get(nic.device)
        if pif is not None:
            store.update(pif.ref, {"MAC": nic.mac, "MTU": nic.mtu, "currently_attached": nic.carrier})
            if store.find(pif.fields["metrics"]) is not None:
                store.update(pif.fields["metrics"], metrics)
            continue
        number = nic.device[3:] if nic.device.startswith("eth") and nic.device[3:].isdigit() else str(index)
        network = store.add("network", {
            "name_label": f"Pool-wide network associated with {nic.device}", "bridge": f"xenbr{number}",
            "MTU": nic.mtu, "other_config": {}})
        store.add("PIF", {
            "device": nic.device, "network": network, "host": host, "MAC": nic.mac, "MTU": nic.mtu, "VLAN": -1,
            "physical": True, "currently_attached": nic.carrier, "management": index == 0,
            "ip_configuration_mode": "DHCP" if index == 0 else "None",
            "metrics": store.add("PIF_metrics", metrics),
        })


async def _storage(api: Any) -> None:
    """First start: a local file SR (pool.default_SR) and an ISO library; every start: scan them."""
    from xapid.objects.sr import make_sr, reconcile  # the SR module owns SR records

    ctx = CallContext.internal(api)
    store = api.store
    if not store.refs("SR"):
        local = api.storage.local_sr or str(api.state_dir / "sr")
        iso = api.storage.iso_library or str(api.state_dir / "iso")
        default = await make_sr(ctx, "Local storage", "Disk images in " + local, "file", "user",
                                {"location": local})
        await make_sr(ctx, "ISO library", "ISO images in " + iso, "iso", "iso", {"location": iso})
        store.update(api.pool_ref, {"default_SR": default, "suspend_image_SR": default, "crash_dump_SR": default})
        return
    for sr in store.refs("SR"):
        pbds = [store.get(p) for p in store.get(sr).fields["PBDs"]]
        if pbds and pbds[0].fields["currently_attached"]:
            try:
                await reconcile(ctx, sr)
            except XenAPIError as error:
                log.error("SR {name} could not be scanned: {error}", name=store.get(sr).fields["name_label"],
                          error=" ".join(error.description))


def _templates(store: Any, now: datetime) -> None:
    """The default templates, added or brought up to date at every start (xapid/templates.py)."""
    from xapid.templates import install_defaults

    install_defaults(store, now)


def _mirror_users(api: Any) -> None:
    from xapid.objects.session import user_object

    for user in api.users.list():
        user_object(api.store, user.name)


def _roles(api: Any) -> None:
    """xapi's roles and permissions as role objects (generated from the schema; not stored), and
    the sessions' rbac_permissions from the same table."""
    from xapid.auth import rbac
    api.rbac = rbac.install(api.store, api.schema)
    api.sessions.permissions = api.rbac.session_permissions


def _reconcile(api: Any, host: str, domains: list[DomainInfo], now: datetime) -> None:
    from xapid.objects.vm import metrics_fields  # the VM module owns the metrics layout

    store = api.store
    by_uuid = {d.uuid: d for d in domains if not d.is_control_domain}
    dom0 = next((d for d in domains if d.is_control_domain), None)
    control = [o for o in store.all("VM") if o.fields["is_control_domain"]]
    if dom0 is not None and not control:
        metrics = store.add("VM_metrics", {"install_time": now})
        ref = store.add("VM", {
            "name_label": f"Control domain on host: {store.get(host).fields['hostname']}",
            "name_description": "The domain which manages physical devices and manages other domains",
            "is_control_domain": True, "metrics": metrics, "memory_static_max": dom0.memory_max,
            "memory_dynamic_max": dom0.memory_target, "memory_dynamic_min": dom0.memory_target,
            "memory_static_min": dom0.memory_target, "VCPUs_max": dom0.vcpus_max,
            "VCPUs_at_startup": dom0.vcpus, "domain_type": "pv", "user_version": 1,
            "actions_after_shutdown": "destroy", "actions_after_reboot": "destroy",
            "actions_after_crash": "destroy",
        })
        control = [store.get(ref)]
    if dom0 is not None:
        store.update(host, {"control_domain": control[0].ref})
    seen: set[str] = set()
    for vm in store.all("VM"):
        domain = dom0 if vm.fields["is_control_domain"] else by_uuid.get(vm.fields["uuid"])
        changes: dict[str, Any] = {"current_operations": {}}
        if domain is not None:
            seen.add(domain.uuid)
            changes.update(power_state="Paused" if domain.state == "paused" else "Running",
                           domid=domain.domid, resident_on=host)
            metrics = vm.fields["metrics"]
            if store.exists(metrics, "VM_metrics"):
                store.update(metrics, metrics_fields(domain, now))
        elif vm.fields["power_state"] in ("Running", "Paused"):
            log.warn("VM {uuid} was {state} but its domain is gone: now Halted", uuid=vm.fields["uuid"],
                     state=vm.fields["power_state"])
            changes.update(power_state="Halted", domid=-1, resident_on=NULL_REF)
        else:
            changes.update(domid=-1, resident_on=NULL_REF)
        store.update(vm.ref, changes)
    for domain in domains:
        if not domain.is_control_domain and domain.uuid not in seen:
            log.warn("domain {domid} ({uuid}, {name!r}) has no VM here; left alone",
                     domid=domain.domid, uuid=domain.uuid, name=domain.name)


def boot_time() -> int:
    """When the machine booted (``btime`` of /proc/stat, as xapi reads it); 0 when unknown."""
    try:
        with open("/proc/stat", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("btime "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _start_times(store: Any, host: str, now: float) -> None:
    """host.other_config boot_time and agent_start_time, refreshed at every start as xapi does
    (Unix seconds in OCaml's float text: ``1700000000.``)."""
    other = dict(store.get(host).fields["other_config"])
    other.update(boot_time=f"{boot_time()}.", agent_start_time=f"{int(now)}.")
    store.update(host, {"other_config": other})
