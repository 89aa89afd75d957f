"""The services a handler reaches through ``ctx.api``, built once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from twisted.internet.task import deferLater

from xapid.backend.proxy import Hypervisor
from xapid.schema import Schema
from xapid.sessions import SessionManager
from xapid.store import Store


@dataclass
class Api:
    schema: Schema
    store: Store
    sessions: SessionManager
    hypervisor: Hypervisor
    users: Any  # xapid.users.UsersFile
    runner: Any  # xapid.runner.Runner for blocking work that is not a driver call
    reactor: Any  # IReactorTime: seconds() and callLater()
    state_dir: Path
    database: Any  # xapid.store.Database
    auth_failure_delay: float = 2.0
    shutdown_timeout: float = 60.0
    host_ref: str = "OpaqueRef:NULL"
    pool_ref: str = "OpaqueRef:NULL"
    storage: Any = None  # xapid.config.StorageConfig
    public_url: str = "http://127.0.0.1"  # where this daemon is reached (consoles' location)
    tasks: Any = None  # xapid.tasks.TaskManager
    events: Any = None  # xapid.events.EventHub
    stats: Any = None  # xapid.stats.sampler.Sampler
    passwords: Any = None  # xapid.login.PasswordChecker: every password check (RPC login, HTTP Basic)
    boot: Any = None  # xapid.backend.specs.BootPolicy: bootloaders and kernel dirs a VM may name
    limits: Any = None  # xapid.wire.values.Limits: request bounds, and value bounds apitypes.coerce applies
    audit: Any = None  # xapid.audit.AuditLog: write calls, logins and failed logins
    plugin_dir: str = "/etc/xapi.d/plugins"  # [security] plugin_dir: host.call_plugin (xapid/objects/plugin.py)
    max_messages: int = 10_000  # [limits] max_messages (xapid/objects/messages.py)
    max_blob_bytes: int = 4 << 20  # [limits] max_blob_bytes (PUT /blob)
    rbac: Any = None  # xapid.rbac.Rbac: the role objects' table, generated from the schema

    @property
    def disk_format(self) -> str:
        """Format of new disks in file SRs: raw or qcow2."""
        return self.storage.disk_format if self.storage else "raw"

    def console_url(self, console_uuid: str) -> str:
        return f"{self.public_url}/console?uuid={console_uuid}"

    @property
    def clock(self) -> Callable[[], float]:
        return self.reactor.seconds

    def sleep(self, seconds: float) -> Any:
        """A Deferred firing after *seconds* on the injected reactor."""
        return deferLater(self.reactor, seconds, lambda: None)
