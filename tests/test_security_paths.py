"""Issue 13, host paths: boot files and bootloaders ([security]) and SR locations ([storage] roots).

Each test is one finding: what a vm-admin or pool-admin could make root in dom0 read, run, create or
delete, refused at set time and again by both drivers' build (one shared check in backend/specs.py).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import pytest
import XenAPI
from support import PASSWORD, ApiEnv, vm_record
from test_backend_contract import DRIVERS, FakeClock, make_spec

from xapid.backend.interface import InvalidSpec
from xapid.backend.specs import BootPolicy, PathRefused
from xapid.backend.xen import driver as xen_driver

PYGRUB = BootPolicy.default().bootloader("pygrub") if dict(BootPolicy.default().bootloaders) else ""
needs_pygrub = pytest.mark.skipif(not PYGRUB, reason="no pygrub installed")


@pytest.fixture(params=sorted(DRIVERS))
def backend(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Any:
    """Each driver (sim, and xen on the fake Xen host), opened."""
    made = DRIVERS[request.param](tmp_path, FakeClock(), request)
    made.open()
    yield made
    made.close()


def _kernel_dir(env: ApiEnv) -> pathlib.Path:
    kernels = env.api.state_dir / "kernels"
    kernels.mkdir(exist_ok=True)
    return kernels


# -- PV_bootloader / PV_kernel / PV_ramdisk at set time -------------------------------------------


def test_bootloader_sh_refused_at_set_time(admin):
    """PV_bootloader=/bin/sh (libxl would run it as root) is INVALID_VALUE naming the field."""
    vm = admin("VM.create", vm_record())
    error = admin.fails("VM.set_PV_bootloader", vm, "/bin/sh")
    assert error[:3] == ["INVALID_VALUE", "PV_bootloader", "/bin/sh"] and "not a configured bootloader" in error[3]
    assert admin("VM.get_PV_bootloader", vm) == ""
    error = admin.fails("VM.create", vm_record(PV_bootloader="/bin/sh", PV_bootloader_args="-c 'id'"))
    assert error[:2] == ["INVALID_VALUE", "PV_bootloader"]


def test_bootloader_args_bounded(admin):
    """PV_bootloader_args: no pygrub option that picks files (--output*, --runas, positional), no NUL/newline."""
    vm = admin("VM.create", vm_record())
    for bad in ("--output-directory=/etc", "--runas=0", "/etc/shadow", "-q\n--output=/x", "a" * 2000,
                "--isconfig", "'unterminated"):
        assert admin.fails("VM.set_PV_bootloader_args", vm, bad)[:2] == ["INVALID_VALUE", "PV_bootloader_args"], bad
    admin("VM.set_PV_bootloader_args", vm, "-q --entry=0 --args='console=hvc0 root=/dev/xvda1'")


def test_ramdisk_etc_shadow_refused(admin):
    """PV_ramdisk=/etc/shadow (read into a guest) is refused at set time and at create."""
    vm = admin("VM.create", vm_record())
    error = admin.fails("VM.set_PV_ramdisk", vm, "/etc/shadow")
    assert error[:3] == ["INVALID_VALUE", "PV_ramdisk", "/etc/shadow"]
    assert "allowed kernel directories" in error[3]
    assert admin.fails("VM.create", vm_record(PV_kernel="/etc/shadow"))[:2] == ["INVALID_VALUE", "PV_kernel"]


def test_dotdot_and_symlink_escapes_refused(admin, env):
    """A path that leaves the kernel dirs through `..` or a symlink is refused."""
    kernels = _kernel_dir(env)
    (kernels / "escape").symlink_to("/etc/shadow")
    vm = admin("VM.create", vm_record())
    for bad in (f"{kernels}/../xapid.db", "/var/lib/xcp/guest/../../../../etc/shadow", f"{kernels}/escape"):
        assert admin.fails("VM.set_PV_kernel", vm, bad)[:2] == ["INVALID_VALUE", "PV_kernel"], bad
    assert admin.fails("VM.set_PV_kernel", vm, "vmlinuz")[:2] == ["INVALID_VALUE", "PV_kernel"]  # relative


def test_kernel_inside_kernel_dirs_accepted_and_boots(admin, env):
    """A kernel and ramdisk in <state_dir>/kernels (or xapi's /var/lib/xcp/guest) are accepted; the VM starts."""
    kernels = _kernel_dir(env)
    (kernels / "vmlinuz").write_bytes(b"kernel")
    vm = admin("VM.create", vm_record())
    admin("VM.set_PV_kernel", vm, str(kernels / "vmlinuz"))
    admin("VM.set_PV_ramdisk", vm, "/var/lib/xcp/guest/initrd.img")
    admin("VM.start", vm, False, False)
    assert admin("VM.get_power_state", vm) == "Running"


@needs_pygrub
def test_pygrub_accepted(admin):
    """pygrub by name, and its resolved path, are accepted; an empty bootloader is none."""
    vm = admin("VM.create", vm_record(PV_kernel="", PV_bootloader="pygrub", PV_bootloader_args="-q"))
    admin("VM.set_PV_bootloader", vm, PYGRUB)
    admin("VM.set_PV_bootloader", vm, "")
    admin("VM.set_PV_bootloader", vm, "pygrub")


def test_configured_bootloaders_and_kernel_dirs(tmp_path):
    """[security] lists absolute paths too; a name that does not resolve is simply not usable."""
    loader = tmp_path / "myloader"
    loader.write_text("#!/bin/sh\n")
    loader.chmod(0o755)
    policy = BootPolicy.build((str(loader), "no-such-bootloader-xyz"), (str(tmp_path / "k"),))
    assert policy.bootloader(str(loader)) == str(loader)
    with pytest.raises(PathRefused):
        policy.bootloader("no-such-bootloader-xyz")
    assert policy.boot_file("PV_kernel", str(tmp_path / "k" / "vmlinuz")) == str(tmp_path / "k" / "vmlinuz")
    with pytest.raises(PathRefused):
        policy.boot_file("PV_kernel", str(tmp_path / "k2" / "vmlinuz"))  # a prefix is not a parent


# -- the same refusal by both drivers at build time -------------------------------------------------


def test_every_driver_refuses_host_paths_at_build(backend):
    """/bin/sh as bootloader, /etc/shadow as ramdisk, a `..` escape: InvalidSpec from sim and xen alike."""
    for changes in ({"kernel": "", "bootloader": "/bin/sh", "bootloader_args": "-c 'id'"},
                    {"ramdisk": "/etc/shadow"},
                    {"kernel": "/var/lib/xcp/guest/../../../../bin/sh"},
                    {"kernel": "", "bootloader": "pygrub", "bootloader_args": "--output=/etc/passwd"}):
        with pytest.raises(InvalidSpec) as info:
            backend.create_domain(make_spec(**changes), paused=True)
        assert isinstance(info.value, PathRefused), changes
    assert [d.domid for d in backend.list_domains()] == [0]
    backend.create_domain(make_spec(), paused=True)  # a kernel in /var/lib/xcp/guest builds


def test_xen_driver_hands_libxl_the_resolved_paths(xen_fakes, tmp_path, monkeypatch):
    """The xen driver's libxl config (domconfig) gets real paths, and a policy refusal never reaches libxl."""
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "real").write_bytes(b"k")
    (kernels / "link").symlink_to(kernels / "real")
    built: list[Any] = []
    original = xen_driver.domconfig.domain_config_json
    monkeypatch.setattr(xen_driver.domconfig, "domain_config_json", lambda spec: built.append(spec) or original(spec))
    backend = xen_fakes.backend(tmp_path / "state", FakeClock().seconds)
    backend.open()
    try:
        backend.boot_policy = BootPolicy.build((), (str(kernels),))
        backend.create_domain(make_spec(kernel=str(kernels / "link")), paused=True)
        assert [s.kernel for s in built] == [str(kernels / "real")]
        with pytest.raises(PathRefused):
            backend.create_domain(make_spec(kernel="/var/lib/xcp/guest/vmlinuz"), paused=True)  # not configured
        assert len(built) == 1
    finally:
        backend.close()


def test_sim_refuses_exactly_what_the_policy_refuses(tmp_path):
    """The sim's build check is the shared one: a spec it accepts passes the policy, and vice versa."""
    from xapid.backend.sim import SimBackend

    sim = SimBackend(tmp_path / "sim", FakeClock().seconds)
    sim.open()
    try:
        spec = make_spec(ramdisk="/etc/shadow")
        with pytest.raises(PathRefused) as by_sim:
            sim.create_domain(spec, paused=True)
        with pytest.raises(PathRefused) as by_policy:
            sim.boot_policy.check(spec)
        assert by_sim.value.details == by_policy.value.details
        assert sim.create_domain(dataclasses.replace(spec, ramdisk=""), paused=True).state == "paused"
    finally:
        sim.close()


# -- SR locations ------------------------------------------------------------------------------------


def _sr_create(admin, env, location: str, sr_type: str = "file", **config: str) -> Any:
    return admin("SR.create", env.api.host_ref, {"location": location, **config}, "0", "sr", "", sr_type,
                 "iso" if sr_type == "iso" else "user", False, {})


def _sr_fails(admin, env, location: str, sr_type: str = "file", **config: str) -> list[str]:
    return admin.fails("SR.create", env.api.host_ref, {"location": location, **config}, "0", "sr", "", sr_type,
                       "iso" if sr_type == "iso" else "user", False, {})


def test_sr_create_on_etc_and_root_refused(admin, env):
    """/etc as a file SR and / as an ISO SR are outside every storage root: SR_BACKEND_FAILURE, nothing made."""
    before = len(admin("SR.get_all"))
    for location, sr_type in (("/etc", "file"), ("/", "iso"), ("/tmp/xapid-never-made/sr", "file")):
        error = _sr_fails(admin, env, location, sr_type)
        assert error[:2] == ["SR_BACKEND_FAILURE", "EACCES"] and "not inside a storage root" in error[3]
    assert not os.path.exists("/tmp/xapid-never-made")
    assert len(admin("SR.get_all")) == before
    assert _sr_fails(admin, env, str(env.api.state_dir))[:2] == ["SR_BACKEND_FAILURE", "EACCES"]  # own state


def test_sr_symlink_out_of_root_refused(admin, env, tmp_path):
    """A location inside a root that is a symlink to a directory outside is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (env.api.state_dir / "sneaky").symlink_to(outside)
    error = _sr_fails(admin, env, str(env.api.state_dir / "sneaky"))
    assert error[:2] == ["SR_BACKEND_FAILURE", "EACCES"] and str(outside) in error[3]
    assert _sr_fails(admin, env, str(env.api.state_dir / "sr" / ".." / ".." / "outside"))[1] == "EACCES"


def test_sr_inside_root_accepted(admin, env, tmp_path, clock):
    """Inside a root (default: the state dir) an SR is made; [storage] roots adds others."""
    sr = _sr_create(admin, env, str(env.api.state_dir / "more" / "disks"))
    assert os.path.isdir(env.api.state_dir / "more" / "disks") and admin("SR.get_type", sr) == "file"
    extra = tmp_path / "extra-root"
    extra.mkdir()
    roots_env = ApiEnv(tmp_path / "second", clock)
    roots_env.api.storage = dataclasses.replace(roots_env.api.storage, roots=(str(extra),))
    other = roots_env.login()
    assert _sr_create(other, roots_env, str(extra / "a"))
    assert _sr_fails(other, roots_env, str(roots_env.api.state_dir / "b"))[1] == "EACCES"


@pytest.mark.parametrize("config", [
    {"location": "//server/share", "type": "cifs"},
    {"location": "//server/share"},
    {"location": "nfs.example:/export/isos"},
    {"location": "smb://server/share"},
    {"location": "nfs://server/export"},
    {"location": "/isos", "server": "nfs.example", "serverpath": "/export"},
    {"location": "relative/dir"},
])
def test_remote_iso_sr_refused(admin, env, config):
    """An ISO SR on cifs/NFS no longer silently becomes a local directory: SR_BACKEND_FAILURE EINVAL."""
    error = admin.fails("SR.create", env.api.host_ref, config, "0", "isos", "", "iso", "iso", False, {})
    assert error[:2] == ["SR_BACKEND_FAILURE", "EINVAL"] and error[3]
    assert not os.path.exists("relative")


def test_vdi_destroy_never_deletes_a_file_xapid_did_not_create(admin, env):
    """A disk file adopted by SR.scan is read-only: destroy and resize refuse and the file stays;
    VDI.forget drops the record; a VDI xapid created is deleted as before."""
    sr = admin("pool.get_default_SR", admin("pool.get_all")[0])
    directory = pathlib.Path(admin("PBD.get_device_config", admin("SR.get_PBDs", sr)[0])["location"])
    foreign = directory / "precious.img"
    foreign.write_bytes(b"data that is not xapid's")
    admin("SR.scan", sr)
    (vdi,) = [v for v in admin("SR.get_VDIs", sr) if admin("VDI.get_location", v) == "precious.img"]
    assert admin("VDI.get_read_only", vdi) is True
    error = admin.fails("VDI.destroy", vdi)
    assert error[:2] == ["SR_BACKEND_FAILURE", "EPERM"] and "not created by xapid" in error[3]
    assert admin.fails("VDI.resize", vdi, str(1 << 20))[:2] == ["SR_BACKEND_FAILURE", "EPERM"]
    assert foreign.read_bytes() == b"data that is not xapid's"
    (directory / "junk.img.partial").write_bytes(b"x")  # foreign leftovers look like ours: never removed
    (directory / "old.img.deleting").write_bytes(b"x")
    admin("SR.scan", sr)
    assert (directory / "junk.img.partial").exists() and (directory / "old.img.deleting").exists()
    admin("VDI.forget", vdi)
    assert foreign.exists()
    own = admin("VDI.create", {"SR": sr, "virtual_size": str(1 << 20), "type": "user", "sharable": False,
                               "read_only": False, "other_config": {}, "name_label": "mine"})
    path = directory / admin("VDI.get_location", own)
    assert path.exists() and admin("VDI.get_read_only", own) is False
    admin("VDI.destroy", own)
    assert not path.exists() and foreign.exists()


# -- a real daemon, through the Python SDK --------------------------------------------------------


def test_sdk_refuses_host_paths(tmp_path):
    """Over the wire: a bootloader outside [security] and an SR on /etc are refused, naming why."""
    from support import RealDaemon

    daemon = RealDaemon(tmp_path, config="[security]\nbootloaders =\n")
    try:
        session = XenAPI.Session(daemon.url)
        session.login_with_password("admin", PASSWORD, "1.0", "xapid-security-tests")
        x = session.xenapi
        vm = x.VM.create(vm_record())
        with pytest.raises(XenAPI.Failure) as info:
            x.VM.set_PV_bootloader(vm, "pygrub")  # no bootloader configured at all
        assert info.value.details[:2] == ["INVALID_VALUE", "PV_bootloader"]
        with pytest.raises(XenAPI.Failure) as info:
            x.VM.set_PV_ramdisk(vm, "/etc/shadow")
        assert info.value.details[:2] == ["INVALID_VALUE", "PV_ramdisk"]
        host = x.host.get_all()[0]
        with pytest.raises(XenAPI.Failure) as info:
            x.SR.create(host, {"location": "/etc"}, "0", "etc", "", "file", "user", False, {})
        assert info.value.details[:2] == ["SR_BACKEND_FAILURE", "EACCES"]
        session.xenapi.session.logout()
    finally:
        daemon.stop()


def test_upgrade_keeps_known_disks_writable(tmp_path):
    """Disks an older xapid made (known to the database, no marker yet) are marked once at the
    first scan and stay deletable; a file dropped in later is adopted read-only."""
    from xapid.backend.storage import OWNED, FileSR

    sr = FileSR(tmp_path / "sr")
    sr.attach(create=True)
    (tmp_path / "sr" / "old.img").write_bytes(b"\0" * 512)  # as an older xapid left it: no marker
    sr.mark_known(["old.img"])
    assert sr.owns("old.img")
    (tmp_path / "sr" / "later.img").write_bytes(b"\0" * 512)
    sr.mark_known(["later.img"])  # only once: the first scan after the upgrade
    assert not sr.owns("later.img")
    assert (tmp_path / "sr" / OWNED).is_dir()
