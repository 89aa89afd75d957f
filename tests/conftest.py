"""Shared fixtures (helpers live in support.py, imported by name so no other conftest shadows them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from support import ApiEnv, LocalClient, RealDaemon
from xenfakes import fake_xen_so, xen_fakes, xenstored  # noqa: F401 - fixtures for the Xen tests


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def env(tmp_path: Path, clock: Clock) -> ApiEnv:
    return ApiEnv(tmp_path, clock)


@pytest.fixture
def admin(env: ApiEnv) -> LocalClient:
    return env.login("admin")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = RealDaemon(tmp_path_factory.mktemp("daemon"))
    yield d
    d.stop()
