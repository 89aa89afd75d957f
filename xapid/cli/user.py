"""``xapid user add|del|list|passwd``: manage the users file from the command line.

A password is read from standard input: one line (without its ``\\n`` or ``\\r\\n``) when it
is not a terminal, else typed twice at a prompt.  Errors print one line ``xapid: …`` on
stderr and exit with status 2.

The environment variable ``XAPID_BCRYPT_ROUNDS`` overrides the bcrypt cost of new hashes.
It exists for the test suite only (cost 4 is fast and weak); do not set it in production.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any, TextIO

from xapid.auth.roles import ROLES
from xapid.auth.users import DEFAULT_ROUNDS, DEFAULT_USERS_FILE, UsersError, UsersFile

EXIT_ERROR = 2
ROUNDS_ENV = "XAPID_BCRYPT_ROUNDS"


def add_user_subparsers(subparsers: Any) -> None:
    """Register ``user`` and its sub-commands on an argparse ``add_subparsers()`` object."""
    user = subparsers.add_parser("user", help="manage the users allowed to log in")
    commands = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = commands.add_parser("add", help="add a user (password from stdin, or prompted for)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, metavar="ROLE", help=f"one of: {', '.join(ROLES)}")
    delete = commands.add_parser("del", help="delete a user")
    delete.add_argument("name", metavar="NAME")
    commands.add_parser("list", help="print NAME ROLE per user, sorted by name")
    passwd = commands.add_parser("passwd", help="change a user's password (from stdin, or prompted for)")
    passwd.add_argument("name", metavar="NAME")
    for command in (add, delete, commands.choices["list"], passwd):
        command.add_argument("--users", metavar="FILE", help=f"users file (default {DEFAULT_USERS_FILE})")


def run_user_command(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO, *,
                     isatty: bool) -> int:
    """Run the parsed ``user`` sub-command; 0 on success, else one line on *stderr* and 2."""
    path = DEFAULT_USERS_FILE if args.users is None else args.users
    try:
        users = UsersFile(path, rounds=_rounds())
        users.load()
        if args.user_command == "list":
            for user in users.list():
                stdout.write(f"{user.name} {user.role}\n")
        elif args.user_command == "add":
            users.check_add(args.name, args.role)
            users.add(args.name, args.role, _read_password(stdin, isatty))
            stdout.write(f"added user {args.name} ({args.role}) to {path}\n")
        elif args.user_command == "del":
            users.delete(args.name)
            stdout.write(f"deleted user {args.name} from {path}\n")
        else:
            if users.get(args.name) is None:
                raise UsersError(f"no user {args.name} in {path}")
            users.set_password(args.name, _read_password(stdin, isatty))
            stdout.write(f"changed the password of {args.name} in {path}\n")
    except UsersError as exc:
        stderr.write(f"xapid: {exc}\n")
        stderr.flush()
        return EXIT_ERROR
    stdout.flush()
    return 0


def main_for_tests(argv: list[str]) -> int:
    """Parse *argv* (starting with ``user``) and run it on the process's real stdio."""
    parser = argparse.ArgumentParser(prog="xapid")
    add_user_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_user_command(args, sys.stdin, sys.stdout, sys.stderr, isatty=sys.stdin.isatty())


def _rounds() -> int:
    value = os.environ.get(ROUNDS_ENV)
    if value is None:
        return DEFAULT_ROUNDS
    try:
        return int(value)
    except ValueError:
        raise UsersError(f"{ROUNDS_ENV} must be an integer, not {value!r}") from None


def _read_password(stdin: TextIO, isatty: bool) -> str:
    """One line from a pipe or file without its line ending, or typed twice at a terminal."""
    if not isatty:
        try:
            line = stdin.readline()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersError(f"cannot read the password from standard input: {exc}") from None
        if not line:
            raise UsersError("no password on standard input")
        return line.removesuffix("\n").removesuffix("\r") if line.endswith("\n") else line
    try:
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Retype password: ")
    except (EOFError, KeyboardInterrupt):
        raise UsersError("no password entered") from None
    if first != second:
        raise UsersError("the passwords do not match")
    return first
