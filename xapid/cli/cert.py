"""``xapid cert show|regenerate``: the daemon's own TLS certificate (``<state_dir>/tls/xapid.pem``).

The state dir is ``--state-dir``, else the config's ``[server] state_dir``.  Errors print one
line ``xapid: …`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

EXIT_ERROR = 2


def add_cert_subparsers(subparsers: Any) -> None:
    """Register ``cert`` and its sub-commands on an argparse ``add_subparsers()`` object."""
    cert = subparsers.add_parser("cert", help="show or regenerate the daemon's own TLS certificate")
    commands = cert.add_subparsers(dest="cert_command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", help="describe the certificate served by ssl: listeners without privateKey")
    regenerate = commands.add_parser("regenerate", help="replace it with a new key and self-signed certificate; "
                                                        "running daemons serve it on new connections")
    for command in (show, regenerate):
        command.add_argument("--state-dir", metavar="DIR", help="state dir (default: [server] state_dir)")
        command.add_argument("--config", metavar="FILE",
                             help="INI config file (default /etc/xapid/xapid.conf if present)")


def run_cert_command(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Run the parsed ``cert`` sub-command; 0 on success, else one line on *stderr* and 2."""
    from xapid import tls
    from xapid.config import ConfigError, load_config, override

    try:
        config = override(load_config(args.config), state_dir=args.state_dir)
        state_dir = Path(config.server.state_dir)
        pem_path, crt_path = tls.own_paths(state_dir)
        if args.cert_command == "show":
            if not pem_path.exists():
                raise tls.TLSError(f"no TLS certificate at {pem_path} yet: the daemon makes it when it starts with "
                                   f"an ssl: listener without privateKey (or run xapid cert regenerate)")
            for label, value in tls.describe_certificate(pem_path):
                stdout.write(f"{label}: {value}\n")
            stdout.write(f"certificate for clients: {crt_path}\n")
        else:
            existed = pem_path.exists()
            certificate = tls.generate_own_certificate(state_dir)
            stdout.write(f"{'replaced' if existed else 'created'} the TLS key and self-signed certificate "
                         f"{pem_path} (certificate for clients: {crt_path})\n")
            stdout.write(f"SHA-256 fingerprint: {tls.fingerprint(certificate)}\n")
            stdout.write("running daemons serve it on new connections; open connections keep the old one\n")
    except (ConfigError, tls.TLSError) as exc:
        stderr.write(f"xapid: {exc}\n")
        stderr.flush()
        return EXIT_ERROR
    stdout.flush()
    return 0
