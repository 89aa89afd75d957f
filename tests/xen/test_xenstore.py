"""libxenstore bindings against a real C xenstored (run by the fake_xen.c shim)."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredQueue

from xapid.backend.xen.libs import XenError
from xapid.backend.xen.watches import WatchReader
from xapid.backend.xen.xenstore import XS_PERM_NONE, XS_PERM_READ, XenStore

TIMEOUT = 5.0


def unique(prefix: str = "/test") -> str:
    """A fresh path, so tests sharing the session daemon never collide."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def test_read_write_mkdir_rm_directory(store: XenStore) -> None:
    """Values round-trip; directory lists children; rm removes a subtree; missing paths give ENOENT."""
    base = unique()
    store.write(f"{base}/a", "1")
    store.write(f"{base}/b", b"\x00bin")
    store.mkdir(f"{base}/c")
    assert store.read(f"{base}/a") == b"1"
    assert store.read(f"{base}/b") == b"\x00bin"
    assert store.read(f"{base}/c") == b""
    assert sorted(store.directory(base)) == ["a", "b", "c"]
    store.rm(base)
    with pytest.raises(XenError) as caught:
        store.read(f"{base}/a")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(XenError) as caught:
        store.directory(base)
    assert caught.value.errno == errno.ENOENT


def test_permissions_round_trip(store: XenStore) -> None:
    """set_permissions then get_permissions returns the same (domid, perms) pairs."""
    path = unique()
    store.write(path, "x")
    store.set_permissions(path, [(1, XS_PERM_NONE), (0, XS_PERM_READ)])
    assert store.get_permissions(path) == [(1, XS_PERM_NONE), (0, XS_PERM_READ)]


def test_transaction_isolation_commit_and_abort(store: XenStore) -> None:
    """A transaction's write is invisible outside until commit, and discarded by abort."""
    path = unique()
    t = store.transaction_start()
    store.write(path, "v", t)
    assert store.read(path, t) == b"v"
    with pytest.raises(XenError):
        store.read(path)
    assert store.transaction_end(t)
    assert store.read(path) == b"v"
    t = store.transaction_start()
    store.write(path, "discarded", t)
    assert store.transaction_end(t, abort=True)
    assert store.read(path) == b"v"


def test_transact_retries_on_conflict(store: XenStore, xenstored: Path) -> None:
    """A commit that conflicts with another connection's write (EAGAIN) is rerun and then succeeds."""
    path = unique()
    store.write(path, "0")
    other = XenStore()
    attempts: list[int] = []

    def increment(t: int) -> int:
        value = int(store.read(path, t)) + 1
        if not attempts:
            other.write(path, "10")  # a concurrent change: this first attempt must conflict
        attempts.append(value)
        store.write(path, str(value), t)
        return value

    try:
        assert store.transact(increment) == 11
    finally:
        other.close()
    assert attempts == [1, 11]
    assert store.read(path) == b"11"


def test_transact_aborts_when_body_raises(store: XenStore) -> None:
    """An exception in the body aborts the transaction and propagates."""
    path = unique()

    def fail(t: int) -> None:
        store.write(path, "x", t)
        raise ValueError("boom")

    with pytest.raises(ValueError):
        store.transact(fail)
    with pytest.raises(XenError):
        store.read(path)


def test_domain_path_and_introduce_release(store: XenStore) -> None:
    """get_domain_path names /local/domain/N; introduce and release toggle is_domain_introduced."""
    assert store.get_domain_path(7) == "/local/domain/7"
    assert not store.is_domain_introduced(3)
    store.introduce_domain(3, 0x1234, 5)
    assert store.is_domain_introduced(3)
    store.release_domain(3)
    assert not store.is_domain_introduced(3)


def test_closed_handle_raises_ebadf(store: XenStore) -> None:
    """After close every call raises EBADF instead of reaching the library with NULL."""
    store.close()
    store.close()
    with pytest.raises(XenError) as caught:
        store.read("/tool")
    assert caught.value.errno == errno.EBADF


def test_open_without_daemon_raises_enoent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """xs_open on a missing socket raises XenError(ENOENT), not a crash."""
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "no-socket"))
    with pytest.raises(XenError) as caught:
        XenStore()
    assert caught.value.errno == errno.ENOENT


@pytest_twisted.ensureDeferred
async def test_watch_events_arrive_through_reactor(store: XenStore) -> None:
    """A watch fires at registration and on a write below it, delivered by the reactor."""
    base = unique()
    events: DeferredQueue[tuple[str, str]] = DeferredQueue()
    reader = WatchReader(store, lambda path, token: events.put((path, token)))
    reader.start(reactor)
    try:
        store.watch(base, "tok")
        assert await events.get().addTimeout(TIMEOUT, reactor) == (base, "tok")
        store.write(f"{base}/key", "v")
        assert await events.get().addTimeout(TIMEOUT, reactor) == (f"{base}/key", "tok")
        store.unwatch(base, "tok")
    finally:
        reader.stop()


@pytest_twisted.ensureDeferred
async def test_release_domain_fires_special_watches(store: XenStore) -> None:
    """@introduceDomain and @releaseDomain watches fire when a domain is introduced and released."""
    events: DeferredQueue[tuple[str, str]] = DeferredQueue()
    reader = WatchReader(store, lambda path, token: events.put((path, token)))
    reader.start(reactor)
    try:
        store.watch("@introduceDomain", "intro")
        store.watch("@releaseDomain", "release")
        initial = {await events.get().addTimeout(TIMEOUT, reactor) for _ in range(2)}
        assert initial == {("@introduceDomain", "intro"), ("@releaseDomain", "release")}
        store.introduce_domain(4, 0x1234, 6)
        assert await events.get().addTimeout(TIMEOUT, reactor) == ("@introduceDomain", "intro")
        store.release_domain(4)
        assert await events.get().addTimeout(TIMEOUT, reactor) == ("@releaseDomain", "release")
    finally:
        reader.stop()
