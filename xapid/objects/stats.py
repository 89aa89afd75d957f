"""Data sources (xapi's ``get_data_sources`` family on VM and host) and xapid's cooked statistics
calls (``host.query_stats``, ``host.top_VMs``), served from the metrics engine (``ctx.api.stats``)."""

from __future__ import annotations

import weakref
from typing import Any

from xapid.apitypes import SharedValue
from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import called, message
from xapid.stats.rrd import CFS, STEP

MIN_WINDOW = float(STEP)


def _owner(ctx: CallContext, ref: str) -> str:
    """The metrics owner of *ref*, of the class whose message this call serves (VM or host)."""
    cls = called(ctx).cls
    return f"{cls.lower()}:{ctx.store.get(ref, cls).fields['uuid']}"


def _known(ctx: CallContext, owner: str, name: str) -> None:
    if not isinstance(name, str) or not ctx.api.stats.has(owner, name):
        raise XenAPIError("INVALID_VALUE", "data_source", str(name))


@message("VM.get_data_sources", "host.get_data_sources")
def get_data_sources(ctx: CallContext, obj: str) -> list[dict[str, Any]]:
    """Every data source of the VM or host (a VM's archived while it has a domain; kept across reboots)."""
    return ctx.api.stats.data_sources(_owner(ctx, obj))


@message("VM.query_data_source", "host.query_data_source")
def query_data_source(ctx: CallContext, obj: str, data_source: str) -> float:
    owner = _owner(ctx, obj)
    _known(ctx, owner, data_source)
    return ctx.api.stats.value(owner, data_source)


@message("VM.record_data_source", "host.record_data_source")
def record_data_source(ctx: CallContext, obj: str, data_source: str) -> str:
    _known(ctx, _owner(ctx, obj), data_source)  # every known source is archived already
    return ""


@message("VM.forget_data_source_archives", "host.forget_data_source_archives")
def forget_data_source_archives(ctx: CallContext, obj: str, data_source: str) -> str:
    owner = _owner(ctx, obj)
    _known(ctx, owner, data_source)
    ctx.api.stats.forget(owner, data_source)
    return ""


def _check_window_cf(window: float, cf: str) -> str:
    if not window >= MIN_WINDOW:  # also refuses NaN
        raise XenAPIError("INVALID_VALUE", "window", repr(window))
    if not isinstance(cf, str) or cf.upper() not in CFS:
        raise XenAPIError("INVALID_VALUE", "cf", str(cf))
    return cf.upper()


class _QueryCache:
    """Per metrics engine: the keys each list of patterns selects, and the answers of the
    current sample.  Selected keys stay valid while the table and its ``layout`` (bumped by the
    table itself whenever a source is added or forgotten, whoever does it) are the same; an
    answer while the table's ``last_update`` is the same too.  Both caches are small and bounded.
    """

    MAX = 16

    def __init__(self) -> None:
        self.keys: dict[tuple[str, ...], tuple[Any, list[tuple[str, str]]]] = {}
        self.replies: dict[tuple[Any, ...], SharedValue] = {}
        self.replies_at: tuple[Any, ...] = ()


_CACHES: "weakref.WeakKeyDictionary[Any, _QueryCache]" = weakref.WeakKeyDictionary()


def _cache_of(stats: Any) -> _QueryCache:
    cache = _CACHES.get(stats)
    if cache is None:
        cache = _CACHES[stats] = _QueryCache()
    return cache


def _select(stats: Any, cache: _QueryCache, sources: list[str]) -> list[tuple[str, str]]:
    """Every key the patterns select, each once, in first-match order (cached while the table's
    sources stay the same); INVALID_VALUE for a malformed pattern."""
    table = stats.table
    shape = (table, table.layout)
    pattern_key = tuple(sources) if all(type(p) is str for p in sources) else None
    cached = cache.keys.get(pattern_key) if pattern_key is not None else None
    if cached is not None and cached[0] == shape:
        return cached[1]
    keys: dict[tuple[str, str], None] = {}  # each key once, in first-match order
    for pattern in sources:
        try:
            keys.update(dict.fromkeys(stats.select(pattern)))
        except ValueError:
            raise XenAPIError("INVALID_VALUE", "sources", pattern) from None
    selected = list(keys)
    if pattern_key is not None:
        if len(cache.keys) >= cache.MAX:
            cache.keys.clear()
        cache.keys[pattern_key] = (shape, selected)
    return selected


@message("host.query_stats")
def query_stats(ctx: CallContext, host: str, sources: list[str], window: float, cf: str) -> Any:
    """The cooked call: every source matching the patterns, consolidated over the window.  The
    answer (a :class:`SharedValue`, the ``(string -> float) map``) is shared by identical
    calls until the next sample."""
    ctx.store.get(host, "host")
    cf = _check_window_cf(window, cf)
    stats = ctx.api.stats
    cache = _cache_of(stats)
    table = stats.table
    now = (table, table.last_update, table.layout)
    if cache.replies_at != now:
        cache.replies.clear()
        cache.replies_at = now
    reply_key = (tuple(sources), float(window), cf) if all(type(p) is str for p in sources) else None
    reply = cache.replies.get(reply_key) if reply_key is not None else None
    if reply is not None:
        return reply
    reply = SharedValue(stats.cooked(_select(stats, cache, sources), window, cf))
    if reply_key is not None:
        if len(cache.replies) >= cache.MAX:
            cache.replies.clear()
        cache.replies[reply_key] = reply
    return reply


@message("host.top_VMs")
def top_vms(ctx: CallContext, host: str, source: str, window: float, cf: str, n: int) -> dict[str, float]:
    """The *n* VMs with the largest consolidated value of *source* (matching sources of a VM summed)."""
    ctx.store.get(host, "host")
    cf = _check_window_cf(window, cf)
    if n < 0:
        raise XenAPIError("INVALID_VALUE", "n", str(n))
    if not source or ":" in source:
        raise XenAPIError("INVALID_VALUE", "source", source)
    per_vm: dict[str, float] = {}
    for key, value in ctx.api.stats.cooked(ctx.api.stats.select(f"vm:*:{source}"), window, cf).items():
        uuid = key.split(":")[1]
        per_vm[uuid] = per_vm.get(uuid, 0.0) + value
    ranked = sorted(per_vm.items(), key=lambda item: (-item[1], item[0]))[:n]
    return dict(ranked)
