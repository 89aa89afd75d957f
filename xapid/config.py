"""Configuration: an INI file (``etc/xapid.conf`` documents every key) read into frozen sections.

Every key is validated before any service starts; a problem raises :class:`ConfigError`
naming the file, the section and the key.  Unknown sections and keys are errors too.
Each key declares its rule on its field (:func:`key`): the text is read as the field's type,
then the rule says what is wrong with the value, if anything.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

DEFAULT_CONFIG = Path("/etc/xapid/xapid.conf")

BACKENDS = ("sim", "xen", "auto")
LOG_LEVELS = ("debug", "info", "warn", "error")
DISK_FORMATS = ("raw", "qcow2")
AUTOBALLOON = ("auto", "on", "off")

_T = TypeVar("_T")


class ConfigError(Exception):
    """One line saying what is wrong and where."""


# -- rules ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """A key's check, for the field types in ``types``.  The plain rule: any value of the type.

    Before the check, a text is stripped and a list is one item per non-blank line; an empty
    text ("must not be empty") or list ("needs at least one value") is refused unless *empty_ok*.
    """

    empty_ok: bool = field(default=False, kw_only=True)
    types: ClassVar[tuple[type, ...]] = (str,)

    def problem(self, value: Any, text: str) -> str | None:
        """What is wrong with *value* (read from *text*), or None."""
        return None


@dataclass(frozen=True)
class Text(Rule):
    """A plain string (not empty unless *empty_ok*)."""


@dataclass(frozen=True)
class Flag(Rule):
    """true/false, yes/no or 1/0."""

    types = (bool,)


@dataclass(frozen=True)
class Number(Rule):
    """A plain number (whole for an ``int`` field)."""

    types = (int, float)


@dataclass(frozen=True)
class Positive(Number):
    """Greater than 0."""

    def problem(self, value: Any, text: str) -> str | None:
        return f"must be greater than 0, got {text!r}" if value <= 0 else None


@dataclass(frozen=True)
class NonNegative(Number):
    """0 or more."""

    def problem(self, value: Any, text: str) -> str | None:
        return f"must not be negative, got {text!r}" if value < 0 else None


@dataclass(frozen=True)
class AtLeast(Number):
    """At least *least* (*unit* names it in the message)."""

    least: float = 0
    unit: str = ""

    def problem(self, value: Any, text: str) -> str | None:
        unit = f" ({self.unit})" if self.unit else ""
        return f"must be at least {self.least}{unit}, got {text!r}" if value < self.least else None


@dataclass(frozen=True)
class OneOf(Rule):
    """One of *choices*; *noun* words the message ("unknown <noun> …") when given."""

    choices: tuple[str, ...] = ()
    noun: str = ""

    def problem(self, value: Any, text: str) -> str | None:
        if value in self.choices:
            return None
        if self.noun:
            return f"unknown {self.noun} {value!r} (expected one of: {', '.join(self.choices)})"
        return f"expected one of {', '.join(self.choices)}, got {value!r}"


@dataclass(frozen=True)
class AbsolutePath(Rule):
    """An absolute path (or empty, with *empty_ok*)."""

    def problem(self, value: Any, text: str) -> str | None:
        return f"{value!r} is not an absolute path" if value and not value.startswith("/") else None


@dataclass(frozen=True)
class Lines(Rule):
    """A plain list, one item per line (at least one unless *empty_ok*): e.g. endpoint strings."""

    types = (tuple,)

    def problem(self, value: Any, text: str) -> str | None:
        for item in value:
            reason = self.item_problem(item)
            if reason:
                return reason
        return None

    def item_problem(self, item: str) -> str | None:
        """What is wrong with one item, or None."""
        return None


@dataclass(frozen=True)
class PathList(Lines):
    """Absolute paths, maybe none; with *names_ok* also program names (no ``/``)."""

    empty_ok: bool = field(default=True, kw_only=True)
    names_ok: bool = False

    def item_problem(self, item: str) -> str | None:
        if item.startswith("/") or (self.names_ok and "/" not in item):
            return None
        return f"{item!r} is not an absolute path" + (" (or a program name)" if self.names_ok else "")


@dataclass(frozen=True)
class OriginList(Lines):
    """Web origins (``scheme://host[:port]`` over http or https, or ``*``), maybe none."""

    empty_ok: bool = field(default=True, kw_only=True)

    def item_problem(self, item: str) -> str | None:
        if item == "*" or (item.startswith(("http://", "https://")) and "/" not in item.split("://", 1)[1]):
            return None
        return f"{item!r} is not an origin (scheme://host[:port], or *)"


positive = Positive()
non_negative = NonNegative()
non_empty = Text()
may_be_empty = Text(empty_ok=True)
_PLAIN: dict[type, Rule] = {bool: Flag(), int: Number(), float: Number(), str: non_empty, tuple: Lines()}


def key(default: _T, rule: Rule) -> _T:
    """A config key's field: its default and its rule."""
    return field(default=default, metadata={"rule": rule})


def rule_of(f: Field[Any]) -> Rule:
    """The rule declared on field *f* (a field without one gets the plain rule of its type)."""
    rule = f.metadata.get("rule")
    return rule if isinstance(rule, Rule) else _PLAIN.get(type(f.default), non_empty)


# -- sections ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = key(("tcp:9363:interface=127.0.0.1:backlog=1024",), Lines())  # endpoint strings
    backend: str = key("sim", OneOf(BACKENDS, "backend"))
    state_dir: str = key("/var/lib/xapid", non_empty)
    users: str = key("/etc/xapid/users", non_empty)
    threads: int = key(10, positive)
    log_level: str = key("info", OneOf(LOG_LEVELS, "level"))
    log_file: str = key("", AbsolutePath(empty_ok=True))  # empty: stderr (the journal under systemd)
    log_file_bytes: int = key(10 << 20, positive)
    idle_timeout: float = key(600.0, positive)
    header_timeout: float = key(30.0, positive)
    body_timeout: float = key(120.0, positive)
    max_clients: int = key(5000, positive)
    max_anonymous_clients: int = key(256, positive)
    cors_origins: tuple[str, ...] = key((), OriginList())


@dataclass(frozen=True)
class ApiConfig:
    session_idle_timeout: float = key(86400.0, positive)
    max_sessions_per_user: int = key(500, positive)
    auth_failure_delay: float = key(2.0, non_negative)
    shutdown_timeout: float = key(60.0, positive)
    task_ttl: float = key(3600.0, positive)
    event_history: int = key(10_000, positive)
    event_queue_size: int = key(1_000, positive)


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = key(8 << 20, positive)
    max_depth: int = key(64, positive)
    max_elements: int = key(1_000_000, positive)
    max_header_bytes: int = key(64 << 10, positive)
    pending_input_bytes: int = key(1 << 20, positive)
    login_threads: int = key(2, positive)
    login_failures_burst: int = key(10, positive)
    login_failure_interval: float = key(6.0, positive)
    login_queue_per_source: int = key(64, positive)
    max_string_bytes: int = key(1 << 20, positive)
    max_collection_items: int = key(10_000, positive)
    audit_log_bytes: int = key(10 << 20, positive)
    max_pending_tasks_per_session: int = key(100, positive)
    max_pending_tasks_per_user: int = key(1000, positive)
    max_blob_bytes: int = key(4 << 20, positive)  # data of one blob (PUT /blob)
    max_messages: int = key(10_000, positive)  # messages kept (xapi's message_limit); the oldest go first
    max_transfers: int = key(8, positive)  # disk/VM transfers (export/import over HTTP) at once, all users
    max_transfers_per_user: int = key(2, positive)  # of them by one user
    console_idle_timeout: float = key(1800.0, positive)  # a console relay without a byte either way is closed
    max_consoles: int = key(64, positive)  # console sessions (/console) at once, in total
    max_consoles_per_vm: int = key(4, positive)  # of them on one VM
    max_consoles_per_user: int = key(16, positive)  # of them by one user (on any VMs)


@dataclass(frozen=True)
class StorageConfig:
    local_sr: str = key("", may_be_empty)
    iso_library: str = key("", may_be_empty)
    disk_format: str = key("raw", OneOf(DISK_FORMATS, "format"))
    roots: tuple[str, ...] = key((), PathList())


@dataclass(frozen=True)
class SecurityConfig:
    bootloaders: tuple[str, ...] = key(("pygrub",), PathList(names_ok=True))
    kernel_dirs: tuple[str, ...] = key(("/var/lib/xcp/guest",), PathList())
    # host.call_plugin runs root-owned files directly in it
    plugin_dir: str = key("/etc/xapi.d/plugins", AbsolutePath())


@dataclass(frozen=True)
class SimConfig:
    cpus: int = key(4, positive)
    memory_mib: int = key(16384, positive)
    dom0_memory_mib: int = key(1024, positive)
    dom0_vcpus: int = key(4, positive)  # at most 8 per cpu (checked in parse_config)
    hostname: str = key("xapid-sim", may_be_empty)


@dataclass(frozen=True)
class StatsConfig:
    period: float = key(5.0, AtLeast(1, "seconds"))
    save_interval: float = key(3600.0, positive)
    prometheus_listen: str = key("", may_be_empty)


@dataclass(frozen=True)
class XenConfig:
    autoballoon: str = key("auto", OneOf(AUTOBALLOON))
    xenstored_timeout: float = key(60.0, positive)
    log_dir: str = key("", AbsolutePath(empty_ok=True))
    log_max_bytes: int = key(10 << 20, positive)


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


def _read(section: str, f: Field[Any], text: str, where: str) -> Any:
    """*text* read as field *f*'s type and checked by its rule; else ConfigError."""
    problem = f"{where}: [{section}] {f.name}"
    rule = rule_of(f)
    kind: type = type(f.default)
    value: Any
    if kind is tuple:
        value = tuple(part for line in text.splitlines() for part in [line.strip()] if part)
        if not value and not rule.empty_ok:
            raise ConfigError(f"{problem}: needs at least one value")
    elif kind is bool:
        if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise ConfigError(f"{problem}: expected true or false, got {text!r}")
        value = text.lower() in ("true", "yes", "1")
    elif kind is int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{problem}: expected a whole number, got {text!r}") from None
    elif kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{problem}: expected a number, got {text!r}") from None
    else:
        value = text.strip()
        if not value and not rule.empty_ok:
            raise ConfigError(f"{problem}: must not be empty")
    reason = rule.problem(value, text)
    if reason:
        raise ConfigError(f"{problem}: {reason}")
    return value


def parse_config(text: str, where: str) -> Config:
    """Parse INI *text* (from *where*, for messages) into a validated Config."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case: configparser's documented override of a method
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
        known = {f.name: f for f in fields(current)}
        changes = {}
        for key_name, text_value in parser.items(name):
            if key_name not in known:
                raise ConfigError(f"{where}: [{name}] unknown key {key_name!r} (expected one of: {', '.join(known)})")
            changes[key_name] = _read(name, known[key_name], text_value, where)
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


_SERVER = {f.name: f for f in fields(ServerConfig)}


def override(config: Config, *, listen: list[str] | None = None, backend: str | None = None,
             state_dir: str | None = None, users: str | None = None) -> Config:
    """Apply command-line flags (validated like config values)."""
    changes: dict[str, Any] = {}
    if listen:
        changes["listen"] = tuple(listen)
    if backend is not None:
        changes["backend"] = _read("server", _SERVER["backend"], backend, "--backend")
    if state_dir is not None:
        changes["state_dir"] = _read("server", _SERVER["state_dir"], state_dir, "--state-dir")
    if users is not None:
        changes["users"] = _read("server", _SERVER["users"], users, "--users")
    # relative paths (flags or file) are taken from the directory xapid was started in, once: the daemon
    # hands its state dir to the SRs it makes, whose locations must be absolute
    for name in ("state_dir", "users"):
        path = changes.get(name, getattr(config.server, name))
        if not os.path.isabs(path):
            changes[name] = os.path.abspath(path)
    return replace(config, server=replace(config.server, **changes)) if changes else config
