"""The Xen driver's console pty check: a guest writes its own ``console/tty`` node, so the pty it names
is used only when xenconsoled (or the guest's own device model) holds its master.  The check reads
/proc; here a /proc tree of real files stands below it (cmdline, fd symlinks, fdinfo)."""

from __future__ import annotations

import os
from pathlib import Path

from xapid.backend.xen.consoles import pty_of_console_daemon


def process(procfs: Path, pid: int, argv: list[str], ptys: dict[int, int]) -> None:
    """A process with *argv* holding /dev/ptmx descriptors: fd -> tty-index."""
    root = procfs / str(pid)
    (root / "fd").mkdir(parents=True)
    (root / "fdinfo").mkdir()
    (root / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
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
