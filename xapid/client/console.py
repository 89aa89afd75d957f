"""``xapid vm console VM``: a VM's console through the host's ``/console`` handler.

The client opens its own connection to the host it already talks to (the same URL, TLS pin or UNIX
socket), sends ``CONNECT /console?ref=<console>&session_id=<session>`` as XenCenter does, checks the
``200`` and then relays bytes:

- a text console (``vt100``, the default) to the terminal, in raw mode; ``Ctrl-]`` leaves, as in
  ``virsh console``. When stdin is not a terminal, its lines are sent and the output printed until
  the console has been quiet for ``--wait`` seconds after stdin ended (for scripts).
- a graphical console (``rfb``, ``--vnc``) to a local TCP port on 127.0.0.1 that a VNC viewer opens;
  one viewer at a time, until Ctrl-C.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import sys
import termios
import tty
import urllib.parse
from typing import Any

from xapid.client.connection import ClientError, Target, _pin_checker, pinned_context

ESCAPE = b"\x1d"  # Ctrl-]
HEAD_LIMIT = 16 << 10


def pick_console(ctx: Any, vm_ref: str, protocol: str) -> str:
    """The ref of *vm_ref*'s console speaking *protocol*; a one-line error naming what exists otherwise."""
    consoles = ctx.client.call("VM.get_consoles", vm_ref)
    found = {ctx.client.call("console.get_protocol", c): c for c in consoles}
    if protocol not in found:
        have = ", ".join(sorted(found)) or "none (is the VM running?)"
        raise ClientError(f"the VM has no {protocol} console; it has: {have}")
    return str(found[protocol])


def open_console(target: Target, session: str, console_ref: str, stderr: Any, timeout: float = 30) -> socket.socket:
    """A socket relaying to the console, past the CONNECT reply; ClientError with the status otherwise."""
    query = urllib.parse.urlencode({"ref": console_ref, "session_id": session})
    if target.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        host = "localhost"
        try:
            sock.connect(target.unix_path)
        except OSError as exc:
            sock.close()
            raise ClientError(f"cannot reach the host: {exc}") from None
    else:
        parsed = urllib.parse.urlsplit(target.url)
        host = parsed.hostname or "localhost"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ClientError(f"cannot reach the host: {exc}") from None
    try:
        return _connect_console(sock, target, host, query, stderr)
    except BaseException:
        sock.close()  # a refused pin, a refusal or a broken connection leaves nothing open
        raise


def _connect_console(sock: socket.socket, target: Target, host: str, query: str, stderr: Any) -> socket.socket:
    """*sock* (a connection to the host) past TLS and its pin check when https, and the CONNECT reply."""
    if target.unix_path is None and urllib.parse.urlsplit(target.url).scheme == "https":
        sock = pinned_context().wrap_socket(sock, server_hostname=host)
        der = sock.getpeercert(binary_form=True) or b""
        _pin_checker(target, stderr)(hashlib.sha256(der).hexdigest().upper())
    sock.sendall(f"CONNECT /console?{query} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        try:
            data = sock.recv(4096)
        except OSError as exc:
            raise ClientError(f"the host closed the console connection: {exc}") from None
        if not data or len(head) > HEAD_LIMIT:
            raise ClientError("the host closed the console connection before answering")
        head += data
    head, _, rest = head.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        raise ClientError(f"the host refused the console: {status}")
    sock.settimeout(None)
    if rest:
        sock = _Prefixed(sock, rest)  # type: ignore[assignment]  # a socket with bytes read ahead
    return sock


class _Prefixed:
    """A socket whose first recv returns bytes already read past the reply head."""

    def __init__(self, sock: socket.socket, first: bytes):
        self._sock, self._first = sock, first

    def recv(self, size: int) -> bytes:
        if self._first:
            data, self._first = self._first[:size], self._first[size:]
            return data
        return self._sock.recv(size)

    def pending(self) -> bool:
        return bool(self._first) or _pending(self._sock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _pending(sock: Any) -> bool:
    """Whether *sock* holds bytes already read that select() would not report."""
    if isinstance(sock, _Prefixed):
        return sock.pending()
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def relay_text(sock: Any, stdin: Any, stdout: Any, stderr: Any, wait: float) -> int:
    """Relay a text console to the terminal until Ctrl-] (or, stdin not a terminal, until it ends and
    the console has been quiet for *wait* seconds). Returns the exit code."""
    in_fd = stdin.fileno()
    out = getattr(stdout, "buffer", stdout)
    interactive = os.isatty(in_fd)
    saved = termios.tcgetattr(in_fd) if interactive else None
    if interactive:
        stderr.write("Connected to the console (escape character is ^])\r\n")
        stderr.flush()
        tty.setraw(in_fd)
    stdin_open = True
    try:
        while True:
            readers = [sock] + ([in_fd] if stdin_open else [])
            ready = [sock] if _pending(sock) else select.select(readers, [], [], None if stdin_open else wait)[0]
            if not ready:
                return 0  # stdin ended and the console stayed quiet
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    if interactive:
                        stderr.write("\r\nthe host closed the console\r\n")
                    return 0
                out.write(data)
                out.flush()
            if in_fd in ready:
                data = os.read(in_fd, 4096)
                if not data:
                    stdin_open = False
                    continue
                if interactive and ESCAPE in data:
                    data = data.split(ESCAPE, 1)[0]
                    if data:
                        sock.sendall(data)
                    return 0
                sock.sendall(data if interactive else data.replace(b"\n", b"\r"))
    except OSError as exc:
        raise ClientError(f"the console connection broke: {exc}") from None
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
            stderr.write("\n")
        try:
            sock.close()
        except OSError:
            pass


def serve_vnc(connect: Any, port: int, stderr: Any) -> int:
    """Listen on 127.0.0.1:*port*; relay each VNC viewer (one at a time) to a fresh console connection."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as exc:
        raise ClientError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    listener.listen(1)
    stderr.write(f"graphical console: point a VNC viewer at 127.0.0.1:{listener.getsockname()[1]} (Ctrl-C stops)\n")
    stderr.flush()
    try:
        while True:
            viewer, _ = listener.accept()
            try:
                _pump(viewer, connect())
            finally:
                viewer.close()
    finally:
        listener.close()


def _pump(a: socket.socket, b: Any) -> None:
    try:
        while True:
            ready = [b] if _pending(b) else select.select([a, b], [], [])[0]
            for src, dst in ((a, b), (b, a)):
                if src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    dst.sendall(data)
    except OSError:
        return
    finally:
        b.close()


def vm_console(ctx: Any, opts: Any, target: Target, stdin: Any = None) -> int:
    from xapid.client.commands import _vm

    ref, rec = _vm(ctx, opts.target)
    if rec["power_state"] not in ("Running", "Paused"):
        raise ClientError(f"{rec['name_label']} is {rec['power_state']}: only a running VM has a console")
    protocol = "rfb" if opts.vnc is not None else "vt100"
    console = pick_console(ctx, ref, protocol)
    session = ctx.client.session

    def connect() -> Any:
        return open_console(target, session, console, ctx.stderr)

    if protocol == "rfb":
        return serve_vnc(connect, opts.vnc, ctx.stderr)
    return relay_text(connect(), stdin or sys.stdin, ctx.stdout, ctx.stderr, opts.wait)
