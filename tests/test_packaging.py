"""xapid as an installed package: a wheel built from this tree, installed (not editable) into a fresh
venv, starts anywhere and serves a login.

The dependencies come from the test venv (a .pth line in the fresh venv; no network is needed), but
xapid itself is only the wheel's copy: the daemon runs outside the source tree and the test checks
where ``xapid`` was imported from.  This test needs the schema as package data
(``xapid/data/xenapi.xml`` and ``xenapi.rng``, read through importlib.resources).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import XenAPI

from support import PASSWORD, ROOT, make_users


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
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if "site-packages" in p] or [sysconfig.get_paths()["purelib"]]
    (Path(purelib) / "_xapid_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--quiet", "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    xapid = env_dir / "bin" / "xapid"
    assert xapid.exists()
    where = subprocess.run([str(python), "-c", "import xapid, xapid.schema as s; print(xapid.__file__); "
                            "print(s.DEFAULT_SCHEMA)"], capture_output=True, text=True, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, schema = where.stdout.split()
    assert module.startswith(str(env_dir)) and schema.startswith(str(env_dir)), where.stdout

    make_users(tmp_path / "users")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(XAPID_BCRYPT_ROUNDS="4", PYTHONUNBUFFERED="1")
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(xapid), "serve", "--state-dir", str(tmp_path / "state"), "--users",
                                 str(tmp_path / "users"), "--listen", "tcp:0:interface=127.0.0.1"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.findall(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        session = XenAPI.Session(f"http://127.0.0.1:{found[0]}/")
        session.xenapi.login_with_password("admin", PASSWORD)
        assert session.xenapi.host.get_all()
        session.xenapi.session.logout()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    shutil.rmtree(env_dir)
