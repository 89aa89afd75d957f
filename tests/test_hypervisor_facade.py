"""The typed hypervisor facade (:mod:`xapid.backend.proxy`): one method per driver operation, with
the driver's own parameters, and the only way the API layer reaches a driver."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from zope.interface.interface import Method

from xapid.backend import interface
from xapid.backend.interface import (
    BackendError, BadDomainState, IBackend, InvalidSpec, NoSuchDomain, NotEnoughMemory, ShutdownTimeout,
)
from xapid.backend.proxy import Domain, Hypervisor
from xapid.errors import XenAPIError
from xapid.runner import InlineRunner

XAPID = Path(__file__).resolve().parent.parent / "xapid"
#: lifecycle operations of the daemon: called in the calling thread, not through the runner
SYNC = {"close", "watch_domains"}
#: context a caller may give besides the driver's own parameters (for the Xen-API error)
CONTEXT = {"vm"}


def operations() -> list[str]:
    return sorted(name for name in IBackend.names() if isinstance(IBackend.get(name), Method))


def driver_signatures() -> dict[str, tuple[list[tuple[str, str]], str]]:
    """IBackend's methods as written: [(parameter, annotation)], return annotation."""
    tree = ast.parse(Path(interface.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "IBackend")
    return {f.name: ([(a.arg, ast.unparse(a.annotation) if a.annotation else "") for a in f.args.args],
                     ast.unparse(f.returns) if f.returns else "")
            for f in cls.body if isinstance(f, ast.FunctionDef)}


def view_name(operation: str) -> str:
    """The :class:`Domain` method of a per-domain operation: ``pause_domain`` → ``pause``."""
    return operation.replace("domain_", "").replace("_domain", "")


def same(facade: list[tuple[str, str]], driver: list[tuple[str, str]]) -> bool:
    """Same names and annotations; the facade may narrow a parameter the interface leaves ``object``."""
    return [n for n, _ in facade] == [n for n, _ in driver] and all(
        f == d or d == "object" for (_, f), (_, d) in zip(facade, driver))


def params(fn: Any) -> tuple[list[tuple[str, str]], set[str]]:
    sig = inspect.signature(fn)
    positional = [(p.name, str(p.annotation)) for p in sig.parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    keyword = {p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    return positional, keyword


@pytest.mark.parametrize("operation", operations())
def test_every_driver_operation_has_a_typed_facade_method(operation: str) -> None:
    method = getattr(Hypervisor, operation, None)
    assert method is not None, f"Hypervisor has no method for the driver operation {operation}"
    expected, returns = driver_signatures()[operation]
    positional, keyword = params(method)
    assert same(positional, expected), operation
    assert keyword <= CONTEXT, operation
    assert inspect.signature(method).return_annotation == returns, operation
    assert inspect.iscoroutinefunction(method) == (operation not in SYNC), operation


def domain_operations() -> list[str]:
    return [op for op in operations() if driver_signatures()[op][0][:1] == [("uuid", "str")]]


@pytest.mark.parametrize("operation", domain_operations())
def test_every_domain_operation_is_on_the_domain_view(operation: str) -> None:
    method = getattr(Domain, view_name(operation), None)
    assert method is not None, f"Domain has no {view_name(operation)} for the driver operation {operation}"
    expected, returns = driver_signatures()[operation]
    positional, keyword = params(method)
    assert same(positional, expected[1:]) and not keyword, operation
    assert inspect.signature(method).return_annotation == returns, operation
    assert inspect.iscoroutinefunction(method), operation


SPEC = interface.DomainSpec(uuid="u", name="vm", domain_type="pv", memory_static_max=1 << 28,
                            memory_target=1 << 28, vcpus_max=1, vcpus_at_startup=1)


class Recorder:
    """A driver that records every call and answers with a token, or raises a prepared error."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.error: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        def operation(*args: Any) -> Any:
            self.calls.append((name, args))
            if self.error is not None:
                raise self.error
            return f"result of {name}"
        return operation


@pytest_twisted.ensureDeferred
async def test_each_method_calls_its_driver_operation_with_its_arguments() -> None:
    driver = Recorder()
    hv = Hypervisor(driver, InlineRunner())  # type: ignore[arg-type]
    signatures = driver_signatures()
    for operation in operations():
        args = tuple(f"{operation}:{name}" for name, _ in signatures[operation][0])
        result = getattr(hv, operation)(*args)
        result = await result if inspect.iscoroutine(result) else result
        assert driver.calls[-1] == (operation, args)
        assert result == (None if signatures[operation][1] == "None" else f"result of {operation}"), operation
        if signatures[operation][0][:1] == [("uuid", "str")]:
            view = getattr(hv.domain(args[0], vm="OpaqueRef:v"), view_name(operation))
            assert await view(*args[1:]) == result
            assert driver.calls[-1] == (operation, args)


@pytest_twisted.ensureDeferred
async def test_driver_errors_are_mapped_with_the_context_given_once() -> None:
    driver = Recorder()
    hv = Hypervisor(driver, InlineRunner())  # type: ignore[arg-type]
    domain = hv.domain("u", vm="OpaqueRef:v")
    cases: list[tuple[BaseException, Any, list[str]]] = [
        (ShutdownTimeout("slow guest"), lambda: domain.shutdown("poweroff", 7.5),
         ["VM_SHUTDOWN_TIMEOUT", "OpaqueRef:v", "7.5"]),
        (ShutdownTimeout("slow guest"), lambda: domain.suspend("/img", 3), ["VM_SHUTDOWN_TIMEOUT", "OpaqueRef:v", "3"]),
        (NotEnoughMemory("no room", "10", "5"), lambda: hv.create_domain(SPEC, False, vm="OpaqueRef:v"),
         ["HOST_NOT_ENOUGH_FREE_MEMORY", "10", "5"]),
        (InvalidSpec("too many vCPUs"), lambda: domain.set_vcpus(99),
         ["VALUE_NOT_SUPPORTED", "set_vcpus", "OpaqueRef:v", "too many vCPUs"]),
        (BadDomainState("not running"), domain.pause, ["OPERATION_NOT_ALLOWED", "pause_domain: not running"]),
        (NoSuchDomain("gone"), domain.info, ["OPERATION_NOT_ALLOWED", "domain_info: gone"]),
        (BackendError("disk on fire"), lambda: domain.attach_disk(interface.DiskSpec("xvdb", "/d", "w")),
         ["INTERNAL_ERROR", "attach_disk: disk on fire"]),
    ]
    for error, call, expected in cases:
        driver.error = error
        with pytest.raises(XenAPIError) as caught:
            await call()
        assert [caught.value.code, *caught.value.params] == expected


@pytest_twisted.ensureDeferred
async def test_unexpected_failure_is_an_internal_error_and_xenapi_errors_pass() -> None:
    driver = Recorder()
    hv = Hypervisor(driver, InlineRunner())  # type: ignore[arg-type]
    driver.error = OSError(9, "Bad file descriptor")
    with pytest.raises(XenAPIError) as caught:
        await hv.free_memory()
    assert caught.value.code == "INTERNAL_ERROR" and "incident" in caught.value.params[0]
    assert "Bad file descriptor" not in caught.value.params[0]
    driver.error = XenAPIError("VM_BAD_POWER_STATE", "x")
    with pytest.raises(XenAPIError) as caught:
        await hv.list_domains()
    assert caught.value.code == "VM_BAD_POWER_STATE"


@pytest_twisted.ensureDeferred
async def test_find_domain_is_none_only_for_a_missing_domain() -> None:
    driver = Recorder()
    hv = Hypervisor(driver, InlineRunner())  # type: ignore[arg-type]
    assert await hv.find_domain("u") == "result of domain_info"
    driver.error = NoSuchDomain("gone")
    assert await hv.find_domain("u") is None
    driver.error = BackendError("xenstore unreadable")
    with pytest.raises(XenAPIError, match="INTERNAL_ERROR"):
        await hv.find_domain("u")


@pytest_twisted.ensureDeferred
async def test_lifecycle_errors_reach_the_daemon_unmapped() -> None:
    """open's HypervisorUnavailable becomes the daemon's one-line start-up error, not a Xen-API code."""
    driver = Recorder()
    hv = Hypervisor(driver, InlineRunner())  # type: ignore[arg-type]
    driver.error = interface.HypervisorUnavailable("no /dev/xen/privcmd")
    with pytest.raises(interface.HypervisorUnavailable):
        await hv.open()


def test_the_facade_is_the_only_way_to_a_driver() -> None:
    """Outside xapid/backend/ no code reads ``hypervisor.driver``, uses the untyped ``_call``, or runs a
    driver operation itself.  (server.py builds the driver and hands it to the facade; the metrics
    sampler reads counters through the facade too.)"""
    ops = "|".join(operations())
    forbidden = [
        re.compile(r"\b(hypervisor|hv)\.(driver|_call|call)\b"),
        re.compile(rf"runner\.run\(\s*[\w.]*\.({ops})\b"),
        re.compile(rf"getattr\([^)]*,\s*[\"']({ops})[\"']"),
    ]
    offenders = []
    for path in sorted(XAPID.rglob("*.py")):
        if path.is_relative_to(XAPID / "backend"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in forbidden):
                offenders.append(f"{path.relative_to(XAPID.parent)}:{number}: {line.strip()}")
    assert offenders == []
    assert not hasattr(Hypervisor, "call")
