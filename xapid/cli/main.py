"""The command line: ``xapid serve``, ``xapid user …``, ``xapid cert …``, ``xapid schema-doc``.

This is the only module that imports the global reactor.  Errors a user can cause print
one line ``xapid: …`` on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO, cast

from xapid import __version__
from xapid.client import VERBS

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads

    from xapid.config import Config
    from xapid.server import Daemon
    from xapid.systemd import Notifier

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from xapid.cli.cert import add_cert_subparsers
    from xapid.cli.ops import add_ops_subparsers
    from xapid.cli.user import add_user_subparsers

    parser = argparse.ArgumentParser(prog="xapid", description="Xen Management API daemon")
    parser.add_argument("--version", action="version", version=f"xapid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", help="INI config file (default /etc/xapid/xapid.conf if present)")
    serve.add_argument("--listen", action="append", metavar="ENDPOINT",
                       help="Twisted server endpoint string, e.g. tcp:9363:interface=127.0.0.1 (repeatable)")
    serve.add_argument("--backend", choices=("sim", "xen", "auto"),
                       help="hypervisor driver (auto: xen when a Xen hypervisor is present)")
    serve.add_argument("--state-dir", help="directory for the database and driver state")
    serve.add_argument("--users", help="users file")
    add_user_subparsers(sub)
    add_cert_subparsers(sub)
    add_ops_subparsers(sub)
    doc = sub.add_parser("schema-doc", help="print the served classes and messages as Markdown")
    doc.add_argument("--output", help="write to this file instead of stdout")
    return parser


def _fail(stderr: TextIO, message: str) -> int:
    stderr.write(f"xapid: {message}\n")
    stderr.flush()
    return EXIT_USAGE


def _configured(args: argparse.Namespace) -> Config:
    """The config file's settings with the command line's overrides (ConfigError when invalid)."""
    from xapid.config import load_config, override

    return override(load_config(args.config), listen=args.listen, backend=args.backend,
                    state_dir=args.state_dir, users=args.users)


def serve(args: argparse.Namespace, stderr: TextIO) -> int:
    from xapid.config import ConfigError

    try:
        config = _configured(args)
    except ConfigError as exc:
        return _fail(stderr, str(exc))

    from xapid import systemd

    # before Twisted's endpoints module is imported (it reads LISTEN_FDS then; xapid/systemd.py)
    systemd.prepare_listen_fds()
    notifier = systemd.take_environment()  # NOTIFY_SOCKET and WATCHDOG_*, removed for children

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from xapid.cli.logs import start_logging
    from xapid.server import Daemon, StartupError

    systemd.forget_listen_fds()
    try:
        start_logging(stderr, config.server.log_level, log_file=config.server.log_file,
                      log_file_bytes=config.server.log_file_bytes)
    except OSError as exc:
        return _fail(stderr, f"cannot open [server] log_file {config.server.log_file}: {exc.strerror or exc}")
    if config.server.log_file:
        stderr.write(f"xapid: logging to {config.server.log_file}\n")
        stderr.flush()
    os.umask(0o077)  # every file the daemon makes (database, images, audit log, keys) is private from its first byte
    daemon = Daemon(config, reactor)
    daemon.status = notifier.status
    notifier.healthy = lambda: not daemon.fatal_error
    serving = _Serving(args, daemon, notifier, reactor)
    try:
        daemon.check()
    except StartupError as exc:
        return _fail(stderr, str(exc))
    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(serving.run()))
    reactor.run()
    if serving.error is not None:
        return _fail(stderr, serving.error)
    if daemon.fatal_error:
        return _fail(stderr, daemon.fatal_error)
    return 0


class _Serving:
    """The daemon's start-up, SIGHUP reloads and stop in the reactor, each told to systemd."""

    def __init__(self, args: argparse.Namespace, daemon: Daemon, notifier: Notifier, reactor: Any) -> None:
        from twisted.logger import Logger

        self.args, self.daemon, self.notifier, self.reactor = args, daemon, notifier, reactor
        self.log = Logger(namespace="xapid.cli.main")
        self.error: str | None = None  # why start-up failed
        self.serving: str | None = None  # "serving on …" once started
        self.hup_pending = False  # a SIGHUP came during start-up

    def reload(self) -> None:
        """SIGHUP: re-read the config, apply what can change live, log what needs a restart."""
        from xapid.config import ConfigError

        self.notifier.notify(RELOADING=1, STATUS="reloading the configuration")
        try:
            new = _configured(self.args)
        except ConfigError as exc:
            self.log.error("reload: {error}; the running configuration is kept", error=str(exc))
        else:
            self.daemon.reload(new)
        self.notifier.notify(READY=1, STATUS=self.serving or "serving")

    async def stop(self) -> None:
        self.notifier.notify(STOPPING=1, STATUS="stopping")
        await self.daemon.stop()

    def on_hup(self) -> None:
        if self.serving is not None:
            self.reload()
        else:  # during start-up: applied once serving (SIGHUP's default action would kill us)
            self.hup_pending = True

    async def run(self) -> None:
        import signal

        from twisted.internet.defer import Deferred

        from xapid import systemd
        from xapid.server import StartupError

        reactor = self.reactor
        self.notifier.start_watchdog(reactor)
        systemd.install_block_hook(reactor)
        threads = cast("IReactorThreads", reactor)  # typed without it, but every reactor has threads
        signal.signal(signal.SIGHUP, lambda *_: threads.callFromThread(self.on_hup))
        try:
            addresses = await self.daemon.start()
        except Exception as exc:  # noqa: BLE001 - never a traceback to the user
            self.error = str(exc) if isinstance(exc, StartupError) else \
                f"unexpected error during start-up: {type(exc).__name__}: {exc}"
            self.notifier.notify(STATUS=f"start-up failed: {self.error}")
            await self.daemon.stop()
            reactor.stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(self.stop()))
        self.serving = f"serving on {', '.join(addresses)}"
        self.notifier.notify(READY=1, STATUS=self.serving)
        if self.hup_pending:
            self.reload()


#: the client's verbs (xapid/client/__init__.py imports nothing heavy: the client loads only in client.run)
CLIENT_VERBS = frozenset(VERBS)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in CLIENT_VERBS:  # the remote client (xapid/client): vm, top, call…
        from xapid import client

        return client.run(list(words), stdin, stdout, stderr)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args, stderr)
    if args.command == "user":
        from xapid.cli.user import run_user_command

        return run_user_command(args, stdin, stdout, stderr, isatty=stdin.isatty())
    if args.command == "cert":
        from xapid.cli.cert import run_cert_command

        return run_cert_command(args, stdout, stderr)
    if args.command in ("check-config", "db"):
        from xapid.cli.ops import check_config, run_db_command

        problem = check_config(args, stdout) if args.command == "check-config" else run_db_command(args, stdout)
        return _fail(stderr, problem) if problem else 0
    if args.command == "schema-doc":
        from xapid.schema import SchemaError, load_schema
        from xapid.cli.schemadoc import render

        try:
            text = render(load_schema())
        except SchemaError as exc:
            return _fail(stderr, f"schema error: {exc}")
        if args.output:
            try:
                with open(args.output, "w", encoding="utf-8") as out:
                    out.write(text)
            except OSError as exc:
                return _fail(stderr, f"cannot write {args.output}: {exc.strerror}")
        else:
            stdout.write(text)
        return 0
    return _fail(stderr, f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
