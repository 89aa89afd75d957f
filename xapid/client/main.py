"""The client's command line: the parser, the connection options and the dispatch to the verbs."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, NoReturn

from xapid.client import commands
from xapid.client.connection import ClientError, connect, resolve_target

NOUNS = ("vm", "vdi", "vbd", "vif", "sr", "network", "host", "task")
VM_VERBS = ("list", "show", "start", "shutdown", "reboot", "suspend", "resume", "destroy", "snapshot", "revert",
            "clone", "install", "console", "set")
OTHER_VERBS = {"task": ("list", "show", "cancel")}

EPILOG = """connection: --url or XAPID_URL (http://, https:// or a UNIX socket path), --user or XAPID_USER,
the password from XAPID_PASSWORD, --password-file, the profile, or a prompt; profiles live in
~/.config/xapid/client.toml (mode 0600). Exit codes: 0 ok, 1 failure (Xen-API failures as CODE PARAMS…),
2 usage."""


class _Stop(Exception):
    def __init__(self, code: int):
        self.code = code


def _parser_class(stdout: Any, stderr: Any) -> type[argparse.ArgumentParser]:
    class Parser(argparse.ArgumentParser):
        def _print_message(self, message: str, file: Any = None) -> None:
            if message:
                (stdout if file in (None, sys.stdout) else stderr).write(message)

        def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
            if message:
                stderr.write(message)
            raise _Stop(status)

        def error(self, message: str) -> NoReturn:
            stderr.write(f"xapid: {message} (see {self.prog} --help)\n")
            raise _Stop(2)

    return Parser


def common_options(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = parser.add_argument_group("connection and output")
    g.add_argument("--url", default=S, help="http://HOST:PORT/, https://…, or a UNIX socket path")
    g.add_argument("--user", default=S)
    g.add_argument("--password-file", default=S, help="a file whose first line is the password")
    g.add_argument("--profile", default=S, help="a [profiles.NAME] table of ~/.config/xapid/client.toml")
    g.add_argument("--fingerprint", default=S, help="the SHA-256 fingerprint the https certificate must have")
    g.add_argument("--json", action="store_true", default=S, help="JSON output (Xen-API field names)")
    g.add_argument("--quiet", "-q", action="store_true", default=S, help="uuids only, or nothing")


def build_parser(stdout: Any, stderr: Any) -> argparse.ArgumentParser:
    Parser = _parser_class(stdout, stderr)
    top = Parser(prog="xapid", description="A command-line client of the Xen Management API.", epilog=EPILOG)
    common_options(top)
    verbs = top.add_subparsers(dest="noun", metavar="VERB", required=True, parser_class=Parser)
    for noun in NOUNS:
        cls = commands.CLASS_OF[noun]
        np = verbs.add_parser(noun, help=f"{cls} objects")
        sub = np.add_subparsers(dest="verb", metavar="ACTION", required=True, parser_class=Parser)
        _add_object_actions(sub, noun, cls)
        if noun == "vm":
            _add_vm_actions(sub)
    _add_tools(verbs)
    return top


def _port(text: str) -> int:
    """A TCP port number, 0-65535 (a usage error otherwise, not a traceback at bind time)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds (select() refuses the rest)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite, non-negative number of seconds")
    return value


def leaf(sub: Any, name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand of *sub* with the common options."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text, **kwargs)
    common_options(p)
    return p


def _add_object_actions(sub: Any, noun: str, cls: str) -> None:
    """``list`` and ``show`` of every object class (and ``cancel`` of a task)."""
    p = leaf(sub, "list", f"list the {cls} objects")
    if noun == "vm":
        kind = p.add_mutually_exclusive_group()
        kind.add_argument("--templates", action="store_true", help="templates instead of VMs")
        kind.add_argument("--snapshots", action="store_true", help="snapshots instead of VMs")
        kind.add_argument("--all", action="store_true", help="VMs, templates and snapshots")
        p.add_argument("--names", action="store_true", help="names only, one a line (shell completion)")
    leaf(sub, "show", f"every field of one {cls}").add_argument("target", metavar=noun.upper(),
                                                               help="name, uuid, uuid prefix or ref")
    if noun == "task":
        leaf(sub, "cancel", "cancel a task").add_argument("target", metavar="TASK")


def _add_vm_actions(sub: Any) -> None:
    """The VM's power, snapshot, install, console and set actions."""
    for verb, text in (("start", "start a VM"), ("shutdown", "shut a VM down (clean; --force: hard)"),
                       ("reboot", "reboot a VM (clean; --force: hard)"), ("suspend", "suspend a VM"),
                       ("resume", "resume a suspended VM")):
        p = leaf(sub, verb, text)
        p.add_argument("target", metavar="VM")
        if verb == "start":
            p.add_argument("--paused", action="store_true")
        if verb in ("start", "shutdown", "reboot", "resume"):
            p.add_argument("--force", action="store_true")
    p = leaf(sub, "destroy", "destroy a halted VM (its disks stay)")
    p.add_argument("target", metavar="VM")
    p.add_argument("--snapshot", action="store_true", help="TARGET is a snapshot")
    for verb, text in (("snapshot", "snapshot a VM"), ("clone", "clone a VM")):
        p = leaf(sub, verb, text)
        p.add_argument("target", metavar="VM")
        p.add_argument("name", metavar="NAME")
    leaf(sub, "revert", "revert a VM to one of its snapshots").add_argument("target", metavar="SNAPSHOT")
    p = leaf(sub, "install", "a new VM from a template (as xe vm-install)")
    p.add_argument("template", metavar="TEMPLATE")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--sr", help="the SR of its disks (default: the pool's default SR)")
    p = leaf(sub, "console", "attach to a running VM's text console (Ctrl-] leaves), or --vnc: its graphical one")
    p.add_argument("target", metavar="VM")
    p.add_argument("--vnc", type=_port, nargs="?", const=5900, default=None, metavar="PORT",
                   help="relay the graphical (rfb) console to 127.0.0.1:PORT for a VNC viewer (default 5900)")
    p.add_argument("--wait", type=_seconds, default=1.0, metavar="SECONDS",
                   help="stdin not a terminal: leave once it ended and the console was quiet this long")
    p = leaf(sub, "set", "set fields: KEY=VALUE, MAP:KEY=VALUE (empty VALUE removes the key)")
    p.add_argument("target", metavar="VM")
    p.add_argument("assignments", metavar="KEY=VALUE", nargs="+")


def _add_tools(verbs: Any) -> None:
    """The verbs that are no object class: top, events, call, completion."""
    p = leaf(verbs, "top", "a live view of the host and its running VMs")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    p.add_argument("--window", type=float, default=30.0, help="the averaging window in seconds (default 30)")
    p.add_argument("--sort", choices=("cpu", "mem", "disk", "net", "name"), default="cpu")
    p = leaf(verbs, "events", "stream event.from")
    p.add_argument("--class", dest="classes", action="append", metavar="CLASS", help="(repeatable; default *)")
    p.add_argument("--all", action="store_true", help="begin with every current object")
    p.add_argument("--count", type=int, default=0, help="stop after N events")
    p = leaf(verbs, "call", "a raw call: METHOD, then arguments as JSON (bare words are strings, @session is the session)")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("args", metavar="ARG", nargs="*")
    p.add_argument("--no-session", action="store_true", help="do not pass the session as the first argument")
    p = verbs.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=("bash", "zsh"))


def opt(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


class _Opts:
    def __init__(self, args: argparse.Namespace):
        self.url = opt(args, "url")
        self.user = opt(args, "user")
        self.password_file = opt(args, "password_file")
        self.profile = opt(args, "profile")
        self.fingerprint = opt(args, "fingerprint")


def main(argv: list[str], stdin: Any, stdout: Any, stderr: Any, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    try:
        args = build_parser(stdout, stderr).parse_args(argv)
    except _Stop as stop:
        return stop.code
    if args.noun == "completion":
        from xapid.client.completion import script

        stdout.write(script(args.shell))
        return 0
    client = None
    try:
        target = resolve_target(_Opts(args), environ)
        client = connect(target, stdin, stderr)
        ctx = commands.Ctx(client, stdout, stderr, bool(opt(args, "json")), bool(opt(args, "quiet")))
        if args.noun == "vm" and opt(args, "verb") == "console":
            from xapid.client.console import vm_console

            return vm_console(ctx, args, target, stdin)
        return dispatch(ctx, args)
    except ClientError as exc:
        stderr.write(f"xapid: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        stderr.write("xapid: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if client is not None:
            try:
                client.fork().logout() if client.session else None
            except (Exception, KeyboardInterrupt):  # noqa: BLE001, S110 - leaving anyway
                pass


def dispatch(ctx: commands.Ctx, args: argparse.Namespace) -> int:
    noun, verb = args.noun, opt(args, "verb")
    if noun == "top":
        from xapid.client.top import run_top

        return run_top(ctx, args)
    if noun == "events":
        return commands.cmd_events(ctx, args)
    if noun == "call":
        return commands.cmd_call(ctx, args)
    if verb == "list":
        return commands.cmd_list(ctx, noun, args)
    if verb == "show":
        return commands.cmd_show(ctx, noun, args)
    if noun == "task" and verb == "cancel":
        return commands.task_cancel(ctx, args)
    if verb in ("start", "shutdown", "reboot", "suspend", "resume"):
        return commands.vm_power(ctx, args)
    if verb == "destroy":
        return commands.vm_destroy(ctx, args)
    if verb in ("snapshot", "clone", "revert"):
        return commands.vm_copying(ctx, args)
    if verb == "install":
        return commands.vm_install(ctx, args)
    if verb == "set":
        return commands.vm_set(ctx, args)
    raise ClientError(f"unknown verb {noun} {verb}", 2)
