"""Console endpoints of the ``xen`` driver, checked against what a guest may write."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from xapid.backend.interface import BadDomainState, ConsoleEndpoint, NoConsole
from xapid.backend.xen.core import XenCore, state_of
from xapid.backend.xen.libs import XenError

_PTS = re.compile(r"/dev/pts/[0-9]{1,9}")


def pty_of_console_daemon(procfs: Path, index: int, domid: int) -> bool:
    """Whether the master of ``/dev/pts/<index>`` is held by xenconsoled or by *domid*'s device model.

    A guest may write its own ``console/tty`` node: without this check it could point it at another
    pty of the host (an administrator's terminal).  The master's index comes from
    ``/proc/<pid>/fdinfo/<fd>`` (``tty-index:``) of each ``/dev/ptmx`` descriptor."""
    want_domid = str(domid).encode()
    for proc in procfs.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            name = os.path.basename(argv[0]) if argv else b""
            owner = name == b"xenconsoled" or any(
                a == b"-xen-domid" and b == want_domid for a, b in zip(argv, argv[1:]))
            if not owner:
                continue
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


def _is_pty_slave(path: str) -> bool:
    """Whether *path* is a Unix98 pty slave (character device, major 136-143)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and 136 <= os.major(st.st_rdev) <= 143


class Consoles(XenCore):
    """The vt100 pty and the device model's VNC port of a domain, each verified."""

    # -- consoles ----------------------------------------------------------------------

    def console_endpoint(self, uuid: str, protocol: str) -> ConsoleEndpoint:
        """The domain's console as published in xenstore, checked, since a guest may write
        under its own ``console/`` node:

        * ``vt100``: ``console/tty`` (``serial/0/tty`` for an HVM guest without a PV console)
          must be ``/dev/pts/<n>`` and a pty slave character device (majors 136-143);
        * ``rfb``: ``console/vnc-port`` must be a TCP port on which this domain's own device
          model (the process with ``-xen-domid <domid>``) listens; reached on 127.0.0.1, where
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

        def read(rel: str) -> str:
            try:
                return xs.read(f"{home}/{rel}").decode("ascii", "replace").strip()
            except XenError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES):
                    return ""
                raise

        with self._hypercall("read the console's location", uuid):
            if protocol == "vt100":
                path = read("console/tty") or read("serial/0/tty")
            else:
                port_text = read("console/vnc-port")
        if protocol == "vt100":
            if not _PTS.fullmatch(path) or not _is_pty_slave(path) or not pty_of_console_daemon(
                    self._procfs, int(path.rsplit("/", 1)[1]), raw.domain):
                raise NoConsole(f"domain {uuid} publishes no usable console pty", uuid, protocol)
            return ConsoleEndpoint("vt100", "pty", path=path)
        port = int(port_text) if port_text.isdigit() and len(port_text) <= 5 else -1
        if not 0 < port < 65536 or not self._device_model_listens(raw.domain, port):
            raise NoConsole(f"domain {uuid} has no VNC server of its device model", uuid, protocol)
        return ConsoleEndpoint("rfb", "tcp", host="127.0.0.1", port=port)

    def _device_model_listens(self, domid: int, port: int) -> bool:
        """Whether a process started with ``-xen-domid <domid>`` holds a socket listening on *port*."""
        inodes: set[str] = set()
        for table in ("net/tcp", "net/tcp6"):
            try:
                lines = (self._procfs / table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[1].rpartition(":")[2] == f"{port:04X}":
                    inodes.add(f"socket:[{fields[9]}]")
        if not inodes:
            return False
        want = str(domid).encode()
        for proc in self._procfs.iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if not any(a == b"-xen-domid" and b == want for a, b in zip(argv, argv[1:])):
                    continue
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return True
            except OSError:
                continue
        return False
