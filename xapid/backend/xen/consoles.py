"""Console endpoints of the ``xen`` driver, checked against what a guest may write."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xapid.backend.interface import BadDomainState, ConsoleEndpoint, HeldPty, NoConsole
from xapid.backend.xen.core import XenCore, state_of
from xapid.backend.xen.libs import XenError

_PTS = re.compile(r"/dev/pts/[0-9]{1,9}")
_LOOPBACK = ipaddress.ip_address("127.0.0.1")  # where the relay connects to a device model's VNC server


def _processes(procfs: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """Each process of *procfs* with its argv (processes gone meanwhile are skipped)."""
    for proc in procfs.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            yield proc, (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue


def _node(xs: Any, path: str) -> str:
    """The text of xenstore node *path* ("" when it is absent or not readable to dom0's tools)."""
    try:
        return xs.read(path).decode("ascii", "replace").strip()
    except XenError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES):
            return ""
        raise


def _owned_by_root(proc: Path) -> bool:
    """Whether *proc* runs with real and effective uid 0 (``Uid:`` of its ``status``); an
    unreadable status counts as not root.  Any local user may name a process ``xenconsoled``
    or give it ``-xen-domid <n>``: its argv alone proves nothing."""
    try:
        lines = (proc / "status").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for line in lines:
        key, _, value = line.partition(":")
        if key == "Uid":
            ids = value.split()
            return len(ids) >= 2 and ids[0] == "0" and ids[1] == "0"
    return False


def _device_model_of(argv: list[bytes], domid: int) -> bool:
    """Whether *argv* is the device model of *domid* (``-xen-domid <domid>``)."""
    want = str(domid).encode()
    return any(a == b"-xen-domid" and b == want for a, b in zip(argv, argv[1:]))


def pty_of_console_daemon(procfs: Path, index: int, domid: int) -> bool:
    """Whether the master of ``/dev/pts/<index>`` is held by xenconsoled or by *domid*'s device model,
    running as root (see :func:`_owned_by_root`).

    A guest may write its own ``console/tty`` node: without this check it could point it at another
    pty of the host (an administrator's terminal).  The master's index comes from
    ``/proc/<pid>/fdinfo/<fd>`` (``tty-index:``) of each ``/dev/ptmx`` descriptor."""
    for proc, argv in _processes(procfs):
        if os.path.basename(argv[0]) != b"xenconsoled" and not _device_model_of(argv, domid):
            continue
        if not _owned_by_root(proc):
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) not in ("/dev/ptmx", "/dev/pts/ptmx"):
                    continue
                for line in (proc / "fdinfo" / fd.name).read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key == "tty-index" and value.strip() == str(index):
                        return True
        except OSError:
            continue
    return False


def _reaches_loopback(address: str) -> bool:
    """Whether a socket bound to *address* (``/proc/net/tcp{,6}`` hex: 32-bit words in host order)
    receives connections to 127.0.0.1: the wildcard, 127.0.0.1 itself, or its v4-mapped form."""
    try:
        raw = b"".join(int(address[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(address), 8))
        ip = ipaddress.ip_address(raw)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_unspecified or ip == _LOOPBACK


def listeners_reaching_loopback(procfs: Path, port: int) -> set[str]:
    """The ``socket:[inode]`` names of the TCP sockets listening on *port* that a connection to
    127.0.0.1:*port* may reach (whichever of them the kernel prefers)."""
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (procfs / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) <= 9 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, hex_port = fields[1].rpartition(":")
            if hex_port == f"{port:04X}" and _reaches_loopback(address):
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _open_pty_slave(path: str) -> int:
    """*path* opened read-write (non-blocking, never as the controlling tty) if it is a Unix98 pty
    slave (character device, major 136-143), else -1.  Nothing is written or set on it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat.S_ISCHR(st.st_mode) or not 136 <= os.major(st.st_rdev) <= 143:
        os.close(fd)
        return -1
    return fd


class Consoles(XenCore):
    """The vt100 pty and the device model's VNC port of a domain, each verified."""

    # -- consoles ----------------------------------------------------------------------

    def console_endpoint(self, uuid: str, protocol: str) -> ConsoleEndpoint:
        """The domain's console as published in xenstore, checked, since a guest may write
        under its own ``console/`` node:

        * ``vt100``: ``console/tty`` (``serial/0/tty`` for an HVM guest without a PV console)
          must be ``/dev/pts/<n>`` and a pty slave character device (majors 136-143), whose master
          xenconsoled (or the guest's device model) holds; the slave is opened before that check and
          handed over open (:class:`~xapid.backend.interface.HeldPty`);
        * ``rfb``: ``console/vnc-port`` must be a TCP port on which this domain's own device
          model (the process with ``-xen-domid <domid>``) listens, on 127.0.0.1 or the wildcard,
          and nothing else does there; reached on 127.0.0.1, where
          :mod:`xapid.backend.xen.domconfig` has qemu listen, whatever ``vnc-listen`` says.
        """
        raw = self._find(uuid)
        state = state_of(raw)
        if state not in ("running", "paused"):
            raise BadDomainState(f"domain {uuid} is {state}: it has no console", uuid, state)
        if protocol not in ("vt100", "rfb"):
            raise NoConsole(f"no {protocol} console", uuid, protocol)
        home = f"/local/domain/{raw.domain}"
        xs = self._store()
        with self._hypercall("read the console's location", uuid):
            if protocol == "vt100":
                path = _node(xs, f"{home}/console/tty") or _node(xs, f"{home}/serial/0/tty")
            else:
                port_text = _node(xs, f"{home}/console/vnc-port")
        if protocol == "vt100":
            # opened first, then checked: held open, its number cannot pass to another terminal
            # (an administrator's login) between this check and the relay's use of it
            fd = _open_pty_slave(path) if _PTS.fullmatch(path) else -1
            held = HeldPty(fd) if fd >= 0 else None
            try:
                if held is None or not pty_of_console_daemon(self._procfs, int(path.rsplit("/", 1)[1]), raw.domain):
                    raise NoConsole(f"domain {uuid} publishes no usable console pty", uuid, protocol)
                with self._hypercall("read the other domains' consoles", uuid):
                    shared = self._named_by_another(
                        xs, [d.domain for d in self._raw_domains() if d.domain != raw.domain], path)
                if shared:  # xenconsoled holds every guest's pty: this one may be another guest's console
                    raise NoConsole(f"domain {uuid} names a console pty that another domain names too",
                                    uuid, protocol)
            except BaseException:
                if held is not None:
                    held.close()
                raise
            return ConsoleEndpoint("vt100", "pty", path=path, pty=held)
        port = int(port_text) if port_text.isdigit() and len(port_text) <= 5 else -1
        if not 0 < port < 65536 or not self._device_model_listens(raw.domain, port):
            raise NoConsole(f"domain {uuid} has no VNC server of its device model", uuid, protocol)
        return ConsoleEndpoint("rfb", "tcp", host="127.0.0.1", port=port)

    @staticmethod
    def _named_by_another(xs: Any, others: list[int], path: str) -> bool:
        """Whether one of the domains *others* (the hypervisor's, not xenstore's leftovers) names
        *path* as its console pty (``console/tty`` or ``serial/0/tty``).  A guest writes its own
        node: naming the pty xenconsoled holds for another guest would hand that guest's console
        to this one's users.  (A guest naming a victim's pty can only make the victim's console
        refused, never reach it.)"""
        return any(_node(xs, f"/local/domain/{other}/{rel}") == path
                   for other in others for rel in ("console/tty", "serial/0/tty"))

    def _device_model_listens(self, domid: int, port: int) -> bool:
        """Whether 127.0.0.1:*port* reaches only sockets of the root process started with ``-xen-domid
        <domid>``: a device model listening on another address must not lead the relay to whatever
        else listens on the loopback's port."""
        inodes = listeners_reaching_loopback(self._procfs, port)
        if not inodes:
            return False
        held: set[str] = set()
        for proc, argv in _processes(self._procfs):
            if not _device_model_of(argv, domid) or not _owned_by_root(proc):
                continue
            try:
                held.update(link for link in map(os.readlink, (proc / "fd").iterdir()) if link in inodes)
            except OSError:
                continue
        return held == inodes
