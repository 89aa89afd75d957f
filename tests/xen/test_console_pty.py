"""The Xen driver's console pty check: a guest writes its own ``console/tty`` node, so the pty it names
is used only when xenconsoled (or the guest's own device model) holds its master; its ``console/vnc-port``
only when 127.0.0.1 reaches nothing but its own device model's listening socket.  The checks read /proc;
here a /proc tree of real files stands below them (cmdline, fd symlinks, fdinfo, net/tcp), under the
whole driver on the fake Xen host (real xenstored, real ptys)."""

from __future__ import annotations

import ipaddress
import os
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from xenfakes import XenFakes, fake_sysfs

from xapid.backend.interface import ConsoleEndpoint, DomainSpec, NoConsole, NoSuchDomain
from xapid.backend.xen.consoles import listeners_reaching_loopback, pty_of_console_daemon
from xapid.backend.xen.xenstore import XenStore
from xapid.constants import MiB


def process(procfs: Path, pid: int, argv: list[str], ptys: dict[int, int], uid: int | None = 0,
            euid: int | None = None) -> None:
    """A process with *argv* holding /dev/ptmx descriptors: fd -> tty-index; its ``status`` says real
    uid *uid* and effective uid *euid* (default: *uid*); *uid* None: no ``status`` file (unreadable)."""
    root = procfs / str(pid)
    (root / "fd").mkdir(parents=True)
    (root / "fdinfo").mkdir()
    (root / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    if uid is not None:
        e = uid if euid is None else euid
        (root / "status").write_text(f"Name:\t{Path(argv[0]).name[:15]}\nState:\tS (sleeping)\nPid:\t{pid}\n"
                                     f"Uid:\t{uid}\t{e}\t{e}\t{e}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    for fd, index in ptys.items():
        os.symlink("/dev/ptmx", root / "fd" / str(fd))
        (root / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t02\ntty-index:\t{index}\n")
    os.symlink("/dev/null", root / "fd" / "0")
    (root / "fdinfo" / "0").write_text("pos:\t0\n")


def test_only_the_console_daemons_ptys_are_accepted(tmp_path):
    procfs = tmp_path / "proc"
    procfs.mkdir()
    (procfs / "self").mkdir()
    process(procfs, 100, ["/usr/sbin/xenconsoled", "--pid-file=/run/x"], {5: 3, 6: 4})
    process(procfs, 200, ["/usr/bin/qemu-system-i386", "-xen-domid", "7", "-serial", "pty"], {9: 11})
    process(procfs, 300, ["sshd: admin@pts/20"], {4: 20})  # an administrator's terminal
    assert pty_of_console_daemon(procfs, 3, domid=5) and pty_of_console_daemon(procfs, 4, domid=5)
    assert pty_of_console_daemon(procfs, 11, domid=7)  # the HVM guest's own device model
    assert not pty_of_console_daemon(procfs, 11, domid=8)  # another guest's device model pty
    assert not pty_of_console_daemon(procfs, 20, domid=5)  # not a console daemon's pty
    assert not pty_of_console_daemon(procfs, 99, domid=5)  # nobody's


def test_impostors_not_running_as_root_are_not_trusted(tmp_path: Path) -> None:
    """Any local user may call a process xenconsoled or give it ``-xen-domid 5``: only root's count."""
    procfs = tmp_path / "proc"
    procfs.mkdir()
    process(procfs, 100, ["/tmp/xenconsoled"], {5: 3}, uid=1000)
    process(procfs, 200, ["/tmp/qemu", "-xen-domid", "5"], {5: 4}, uid=1000)
    process(procfs, 300, ["xenconsoled"], {5: 6}, uid=1000, euid=0)  # set-uid: the real uid is the user's
    process(procfs, 400, ["xenconsoled"], {5: 7}, uid=0, euid=1000)  # root that dropped to a user
    process(procfs, 500, ["xenconsoled"], {5: 8}, uid=None)  # status unreadable (gone, hidepid)
    process(procfs, 600, ["/usr/sbin/xenconsoled"], {5: 9})
    for index in (3, 4, 6, 7, 8):
        assert not pty_of_console_daemon(procfs, index, domid=5), index
    assert pty_of_console_daemon(procfs, 9, domid=5)


# -- the whole console_endpoint on the fake Xen host: real xenstore, real ptys, a /proc tree of files --


def hex_address(ip: str) -> str:
    """*ip* as /proc/net/tcp{,6} prints it: 32-bit words in host byte order."""
    raw = ipaddress.ip_address(ip).packed
    return "".join(f"{int.from_bytes(raw[i:i + 4], sys.byteorder):08X}" for i in range(0, len(raw), 4))


def listening(procfs: Path, sockets: list[tuple[str, int, int]], state: str = "0A") -> None:
    """/proc/net/tcp and tcp6 with *sockets* (address, port, inode) in *state* (0A: LISTEN)."""
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    for table, wide in (("tcp", False), ("tcp6", True)):
        rows = [f"   {n}: {hex_address(ip)}:{port:04X} {hex_address('::' if wide else '0.0.0.0')}:0000 {state} "
                f"00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
                for n, (ip, port, inode) in enumerate(sockets) if (":" in ip) == wide]
        (procfs / "net").mkdir(exist_ok=True)
        (procfs / "net" / table).write_text(head + "".join(rows))


def holding_sockets(procfs: Path, pid: int, argv: list[str], inodes: list[int], uid: int | None = 0) -> None:
    process(procfs, pid, argv, {}, uid=uid)
    for n, inode in enumerate(inodes, start=10):
        os.symlink(f"socket:[{inode}]", procfs / str(pid) / "fd" / str(n))


def test_loopback_reach_of_listening_addresses(tmp_path: Path) -> None:
    procfs = tmp_path / "proc"
    procfs.mkdir()
    listening(procfs, [("0.0.0.0", 5900, 1), ("127.0.0.1", 5900, 2), ("10.0.0.5", 5900, 3), ("::", 5900, 4),
                       ("::ffff:127.0.0.1", 5900, 5), ("::1", 5900, 6), ("127.0.0.2", 5900, 7), ("127.0.0.1", 5901, 8)])
    assert listeners_reaching_loopback(procfs, 5900) == {f"socket:[{i}]" for i in (1, 2, 4, 5)}
    listening(procfs, [("127.0.0.1", 5900, 1)], state="01")  # an established connection, not a listener
    assert listeners_reaching_loopback(procfs, 5900) == set()


@pytest.fixture
def xen_host(xen_fakes: XenFakes, tmp_path: Path) -> Iterator[tuple[Any, int, str, Path]]:
    """An open xen driver whose /proc is a tree of files, and a running domain: (driver, domid, uuid, procfs)."""
    procfs = tmp_path / "proc"
    procfs.mkdir()
    backend = xen_fakes.backend(tmp_path / "state", time.time, sysfs=fake_sysfs(tmp_path / "sys"), procfs=procfs)
    backend.open()
    uuid = str(uuidlib.uuid4())
    spec = DomainSpec(uuid=uuid, name="guest", domain_type="hvm", memory_static_max=256 * MiB,
                      memory_target=256 * MiB, vcpus_max=1, vcpus_at_startup=1)
    domid = backend.create_domain(spec, paused=False).domid
    yield backend, domid, uuid, procfs
    backend.close()


def guest_writes(domid: int, node: str, value: str) -> None:
    xs = XenStore()
    try:
        xs.write(f"/local/domain/{domid}/{node}", value.encode())
    finally:
        xs.close()


def test_vnc_endpoint_only_where_127_0_0_1_reaches_the_guests_own_device_model(xen_host: Any) -> None:
    driver, domid, uuid, procfs = xen_host
    qemu = ["/usr/lib/xen/bin/qemu-system-i386", "-xen-domid", str(domid), "-vnc", "127.0.0.1:0"]
    holding_sockets(procfs, 200, qemu, [11, 12, 13, 14])
    holding_sockets(procfs, 300, ["/usr/bin/qemu-system-i386", "-xen-domid", str(domid + 1)], [21])
    holding_sockets(procfs, 400, ["nc", "-l", "127.0.0.1", "5901"], [31, 32])
    listening(procfs, [("127.0.0.1", 5900, 11), ("10.0.0.5", 5901, 12), ("127.0.0.1", 5901, 31), ("::", 5903, 13),
                       ("0.0.0.0", 5904, 21), ("0.0.0.0", 5905, 32), ("::1", 5906, 14)])
    guest_writes(domid, "console/vnc-port", "5900")
    assert driver.console_endpoint(uuid, "rfb") == ConsoleEndpoint("rfb", "tcp", host="127.0.0.1", port=5900)
    guest_writes(domid, "console/vnc-port", "5903")  # a dual-stack wildcard socket takes 127.0.0.1 too
    assert driver.console_endpoint(uuid, "rfb").port == 5903
    # the guest names: its device model's port on another address, where a local service holds the
    # loopback; another guest's VNC server; a service's; a port 127.0.0.1 does not reach; garbage
    for forged in ("5901", "5904", "5905", "5906", "0", "65536", "-1", "59000000", ""):
        guest_writes(domid, "console/vnc-port", forged)
        with pytest.raises(NoConsole):
            driver.console_endpoint(uuid, "rfb")
    with pytest.raises(NoConsole):
        driver.console_endpoint(uuid, "rdp")
    with pytest.raises(NoSuchDomain):
        driver.console_endpoint(str(uuidlib.uuid4()), "rfb")


def test_text_endpoint_only_for_a_pty_of_the_console_daemon(xen_host: Any) -> None:
    driver, domid, uuid, procfs = xen_host
    ours, theirs = os.openpty(), os.openpty()  # real ptys: the check stats the slave
    try:
        ours_path, theirs_path = os.ttyname(ours[1]), os.ttyname(theirs[1])
        index = int(ours_path.rsplit("/", 1)[1])
        process(procfs, 100, ["/usr/sbin/xenconsoled"], {5: index})
        guest_writes(domid, "console/tty", ours_path)
        assert driver.console_endpoint(uuid, "vt100") == ConsoleEndpoint("vt100", "pty", path=ours_path)
        for forged in (theirs_path, "/dev/null", "/dev/pts/../../etc/shadow", "/dev/tty", ""):
            guest_writes(domid, "console/tty", forged)
            with pytest.raises(NoConsole):
                driver.console_endpoint(uuid, "vt100")
    finally:
        for fd in (*ours, *theirs):
            os.close(fd)


def test_vnc_endpoint_not_for_an_impostor_device_model(xen_host: Any) -> None:
    """A user's process started with ``-xen-domid <domid>`` listening on 127.0.0.1: not the device model."""
    driver, domid, uuid, procfs = xen_host
    holding_sockets(procfs, 200, ["/usr/lib/xen/bin/qemu-system-i386", "-xen-domid", str(domid)], [11])
    holding_sockets(procfs, 500, ["/home/eve/qemu", "-xen-domid", str(domid)], [41], uid=1000)
    listening(procfs, [("127.0.0.1", 5900, 11), ("127.0.0.1", 5907, 41)])
    guest_writes(domid, "console/vnc-port", "5900")
    assert driver.console_endpoint(uuid, "rfb").port == 5900
    guest_writes(domid, "console/vnc-port", "5907")
    with pytest.raises(NoConsole):
        driver.console_endpoint(uuid, "rfb")


def test_text_endpoint_not_for_a_pty_of_an_impostor_console_daemon(xen_host: Any) -> None:
    driver, domid, uuid, procfs = xen_host
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        process(procfs, 100, ["/home/eve/xenconsoled"], {5: int(path.rsplit("/", 1)[1])}, uid=1000)
        guest_writes(domid, "console/tty", path)
        with pytest.raises(NoConsole):
            driver.console_endpoint(uuid, "vt100")
    finally:
        os.close(master)
        os.close(slave)


def test_the_checked_pty_is_held_so_its_number_cannot_pass_to_another_terminal(xen_host: Any) -> None:
    """The driver opens the guest's pty before it checks who holds the master and hands that descriptor
    to the relay, which never reopens the path.  So when xenconsoled lets the pty go after the check and
    a new terminal (an administrator's login) is allocated, the new terminal cannot take its number,
    and the relay refuses the hung-up pty instead of reaching the new terminal."""
    from xapid.console.relay import open_pty

    driver, domid, uuid, procfs = xen_host
    master, slave = os.openpty()
    path = os.ttyname(slave)
    process(procfs, 100, ["/usr/sbin/xenconsoled"], {5: int(path.rsplit("/", 1)[1])})
    guest_writes(domid, "console/tty", path)
    endpoint = driver.console_endpoint(uuid, "vt100")
    assert endpoint == ConsoleEndpoint("vt100", "pty", path=path) and endpoint.pty is not None
    os.close(master)  # xenconsoled lets the guest's pty go...
    os.close(slave)
    login_master, login_slave = os.openpty()  # ...and the next terminal is allocated
    try:
        assert os.ttyname(login_slave) != path  # the held pty keeps its number
        with pytest.raises(OSError):
            open_pty(endpoint)  # the checked pty is hung up: the console is refused, never redirected
        os.set_blocking(login_master, False)
        with pytest.raises(BlockingIOError):
            os.read(login_master, 100)  # nothing was written to the new terminal, nor set on it
    finally:
        os.close(login_master)
        os.close(login_slave)


def test_a_refused_console_pty_is_not_left_open(xen_host: Any) -> None:
    """A pty the check refuses is closed again: no descriptor of it stays in the daemon."""
    driver, domid, uuid, procfs = xen_host
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        process(procfs, 300, ["sshd: admin@pts/9"], {4: int(path.rsplit("/", 1)[1])})
        guest_writes(domid, "console/tty", path)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(NoConsole):
            driver.console_endpoint(uuid, "vt100")
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(master)
        os.close(slave)

def test_a_guest_cannot_name_another_guests_console_pty(xen_host: Any) -> None:
    """xenconsoled (root) holds the pty of every guest, so a guest that writes another guest's pty into
    its own ``console/tty`` would pass the holder check: a pty another domain names is refused."""
    driver, domid, uuid, procfs = xen_host
    other_uuid = str(uuidlib.uuid4())
    other = driver.create_domain(DomainSpec(uuid=other_uuid, name="victim", domain_type="hvm",
                                            memory_static_max=256 * MiB, memory_target=256 * MiB, vcpus_max=1,
                                            vcpus_at_startup=1), paused=False).domid
    mine, theirs = os.openpty(), os.openpty()
    try:
        mine_path, theirs_path = os.ttyname(mine[1]), os.ttyname(theirs[1])
        process(procfs, 100, ["/usr/sbin/xenconsoled"], {5: int(mine_path.rsplit("/", 1)[1]),
                                                          6: int(theirs_path.rsplit("/", 1)[1])})
        guest_writes(domid, "console/tty", mine_path)  # as xenconsoled writes them
        guest_writes(other, "console/tty", theirs_path)
        assert driver.console_endpoint(uuid, "vt100").path == mine_path
        assert driver.console_endpoint(other_uuid, "vt100").path == theirs_path
        guest_writes(domid, "console/tty", theirs_path)  # the guest points at the victim's console
        with pytest.raises(NoConsole, match="another domain"):
            driver.console_endpoint(uuid, "vt100")
        os.set_blocking(theirs[0], False)
        with pytest.raises(BlockingIOError):
            os.read(theirs[0], 100)  # nothing reached the victim's console
    finally:
        for fd in (*mine, *theirs):
            os.close(fd)
        driver.destroy_domain(other_uuid)
