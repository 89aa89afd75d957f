"""``xapid top``: the host and its running VMs, refreshed every 5 s from ONE ``host.query_stats`` call
(30-s averages cooked on the host); ``event.from`` on VM keeps the list of VMs current between refreshes
(VMs appearing, vanishing, starting, stopping). A full-screen curses view, or ``--once`` (``--json``)."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from xapid.client.connection import Client, ClientError
from xapid.client.output import human_bytes

VM_FIELDS = ("uuid", "name_label", "power_state", "is_a_template", "is_control_domain", "VCPUs_at_startup")
LIVE = ("Running", "Paused")
SORTS = {"cpu": "cpu_usage", "mem": "memory", "disk": "disk", "net": "net", "name": "name_label"}
KEYS = {ord("c"): "cpu", ord("m"): "mem", ord("d"): "disk", ord("n"): "net", ord("a"): "name",
        ord("C"): "cpu", ord("M"): "mem", ord("D"): "disk", ord("N"): "net", ord("A"): "name"}
_VBD = re.compile(r"^vbd_(.+)_(read|write)$")
_VIF = re.compile(r"^vif_(\d+)_(rx|tx)$")
_PIF = re.compile(r"^pif_(.+)_(rx|tx)$")


def stat_patterns(host_uuid: str) -> list[str]:
    return [f"host:{host_uuid}:cpu_avg", f"host:{host_uuid}:memory_*", f"host:{host_uuid}:pif_*",
            "vm:*:cpu_usage", "vm:*:memory", "vm:*:vbd_*", "vm:*:vif_*"]


@dataclass
class View:
    host: dict[str, Any]
    vms: list[dict[str, Any]]
    total_vms: int
    window: float
    at: float = field(default_factory=time.time)


class TopModel:
    """The VMs (from events) and the latest cooked stats (one call per :meth:`refresh`)."""

    def __init__(self, client: Client, window: float = 30.0):
        self.client = client
        self.window = window
        pool = client.call("pool.get_all")[0]
        self.host_ref = client.call("pool.get_master", pool)
        host = client.call("host.get_record", self.host_ref)
        self.host = {"uuid": host["uuid"], "name_label": host["name_label"], "cpus": len(host["host_CPUs"])}
        self.patterns = stat_patterns(host["uuid"])
        self.vms: dict[str, dict[str, Any]] = {}
        self.token = ""
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.stats: dict[str, float] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.poll_events(0.0)  # token "": every VM, now

    # -- events ------------------------------------------------------------------------------

    def poll_events(self, timeout: float, client: Client | None = None) -> None:
        batch = (client or self.client).call("event.from", ["VM"], self.token, float(timeout))
        with self.lock:
            for event in batch["events"]:
                if event["operation"] == "del":
                    if self.vms.pop(event["ref"], None) is not None:
                        self.changed.set()
                    continue
                snap = event.get("snapshot") or {}
                rec = {k: snap.get(k) for k in VM_FIELDS}
                if self.vms.get(event["ref"]) != rec:
                    self.vms[event["ref"]] = rec
                    self.changed.set()
            self.token = batch["token"]

    def watch(self, timeout: float = 30.0) -> threading.Thread:
        """Follow VM events in a thread, on a connection of its own."""
        client = self.client.fork()

        def loop() -> None:
            try:
                while not self._stop.is_set():
                    self.poll_events(timeout, client)
            except BaseException as exc:  # noqa: BLE001 - shown by the view
                if not self._stop.is_set():
                    self.error = exc
                    self.changed.set()
            finally:
                client.close()

        thread = threading.Thread(target=loop, name="xapid-top-events", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    # -- stats ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        self.stats = self.client.call("host.query_stats", self.host_ref, self.patterns, self.window, "AVERAGE")

    def view(self, sort: str = "cpu") -> View:
        host_uuid = self.host["uuid"]
        per_vm: dict[str, dict[str, float]] = {}
        host = dict(self.host, cpu_avg=None, memory_total_kib=None, memory_free_kib=None, pif_rx=None, pif_tx=None)
        for key, value in self.stats.items():
            kind, uuid, name = key.split(":", 2)
            if kind == "host":
                if uuid != host_uuid:
                    continue
                m = _PIF.match(name)
                if m:
                    k = f"pif_{m.group(2)}"
                    host[k] = (host[k] or 0.0) + value
                elif name in host:
                    host[name] = value
                continue
            vm = per_vm.setdefault(uuid, {})
            m = _VBD.match(name)
            if m and "_iops_" not in name:
                k = f"vbd_{m.group(2)}"
                vm[k] = vm.get(k, 0.0) + value
                continue
            m = _VIF.match(name)
            if m:
                k = f"vif_{m.group(2)}"
                vm[k] = vm.get(k, 0.0) + value
                continue
            if name in ("cpu_usage", "memory"):
                vm[name] = value
        with self.lock:
            records = list(self.vms.values())
        rows = []
        for rec in records:
            if rec["is_a_template"] or rec["power_state"] not in LIVE:
                continue
            s = per_vm.get(rec["uuid"], {})
            row = {k: rec[k] for k in ("uuid", "name_label", "power_state", "is_control_domain", "VCPUs_at_startup")}
            for k in ("cpu_usage", "memory", "vbd_read", "vbd_write", "vif_rx", "vif_tx"):
                row[k] = s.get(k)
            rows.append(row)
        rows.sort(key=sort_key(sort))
        total = sum(1 for r in records if not r["is_a_template"])
        return View(host=host, vms=rows, total_vms=total, window=self.window)


def _num(value: Any) -> float:
    return -1.0 if value is None else float(value)


def sort_key(sort: str) -> Any:
    if sort == "name":
        return lambda r: (str(r["name_label"]).lower(), r["uuid"])
    if sort == "disk":
        return lambda r: (-(_num(r["vbd_read"]) + _num(r["vbd_write"])), str(r["name_label"]).lower(), r["uuid"])
    if sort == "net":
        return lambda r: (-(_num(r["vif_rx"]) + _num(r["vif_tx"])), str(r["name_label"]).lower(), r["uuid"])
    key = SORTS[sort]
    return lambda r: (-_num(r[key]), str(r["name_label"]).lower(), r["uuid"])


# -- rendering ---------------------------------------------------------------------------------

HEADERS = ("NAME", "UUID", "STATE", "VCPUS", "CPU%", "MEMORY", "DISK RD/s", "DISK WR/s", "NET RX/s", "NET TX/s")
RIGHT = {3, 4, 5, 6, 7, 8, 9}
SORT_COLUMN = {"cpu": 4, "mem": 5, "disk": 6, "net": 8, "name": 0}


def _rate(value: Any) -> str:
    return "-" if value is None else human_bytes(value) if value >= 1024 else f"{value:.0f} B"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def render(view: View, sort: str, width: int = 160) -> list[str]:
    """The screen as lines: title, host line, blank, column headers (the sort column marked), one row per VM."""
    h = view.host
    clock = time.strftime("%H:%M:%S", time.localtime(view.at))
    title = (f"xapid top - {h['name_label']} - {clock} - {view.window:.0f}-s averages - sorted by {sort}"
             "    keys: c cpu, m mem, d disk, n net, a name, q quit")
    if h["memory_total_kib"] is not None and h["memory_free_kib"] is not None:
        used = (h["memory_total_kib"] - h["memory_free_kib"]) * 1024
        memory = f"mem {human_bytes(used)} used of {human_bytes(h['memory_total_kib'] * 1024)}"
    else:
        memory = "mem -"
    running = len(view.vms)
    host_line = (f"host {h['name_label']}: cpu {_pct(h['cpu_avg'])}{'%' if h['cpu_avg'] is not None else ''} of {h['cpus']} CPUs, {memory}, "
                 f"net rx {_rate(h['pif_rx'])}/s tx {_rate(h['pif_tx'])}/s, VMs {running} running of {view.total_vms}")
    headers = list(HEADERS)
    marked = SORT_COLUMN[sort]
    headers[marked] = headers[marked] + "*"
    rows = [[r["name_label"] + (" (dom0)" if r["is_control_domain"] else ""), r["uuid"][:8], r["power_state"],
             str(r["VCPUs_at_startup"] or "-"), _pct(r["cpu_usage"]),
             "-" if r["memory"] is None else human_bytes(r["memory"]), _rate(r["vbd_read"]), _rate(r["vbd_write"]),
             _rate(r["vif_rx"]), _rate(r["vif_tx"])] for r in view.vms]
    cells = [headers] + rows
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    lines = [title[:width], host_line[:width], ""]
    for row in cells:
        text = "  ".join(str(c).rjust(w) if i in RIGHT else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        lines.append(text[:width])
    return lines


def view_json(view: View) -> dict[str, Any]:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(view.at)), "window": view.window,
            "host": view.host, "VMs": view.vms, "total_VMs": view.total_vms}


# -- the command -------------------------------------------------------------------------------


def run_top(ctx: Any, args: Any) -> int:
    sort = args.sort
    model = TopModel(ctx.client, args.window)
    if args.once:
        model.refresh()
        view = model.view(sort)
        if ctx.json:
            ctx.out(json.dumps(view_json(view), indent=2, sort_keys=True) + "\n")
        elif ctx.quiet:
            ctx.out("".join(r["uuid"] + "\n" for r in view.vms))
        else:
            ctx.out("\n".join(render(view, sort, 10_000)) + "\n")
        return 0
    if not ctx.interactive:
        raise ClientError("top needs a terminal (use --once for scripts)", 2)
    import curses

    model.watch(timeout=min(30.0, max(args.interval, 1.0)))
    try:
        return curses.wrapper(_screen, model, sort, max(args.interval, 0.5))
    except KeyboardInterrupt:
        return 0
    finally:
        model.stop()


def _screen(stdscr: Any, model: TopModel, sort: str, interval: float) -> int:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass
    stdscr.timeout(200)
    due = 0.0
    view = None
    while True:
        now = time.monotonic()
        redraw = False
        if now >= due:
            model.refresh()
            due = now + interval
            redraw = True
        if model.changed.is_set():
            model.changed.clear()
            redraw = True
        if model.error is not None:
            raise ClientError(f"event.from: {model.error}")
        if redraw or view is None:
            view = model.view(sort)
            _draw(stdscr, render(view, sort, 1000))
        ch = stdscr.getch()
        if ch in (ord("q"), ord("Q"), 27):
            return 0
        if ch in KEYS:
            sort = KEYS[ch]
            view = model.view(sort)
            _draw(stdscr, render(view, sort, 1000))
        elif ch == curses.KEY_RESIZE:
            _draw(stdscr, render(view, sort, 1000))


def _draw(stdscr: Any, lines: list[str]) -> None:
    import curses

    height, width = stdscr.getmaxyx()
    stdscr.erase()
    for y, line in enumerate(lines[:height]):
        try:
            attr = curses.A_REVERSE if y == 3 else (curses.A_BOLD if y < 2 else curses.A_NORMAL)
            stdscr.addnstr(y, 0, line, max(width - 1, 0), attr)
        except curses.error:
            pass
    stdscr.refresh()
