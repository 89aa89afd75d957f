"""``xapid check-config`` and ``xapid db backup|restore``: operations that start no daemon."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO


def add_ops_subparsers(subparsers: Any) -> None:
    check = subparsers.add_parser("check-config", help="validate a config file (exit 0, or 2 with one line); "
                                                       "nothing is started")
    check.add_argument("--config", metavar="FILE", help="INI config file (default /etc/xapid/xapid.conf if present)")
    db = subparsers.add_parser("db", help="back up or restore the state dir's database")
    commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    backup = commands.add_parser("backup", help="copy the database to FILE (online: the daemon may be running)")
    restore = commands.add_parser("restore", help="replace the database with FILE (the daemon must be stopped)")
    for command in (backup, restore):
        command.add_argument("file", metavar="FILE")
        command.add_argument("--state-dir", metavar="DIR", help="state dir (default: [server] state_dir)")
        command.add_argument("--config", metavar="FILE",
                             help="INI config file (default /etc/xapid/xapid.conf if present)")


def check_config(args: argparse.Namespace, stdout: TextIO) -> str | None:
    """None when the config is usable, else the one line saying why."""
    from xapid.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return str(exc)
    from twisted.internet.task import Clock

    from xapid import statedir
    from xapid.schema import SchemaError, load_schema
    from xapid.server import Daemon, StartupError
    from xapid.auth.users import UsersError, UsersFile

    try:
        load_schema()
        # endpoints, backend, storage format: nothing opened or bound.  A systemd: socket exists only in
        # the service itself: its line is checked for its form, not for a passed fd.
        passed = tuple(d for d in config.server.listen if d.startswith("systemd:"))
        for description in passed:
            if not any(part.split("=", 1)[0] in ("index", "name") for part in description.split(":")[1:]):
                raise StartupError(f"bad listen address {description!r}: systemd: needs index=N or name=NAME")
        own = tuple(d for d in config.server.listen if d not in passed) or ("tcp:0:interface=127.0.0.1",)
        Daemon(replace(config, server=replace(config.server, listen=own)), Clock()).check()
        if Path(config.server.users).exists():
            UsersFile(config.server.users).load()
        statedir.check_readable_format(Path(config.server.state_dir))
    except SchemaError as exc:
        return f"schema error: {exc}"
    except (StartupError, UsersError, statedir.StateDirError) as exc:
        return str(exc)
    stdout.write(f"{config.source}: OK\n")
    return None


def run_db_command(args: argparse.Namespace, stdout: TextIO) -> str | None:
    from xapid import statedir
    from xapid.config import ConfigError, load_config, override

    try:
        config = override(load_config(args.config), state_dir=args.state_dir)
    except ConfigError as exc:
        return str(exc)
    state_dir = Path(config.server.state_dir)
    target = Path(args.file)
    try:
        if args.db_command == "backup":
            statedir.backup(state_dir, target)
            stdout.write(f"backed up {state_dir / statedir.DB_FILE} to {target}\n")
        else:
            found = statedir.restore(state_dir, target)
            note = "" if found == statedir.FORMAT else f" (format {found}: migrated at the next start)"
            stdout.write(f"restored {state_dir / statedir.DB_FILE} from {target}{note}\n")
    except statedir.StateDirError as exc:
        return str(exc)
    return None
