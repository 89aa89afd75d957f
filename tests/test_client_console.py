"""``xapid vm console``: the client reaches a VM's console through the host's /console handler (CONNECT), as
a person does in a terminal (tmux: the boot banner, a login prompt that echoes, Ctrl-] leaves) and as a script
does (stdin piped); ``--vnc`` relays the graphical console to a local port a VNC client opens."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

from support import PASSWORD, ROOT
from test_client_cli import ok, one_line_failure, run_client
from test_client_top import Tmux


def test_console_piped_gets_banner_and_echo(daemon, tmp_path):
    xc = lambda *a, **kw: run_client(daemon.url, *a, home=tmp_path, **kw)
    ok(xc("vm", "install", "Other install media", "con-pv"))
    assert "only a running VM has a console" in one_line_failure(xc("vm", "console", "con-pv"))
    ok(xc("vm", "start", "con-pv"))
    base = {"XAPID_URL": daemon.url, "XAPID_USER": "admin", "XAPID_PASSWORD": PASSWORD, "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "xapid.client", "vm", "console", "con-pv", "--wait", "1"],
                            input="operator\n", capture_output=True, text=True, cwd=ROOT, env=base, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "con-pv" in result.stdout and "login:" in result.stdout
    assert "login: operator" in result.stdout  # the console echoed what was typed


def test_console_in_a_terminal_and_escape(daemon, tmp_path):
    xc = lambda *a: run_client(daemon.url, *a, home=tmp_path)
    ok(xc("vm", "install", "Other install media", "con-tty"))
    ok(xc("vm", "start", "con-tty"))
    t = Tmux(daemon.url, str(tmp_path), ["vm", "console", "con-tty"])
    try:
        t.wait(lambda s: any("escape character is ^]" in line for line in s))
        t.keys("Enter")
        t.wait(lambda s: any(line.rstrip().endswith("login:") for line in s))
        t.keys("-l", "someone")
        t.wait(lambda s: any("login: someone" in line for line in s))
        t.keys("C-]")
        lines = t.wait(lambda s: any(line.startswith("EXIT=") for line in s))
        assert "EXIT=0" in "\n".join(lines)
    finally:
        t.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_console_vnc_relay_speaks_rfb(daemon, tmp_path):
    """An HVM VM's rfb console through ``--vnc PORT``: a client on that port gets the RFB handshake (version,
    no-auth security, ServerInit with the VM's name)."""
    xc = lambda *a: run_client(daemon.url, *a, home=tmp_path)
    ok(xc("vm", "install", "Other install media", "con-hvm"))
    ok(xc("vm", "set", "con-hvm", "HVM_boot_policy=BIOS order"))
    ok(xc("vm", "start", "con-hvm"))
    port = _free_port()
    base = {"XAPID_URL": daemon.url, "XAPID_USER": "admin", "XAPID_PASSWORD": PASSWORD, "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "xapid.client", "vm", "console", "con-hvm", "--vnc", str(port)],
                            cwd=ROOT, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.1)
        with sock:
            def read(n: int) -> bytes:
                data = b""
                while len(data) < n:
                    chunk = sock.recv(n - len(data))
                    assert chunk, data
                    data += chunk
                return data
            assert read(12) == b"RFB 003.008\n"
            sock.sendall(b"RFB 003.008\n")
            count = read(1)[0]
            assert 1 in read(count)  # None security offered
            sock.sendall(b"\x01")
            assert read(4) == b"\0\0\0\0"  # SecurityResult OK
            sock.sendall(b"\x01")  # ClientInit: shared
            width, height = struct.unpack(">HH", read(4))
            read(16)
            (length,) = struct.unpack(">I", read(4))
            assert width > 0 and height > 0 and b"con-hvm" in read(length)
    finally:
        proc.terminate()
        proc.wait(30)
