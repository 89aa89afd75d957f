"""xapid as an installed package: the same smoke test (start anywhere, serve a login, stop cleanly on
SIGTERM) for each way an operator installs it: a wheel built from this tree and installed with pip into a
fresh venv (not editable), ``pipx install`` of the tree, and the editable install the test venv uses.

The dependencies come from the test venv (a .pth line in the fresh venvs; no network is needed), but
xapid itself is only the installed copy: the daemon runs outside the source tree and the test checks
where ``xapid`` was imported from.  This needs the schema as package data (``xapid/data/xenapi.xml``
and ``xenapi.rng``, read through importlib.resources).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import Any

from support import ROOT, make_users, serve_and_use


def _dependency_paths(python: Path) -> None:
    """Let the fresh venv of *python* import xapid's dependencies from the test venv (no network)."""
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if "site-packages" in p] or [sysconfig.get_paths()["purelib"]]
    (Path(purelib) / "_xapid_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))


def _where(python: Path, cwd: Path) -> tuple[str, str]:
    where = subprocess.run([str(python), "-c", "import xapid, xapid.schema as s; print(xapid.__file__); "
                            "print(s.DEFAULT_SCHEMA)"], capture_output=True, text=True, cwd=cwd)
    assert where.returncode == 0, where.stderr
    module, schema = where.stdout.split()
    return module, schema


def _serves_a_login(xapid: Path, tmp_path: Path) -> None:
    """Start the installed ``xapid serve`` outside the tree, log in with the SDK, stop it with SIGTERM."""
    assert xapid.exists()
    make_users(tmp_path / "users")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(XAPID_BCRYPT_ROUNDS="4", PYTHONUNBUFFERED="1")

    def use(api: Any) -> None:
        assert api.host.get_all()

    serve_and_use([str(xapid), "serve", "--state-dir", str(tmp_path / "state"), "--users", str(tmp_path / "users"),
                   "--listen", "tcp:0:interface=127.0.0.1"], tmp_path, env, use)


def test_wheel_installs_and_serves(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "-w", str(wheels), "--no-deps",
                            "--quiet", "--disable-pip-version-check"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("xapid-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _dependency_paths(python)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--quiet", "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    module, schema = _where(python, tmp_path)
    assert module.startswith(str(env_dir)) and schema.startswith(str(env_dir)), (module, schema)
    _serves_a_login(env_dir / "bin" / "xapid", tmp_path)
    shutil.rmtree(env_dir)


def test_pipx_install_serves(tmp_path):
    """``pipx install .``: its own venv under PIPX_HOME with the dependencies pip resolves from the package
    index (pipx checks their metadata, so they cannot come from the test venv), the ``xapid`` command
    linked into PIPX_BIN_DIR."""
    home, bin_dir = tmp_path / "pipx", tmp_path / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIPX_HOME=str(home), PIPX_BIN_DIR=str(bin_dir), PIPX_MAN_DIR=str(tmp_path / "man"),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([sys.executable, "-m", "pipx", "install", "--python", sys.executable,
                              str(ROOT)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    (python,) = (home / "venvs" / "xapid" / "bin").glob("python")
    module, schema = _where(python, tmp_path)
    assert module.startswith(str(home)) and schema.startswith(str(home)), (module, schema)
    _serves_a_login(bin_dir / "xapid", tmp_path)


def test_editable_install_serves(tmp_path):
    """The developer's install (``pip install -e .``, as scripts/test makes it): the tree's own modules."""
    python = Path(sys.executable)
    module, schema = _where(python, tmp_path)
    assert module.startswith(str(ROOT)) and schema.startswith(str(ROOT)), (module, schema)
    _serves_a_login(python.parent / "xapid", tmp_path)
