"""The simulator's text console: a guest's serial line as a terminal sees it.

Each session starts with the guest's boot messages (naming the VM) and a ``login:`` prompt.
Input goes through a small line discipline, as a tty in cooked mode with echo: printable
characters are echoed, backspace/DEL erases one, Ctrl-U the line, Ctrl-C abandons it, CR or
LF ends it.  A login name is followed by a ``Password:`` prompt (not echoed), then ``Login
incorrect`` and the prompt again: the simulated guest lets nobody in.  Lines are bounded
(:data:`LINE_MAX`; beyond it, a bell), escape sequences from the terminal are dropped, so
any input costs linear time and bounded memory.
"""

from __future__ import annotations

import re

LINE_MAX = 255
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_ESCAPE = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|.)?", re.DOTALL)


def hostname(name: str) -> str:
    """A host name for the prompt from the VM's name (lower case, letters, digits and '-')."""
    text = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63]
    return text or "localhost"


def boot_banner(name: str, kind: str = "vt100") -> bytes:
    """The boot messages of a simulated guest named *name*."""
    safe = _UNSAFE.sub("?", name)[:128]
    lines = [
        "[    0.000000] Linux version 6.1.0-sim (xapid simulated guest)",
        f"[    0.000000] Command line: console=hvc0 root=/dev/xvda1 ro (VM \"{safe}\")",
        "[    0.412000] xen:events: Using FIFO-based ABI",
        "[    1.100000] blkfront: xvda: flush diskcache: enabled; persistent grants: enabled",
        "[    2.300000] systemd[1]: Reached target multi-user.target",
        "",
        f"Simulated guest {safe} ({kind} console of xapid's sim backend)",
        "",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


class SerialConsole:
    """One session on the simulated serial line: :meth:`start` then :meth:`feed` per input;
    both return the bytes the guest sends back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.host = hostname(name)
        self.line = bytearray()
        self.user: str | None = None  # the login name typed, while the password is asked
        self.logins = 0
        self._just_ended = False  # the last byte ended a line with CR (its LF is not a second line)

    def prompt(self) -> bytes:
        return b"Password: " if self.user is not None else f"{self.host} login: ".encode()

    def start(self) -> bytes:
        return boot_banner(self.name) + b"\r\n" + self.prompt()

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        echo = self.user is None
        for byte in _ESCAPE.sub(b"", data):
            if byte in (0x0D, 0x0A):  # end of line (CR LF from a terminal counts once: LF on an empty line is skipped)
                if byte == 0x0A and not self.line and self._just_ended:
                    self._just_ended = False
                    continue
                out += b"\r\n" + self._line_done()
                echo = self.user is None
                self._just_ended = byte == 0x0D
                continue
            self._just_ended = False
            if byte in (0x08, 0x7F):
                if self.line:
                    self.line.pop()
                    if echo:
                        out += b"\b \b"
            elif byte == 0x15:  # Ctrl-U: kill the line
                if echo:
                    out += b"\b \b" * len(self.line)
                self.line.clear()
            elif byte == 0x03:  # Ctrl-C: abandon the line
                self.line.clear()
                self.user = None
                out += b"^C\r\n" + self.prompt()
                echo = True
            elif 0x20 <= byte < 0x7F:
                if len(self.line) >= LINE_MAX:
                    out += b"\a"
                    continue
                self.line.append(byte)
                if echo:
                    out.append(byte)
            # other control bytes (and non-ASCII) are ignored, as by a 7-bit getty
        return bytes(out)

    def _line_done(self) -> bytes:
        text = self.line.decode("ascii")
        self.line.clear()
        if self.user is None:
            if not text.strip():
                return self.prompt()
            self.user = text.strip()
            return self.prompt()
        self.user = None
        self.logins += 1
        return b"\r\nLogin incorrect\r\n" + self.prompt()
