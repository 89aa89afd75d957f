"""The composition root: config → schema → store → driver → sessions → dispatcher → HTTP.

:class:`Daemon` builds every component from the config with explicit arguments; its
``start()`` opens the state dir, the driver and the database, reconciles the inventory and
only then listens.  Any start-up problem raises :class:`StartupError` with one line.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from xapid import autostart, statedir, tls

from xapid.objects import inventory
from xapid.apitypes import Limits
from xapid.context import Api
from xapid.audit import AUDIT_FILE, AuditLog
from xapid.backend.interface import BackendError, IBackend
from xapid.backend.proxy import Hypervisor
from xapid.backend.specs import BootPolicy
from xapid.config import Config
from xapid.dispatch import Dispatcher
from xapid.errors import XenAPIError
from xapid.events import EventHub
from xapid.stats.http import HttpExports
from xapid.console.relay import ConsoleLimits
from xapid.console.routes import ConsoleRoutes
from xapid.transfer.limits import TransferSlots
from xapid.transfer.raw_routes import RawVdiRoutes
from xapid.transfer.xva_routes import XvaRoutes
from xapid.auth.login import PasswordChecker
from xapid.objects import Hooks, collect_handlers, install as install_objects
from xapid.runner import Completions, InlineRunner, Runner, ThreadRunner
from xapid.schema import DEFAULT_SCHEMA, SchemaError, load_schema
from xapid.sessions import SessionManager
from xapid.stats.rrd import RRDTable
from xapid.gcpolicy import GcPolicy
from xapid.stats.sampler import RRD_FILE, Sampler
from xapid.backend.storage import have_qemu_img
from xapid.store import Committer, Database, Store
from xapid.tasks import TaskManager
from xapid.auth.users import UsersError, UsersFile
from xapid.wire.admission import Admission, descriptor_budget
from xapid.wire.http import HttpSettings
from xapid.wire.resource import ApiHandler, make_factory
from xapid.wire.xmlrpc import encode_value

log = Logger()

SWEEP_INTERVAL = 60.0


class StartupError(Exception):
    """Start-up failed; the message is the one line the user sees."""


def make_driver(config: Config, reactor: Any) -> IBackend:
    """The configured backend driver (not yet opened); ``auto`` is ``xen`` on a Xen host, else refused."""
    backend = config.server.backend
    if backend == "auto":
        from xapid.backend.xen.driver import hypervisor_present

        if not hypervisor_present():
            raise StartupError("--backend auto: no Xen hypervisor here (/dev/xen/privcmd not found); "
                               "run xapid in dom0 of a Xen host, or use --backend sim for the simulated host")
        backend = "xen"
    if backend == "sim":
        from xapid.backend.sim import SimBackend

        sim = config.sim
        return SimBackend(Path(config.server.state_dir) / "sim", reactor.seconds, cpus=sim.cpus,
                          memory=sim.memory_mib << 20, dom0_memory=sim.dom0_memory_mib << 20,
                          dom0_vcpus=sim.dom0_vcpus, hostname=sim.hostname)
    from xapid.backend.xen.driver import XenBackend

    state_dir = Path(config.server.state_dir)
    xen = config.xen
    return XenBackend(state_dir / "xen", reactor.seconds,
                      log_path=Path(xen.log_dir or state_dir / "log") / "libxl.log",
                      log_max_bytes=xen.log_max_bytes, autoballoon=xen.autoballoon,
                      xenstored_timeout=xen.xenstored_timeout)


def _prepare_state_dir(path: Path) -> None:
    """Make *path* (mode 0700, an existing one tightened) and check it is writable; what is in
    it loses any group and other permission bits (an older xapid left xapid.db 0644)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(f"state dir {path} is unusable: {exc.strerror or exc}") from None
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise StartupError(f"state dir {path} is open to other users and cannot be made mode 0700: "
                           f"{exc.strerror or exc}") from None
    _tighten(path)
    try:
        probe = path / ".xapid-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"state dir {path} is unusable: {exc.strerror or exc}") from None


def _tighten(root: Path) -> None:
    """Remove group and other permissions from everything under *root* (symlinks not followed)."""
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            item = os.path.join(top, name)
            try:
                mode = os.lstat(item).st_mode
                if mode & 0o077 and not stat.S_ISLNK(mode):
                    os.chmod(item, stat.S_IMODE(mode) & 0o700)
            except OSError as exc:
                log.warn("cannot make {item} private to xapid: {reason}", item=item, reason=exc.strerror or str(exc))


async def build_api(config: Config, reactor: Any, runner: Runner, db_runner: Runner,
                    schema_path: str | Path = DEFAULT_SCHEMA, driver: IBackend | None = None,
                    login_runner: Runner | None = None, on_fatal: Any = None, state_dir_ready: bool = False,
                    hooks: Hooks | None = None) -> Api:
    """Open the state dir, users file, database and driver; reconcile the inventory.

    *reactor* supplies the clock and timers; *runner* runs blocking driver and auth work,
    *db_runner* the database commits (one at a time).  *driver* (unopened) replaces the
    configured one (tests: the xen driver on a fake host).  Domains found shut down or
    crashed get their VM's actions, as if they had just stopped.  *login_runner* runs the
    password checks (the daemon: its own ``xapid-login`` pool; default: inline, for tests).
    *state_dir_ready*: the caller has run :func:`_prepare_state_dir` already (the daemon, before its lock).
    *hooks*: what the objects modules install (default: :func:`xapid.objects.install`).
    """
    hooks = hooks or install_objects()
    try:
        schema = load_schema(schema_path)
    except SchemaError as exc:
        raise StartupError(f"schema error: {exc}") from None
    state_dir = Path(config.server.state_dir)
    if not state_dir_ready:
        _prepare_state_dir(state_dir)
    try:
        users = UsersFile(config.server.users)
        users.load()
    except UsersError as exc:
        raise StartupError(str(exc)) from None
    db_path = state_dir / "xapid.db"
    try:
        statedir.check_format(state_dir, lambda line: log.warn("{line}", line=line))
    except statedir.StateDirError as exc:
        raise StartupError(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"state dir {state_dir}: migration failed, nothing changed: {exc}") from None
    try:
        database = Database(db_path)
        store = Store(schema, Committer(database, db_runner, clock=reactor))
        hooks.prepare(store)  # the objects' derivers (allowed_operations, ...), before load computes them
        store.load()
    except Exception as exc:  # noqa: BLE001 - sqlite reports many kinds of unusable file
        raise StartupError(f"database {db_path} is unusable: {exc}") from None
    driver = driver or make_driver(config, reactor)
    if on_fatal is not None and hasattr(driver, "on_fatal"):
        driver.on_fatal = on_fatal  # the xen driver's "xenstored lost for good": stop, exit non-zero
    boot = BootPolicy.build(config.security.bootloaders, config.security.kernel_dirs, str(state_dir))
    driver.boot_policy = boot  # every driver build checks host paths against the same policy
    hypervisor = Hypervisor(driver, runner)
    try:
        await hypervisor.open()
    except BackendError as exc:
        raise StartupError(exc.message) from None
    api = Api(
        schema=schema, store=store, hypervisor=hypervisor, users=users, runner=runner,
        reactor=reactor, state_dir=state_dir, database=database,
        sessions=SessionManager(store, reactor.seconds, config.api.session_idle_timeout,
                                config.api.max_sessions_per_user, users=users),
        auth_failure_delay=config.api.auth_failure_delay, shutdown_timeout=config.api.shutdown_timeout,
        storage=config.storage, boot=boot,
    )
    try:
        await inventory.initialise(api)
        await store.flush()
        await hooks.start(api)  # the objects' watchers on the driver (domains that shut down or crash, ...)
    except (XenAPIError, BackendError) as exc:
        raise StartupError(f"cannot read the host inventory from the {driver.name} driver: {exc}") from None
    api.tasks = TaskManager(store, reactor, lambda: api.host_ref, config.api.task_ttl,
                            max_pending_per_session=config.limits.max_pending_tasks_per_session,
                            max_pending_per_user=config.limits.max_pending_tasks_per_user,
                            encode_result=lambda value: encode_value(value).decode())  # xapi: the XML-RPC <value>
    api.events = EventHub(store, reactor, tombstones=config.api.event_history,
                          queue_size=config.api.event_queue_size)
    api.stats = _build_sampler(config, api, runner)
    api.audit = AuditLog(state_dir / AUDIT_FILE, config.limits.audit_log_bytes, clock=reactor.seconds)
    limits = config.limits
    api.passwords = PasswordChecker(users, reactor, login_runner or InlineRunner(), threads=limits.login_threads,
                                    burst=limits.login_failures_burst, interval=limits.login_failure_interval,
                                    queue_per_source=limits.login_queue_per_source)
    api.limits = Limits(limits.max_body_bytes, limits.max_depth, limits.max_elements,
                        max_string_bytes=limits.max_string_bytes, max_collection_items=limits.max_collection_items)
    api.plugin_dir, api.max_messages = config.security.plugin_dir, limits.max_messages
    api.max_blob_bytes = limits.max_blob_bytes
    autostart.schedule(api)  # VMs with other_config:auto_poweron (xapid/autostart.py)
    return api


def _build_sampler(config: Config, api: Api, runner: Runner) -> Sampler:
    """The metrics sampler, its archives restored from the state dir (not started: Daemon.start does)."""
    path = api.state_dir / RRD_FILE
    existed = path.exists()
    table, warning = RRDTable.load(path, now=api.reactor.seconds())
    if warning and existed:
        log.warn("{warning}", warning=warning)
    elif warning:
        log.info("{warning}", warning=warning)
    period = config.stats.period
    return Sampler(api.hypervisor, api.store, table, api.reactor, period, host_ref=lambda: api.host_ref,
                   save_path=path, runner=runner, save_every=max(1, round(config.stats.save_interval / period)))


def _endpoint(reactor: Any, description: str, key: str = "", *, state_dir: Path | None = None,
              make_certificate: bool = False) -> Any:
    """The server endpoint of *description*; StartupError naming it (and the config *key*).

    ``ssl:`` descriptions go to :mod:`xapid.tls` (hardened context; without privateKey the
    daemon's own certificate in *state_dir*, made first when *make_certificate*).
    """
    where = f"{key}: " if key else ""
    if description.split(":", 1)[0] in ("tls", "le", "lets"):  # Twisted's other TLS parsers, with its defaults
        raise StartupError(f"{where}bad listen address {description!r}: use ssl: for TLS (xapid sets up ssl: "
                           f"listeners itself: TLS 1.2+, ECDHE with AEAD suites, ALPN)")
    if tls.is_tls_description(description):
        try:
            return tls.server_endpoint(reactor, description, state_dir, make_certificate=make_certificate)
        except tls.TLSError as exc:
            raise StartupError(f"{where}bad listen address {description!r}: {exc}") from None
    try:
        return endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, ImportError) as exc:
        raise StartupError(f"{where}bad listen address {description!r}: {exc}") from None
    except OSError as exc:  # e.g. an ssl: key or certificate file that cannot be read
        raise StartupError(f"{where}bad listen address {description!r}: {exc.strerror or exc}: "
                           f"{getattr(exc, 'filename', '') or ''}".rstrip(": ")) from None


class Daemon(MultiService):
    """Every long-lived part of xapid, wired from one config."""

    def __init__(self, config: Config, reactor: Any, schema_path: str | Path = DEFAULT_SCHEMA):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.schema_path = schema_path
        self.ports: list[Any] = []
        self.api: Api | None = None
        self.dispatcher: Dispatcher | None = None
        self._pools: list[ThreadPool] = []
        self._completions: Completions | None = None  # the pools' results, polled by the reactor
        self._timers: list[LoopingCall] = []
        self.gc_policy: GcPolicy | None = None  # installed once started (xapid/gcpolicy.py)
        self.admission: Admission | None = None
        self.fatal_error = ""  # set when a component cannot go on: the daemon stops and exits non-zero
        self.status: Any = lambda text: None  # start-up and shutdown progress (the cli: sd_notify STATUS=)
        self._factories: list[Any] = []  # the HTTP factories, whose settings a reload replaces
        self._lock: statedir.StateLock | None = None
        self.stopping = False

    def fatal(self, line: str) -> None:
        """A component cannot go on (e.g. xenstored gone for good): remember *line*, stop the reactor."""
        if not self.fatal_error:
            self.fatal_error = line
            self.reactor.stop()

    def check(self) -> None:
        """Refuse what can be refused before touching anything: endpoints and backend."""
        state_dir = Path(self.config.server.state_dir)
        for description in self.config.server.listen:
            _endpoint(self.reactor, description, state_dir=state_dir)
        if self.config.stats.prometheus_listen:
            _endpoint(self.reactor, self.config.stats.prometheus_listen, "[stats] prometheus_listen",
                      state_dir=state_dir)
        make_driver(self.config, self.reactor)
        if self.config.storage.disk_format == "qcow2" and not have_qemu_img():
            raise StartupError("[storage] disk_format = qcow2 needs qemu-img, which is not installed")

    def _pool(self, name: str, size: int) -> ThreadPool:
        pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        pool.start()
        self._pools.append(pool)
        return pool

    async def start(self) -> list[str]:
        """Open everything and listen; returns the addresses listened on."""
        config, reactor = self.config, self.reactor
        state_dir = Path(config.server.state_dir)
        _prepare_state_dir(state_dir)
        lock = statedir.StateLock(state_dir)
        if not lock.acquire():
            raise StartupError(f"another xapid (pid {lock.holder() or '?'}) is running on state dir {state_dir}")
        self._lock = lock
        self.status("opening the state dir, the database and the driver; reconciling the inventory")
        done = self._completions = Completions(reactor)
        runner = ThreadRunner(reactor, self._pool("xapid-work", config.server.threads), done)
        db_runner = ThreadRunner(reactor, self._pool("xapid-db", 1), done)
        login_runner = ThreadRunner(reactor, self._pool("xapid-login", config.limits.login_threads), done)
        hooks = install_objects()
        self.api = await build_api(config, reactor, runner, db_runner, self.schema_path, login_runner=login_runner,
                                   on_fatal=self.fatal, state_dir_ready=True, hooks=hooks)
        self.dispatcher = Dispatcher(self.api, collect_handlers())
        limits = self.api.limits
        assert limits is not None  # built by build_api from [limits]
        exports = HttpExports(self.api)
        server = config.server
        budget = descriptor_budget(server.max_clients, server.max_anonymous_clients)
        log.info("open files: limit {soft} (was {before}); serving at most {clients} connections, "
                 "{anonymous} of them unauthenticated", soft=budget.soft, before=budget.soft_before,
                 clients=budget.max_clients, anonymous=budget.max_anonymous)
        self.admission = Admission(budget.max_clients, budget.max_anonymous, reactor)
        settings = HttpSettings(max_body=config.limits.max_body_bytes, max_header=config.limits.max_header_bytes,
                                pending_input=config.limits.pending_input_bytes, idle_timeout=server.idle_timeout,
                                header_timeout=server.header_timeout, body_timeout=server.body_timeout)
        lim = config.limits  # /console (xapid/console/routes.py)
        consoles = ConsoleRoutes(self.api, ConsoleLimits(lim.max_consoles, lim.max_consoles_per_vm,
                                                         lim.console_idle_timeout, lim.max_consoles_per_user),
                                 server.cors_origins)
        # one budget of concurrent transfers for /export_raw_vdi, /import_raw_vdi, /export, /import
        transfers = TransferSlots(lim.max_transfers, lim.max_transfers_per_user)
        raw_vdi = RawVdiRoutes(self.api, transfers)  # xapid/transfer/raw_routes.py
        xva_routes = XvaRoutes(self.api, transfers)  # /export, /export_metadata, /import (XVA)
        site = make_factory(ApiHandler(self.dispatcher, limits, {**exports.routes(), **consoles.get_routes(),
                                                                 **raw_vdi.routes(), **xva_routes.routes()},
                                       server.cors_origins, put_routes=exports.put_routes(),
                                       connect_routes=consoles.connect_routes(),
                                       stream_routes={**raw_vdi.stream_routes(), **xva_routes.stream_routes()}), settings,
                            reactor, self.admission)
        self._factories = [site]
        self.status("listening")
        addresses = []
        for description in config.server.listen:
            addresses.append(await self._listen(description, site))
        if config.stats.prometheus_listen:
            scrape = make_factory(ApiHandler(self.dispatcher, limits, exports.open_routes()),
                                  replace(settings, max_body=1 << 16), reactor, self.admission)
            self._factories.append(scrape)
            addresses.append(await self._listen(config.stats.prometheus_listen, scrape, "[stats] prometheus_listen"))
        self._publish_url(self.api)
        self.api.stats.start()
        self.gc_policy = GcPolicy(reactor)
        self.gc_policy.install(self.api.stats)  # the inventory loaded: its graph frozen
        for tick in hooks.periodic:  # the objects' periodic work (the guest agents' data)
            timer = LoopingCall(tick, self.api)
            timer.clock = reactor
            timer.start(config.stats.period, now=False)
            self._timers.append(timer)
        sweeper = LoopingCall(self._housekeeping)
        sweeper.clock = reactor
        sweeper.start(SWEEP_INTERVAL, now=False)
        self._timers.append(sweeper)
        return addresses

    async def _listen(self, description: str, site: Any, key: str = "") -> str:
        endpoint = _endpoint(self.reactor, description, key, state_dir=Path(self.config.server.state_dir),
                             make_certificate=True)
        try:
            port = await endpoint.listen(site)
        except CannotListenError as exc:
            reason = exc.socketError
            text = getattr(reason, "strerror", None) or str(reason)
            if getattr(reason, "errno", None) == errno.EADDRINUSE:
                text = "address already in use"
            raise StartupError(f"{key + ': ' if key else ''}cannot listen on {description}: {text}") from None
        except OSError as exc:
            raise StartupError(f"{key + ': ' if key else ''}cannot listen on {description}: {exc.strerror or exc}") from None
        self.ports.append(port)
        address = port.getHost()
        where = getattr(address, "name", None) or f"{address.host}:{address.port}"
        if isinstance(where, bytes):  # a UNIX socket's path
            where = os.fsdecode(where)
        if key:
            log.info("{key}: serving /metrics without authentication on {where} ({description})", key=key,
                     where=where, description=description)
        else:
            log.info("listening on {where} ({description})", where=where, description=description)
            warning = tls.cleartext_warning(description, address)
            if warning:
                log.warn("{warning}", warning=warning)
        return where

    def _publish_url(self, api: Api) -> None:
        """Tell the API where it is reached (console locations) from the first TCP listener."""
        for port in self.ports:
            address = port.getHost()
            if hasattr(address, "port"):
                host = api.store.get(api.host_ref).fields["address"] if address.host in ("0.0.0.0", "::") \
                    else address.host
                scheme = "https" if isinstance(getattr(port, "factory", None), TLSMemoryBIOFactory) else "http"
                api.public_url = f"{scheme}://{host}:{address.port}"
                break
        with api.store.transaction():
            for console in api.store.all("console"):
                api.store.update(console.ref, {"location": api.console_url(console.fields["uuid"])})

    def _housekeeping(self) -> None:
        """Expire idle sessions, forget old finished tasks and login sources with full buckets."""
        api = self.api
        if api is None:  # never: the timer starts once the API is built
            return
        try:
            api.sessions.sweep()
            api.tasks.collect_garbage()
            api.passwords.sweep()
        except Exception:  # noqa: BLE001 - one bad tick must not stop the timer
            log.failure("housekeeping failed")

    async def stop(self) -> None:
        """Stop listening, let running tasks finish (up to ``[api] shutdown_timeout``, then cancel
        them), make every write durable, close the driver and the database."""
        self.stopping = True
        if self.gc_policy is not None:
            self.gc_policy.uninstall()
        for timer in self._timers:
            if timer.running:
                timer.stop()
        for port in self.ports:
            await port.stopListening()
        self.ports = []
        if self.api is not None and self.api.tasks is not None:
            await self._drain(self.api.tasks, self.config.api.shutdown_timeout)
        if self.api is not None:
            if self.api.stats is not None:
                try:
                    await self.api.stats.stop()
                except Exception:  # noqa: BLE001
                    log.failure("saving the metrics archives failed")
            try:
                await self.api.store.flush()
            except Exception:  # noqa: BLE001
                log.failure("final commit failed")
            self.api.database.close()
            if self.api.audit is not None:
                self.api.audit.close()
        for pool in self._pools:  # joins the workers: no driver call is in flight after this
            pool.stop()
        self._pools = []
        if self._completions is not None:
            self._completions.close()
            self._completions = None
        if self.api is not None:
            try:
                self.api.hypervisor.close()
            except Exception:  # noqa: BLE001
                log.failure("closing the driver failed")
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _drain(self, tasks: TaskManager, timeout: float) -> None:
        """Wait up to *timeout* s for the running Async tasks, then cancel what is left (each ends
        ``cancelled`` with its writes so far committed, its operation's cleanup run)."""
        from twisted.internet.defer import DeferredList

        running = tasks.running()
        if not running:
            return
        log.info("stopping: waiting up to {timeout} s for {count} running task(s)", timeout=timeout,
                 count=len(running))
        self.status(f"stopping: waiting for {len(running)} running task(s)")
        done: Deferred[None] = Deferred()

        def finish(_: object = None) -> None:
            if not done.called:
                done.callback(None)

        DeferredList([d for _, d in running], consumeErrors=True).addBoth(finish)
        timer = self.reactor.callLater(timeout, finish)
        await done
        if timer.active():
            timer.cancel()
        left = tasks.running()
        if left:
            log.warn("stopping: cancelling {count} task(s) still running after {timeout} s: {tasks}",
                     count=len(left), timeout=timeout, tasks=", ".join(ref for ref, _ in left))
            for _, d in left:
                if not d.called:  # the operation still runs (else only its outcome is being committed)
                    d.cancel()
            await DeferredList([d for _, d in left], consumeErrors=True)

    #: keys a SIGHUP applies to the running daemon; any other change needs a restart
    LIVE_KEYS = frozenset({
        ("server", "log_level"), ("server", "idle_timeout"), ("server", "header_timeout"),
        ("server", "body_timeout"),
        *(("limits", key) for key in ("max_body_bytes", "max_depth", "max_elements", "max_header_bytes",
                                      "pending_input_bytes", "login_failures_burst", "login_failure_interval",
                                      "login_queue_per_source", "max_string_bytes", "max_collection_items",
                                      "audit_log_bytes", "max_pending_tasks_per_session",
                                      "max_pending_tasks_per_user", "max_blob_bytes", "max_messages")),
    })

    def reload(self, new: Config) -> list[str]:
        """Apply what *new* changes live (SIGHUP); returns the changed keys that need a restart."""
        from dataclasses import fields as dc_fields

        from xapid.cli.logs import set_log_level

        old = self.config
        changed: list[tuple[str, str]] = []
        restart: list[tuple[str, str]] = []
        for section in dc_fields(Config):
            if section.name == "source":
                continue
            before, after = getattr(old, section.name), getattr(new, section.name)
            for item in dc_fields(before):
                if getattr(before, item.name) != getattr(after, item.name):
                    key = (section.name, item.name)
                    (changed if key in self.LIVE_KEYS else restart).append(key)
        live = set(changed)
        server = replace(old.server, **{k: getattr(new.server, k) for s, k in live if s == "server"})
        applied = replace(old, server=server, limits=replace(old.limits, **{
            k: getattr(new.limits, k) for s, k in live if s == "limits"}))
        self.config = applied
        set_log_level(applied.server.log_level)
        api = self.api
        if api is not None:
            lim = applied.limits
            if api.limits is not None:
                api.limits.max_body, api.limits.max_depth = lim.max_body_bytes, lim.max_depth
                api.limits.max_elements, api.limits.max_string_bytes = lim.max_elements, lim.max_string_bytes
                api.limits.max_collection_items = lim.max_collection_items
            if api.passwords is not None:
                api.passwords.burst, api.passwords.interval = lim.login_failures_burst, lim.login_failure_interval
                api.passwords.queue_per_source = lim.login_queue_per_source
            if api.tasks is not None:
                api.tasks.max_pending_per_session = lim.max_pending_tasks_per_session
                api.tasks.max_pending_per_user = lim.max_pending_tasks_per_user
            if api.audit is not None:
                api.audit.max_bytes = lim.audit_log_bytes
            api.max_messages, api.max_blob_bytes = lim.max_messages, lim.max_blob_bytes
            try:
                if api.users.reload_if_changed():
                    log.info("reload: users file {path} re-read", path=applied.server.users)
            except UsersError as exc:
                log.warn("reload: users file not re-read: {error}", error=str(exc))
            srv = applied.server
            for index, factory in enumerate(self._factories):  # new connections get the new settings
                body = {"max_body": lim.max_body_bytes} if index == 0 else {}  # [1]: /metrics keeps 64 KiB
                factory.settings = replace(factory.settings, max_header=lim.max_header_bytes,
                                           pending_input=lim.pending_input_bytes, idle_timeout=srv.idle_timeout,
                                           header_timeout=srv.header_timeout, body_timeout=srv.body_timeout, **body)
        for section_name, key_name in sorted(changed):
            log.info("reload: [{section}] {key} = {value}", section=section_name, key=key_name,
                     value=getattr(getattr(applied, section_name), key_name))
        for section_name, key_name in sorted(set(restart)):
            log.warn("reload: [{section}] {key} changed in {source}; it takes effect at the next restart",
                     section=section_name, key=key_name, source=new.source)
        log.info("reload: done ({count} change(s) applied; TLS certificates are re-read by every new "
                 "connection when they change)", count=len(changed))
        return [f"[{s}] {k}" for s, k in sorted(set(restart))]

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self.stop())
