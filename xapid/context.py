"""What a handler reaches: :class:`Api`, the services built once by the composition root
(:mod:`xapid.server`), and :class:`CallContext`, one call's view of them (the caller's session,
the message, the task of an ``Async.*`` call, the caller's connection).

Work the daemon does on its own (first-start inventory, the domain watch, auto power-on) runs
handlers through :meth:`CallContext.internal`: no session, no task, no connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.task import deferLater

from xapid.apitypes import utc

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from xapid.audit import AuditLog
    from xapid.backend.proxy import Hypervisor
    from xapid.backend.specs import BootPolicy
    from xapid.config import StorageConfig
    from xapid.events import EventHub
    from xapid.auth.login import PasswordChecker
    from xapid.auth.rbac import Rbac
    from xapid.runner import Runner
    from xapid.schema import MessageSpec, Schema
    from xapid.sessions import Session, SessionManager
    from xapid.stats.sampler import Sampler
    from xapid.store import Database, Store
    from xapid.tasks import TaskManager
    from xapid.auth.users import UsersFile
    from xapid.apitypes import Limits


@dataclass
class Api:
    """The services a handler reaches through ``ctx.api``."""

    schema: Schema
    store: Store
    sessions: SessionManager
    hypervisor: Hypervisor
    users: UsersFile
    runner: Runner  # blocking work that is not a driver call
    reactor: Any  # IReactorTime (seconds(), callLater()); tests pass a Clock
    state_dir: Path
    database: Database
    auth_failure_delay: float = 2.0
    shutdown_timeout: float = 60.0
    host_ref: str = "OpaqueRef:NULL"
    pool_ref: str = "OpaqueRef:NULL"
    storage: StorageConfig | None = None
    public_url: str = "http://127.0.0.1"  # where this daemon is reached (consoles' location)
    tasks: TaskManager = None  # type: ignore[assignment]  # set by build_api before any call
    events: EventHub = None  # type: ignore[assignment]  # set by build_api before any call
    stats: Sampler = None  # type: ignore[assignment]  # set by build_api before any call
    passwords: PasswordChecker = None  # type: ignore[assignment]  # every password check (RPC login, HTTP Basic); set by build_api
    boot: BootPolicy | None = None  # bootloaders and kernel dirs a VM may name
    limits: Limits | None = None  # request bounds, and value bounds apitypes.coerce applies
    audit: AuditLog | None = None  # write calls, logins and failed logins
    plugin_dir: str = "/etc/xapi.d/plugins"  # [security] plugin_dir: host.call_plugin (xapid/objects/plugin.py)
    max_messages: int = 10_000  # [limits] max_messages (xapid/objects/messages.py)
    max_blob_bytes: int = 4 << 20  # [limits] max_blob_bytes (PUT /blob)
    rbac: Rbac = None  # type: ignore[assignment]  # the role objects' table, generated from the schema; set at inventory

    @property
    def disk_format(self) -> str:
        """Format of new disks in file SRs: raw or qcow2."""
        return self.storage.disk_format if self.storage else "raw"

    def console_url(self, console_uuid: str) -> str:
        return f"{self.public_url}/console?uuid={console_uuid}"

    @property
    def clock(self) -> Callable[[], float]:
        return self.reactor.seconds  # type: ignore[no-any-return]  # the reactor is untyped (IReactorTime)

    def sleep(self, seconds: float) -> Deferred[None]:
        """A Deferred firing after *seconds* on the injected reactor."""
        return deferLater(self.reactor, seconds, lambda: None)


class CallContext:
    """What a handler sees: the services, the caller's session and the call itself."""

    __slots__ = ("api", "session", "message", "task", "client")

    def __init__(self, api: Api, session: Session | None, message: MessageSpec | None, task: str | None = None,
                 client: Any = None):
        self.api = api
        self.session = session
        self.message = message
        self.task = task
        self.client = client  # the caller's connection (xapid.wire.http.Client) or None inside the daemon

    @classmethod
    def internal(cls, api: Api, message: str | None = None) -> CallContext:
        """A context for work the daemon does on its own: no session, task or connection;
        *message* names the message whose handler it runs, when one is."""
        return cls(api, None, api.schema.messages[message] if message else None)

    @property
    def store(self) -> Store:
        return self.api.store

    def now(self) -> datetime:
        """The injected clock's time, UTC, in whole seconds (as xapi's datetimes)."""
        return utc(self.api.clock())

    def check_cancelled(self) -> None:
        """At a safe point of an operation: TASK_CANCELLED when this call's task was asked to stop."""
        self.api.tasks.check_cancelled(self.task)

    def progress(self, fraction: float) -> None:
        """Record this call's progress (0 to 1) on its task, when it runs as one."""
        self.api.tasks.progress(self.task, fraction)
