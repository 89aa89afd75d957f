"""The metrics path at scale: the sim's precomputed counters, the GC policy, the cached /metrics text."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from prometheus_client import generate_latest
from support import ApiEnv, resolve
from test_sim_driver import make_spec
from test_stats import running_vm, tick
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from xapid.backend.interface import DiskSpec, NicSpec
from xapid.backend.sim import SimBackend
from xapid.gcpolicy import GcPolicy
from xapid.stats import prometheus
from xapid.stats.http import HttpExports

# -- the sim's read_counters: precomputed per domain, the same values --------------------------


def _reference(sim: SimBackend) -> tuple[set[Any], set[Any], set[Any]]:
    """What read_counters reported before the frames: each domain's info and devices computed anew."""
    now = sim._clock()
    state = sim._state
    assert state is not None
    domains, disks, nics = set(), set(), set()
    for dom in state.domains.values():
        domains.add(dom.info(now, sim._cpus))
        d, n = dom.device_counters(now)
        disks.update(d)
        nics.update(n)
    return domains, disks, nics


def _check(sim: SimBackend) -> None:
    counters = sim.read_counters()
    assert (set(counters.domains), set(counters.disks), set(counters.nics)) == _reference(sim)


def test_sim_counters_follow_every_change_of_a_domain(tmp_path, clock):
    """Every change of a domain (load, I/O rate at the same instant, devices, vCPUs, memory, pause,
    guest shutdown, destroy) shows in the next read_counters exactly as recomputing it would."""
    sim = SimBackend(tmp_path, clock.seconds)
    sim.open()
    try:
        a = sim.create_domain(make_spec(), False)
        b = sim.create_domain(make_spec(disks=(), nics=()), False)
        steps = [
            lambda: sim.set_load(a.uuid, 0.7),
            lambda: sim.set_io(a.uuid, disk_read=1000.0),  # same instant as the load change: only the rate moves
            lambda: sim.attach_disk(a.uuid, DiskSpec(device="xvdb", path="/dev/vg/b", mode="w")),
            lambda: sim.detach_disk(a.uuid, "xvda"),
            lambda: sim.attach_disk(a.uuid, DiskSpec(device="xvda", path="/dev/vg/a", mode="w")),
            lambda: sim.attach_nic(a.uuid, NicSpec(devid=1, mac="00:16:3e:00:00:02", bridge="xenbr0")),
            lambda: sim.set_vcpus(a.uuid, 1),
            lambda: sim.set_memory_target(a.uuid, 256 << 20),
            lambda: sim.pause_domain(b.uuid),
            lambda: sim.unpause_domain(b.uuid),
            lambda: sim.guest_shutdown(b.uuid, "crash"),
            lambda: sim.destroy_domain(b.uuid),
        ]
        _check(sim)
        for step in steps:
            clock.advance(3.7)
            _check(sim)
            step()
            _check(sim)
        clock.advance(5)
        _check(sim)
        assert set(sim._frames) == {d.uuid for d in sim.list_domains()}  # gone domains leave no frame
    finally:
        sim.close()


# -- the GC policy -----------------------------------------------------------------------------


class _Ticking:
    """A sampler stand-in: its after_tick hooks, run as Sampler._safe_tick runs them."""

    def __init__(self) -> None:
        self.after_tick: list[Any] = []

    def tick(self) -> None:
        for hook in list(self.after_tick):
            hook()


@pytest.fixture
def policy():
    clock = Clock()
    made: list[GcPolicy] = []

    def make(**kwargs: Any) -> tuple[GcPolicy, _Ticking, Clock]:
        p = GcPolicy(clock, **kwargs)
        made.append(p)
        return p, _Ticking(), clock
    yield make
    for p in made:
        p.uninstall()
    gc.unfreeze()


def test_gc_policy_freezes_the_graph_at_install_and_unfreezes_at_uninstall(policy):
    p, sampler, _ = policy()
    assert gc.get_freeze_count() == 0
    p.install(sampler)
    assert p.installed and gc.get_freeze_count() > 1000  # the interpreter's own graph at least
    assert len(sampler.after_tick) == 1
    p.uninstall()
    assert not p.installed and gc.get_freeze_count() == 0 and sampler.after_tick == []


def test_gc_policy_collects_between_ticks_never_inside(policy):
    """Every refreeze_every-th tick schedules one collection on the reactor, run after the tick
    returned; objects surviving it are frozen; every full_every-th tick unfreezes first."""
    p, sampler, clock = policy(refreeze_every=3, full_every=6)
    p.install(sampler)
    assert (p.collections, p.full_collections) == (1, 1)  # the one at install
    sampler.tick()
    sampler.tick()
    clock.advance(0)
    assert p.collections == 1  # not yet
    survivor = [[] for _ in range(100)]  # tracked objects allocated after the install
    before = gc.get_freeze_count()
    sampler.tick()
    assert p.collections == 1  # scheduled, not run inside the tick
    clock.advance(0)
    assert (p.collections, p.full_collections) == (2, 1)
    assert gc.get_freeze_count() >= before + len(survivor)
    for _ in range(3):
        sampler.tick()
    clock.advance(0)
    assert (p.collections, p.full_collections) == (3, 2)


def test_gc_policy_reclaims_frozen_cycles_at_the_full_collection(policy):
    """A reference cycle frozen while alive is garbage that only the full (unfrozen) collection frees."""
    import weakref

    class Node:
        pass

    p, sampler, clock = policy(refreeze_every=1, full_every=4)
    p.install(sampler)
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    sampler.tick()
    clock.advance(0)  # a young collection: the cycle is alive, so frozen
    del a, b
    for _ in range(2):
        sampler.tick()
        clock.advance(0)
    assert gone() is not None  # frozen: the young collections do not see it
    sampler.tick()
    clock.advance(0)
    assert gone() is None


def test_sampler_runs_after_tick_hooks_after_a_good_tick_only(env: ApiEnv, admin):
    calls: list[int] = []
    sampler = env.api.stats
    sampler.after_tick.append(lambda: calls.append(sampler.ticks))
    running_vm(admin, env)
    env.clock.advance(5)
    resolve(Deferred.fromCoroutine(sampler._safe_tick()), env.clock)
    assert calls == [1]
    real = env.api.hypervisor.driver.read_counters
    env.api.hypervisor.driver.read_counters = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
    env.clock.advance(5)
    resolve(Deferred.fromCoroutine(sampler._safe_tick()), env.clock)
    assert calls == [1] and sampler.failures == 1
    env.api.hypervisor.driver.read_counters = real


# -- /metrics: rendered without prometheus_client objects, cached per tick --------------------


def _collector(env: ApiEnv) -> prometheus.MetricsCollector:
    registry = HttpExports(env.api).registry
    assert isinstance(registry, prometheus.MetricsRegistry)
    return registry.collector


def test_exposition_bytes_are_generate_latest_bytes(env: ApiEnv, admin):
    """The rendered text equals prometheus_client's, names needing escapes and unknown values included."""
    running_vm(admin, env, 0.5, name='a "quoted" \\ name\nwith a newline, é')
    running_vm(admin, env, 0.25, name="plain")
    collector = _collector(env)
    assert collector.render() == generate_latest(prometheus.MetricsRegistry(collector))
    tick(env)  # first tick: DERIVE and cpu_usage unknown (left out)
    assert collector.render() == generate_latest(prometheus.MetricsRegistry(collector))
    for _ in range(3):
        tick(env)
    body = collector.render()
    assert body == generate_latest(prometheus.MetricsRegistry(collector))
    assert b'vm="a \\"quoted\\" \\\\ name\\nwith a newline, \xc3\xa9"' in body
    assert b"e+" in body  # host memory in bytes: Go's exponent form


def test_exposition_cache_is_invalidated_by_each_tick_and_by_names_and_states(env: ApiEnv, admin):
    vm, _ = running_vm(admin, env, 0.5)
    collector = _collector(env)
    tick(env)
    tick(env)
    first = collector.render()
    assert collector.render() is first and collector.renders == 1  # same tick: the cached bytes
    env.api.hypervisor.driver.set_load(admin("VM.get_uuid", vm), 0.25)
    tick(env)
    tick(env)
    second = collector.render()
    assert collector.renders == 2 and second != first and b"0.25" in second
    admin("VM.set_name_label", vm, "renamed")
    third = collector.render()
    assert collector.renders == 3 and b'vm="renamed"' in third
    admin("VM.pause", vm)
    fourth = collector.render()
    assert collector.renders == 4 and b'xapid_vms{power_state="Paused"} 1.0' in fourth
    assert fourth == generate_latest(prometheus.MetricsRegistry(collector))
