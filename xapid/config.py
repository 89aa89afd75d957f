"""Configuration: an INI file (``etc/xapid.conf`` documents every key) read into frozen sections.

Every key is validated before any service starts; a problem raises :class:`ConfigError`
naming the file, the section and the key.  Unknown sections and keys are errors too.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/xapid/xapid.conf")


class ConfigError(Exception):
    """One line saying what is wrong and where."""


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("tcp:9363:interface=127.0.0.1:backlog=1024",)
    backend: str = "sim"
    state_dir: str = "/var/lib/xapid"
    users: str = "/etc/xapid/users"
    threads: int = 10
    log_level: str = "info"
    log_file: str = ""  # empty: stderr (the journal under systemd)
    log_file_bytes: int = 10 << 20
    idle_timeout: float = 600.0
    header_timeout: float = 30.0
    body_timeout: float = 120.0
    max_clients: int = 5000
    max_anonymous_clients: int = 256
    cors_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class ApiConfig:
    session_idle_timeout: float = 86400.0
    max_sessions_per_user: int = 500
    auth_failure_delay: float = 2.0
    shutdown_timeout: float = 60.0
    task_ttl: float = 3600.0
    event_history: int = 10_000
    event_queue_size: int = 1_000


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 8 << 20
    max_depth: int = 64
    max_elements: int = 1_000_000
    max_header_bytes: int = 64 << 10
    pending_input_bytes: int = 1 << 20
    login_threads: int = 2
    login_failures_burst: int = 10
    login_failure_interval: float = 6.0
    login_queue_per_source: int = 64
    max_string_bytes: int = 1 << 20
    max_collection_items: int = 10_000
    audit_log_bytes: int = 10 << 20
    max_pending_tasks_per_session: int = 100
    max_pending_tasks_per_user: int = 1000
    max_blob_bytes: int = 4 << 20  # data of one blob (PUT /blob)
    max_messages: int = 10_000  # messages kept (xapi's message_limit); the oldest go first
    max_transfers: int = 8  # disk/VM transfers (export/import over HTTP) at once, all users
    max_transfers_per_user: int = 2  # of them by one user
    console_idle_timeout: float = 1800.0  # a console relay without a byte either way is closed
    max_consoles: int = 64  # console sessions (/console) at once, in total
    max_consoles_per_vm: int = 4  # of them on one VM


@dataclass(frozen=True)
class StorageConfig:
    local_sr: str = ""
    iso_library: str = ""
    disk_format: str = "raw"
    roots: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecurityConfig:
    bootloaders: tuple[str, ...] = ("pygrub",)
    kernel_dirs: tuple[str, ...] = ("/var/lib/xcp/guest",)
    plugin_dir: str = "/etc/xapi.d/plugins"  # host.call_plugin runs root-owned files directly in it


@dataclass(frozen=True)
class SimConfig:
    cpus: int = 4
    memory_mib: int = 16384
    dom0_memory_mib: int = 1024
    dom0_vcpus: int = 4
    hostname: str = "xapid-sim"


@dataclass(frozen=True)
class StatsConfig:
    period: float = 5.0
    save_interval: float = 3600.0
    prometheus_listen: str = ""


@dataclass(frozen=True)
class XenConfig:
    autoballoon: str = "auto"
    xenstored_timeout: float = 60.0
    log_dir: str = ""
    log_max_bytes: int = 10 << 20


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    xen: XenConfig = field(default_factory=XenConfig)
    source: str = "<defaults>"


BACKENDS = ("sim", "xen", "auto")
LOG_LEVELS = ("debug", "info", "warn", "error")
DISK_FORMATS = ("raw", "qcow2")
_PATH_LISTS = {"roots", "bootloaders", "kernel_dirs"}  # may be empty; absolute paths (bootloaders: or names)
AUTOBALLOON = ("auto", "on", "off")
_POSITIVE = {"xenstored_timeout", "log_max_bytes", "log_file_bytes", "audit_log_bytes", "max_pending_tasks_per_session", "max_pending_tasks_per_user", "max_blob_bytes", "max_messages", "max_transfers", "max_transfers_per_user", "console_idle_timeout", "max_consoles", "max_consoles_per_vm",
             "threads", "session_idle_timeout", "max_sessions_per_user", "shutdown_timeout", "task_ttl", "event_history", "event_queue_size", "max_body_bytes",
             "max_depth", "max_elements", "cpus",
             "idle_timeout", "header_timeout", "body_timeout", "max_clients", "max_anonymous_clients",
             "max_header_bytes", "pending_input_bytes", "login_threads", "login_failures_burst",
             "login_failure_interval", "login_queue_per_source", "max_string_bytes", "max_collection_items", "memory_mib", "dom0_memory_mib", "dom0_vcpus", "save_interval"}


def _convert(section: str, key: str, text: str, default: Any, where: str) -> Any:
    problem = f"{where}: [{section}] {key}"
    if isinstance(default, tuple):
        items = tuple(part for line in text.splitlines() for part in [line.strip()] if part)
        if key == "cors_origins":
            for item in items:
                if item != "*" and not (item.startswith(("http://", "https://")) and "/" not in item.split("://", 1)[1]):
                    raise ConfigError(f"{problem}: {item!r} is not an origin (scheme://host[:port], or *)")
            return items
        if key in _PATH_LISTS:
            for item in items:
                if not item.startswith("/") and not (key == "bootloaders" and "/" not in item):
                    raise ConfigError(f"{problem}: {item!r} is not an absolute path"
                                      + (" (or a program name)" if key == "bootloaders" else ""))
            return items
        if not items:
            raise ConfigError(f"{problem}: needs at least one value")
        return items
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise ConfigError(f"{problem}: expected true or false, got {text!r}")
        return text.lower() in ("true", "yes", "1")
    if isinstance(default, int):
        try:
            value: Any = int(text)
        except ValueError:
            raise ConfigError(f"{problem}: expected a whole number, got {text!r}") from None
    elif isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{problem}: expected a number, got {text!r}") from None
    else:
        value = text.strip()
        if not value and key not in ("hostname", "local_sr", "iso_library", "prometheus_listen", "log_dir", "log_file"):
            raise ConfigError(f"{problem}: must not be empty")
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"{problem}: must be greater than 0, got {text!r}")
    if key == "period" and section == "stats" and value < 1:
        raise ConfigError(f"{problem}: must be at least 1 (seconds), got {text!r}")
    if key in ("auth_failure_delay",) and value < 0:
        raise ConfigError(f"{problem}: must not be negative, got {text!r}")
    if key == "backend" and value not in BACKENDS:
        raise ConfigError(f"{problem}: unknown backend {value!r} (expected one of: {', '.join(BACKENDS)})")
    if key == "autoballoon" and value not in AUTOBALLOON:
        raise ConfigError(f"{problem}: expected one of {', '.join(AUTOBALLOON)}, got {value!r}")
    if key == "plugin_dir" and not value.startswith("/"):
        raise ConfigError(f"{problem}: {value!r} is not an absolute path")
    if key in ("log_dir", "log_file") and value and not value.startswith("/"):
        raise ConfigError(f"{problem}: {value!r} is not an absolute path")
    if key == "disk_format" and value not in DISK_FORMATS:
        raise ConfigError(f"{problem}: unknown format {value!r} (expected one of: {', '.join(DISK_FORMATS)})")
    if key == "log_level" and value not in LOG_LEVELS:
        raise ConfigError(f"{problem}: unknown level {value!r} (expected one of: {', '.join(LOG_LEVELS)})")
    return value


def parse_config(text: str, where: str) -> Config:
    """Parse INI *text* (from *where*, for messages) into a validated Config."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=where)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: {first}") from None
    config = Config(source=where)
    sections = {f.name: f for f in fields(Config) if f.name != "source"}
    for name in parser.sections():
        if name not in sections:
            raise ConfigError(f"{where}: unknown section [{name}] (expected one of: {', '.join(sections)})")
        current = getattr(config, name)
        known = {f.name: getattr(current, f.name) for f in fields(current)}
        changes = {}
        for key, text_value in parser.items(name):
            if key not in known:
                raise ConfigError(f"{where}: [{name}] unknown key {key!r} (expected one of: {', '.join(known)})")
            changes[key] = _convert(name, key, text_value, known[key], where)
        config = replace(config, **{name: replace(current, **changes)})
    if config.server.max_anonymous_clients > config.server.max_clients:
        raise ConfigError(f"{where}: [server] max_anonymous_clients: must not exceed max_clients "
                          f"({config.server.max_clients})")
    if config.sim.dom0_vcpus > config.sim.cpus * 8:
        raise ConfigError(f"{where}: [sim] dom0_vcpus: at most 8 per physical CPU")
    return config


def load_config(path: str | None) -> Config:
    """The config from *path*; without one, /etc/xapid/xapid.conf when present, else defaults."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return Config()
        path = str(DEFAULT_CONFIG)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    return parse_config(text, path)


def override(config: Config, *, listen: list[str] | None = None, backend: str | None = None,
             state_dir: str | None = None, users: str | None = None) -> Config:
    """Apply command-line flags (validated like config values)."""
    changes: dict[str, Any] = {}
    if listen:
        changes["listen"] = tuple(listen)
    if backend is not None:
        changes["backend"] = _convert("server", "backend", backend, "", "--backend")
    if state_dir is not None:
        changes["state_dir"] = _convert("server", "state_dir", state_dir, "", "--state-dir")
    if users is not None:
        changes["users"] = _convert("server", "users", users, "", "--users")
    return replace(config, server=replace(config.server, **changes)) if changes else config
