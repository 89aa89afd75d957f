"""Config parsing: the shipped file, validation naming section and key, flag overrides."""

from __future__ import annotations

import configparser
import re
from dataclasses import fields
from pathlib import Path

import pytest

from xapid.config import Config, ConfigError, Rule, load_config, override, parse_config, rule_of

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "xapid.conf"


def test_shipped_file_documents_every_key_with_its_default():
    """etc/xapid.conf lists every key, and its values are the built-in defaults."""
    config = load_config(str(SHIPPED))
    defaults = Config()
    for section in ("server", "api", "limits", "sim", "security"):
        assert getattr(config, section) == getattr(defaults, section)
        for key in vars(getattr(defaults, section)):
            assert re.search(rf"\n{key} =( |\n)", SHIPPED.read_text()), f"{key} not documented"


@pytest.mark.parametrize("text, message", [
    ("[server]\nbogus = 1\n", "[server] unknown key 'bogus'"),
    ("[nope]\n", "unknown section [nope]"),
    ("[server]\nthreads = many\n", "[server] threads: expected a whole number"),
    ("[api]\nsession_idle_timeout = -5\n", "[api] session_idle_timeout: must be greater than 0"),
    ("[server]\nbackend = kvm\n", "[server] backend: unknown backend 'kvm'"),
    ("[server]\nlisten =\n", "[server] listen: needs at least one value"),
    ("threads = 3\n", "x.conf: File contains no section headers."),
])
def test_errors_name_section_and_key(text, message):
    """Every problem is one line naming the file, section and key."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.conf")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_multiple_listen_lines():
    """listen takes one endpoint per line."""
    config = parse_config("[server]\nlisten = tcp:1\n  unix:/tmp/s\n", "x.conf")
    assert config.server.listen == ("tcp:1", "unix:/tmp/s")


def test_flags_override_file(tmp_path):
    """--listen, --backend, --state-dir and --users replace the file's values."""
    path = tmp_path / "c.conf"
    path.write_text("[server]\nstate_dir = /a\n")
    config = override(load_config(str(path)), listen=["tcp:1", "tcp:2"], state_dir="/b", backend="sim")
    assert config.server.listen == ("tcp:1", "tcp:2") and config.server.state_dir == "/b"
    with pytest.raises(ConfigError, match="--backend"):
        override(config, backend="qemu")


def test_unreadable_file(tmp_path):
    """A missing config file is one clear line."""
    with pytest.raises(ConfigError, match="cannot read config file .*: No such file or directory"):
        load_config(str(tmp_path / "missing.conf"))


# -- rules declared on the fields -------------------------------------------------------------------

SECTIONS = [f for f in fields(Config) if f.name != "source"]
KEYS = [(section.name, key) for section in SECTIONS for key in fields(getattr(Config(), section.name))]


@pytest.mark.parametrize("section, key", KEYS, ids=[f"{s}.{k.name}" for s, k in KEYS])
def test_every_key_declares_a_rule_fitting_its_type(section, key):
    """Each key carries its rule on its field, and the rule is meant for the field's type, so a new
    key cannot go unvalidated by accident (a plain key says so with Text, Number, Lines or Flag)."""
    rule = key.metadata.get("rule")
    assert isinstance(rule, Rule), f"[{section}] {key.name} declares no rule: use key(default, rule)"
    assert type(key.default) in rule.types, f"[{section}] {key.name}: {type(rule).__name__} is not for {key.type}"
    assert rule_of(key) is rule
    # the default itself passes its own rule
    assert rule.problem(key.default, str(key.default)) is None


def test_shipped_file_documents_every_key_of_every_section():
    """etc/xapid.conf has every key of every section, in that section, set to the built-in default."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SHIPPED.read_text(), source=str(SHIPPED))
    assert sorted(parser.sections()) == sorted(section.name for section in SECTIONS)
    for section, key in KEYS:
        assert parser.has_option(section, key.name), f"[{section}] {key.name} is not in etc/xapid.conf"
    assert load_config(str(SHIPPED)) == Config(source=str(SHIPPED))


def test_readme_config_table_lists_every_section_and_key():
    """README.md's config table has a row per section naming each of its keys."""
    readme = (SHIPPED.parent.parent / "README.md").read_text()
    for section in SECTIONS:
        rows = [line for line in readme.splitlines() if line.startswith(f"| `[{section.name}]` |")]
        assert len(rows) == 1, f"README config table: no row (or several) for [{section.name}]"
        for key in fields(getattr(Config(), section.name)):
            assert f"`{key.name}`" in rows[0], f"README config table: [{section.name}] {key.name} missing"


@pytest.mark.parametrize("text, message", [
    ("[stats]\nperiod = 0.5\n", "[stats] period: must be at least 1 (seconds), got '0.5'"),
    ("[api]\nauth_failure_delay = -1\n", "[api] auth_failure_delay: must not be negative, got '-1'"),
    ("[xen]\nautoballoon = maybe\n", "[xen] autoballoon: expected one of auto, on, off, got 'maybe'"),
    ("[storage]\ndisk_format = vmdk\n", "[storage] disk_format: unknown format 'vmdk' (expected one of: raw, qcow2)"),
    ("[server]\nlog_level = loud\n",
     "[server] log_level: unknown level 'loud' (expected one of: debug, info, warn, error)"),
    ("[server]\nlog_file = x.log\n", "[server] log_file: 'x.log' is not an absolute path"),
    ("[security]\nplugin_dir =\n", "[security] plugin_dir: must not be empty"),
    ("[security]\nplugin_dir = plugins\n", "[security] plugin_dir: 'plugins' is not an absolute path"),
    ("[security]\nbootloaders = pygrub\n  bin/pygrub\n",
     "[security] bootloaders: 'bin/pygrub' is not an absolute path (or a program name)"),
    ("[storage]\nroots = /srv\n  srv\n", "[storage] roots: 'srv' is not an absolute path"),
    ("[server]\ncors_origins = https://a.example/path\n",
     "[server] cors_origins: 'https://a.example/path' is not an origin (scheme://host[:port], or *)"),
    ("[server]\nstate_dir =\n", "[server] state_dir: must not be empty"),
    ("[limits]\nmax_depth = 0\n", "[limits] max_depth: must be greater than 0, got '0'"),
    ("[stats]\nsave_interval = soon\n", "[stats] save_interval: expected a number, got 'soon'"),
    ("[server]\nmax_clients = 5\nmax_anonymous_clients = 6\n",
     "[server] max_anonymous_clients: must not exceed max_clients (5)"),
    ("[sim]\ncpus = 1\ndom0_vcpus = 9\n", "[sim] dom0_vcpus: at most 8 per physical CPU"),
])
def test_each_rule_words_its_error(text, message):
    """Each kind of rule refuses with its own one-line message naming file, section and key."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.conf")
    assert str(info.value) == f"x.conf: {message}"


def test_empty_values_where_a_rule_allows_them():
    """Keys whose rule allows it may be empty (lists: no line); others keep their checks."""
    config = parse_config("[server]\nlog_file =\ncors_origins =\n[storage]\nlocal_sr =\nroots =\n"
                          "[security]\nbootloaders =\nkernel_dirs =\n[sim]\nhostname =\n"
                          "[stats]\nperiod = 1\nprometheus_listen =\n[xen]\nlog_dir =\n", "x.conf")
    assert config.server.log_file == "" and config.server.cors_origins == ()
    assert config.security.bootloaders == () and config.security.kernel_dirs == ()
    assert config.sim.hostname == "" and config.stats.period == 1.0 and config.xen.log_dir == ""
    config = parse_config("[security]\nbootloaders = pygrub\n  /usr/bin/pygrub\n"
                          "[server]\ncors_origins = *\n  http://h:8080\n", "x.conf")
    assert config.security.bootloaders == ("pygrub", "/usr/bin/pygrub")
    assert config.server.cors_origins == ("*", "http://h:8080")


def test_flags_are_checked_by_the_same_rules():
    """--backend, --state-dir and --users go through their keys' rules, naming the flag."""
    with pytest.raises(ConfigError) as info:
        override(Config(), backend="qemu")
    assert str(info.value) == "--backend: [server] backend: unknown backend 'qemu' (expected one of: sim, xen, auto)"
    with pytest.raises(ConfigError) as info:
        override(Config(), state_dir="  ")
    assert str(info.value) == "--state-dir: [server] state_dir: must not be empty"
    assert override(Config(), users=" /u ").server.users == "/u"
