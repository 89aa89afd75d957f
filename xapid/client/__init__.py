"""xapid's command-line client: xe-style verbs over the remote Xen-API, and a live ``top``.

The main ``xapid`` command hands its client verbs here::

    from xapid import client
    if argv and argv[0] in client.VERBS:
        return client.run(argv, sys.stdin, sys.stdout, sys.stderr)
"""

from __future__ import annotations

from typing import Any

#: The top-level verbs this package handles (``xapid vm …``, ``xapid top``, …).
VERBS: tuple[str, ...] = ("vm", "vdi", "vbd", "vif", "sr", "network", "host", "task", "top", "events", "call",
                          "completion")


def run(argv: list[str], stdin: Any, stdout: Any, stderr: Any) -> int:
    """Run the client on *argv* (``["vm", "list", "--json"]``); returns the exit code: 0, 1 (a failure,
    reported on one line of *stderr*) or 2 (usage); 130 after Ctrl-C."""
    from xapid.client.main import main

    return main(list(argv), stdin, stdout, stderr)
