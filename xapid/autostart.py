"""VM auto-power-on at daemon start, as xapi's ``xapi-autostart-vms`` script does it.

When the pool's ``other_config:auto_poweron`` is ``true``, every VM whose
``other_config:auto_poweron`` is ``true`` and that is Halted, not a template and not a
snapshot is started (best effort: a VM that cannot start is logged and skipped; the others
still start).  It runs once the inventory is reconciled, in the background, one VM after
another, through the same ``VM.start`` handler an API call uses.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xapid.errors import XenAPIError

log = Logger()


def candidates(api: Any) -> list[str]:
    store = api.store
    pool = store.find(api.pool_ref)
    if pool is None or pool.fields["other_config"].get("auto_poweron") != "true":
        return []
    return [vm.ref for vm in store.all("VM")
            if vm.fields["other_config"].get("auto_poweron") == "true" and vm.fields["power_state"] == "Halted"
            and not vm.fields["is_a_template"] and not vm.fields["is_a_snapshot"]
            and not vm.fields["is_control_domain"]]


async def run(api: Any) -> list[str]:
    """Start the auto-power-on VMs; returns the refs started."""
    from xapid.context import CallContext
    from xapid.objects.vm import start

    started = []
    for ref in candidates(api):
        if not api.store.exists(ref, "VM") or api.store.get(ref).fields["power_state"] != "Halted":
            continue
        name = api.store.get(ref).fields["name_label"]
        try:
            await start(CallContext.internal(api, "VM.start"), ref, False, False)
            await api.store.flush()
        except XenAPIError as error:
            log.warn("auto_poweron: VM {name!r} ({ref}) did not start: {error}", name=name, ref=ref,
                     error=" ".join(error.description))
            continue
        except Exception:  # noqa: BLE001 - one VM must not stop the others
            log.failure("auto_poweron: VM {name!r} ({ref}) did not start", name=name, ref=ref)
            continue
        log.info("auto_poweron: started VM {name!r} ({ref})", name=name, ref=ref)
        started.append(ref)
    return started


def schedule(api: Any) -> None:
    """Run :func:`run` as soon as the reactor turns (the daemon is serving by then)."""

    def go() -> None:
        Deferred.fromCoroutine(run(api)).addErrback(lambda f: log.failure("auto_poweron failed", f))

    api.reactor.callLater(0, go)
