"""Config parsing: the shipped file, validation naming section and key, flag overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xapid.config import Config, ConfigError, load_config, override, parse_config

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
