"""The client's verbs: xe-style nouns (vm, vdi, vbd, vif, sr, network, host, task), events, call."""

from __future__ import annotations

import json
import re
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xapid.client.connection import NULL, Client, ClientError, XenAPIFailure
from xapid.client.output import (
    dump_json,
    fields_block,
    human_bytes,
    progress_bar,
    table,
)

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Ctx:
    client: Client
    stdout: Any
    stderr: Any
    json: bool
    quiet: bool

    def out(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    @property
    def interactive(self) -> bool:
        return _isatty(self.stdout) and _isatty(self.stderr)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# -- resolution: names, uuids, uuid prefixes, refs ---------------------------------------------

CLASS_OF = {"vm": "VM", "vdi": "VDI", "vbd": "VBD", "vif": "VIF", "sr": "SR", "network": "network", "host": "host",
            "task": "task"}


def vm_kind(kind: str) -> Callable[[dict[str, Any]], bool]:
    if kind == "template":
        return lambda r: r["is_a_template"] and not r["is_a_snapshot"]
    if kind == "snapshot":
        return lambda r: r["is_a_snapshot"]
    if kind == "vm":
        return lambda r: not r["is_a_template"]
    return lambda r: True


def find(ctx: Ctx, cls: str, text: str, keep: Callable[[dict[str, Any]], bool] = lambda r: True,
         what: str | None = None) -> tuple[str, dict[str, Any]]:
    """The one object of *cls* whose ref, uuid or name_label is *text*, or whose uuid starts with it."""
    what = what or cls
    client = ctx.client
    if text.startswith("OpaqueRef:"):
        return text, client.call(f"{cls}.get_record", text)
    records = {ref: rec for ref, rec in client.call(f"{cls}.get_all_records").items() if keep(rec)}
    for test in (lambda r: r.get("uuid") == text, lambda r: r.get("name_label") == text,
                 lambda r: str(r.get("uuid", "")).startswith(text.lower())):
        found = [(ref, rec) for ref, rec in records.items() if test(rec)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            uuids = ", ".join(sorted(rec["uuid"] for _, rec in found))
            raise ClientError(f"{what} {text!r} is ambiguous: it matches {uuids}")
    raise ClientError(f"no {what} matches {text!r}")


# -- tasks with a progress bar ------------------------------------------------------------------


def parse_task_result(text: str) -> Any:
    if not text:
        return ""
    try:
        return xmlrpc.client.loads(f"<methodResponse><params><param>{text}</param></params></methodResponse>")[0][0]
    except Exception:  # noqa: BLE001 - not XML-RPC (a client-driven task): as stored
        return text


def run_task(ctx: Ctx, method: str, *args: Any, label: str | None = None) -> Any:
    """``Async.METHOD``: wait for the task, drawing its progress on stderr when both stdout and stderr
    are terminals; Ctrl-C cancels the task (a second Ctrl-C leaves it running)."""
    client = ctx.client
    task = client.call(f"Async.{method}", *args)
    label = label or method
    show = ctx.interactive and not ctx.quiet
    cancelling = False
    poller = client
    try:
        while True:
            try:
                rec = poller.call("task.get_record", task)
                if show:
                    ctx.stderr.write(progress_bar(float(rec["progress"]), label))
                    ctx.stderr.flush()
                if rec["status"] not in ("pending", "cancelling"):
                    break
                time.sleep(0.2)
            except KeyboardInterrupt:
                if cancelling:
                    if show:
                        ctx.stderr.write("\n")
                    ctx.stderr.write(f"xapid: interrupted; task {rec_uuid(poller, task)} left running\n")
                    raise
                cancelling = True
                poller = client.fork()  # the interrupted connection may be mid-request
                if show:
                    ctx.stderr.write("\n")
                ctx.stderr.write("xapid: cancelling the task (Ctrl-C again to stop waiting)\n")
                ctx.stderr.flush()
                try:
                    poller.call("task.cancel", task)
                except XenAPIFailure as exc:
                    ctx.stderr.write(f"xapid: the task cannot be cancelled: {exc}\n")
    finally:
        if show:
            ctx.stderr.write("\n")
            ctx.stderr.flush()
    try:
        poller.call("task.destroy", task)
    except ClientError:
        pass
    if rec["status"] == "success":
        return parse_task_result(rec["result"])
    if rec["status"] == "cancelled":
        raise ClientError(f"{method}: cancelled", 130)
    raise XenAPIFailure(rec["error_info"] or ["UNKNOWN"])


def rec_uuid(client: Client, ref: str) -> str:
    try:
        return client.call("task.get_uuid", ref)
    except ClientError:
        return ref


# -- listing and showing ------------------------------------------------------------------------


def _names(ctx: Ctx, cls: str) -> dict[str, str]:
    return {ref: rec.get("name_label") or rec.get("uuid", ref) for ref, rec in ctx.client.call(f"{cls}.get_all_records").items()}


def _sorted(records: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(records.items(), key=lambda item: (str(item[1].get("name_label", "")).lower(),
                                                     item[1].get("device", ""), item[1].get("uuid", "")))


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def columns(ctx: Ctx, noun: str) -> tuple[list[str], Callable[[dict[str, Any]], list[Any]], tuple[int, ...]]:
    """Headers, a row maker and the right-aligned columns of ``NOUN list``."""
    if noun == "vm":
        hosts = _names(ctx, "host")
        return (["UUID", "NAME", "STATE", "VCPUS", "MEMORY", "HOST"],
                lambda r: [r["uuid"], r["name_label"], r["power_state"], r["VCPUs_at_startup"],
                           human_bytes(r["memory_static_max"]), hosts.get(r["resident_on"], "")], (3, 4))
    if noun == "vdi":
        srs = _names(ctx, "SR")
        return (["UUID", "NAME", "SR", "SIZE", "USED", "TYPE", "READ-ONLY"],
                lambda r: [r["uuid"], r["name_label"], srs.get(r["SR"], ""), human_bytes(r["virtual_size"]),
                           human_bytes(r["physical_utilisation"]), r["type"], _yes(r["read_only"])], (3, 4))
    if noun == "vbd":
        vms, vdis = _names(ctx, "VM"), _names(ctx, "VDI")
        return (["UUID", "VM", "DEVICE", "VDI", "TYPE", "MODE", "ATTACHED"],
                lambda r: [r["uuid"], vms.get(r["VM"], ""), r["userdevice"], vdis.get(r["VDI"], ""), r["type"],
                           r["mode"], _yes(r["currently_attached"])], ())
    if noun == "vif":
        vms, nets = _names(ctx, "VM"), _names(ctx, "network")
        return (["UUID", "VM", "DEVICE", "NETWORK", "MAC", "ATTACHED"],
                lambda r: [r["uuid"], vms.get(r["VM"], ""), r["device"], nets.get(r["network"], ""), r["MAC"],
                           _yes(r["currently_attached"])], ())
    if noun == "sr":
        return (["UUID", "NAME", "TYPE", "SIZE", "USED", "SHARED"],
                lambda r: [r["uuid"], r["name_label"], r["type"], human_bytes(r["physical_size"]),
                           human_bytes(r["physical_utilisation"]), _yes(r["shared"])], (3, 4))
    if noun == "network":
        return (["UUID", "NAME", "BRIDGE", "MTU"],
                lambda r: [r["uuid"], r["name_label"], r["bridge"], r["MTU"]], (3,))
    if noun == "host":
        return (["UUID", "NAME", "ADDRESS", "ENABLED", "API"],
                lambda r: [r["uuid"], r["name_label"], r["address"], _yes(r["enabled"]),
                           f"{r['API_version_major']}.{r['API_version_minor']}"], ())
    if noun == "task":
        return (["UUID", "NAME", "STATUS", "PROGRESS", "CREATED"],
                lambda r: [r["uuid"], r["name_label"], r["status"], f"{float(r['progress']) * 100:.0f}%",
                           str(r["created"])], (3,))
    raise ClientError(f"unknown noun {noun}", 2)


def cmd_list(ctx: Ctx, noun: str, opts: Any) -> int:
    cls = CLASS_OF[noun]
    records = ctx.client.call(f"{cls}.get_all_records")
    if noun == "vm":
        kind = "template" if opts.templates else "snapshot" if opts.snapshots else "any" if opts.all else "vm"
        keep = vm_kind(kind)
        records = {ref: rec for ref, rec in records.items() if keep(rec)}
    items = _sorted(records)
    if ctx.json:
        ctx.out(dump_json([rec for _, rec in items]))
    elif ctx.quiet:
        ctx.out("".join(rec["uuid"] + "\n" for _, rec in items))
    elif getattr(opts, "names", False):
        ctx.out("".join(rec["name_label"] + "\n" for _, rec in items))
    else:
        headers, row, right = columns(ctx, noun)
        ctx.out(table(headers, [row(rec) for _, rec in items], right))
    return 0


def cmd_show(ctx: Ctx, noun: str, opts: Any) -> int:
    keep = vm_kind("any")
    _, rec = find(ctx, CLASS_OF[noun], opts.target, keep, noun.upper() if noun != "network" else noun)
    if ctx.json:
        ctx.out(dump_json(rec))
    elif ctx.quiet:
        ctx.out(rec["uuid"] + "\n")
    else:
        ctx.out(fields_block(rec))
    return 0


# -- VM operations --------------------------------------------------------------------------------


def _vm(ctx: Ctx, text: str, kind: str = "vm") -> tuple[str, dict[str, Any]]:
    return find(ctx, "VM", text, vm_kind(kind), {"template": "template", "snapshot": "snapshot"}.get(kind, "VM"))


def _report(ctx: Ctx, ref: str, message: str) -> int:
    """After an operation: the VM's record (--json), its uuid (--quiet) or *message*."""
    rec = ctx.client.call("VM.get_record", ref)
    if ctx.json:
        ctx.out(dump_json(rec))
    elif ctx.quiet:
        ctx.out(rec["uuid"] + "\n")
    else:
        ctx.out(message.format(**rec) + "\n")
    return 0


def vm_power(ctx: Ctx, opts: Any) -> int:
    ref, rec = _vm(ctx, opts.target)
    verb = opts.verb
    force = getattr(opts, "force", False)
    label = f"{verb} {rec['name_label']}"
    if verb == "start":
        run_task(ctx, "VM.start", ref, bool(opts.paused), bool(force), label=label)
    elif verb == "shutdown":
        run_task(ctx, "VM.hard_shutdown" if force else "VM.clean_shutdown", ref, label=label)
    elif verb == "reboot":
        run_task(ctx, "VM.hard_reboot" if force else "VM.clean_reboot", ref, label=label)
    elif verb == "suspend":
        run_task(ctx, "VM.suspend", ref, label=label)
    elif verb == "resume":
        run_task(ctx, "VM.resume", ref, False, bool(force), label=label)
    return _report(ctx, ref, "{name_label} ({uuid}): {power_state}")


def vm_destroy(ctx: Ctx, opts: Any) -> int:
    ref, rec = _vm(ctx, opts.target, "snapshot" if opts.snapshot else "vm")
    ctx.client.call("VM.destroy", ref)
    if ctx.json:
        ctx.out(dump_json({"uuid": rec["uuid"], "name_label": rec["name_label"]}))
    elif not ctx.quiet:
        ctx.out(f"destroyed {rec['name_label']} ({rec['uuid']})\n")
    return 0


def vm_copying(ctx: Ctx, opts: Any) -> int:
    verb = opts.verb
    if verb == "revert":
        ref, rec = _vm(ctx, opts.target, "snapshot")
        run_task(ctx, "VM.revert", ref, label=f"revert to {rec['name_label']}")
        return _report(ctx, rec["snapshot_of"], "{name_label} ({uuid}) reverted: {power_state}")
    ref, rec = _vm(ctx, opts.target)
    method = {"snapshot": "VM.snapshot", "clone": "VM.clone"}[verb]
    new = run_task(ctx, method, ref, opts.name, label=f"{verb} {rec['name_label']}")
    return _report(ctx, new, "{uuid}")


def vm_install(ctx: Ctx, opts: Any) -> int:
    """``xe vm-install``: clone the template (``VM.copy`` onto ``--sr`` when given), point its disks at the
    SR, provision; the new VM is destroyed when provisioning fails."""
    client = ctx.client
    template, trec = _vm(ctx, opts.template, "template")
    if opts.sr:
        sr, _ = find(ctx, "SR", opts.sr, what="SR")
    else:
        sr = client.call("pool.get_default_SR", client.call("pool.get_all")[0])
        if sr == NULL and "disks" in trec["other_config"]:
            raise ClientError("the pool has no default SR: give --sr")
    label = f"install {opts.name}"
    if opts.sr:
        vm = run_task(ctx, "VM.copy", template, opts.name, sr, label=label)
    else:
        vm = run_task(ctx, "VM.clone", template, opts.name, label=label)
    try:
        client.call("VM.set_name_description", vm, "")
        if sr != NULL:
            client.call("VM.set_suspend_SR", vm, sr)
        other = client.call("VM.get_other_config", vm)
        if "disks" in other and sr != NULL:
            sr_uuid = client.call("SR.get_uuid", sr)
            client.call("VM.remove_from_other_config", vm, "disks")
            client.call("VM.add_to_other_config", vm, "disks", re.sub(r'sr="[^"]*"', f'sr="{sr_uuid}"', other["disks"]))
        run_task(ctx, "VM.provision", vm, label=label)
    except BaseException:
        try:
            client.fork().call("VM.destroy", vm)
        except ClientError:
            pass
        raise
    return _report(ctx, vm, "{uuid}")


SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|K|KiB|M|MiB|G|GiB|T|TiB)$", re.IGNORECASE)
SIZE_UNITS = {"b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
              "t": 1 << 40, "tib": 1 << 40}


def _value_like(current: Any, text: str, key: str) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "yes", "1", "on"):
            return True
        if text.lower() in ("false", "no", "0", "off"):
            return False
        raise ClientError(f"{key}: expected true or false, not {text!r}", 2)
    if isinstance(current, (dict, list)):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ClientError(f"{key}: expected JSON, not {text!r}", 2) from None
        return value
    m = SIZE_RE.match(text)
    if m and key.startswith("memory"):
        return str(int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()]))
    return text


def vm_set(ctx: Ctx, opts: Any) -> int:
    ref, rec = _vm(ctx, opts.target, "any")
    changes = []
    for item in opts.assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClientError(f"expected KEY=VALUE, not {item!r}", 2)
        field, colon, subkey = key.partition(":")
        if field not in rec:
            raise ClientError(f"VM has no field {field!r}", 2)
        changes.append((field, subkey if colon else None, value))
    for field, subkey, value in changes:
        if subkey is not None:
            if not isinstance(rec[field], dict):
                raise ClientError(f"{field} is not a map", 2)
            ctx.client.call(f"VM.remove_from_{field}", ref, subkey)
            if value != "":
                ctx.client.call(f"VM.add_to_{field}", ref, subkey, value)
        else:
            ctx.client.call(f"VM.set_{field}", ref, _value_like(rec[field], value, field))
    return _report(ctx, ref, "{name_label} ({uuid}): updated")


def task_cancel(ctx: Ctx, opts: Any) -> int:
    ref, rec = find(ctx, "task", opts.target)
    ctx.client.call("task.cancel", ref)
    if not ctx.quiet:
        ctx.out(dump_json({"uuid": rec["uuid"]}) if ctx.json else f"cancelling {rec['uuid']}\n")
    return 0


# -- events and raw calls --------------------------------------------------------------------------


def cmd_events(ctx: Ctx, opts: Any) -> int:
    classes = opts.classes or ["*"]
    token = ""
    if not opts.all:  # skip the current objects: start from now
        token = ctx.client.call("event.from", classes, "", 0.0)["token"]
    seen = 0
    while True:
        batch = ctx.client.call("event.from", classes, token, 30.0)
        token = batch["token"]
        for event in batch["events"]:
            snapshot = event.get("snapshot") or {}
            if ctx.json:
                ctx.out(json.dumps({k: event.get(k) for k in ("id", "timestamp", "class", "operation", "ref", "snapshot")
                                    if k in event}, sort_keys=True, default=str) + "\n")
            elif not ctx.quiet:
                name = snapshot.get("name_label") or snapshot.get("uuid") or event["ref"]
                extra = f" {snapshot['power_state']}" if "power_state" in snapshot else ""
                extra += f" {snapshot['status']} {float(snapshot['progress']) * 100:.0f}%" if event["class"] == "task" and "status" in snapshot else ""
                ctx.out(f"{time.strftime('%H:%M:%S')} {event['class']} {event['operation']} {name}{extra}\n")
            seen += 1
            if opts.count and seen >= opts.count:
                return 0


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: a string (refs, names, uuids)


def cmd_call(ctx: Ctx, opts: Any) -> int:
    args = [ctx.client.session if a == "@session" else _json_arg(a) for a in opts.args]
    if opts.method.startswith(("session.login", "session.slave_local_login")) or opts.no_session:
        value = ctx.client.raw(opts.method, *args)
    else:
        value = ctx.client.call(opts.method, *args)
    if not ctx.quiet:
        ctx.out(dump_json(value))
    return 0
