"""The record encoder on its own: ``VM/VBD/VDI/VIF.get_all_records`` replies built in process, cold and
warm, against the stdlib's ``xmlrpc.client.dumps`` of the same records, in the same run.

    python benchmarks/records_bench.py [--vms 1000] [--repeat 9]

No socket and no HTTP: this isolates what ``benchmarks/run.py``'s figures c and d (which include the
transfer of 7-18 MB over loopback and the client's reading of it) cannot show reliably on a noisy
machine, where the cold figure is a single sample.  tests/support.py's ApiEnv (in-process API, fake
clock) creates *vms* VMs with 2 disks and 1 NIC each through the API.  For each class it then times,
as CPU time (``time.process_time``), the best of *repeat*:

- **cold**: every object's cached encoding dropped (what a write does), then the whole reply built,
  as the first ``get_all_records`` after changes is; the shared fragments of other records stay;
- **first ever**: the same with the shared fragments and shape templates emptied too (a fresh daemon);
- **warm**: the reply built again from the cached encodings;
- **stdlib**: ``xmlrpc.client.dumps`` of the same records as the baseline server holds them (decoded
  from xapid's reply, so ints are strings), the envelope included.

Every reply is checked to decode to the same records as the stdlib's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "tests")]

import devices  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from support import ApiEnv  # noqa: E402
from xapid.store import CachedRecord  # noqa: E402
from xapid.wire import xmlrpc as wire  # noqa: E402

from common import machine  # noqa: E402
from run import VM_RECORD  # noqa: E402

GOAL_COLD, GOAL_WARM = 3.0, 10.0


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="20 VMs, one repetition (the test suite's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.vms, args.repeat = 20, 1
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="records-bench-") as tmp:
        clock = Clock()
        clock.advance(1_700_000_000)
        env = ApiEnv(Path(tmp), clock)
        admin = env.login("admin")
        sr = admin("pool.get_default_SR", admin("pool.get_all")[0])
        net = next(r for r, rec in admin("network.get_all_records").items() if rec["bridge"] == "xenbr0")
        started = time.monotonic()
        for _ in range(args.vms):
            vm = admin("VM.create", VM_RECORD)
            for disk in range(devices.DISKS_PER_VM):
                vdi = admin("VDI.create", devices._vdi(sr, disk))
                admin("VBD.create", devices._vbd(vm, vdi, disk))
            for nic in range(devices.NICS_PER_VM):
                admin("VIF.create", devices._vif(vm, net, nic))
        print(f"... {args.vms} VMs with devices created in process in {time.monotonic() - started:.0f} s (not timed)",
              file=sys.stderr, flush=True)
        store = env.api.store
        for cls in ("VM", "VBD", "VDI", "VIF"):
            objs = store.all(cls)

            def reply() -> bytes:
                return wire.success({o.ref: CachedRecord(o) for o in objs})

            def cold() -> bytes:
                for o in objs:
                    o.cache.clear()
                return reply()

            def first_ever() -> bytes:
                wire._MEMO.clear()
                wire._TEMPLATES.clear()
                wire._NAMES.clear()
                return cold()

            plain = xmlrpc.client.loads(cold())[0][0]["Value"]

            def stdlib() -> str:
                return xmlrpc.client.dumps(({"Status": "Success", "Value": plain},), methodresponse=True,
                                           allow_none=True)

            for fn in (cold, first_ever, reply):
                if xmlrpc.client.loads(fn())[0][0]["Value"] != plain:
                    raise SystemExit(f"records_bench: {cls} replies differ")
            figures = {name: best(fn, args.repeat) for name, fn in
                       (("stdlib", stdlib), ("cold", cold), ("first ever", first_ever), ("warm", reply))}
            base = figures["stdlib"]
            print(f"{cls}.get_all_records, {len(objs)} records: stdlib {base * 1e3:.1f} ms; "
                  + ", ".join(f"{name} {t * 1e3:.1f} ms ({base / t:.1f}x)" for name, t in figures.items()
                              if name != "stdlib"), flush=True)
            if cls == "VM":
                print(f"  goals: cold >= {GOAL_COLD:.0f}x: {'met' if base / figures['cold'] >= GOAL_COLD else 'NOT met'}; "
                      f"warm >= {GOAL_WARM:.0f}x: {'met' if base / figures['warm'] >= GOAL_WARM else 'NOT met'} "
                      f"(encoding only; run.py's figure c adds the transfer)", flush=True)
        env.api.hypervisor.driver.close()
        env.api.database.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
