"""``xapid user add|del|list|passwd``: manage the users file from the command line."""

from __future__ import annotations

import argparse
import getpass
import os
from typing import TextIO

from xapid.users import DEFAULT_USERS_FILE, UsersError, UsersFile


def add_user_subparsers(subparsers: argparse._SubParsersAction) -> None:
    user = subparsers.add_parser("user", help="manage API users")
    verbs = user.add_subparsers(dest="user_command", required=True)
    for verb, text in (("add", "add a user"), ("del", "delete a user"), ("passwd", "change a password"),
                       ("list", "list users and roles")):
        p = verbs.add_parser(verb, help=text)
        if verb != "list":
            p.add_argument("name")
        if verb == "add":
            p.add_argument("--role", required=True, help="pool-admin, pool-operator, vm-power-admin, vm-admin, "
                                                          "vm-operator or read-only")
        p.add_argument("--users", default=DEFAULT_USERS_FILE, help=f"users file (default {DEFAULT_USERS_FILE})")


def read_password(stdin: TextIO, isatty: bool) -> str:
    """One line from a pipe (without its line ending), or typed twice at a terminal."""
    if not isatty:
        line = stdin.readline()
        return line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line
    first = getpass.getpass("Password: ")
    if getpass.getpass("Retype password: ") != first:
        raise UsersError("the passwords do not match")
    return first


def run_user_command(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO, *,
                     isatty: bool) -> int:
    """Run one ``user`` sub-command; errors are one line on stderr and exit status 2."""
    # XAPID_BCRYPT_ROUNDS is for tests only: cheaper hashes.
    users = UsersFile(args.users, rounds=int(os.environ.get("XAPID_BCRYPT_ROUNDS", "12")))
    try:
        users.load()
        if args.user_command == "list":
            for user in users.list():
                stdout.write(f"{user.name} {user.role}\n")
        elif args.user_command == "add":
            users.add(args.name, args.role, read_password(stdin, isatty))
            stdout.write(f"added user {args.name} ({args.role}) to {args.users}\n")
        elif args.user_command == "del":
            users.delete(args.name)
            stdout.write(f"deleted user {args.name} from {args.users}\n")
        elif args.user_command == "passwd":
            if users.get(args.name) is None:
                raise UsersError(f"no user {args.name} in {args.users}")
            users.set_password(args.name, read_password(stdin, isatty))
            stdout.write(f"changed the password of {args.name} in {args.users}\n")
    except UsersError as exc:
        stderr.write(f"xapid: {exc}\n")
        return 2
    return 0
