"""VM_guest_metrics and console records from the guest agent's data (xapid.objects.guest_metrics):
the sim's simulated agent in-process and through the official SDK against a real daemon, the xen
driver reading the keys a guest agent writes into the real C xenstored of the fake Xen host."""

from __future__ import annotations

import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
import XenAPI
from support import ApiEnv, RealDaemon, resolve, vm_record
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from xenfakes import XenFakes, fake_sysfs

from xapid.backend.interface import DomainSpec, GuestData, NicSpec
from xapid.backend.xen.xenstore import XenStore
from xapid.objects import guest_metrics
from xapid.objects.guest_metrics import metrics_fields, networks

MiB = 2**20
NULL = "OpaqueRef:NULL"
MAC = "00:16:3e:0a:0b:0c"  # the sim's default agent: 10.10.11.13 and fe80::216:3eff:fe0a:b0c


def _vif(vm: str, network: str, device: str = "0", mac: str = MAC) -> dict[str, Any]:
    return {"device": device, "network": network, "VM": vm, "MAC": mac, "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}}


def _refresh(env: ApiEnv) -> int:
    return resolve(Deferred.fromCoroutine(guest_metrics.refresh(env.api)), env.clock)


@pytest.fixture
def running(env: ApiEnv, admin: Any) -> str:
    net = next(r for r, rec in admin("network.get_all_records").items() if rec["bridge"] == "xenbr0")
    vm = admin("VM.create", vm_record(name_label="agent"))
    admin("VIF.create", _vif(vm, net))
    admin("VM.start", vm, False, False)
    return vm


# -- the mapping (xapi's rules) -------------------------------------------------------------


def test_networks_new_and_old_agent_protocols() -> None:
    """attr/vif/N/ipv4|ipv6/M → N/ipv4/M, N/ipv6/M and the lowest IPv4 as N/ip; without attr/vif,
    attr/ethN/ip → N/ip and N/ipv4/0, attr/ethN/ipv6/M/addr → N/ipv6/M."""
    assert networks({"attr/vif/0/ipv4/1": "10.0.0.9", "attr/vif/0/ipv4/0": "10.0.0.2", "attr/vif/0/ipv6/0": "fe80::1",
                     "attr/vif/2/ipv4/0": "192.168.1.5", "attr/vif/2/ipv4/x": "bad", "attr/eth0/ip": "ignored"}) == {
        "0/ip": "10.0.0.2", "0/ipv4/0": "10.0.0.2", "0/ipv4/1": "10.0.0.9", "0/ipv6/0": "fe80::1",
        "2/ip": "192.168.1.5", "2/ipv4/0": "192.168.1.5"}
    assert networks({"attr/eth0/ip": "10.1.1.1", "attr/eth0/ipv6/0/addr": "fe80::2", "attr/eth1/ip": "10.2.2.2",
                     "attr/lo/ip": "127.0.0.1"}) == {
        "0/ip": "10.1.1.1", "0/ipv4/0": "10.1.1.1", "0/ipv6/0": "fe80::2", "1/ip": "10.2.2.2", "1/ipv4/0": "10.2.2.2"}
    assert networks({"xenserver/attr/net-sriov-vf/1/ipv4/0": "10.9.9.9"}) == {"1/ip": "10.9.9.9", "1/ipv4/0": "10.9.9.9"}


def test_mapping_needs_data_updated_and_follows_xapi() -> None:
    agent = {"data/os_name": "Windows 10", "data/os_majorver": "10", "attr/os/spmajor": "0",
             "attr/PVAddons/MajorVersion": "9", "attr/PVAddons/MinorVersion": "3", "control/feature-suspend": "1",
             "control/feature-shutdown": "1", "data/cant_suspend_reason": "busy", "data/ts": "1",
             "data/meminfo_total": "1024", "feature/hotplug/vbd": "0", "feature/hotplug/vif": "1"}
    assert metrics_fields(GuestData(agent=agent)) is None  # not valid before data/updated (xapi)
    fields = metrics_fields(GuestData(agent={**agent, "data/updated": "1"}, pv_drivers_detected=True))
    assert fields is not None
    assert fields["os_version"] == {"name": "Windows 10", "major": "10", "spmajor": "0"}
    assert fields["PV_drivers_version"] == {"major": "9", "minor": "3", "micro": "-1"}
    assert fields["other"] == {"feature-shutdown": "1", "data-cant-suspend-reason": "busy", "data-ts": "1"}
    assert fields["memory"] == {"total": "1024"}
    assert (fields["can_use_hotplug_vbd"], fields["can_use_hotplug_vif"]) == ("no", "yes")
    assert fields["PV_drivers_detected"] and fields["PV_drivers_up_to_date"] and fields["live"]


# -- in process, sim driver ---------------------------------------------------------------


def test_sim_default_agent_fills_guest_metrics(env: ApiEnv, admin: Any, running: str) -> None:
    assert admin("VM.get_guest_metrics", running) == NULL  # nothing until the agent has been read
    assert _refresh(env) == 1
    gm = admin("VM.get_guest_metrics", running)
    rec = admin("VM_guest_metrics.get_record", gm)
    assert rec["networks"] == {"0/ip": "10.10.11.13", "0/ipv4/0": "10.10.11.13", "0/ipv6/0": "fe80::216:3eff:fe0a:b0c"}
    assert rec["os_version"] == {"name": "Debian GNU/Linux 12 (bookworm)", "uname": "6.1.0-18-amd64",
                                 "distro": "debian", "major": "12", "minor": "5"}
    assert rec["PV_drivers_version"] == {"major": "8", "minor": "4", "micro": "0", "build": "1"}
    assert rec["PV_drivers_detected"] is True and rec["live"] is True
    assert rec["other"] == {"feature-poweroff": "1", "feature-reboot": "1", "feature-suspend": "1"}
    assert rec["memory"] == {"total": str(512 * 1024), "free": str(256 * 1024)}
    console = admin("VM.get_consoles", running)[0]
    assert admin("console.get_location", console).endswith(f"/console?uuid={admin('console.get_uuid', console)}")
    assert admin("console.get_other_config", console)["tty"].startswith("/dev/pts/")


def test_changes_are_written_once_and_halting_clears(env: ApiEnv, admin: Any, running: str) -> None:
    driver = env.api.hypervisor.driver
    uuid = admin("VM.get_uuid", running)
    _refresh(env)
    gm = admin("VM.get_guest_metrics", running)
    first = admin("VM_guest_metrics.get_last_updated", gm)
    env.clock.advance(10)
    seq = env.api.store.seq
    _refresh(env)  # nothing changed: no write, no event
    assert env.api.store.seq == seq and admin("VM_guest_metrics.get_last_updated", gm) == first
    driver.set_guest_agent(uuid, {"attr/vif/0/ipv4/0": "172.16.0.4", "attr/vif/0/ipv4/1": "172.16.0.5",
                                  "data/os_name": "Alpine", "data/updated": "1"})
    _refresh(env)
    rec = admin("VM_guest_metrics.get_record", gm)
    assert rec["networks"] == {"0/ip": "172.16.0.4", "0/ipv4/0": "172.16.0.4", "0/ipv4/1": "172.16.0.5"}
    assert rec["os_version"] == {"name": "Alpine"} and rec["PV_drivers_version"] == {}
    assert rec["last_updated"] != first
    driver.set_guest_agent(uuid, {})  # the agent stopped (or the guest rebooted)
    _refresh(env)
    assert admin("VM_guest_metrics.get_live", gm) is False
    driver.set_guest_agent(uuid, None)
    _refresh(env)
    assert admin("VM_guest_metrics.get_live", gm) is True
    admin("VM.hard_shutdown", running)
    assert admin("VM.get_guest_metrics", running) == NULL
    assert gm not in admin("VM_guest_metrics.get_all")
    _refresh(env)
    assert admin("VM.get_guest_metrics", running) == NULL


def test_guest_without_pv_drivers_has_no_guest_metrics(env: ApiEnv, admin: Any) -> None:
    vm = admin("VM.create", vm_record(platform={"sim-no-pv-drivers": "true"}))
    admin("VM.start", vm, False, False)
    _refresh(env)
    assert admin("VM.get_guest_metrics", vm) == NULL


# -- the official SDK against a real daemon ---------------------------------------------------


def test_sdk_sees_guest_metrics_of_a_running_vm(tmp_path: Path) -> None:
    daemon = RealDaemon(tmp_path, config="[stats]\nperiod = 1\n")
    try:
        session = XenAPI.Session(daemon.url)
        session.xenapi.login_with_password("admin", "s3cret pass")
        x = session.xenapi
        net = next(r for r, rec in x.network.get_all_records().items() if rec["bridge"] == "xenbr0")
        vm = x.VM.create(vm_record(name_label="sdk-agent"))
        x.VIF.create(_vif(vm, net))
        x.VM.start(vm, False, False)
        deadline = time.monotonic() + 15
        while x.VM.get_guest_metrics(vm) == NULL and time.monotonic() < deadline:
            time.sleep(0.2)
        gm = x.VM.get_guest_metrics(vm)
        assert gm != NULL
        rec = x.VM_guest_metrics.get_record(gm)
        assert rec["networks"]["0/ip"] == "10.10.11.13" and rec["networks"]["0/ipv4/0"] == "10.10.11.13"
        assert rec["os_version"]["distro"] == "debian" and rec["PV_drivers_version"]["major"] == "8"
        assert rec["PV_drivers_detected"] is True and rec["live"] is True
        console = x.console.get_record(x.VM.get_consoles(vm)[0])
        assert console["location"].endswith(f"/console?uuid={console['uuid']}")
        assert console["other_config"]["tty"].startswith("/dev/pts/")
        x.VM.hard_shutdown(vm)
        assert x.VM.get_guest_metrics(vm) == NULL
        session.xenapi.session.logout()
    finally:
        daemon.stop()


# -- the xen driver on the fake Xen host (real C xenstored) ------------------------------------


def _spec(**changes: Any) -> DomainSpec:
    fields: dict[str, Any] = {
        "uuid": str(uuidlib.uuid4()), "name": "guest", "domain_type": "pv", "memory_static_max": 512 * MiB,
        "memory_target": 256 * MiB, "vcpus_max": 1, "vcpus_at_startup": 1, "kernel": "/var/lib/xcp/guest/vmlinuz",
        "nics": (NicSpec(0, "00:16:3e:00:00:01", "xenbr0"),)}
    fields.update(changes)
    return DomainSpec(**fields)


def test_xen_driver_reads_the_agents_keys(xen_fakes: XenFakes, tmp_path: Path) -> None:
    xen = xen_fakes.backend(tmp_path / "state", lambda: 1_700_000_000.0, sysfs=fake_sysfs(tmp_path / "sys"))
    xen.open()
    try:
        info = xen.create_domain(_spec(), paused=False)
        before = xen.guest_data(info.uuid)
        assert before.pv_drivers_detected is False and before.vnc_port == -1  # frontends initialising
        assert metrics_fields(before) is None
        home = f"/local/domain/{info.domid}"
        xs = XenStore()
        try:
            for key, value in {
                "data/os_name": "CentOS Stream 9", "data/os_uname": "5.14.0", "data/os_distro": "centos",
                "data/os_majorver": "9", "data/meminfo_free": "1000", "data/meminfo_total": "2000",
                "attr/PVAddons/MajorVersion": "7", "attr/PVAddons/MinorVersion": "30",
                "attr/PVAddons/MicroVersion": "0", "attr/eth0/ip": "10.3.3.3", "attr/eth0/ipv6/0/addr": "fe80::3",
                "control/feature-poweroff": "1", "data/updated": "Thu Jan  1 00:00:00 UTC 2026",
                "console/tty": "/dev/pts/7", "console/vnc-port": "5901", "console/vnc-listen": "127.0.0.1",
                "device/vif/0/state": "4",
            }.items():
                xs.write(f"{home}/{key}", value)
        finally:
            xs.close()
        data = xen.guest_data(info.uuid)
        assert (data.tty, data.vnc_port, data.vnc_listen, data.pv_drivers_detected) == (
            "/dev/pts/7", 5901, "127.0.0.1", True)
        assert "console/tty" not in data.agent and "device/vif/0/state" not in data.agent
        fields = metrics_fields(data)
        assert fields is not None
        assert fields["networks"] == {"0/ip": "10.3.3.3", "0/ipv4/0": "10.3.3.3", "0/ipv6/0": "fe80::3"}
        assert fields["os_version"] == {"name": "CentOS Stream 9", "uname": "5.14.0", "distro": "centos", "major": "9"}
        assert fields["PV_drivers_version"] == {"major": "7", "minor": "30", "micro": "0"}
        assert fields["memory"] == {"free": "1000", "total": "2000"}
        assert fields["other"]["feature-poweroff"] == "1" and fields["PV_drivers_detected"] is True
        assert guest_metrics.console_config(data) == {"tty": "/dev/pts/7", "vnc_port": "5901",
                                                      "vnc_listen": "127.0.0.1"}
    finally:
        xen.close()


def test_xen_guest_metrics_through_the_api(xen_fakes: XenFakes, tmp_path: Path) -> None:
    class FakeReactor(Clock):
        """Fake time; xenstore watches are registered but not read (not what this test is about)."""

        def addReader(self, reader: Any) -> None:
            pass

        def removeReader(self, reader: Any) -> None:
            pass

    clock = FakeReactor()
    clock.advance(1_700_000_000)
    sysfs = fake_sysfs(tmp_path / "sys")
    env = ApiEnv(tmp_path, clock, driver=lambda: xen_fakes.backend(tmp_path / "state" / "xen", clock.seconds,
                                                                   sysfs=sysfs))
    try:
        admin = env.login()
        vm = admin("VM.create", vm_record(name_label="xen-agent"))
        admin("VM.start", vm, False, False)
        _refresh(env)
        assert admin("VM.get_guest_metrics", vm) == NULL  # no agent yet
        xs = XenStore()
        try:
            home = f"/local/domain/{admin('VM.get_domid', vm)}"
            xs.write(f"{home}/attr/vif/0/ipv4/0", "10.4.4.4")
            xs.write(f"{home}/data/updated", "1")
            xs.write(f"{home}/console/tty", "/dev/pts/9")
        finally:
            xs.close()
        _refresh(env)
        gm = admin("VM.get_guest_metrics", vm)
        assert admin("VM_guest_metrics.get_networks", gm) == {"0/ip": "10.4.4.4", "0/ipv4/0": "10.4.4.4"}
        console = admin("VM.get_consoles", vm)[0]
        assert admin("console.get_other_config", console) == {"tty": "/dev/pts/9"}
        admin("VM.hard_shutdown", vm)
        assert admin("VM.get_guest_metrics", vm) == NULL
    finally:
        env.api.hypervisor.driver.close()
