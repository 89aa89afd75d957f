"""What the benchmarks share: the machine description and stopping a started process.

Scripts run as ``python benchmarks/<name>.py`` import it as ``common`` (their directory is on
``sys.path``).  ``run.py`` re-exports these names, so the benchmarks importing them from ``run``
keep working.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = HERE / "stdlib_server.py"  # the one stdlib baseline server (xend's architecture)


def machine() -> str:
    """One line naming the machine: CPUs (and model), Python, platform, open-file limit."""
    cpu = ""
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = f" ({found.group(1).strip()})" if found else ""
    return (f"machine: nproc {os.cpu_count()}{cpu}, {platform.python_implementation()} "
            f"{platform.python_version()}, {platform.platform()}, "
            f"fd limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")


def stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after *grace* seconds; a process already gone is left alone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
