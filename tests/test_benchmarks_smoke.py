"""Every benchmark script runs end to end in its smoke mode and prints its figures.

Each ``benchmarks/*.py`` that has a ``main`` (but ``common.py``, and ``stdlib_server.py``, the
baseline server, which the scripts comparing against it start themselves) runs as a real
subprocess with ``--smoke`` (``--quick`` for ``scale.py``), in its own process group.  It must exit 0,
leave no process of that group running (every server and load process it started is stopped; the
group is killed afterwards anyway, so nothing outlives the test), and print at least one ratio, a
number directly followed by ``x`` or ``×`` (``1.59x``, ``7.2×``).  A new benchmark without a smoke
mode fails here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NOT_SCRIPTS = {"common.py", "stdlib_server.py"}  # shared code; the baseline server the scripts start
FLAGS = {"scale.py": ["--quick"]}  # scale.py's quick run is already a few seconds
RATIO = re.compile(r"\d[x×](?!\w)")
TIMEOUT = 120.0  # a smoke run takes 1-15 s; this is only the bound on a very busy machine


def scripts() -> list[str]:
    found = sorted(p.name for p in BENCHMARKS.glob("*.py")
                   if p.name not in NOT_SCRIPTS and re.search(r"^def main\(", p.read_text(), re.M))
    assert found, f"no benchmark scripts found in {BENCHMARKS}"
    return found


def group_members(pgid: int) -> list[str]:
    """The live (not zombie) processes of process group *pgid*: ``pid command`` each."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            state, _, group = text[text.rindex(")") + 2:].split()[:3]
            if int(group) == pgid and state != "Z":
                found.append(f"{stat.parent.name} {text[text.index('(') + 1:text.rindex(')')]}")
    return found


def run_script(name: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The script run to its end (or killed, with all it started, after TIMEOUT), and what of its process
    group was still running once it had exited."""
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / name), *FLAGS.get(name, ["--smoke"])],
                            cwd=BENCHMARKS.parent, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    left: list[str] = []
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
        left = group_members(proc.pid)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name} did not finish within {TIMEOUT:.0f} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever it started and left behind
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), left


@pytest.mark.parametrize("name", scripts())
def test_benchmark_runs_in_smoke_mode(name: str) -> None:
    flags = FLAGS.get(name, ["--smoke"])
    assert flags[0] in (BENCHMARKS / name).read_text(), f"{name} has no {flags[0]} mode for this test"
    done, left = run_script(name)
    assert done.returncode == 0, f"{name} exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n" \
                                 f"stderr:\n{done.stderr[-3000:]}"
    assert not left, f"{name} exited leaving processes it started running: {left}"
    assert done.stdout.startswith("machine: "), f"{name} does not describe the machine first:\n{done.stdout[:500]}"
    ratios = [line for line in done.stdout.splitlines() if RATIO.search(line)]
    assert ratios, f"{name} printed no ratio line (a number followed by x or ×):\n{done.stdout[-3000:]}"


def test_every_script_is_covered() -> None:
    """Only shared code is left out: each other module of benchmarks/ is either a script or used by one."""
    names = {p.name for p in BENCHMARKS.glob("*.py")}
    sources = "\n".join(p.read_text() for p in BENCHMARKS.glob("*.py"))
    for name in sorted(names - set(scripts())):
        module = name.removesuffix(".py")
        assert re.search(rf"\b(import {module}\b|from {module} import|{re.escape(name)})", sources), \
            f"benchmarks/{name} has no main and no benchmark uses it"


def test_a_stopped_benchmark_stops_what_it_started() -> None:
    """SIGTERM in the middle of a run (here event_watchers.py, its daemon up and watchers connecting): the
    script exits on its own within seconds, and nothing of its process group is left running."""
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "event_watchers.py"), "--smoke", "--no-peer"],
                            cwd=BENCHMARKS.parent, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "connecting" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert proc.returncode != 0
        assert not group_members(proc.pid), "processes left running after SIGTERM"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
