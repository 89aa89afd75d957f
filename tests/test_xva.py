"""Whole-VM export and import in xapi's XVA format: the format on its own (hostile tars included),
and GET /export, GET /export_metadata, PUT /import against real daemons over real sockets."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import shutil
import signal
import socket
import tarfile
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import XenAPI
import zstandard

from support import PASSWORD, RealDaemon, npm_xen_api, vm_record
from xapid.transfer import xva
from xapid.wire.xmlrpc import encode_value

MIB = 1 << 20
NULL = "OpaqueRef:NULL"


# ---------------------------------------------------------------------------------------- helpers


def entry(name: str, data: bytes) -> bytes:
    return xva.tar_file(name, data)


def ova(objects: list[dict[str, Any]], vsn: int = 2) -> bytes:
    version = {"hostname": "xs", "date": "20240101T00:00:00Z", "product_version": "8.2.1",
               "product_brand": "XenServer", "build_number": "release/yangtze", "xapi_major": 1,
               "xapi_minor": 20, "export_vsn": vsn}
    return xva.encode_ova(version, objects)


def xapi_objects(sizes: dict[str, int], vm_name: str = "from-xapi") -> list[dict[str, Any]]:
    """ova.xml objects as xapi writes them: a VM, a VBD per disk, VDIs, their SR, a VIF and its network."""
    vm = {**vm_record(name_label=vm_name), "uuid": "11111111-2222-3333-4444-555555555555",
          "power_state": "Halted", "VBDs": [f"Ref:{10 + i}" for i in range(len(sizes))], "VIFs": ["Ref:30"],
          "is_control_domain": False, "snapshot_of": NULL, "resident_on": NULL, "domid": "-1"}
    objs = [{"class": "VM", "id": "Ref:0", "snapshot": vm}]
    for i, (vdi_id, size) in enumerate(sorted(sizes.items())):
        objs.append({"class": "VBD", "id": f"Ref:{10 + i}", "snapshot": {
            "VM": "Ref:0", "VDI": vdi_id, "userdevice": str(i), "bootable": i == 0, "mode": "RW", "type": "Disk",
            "empty": False, "unpluggable": True, "other_config": {}, "qos_algorithm_type": "",
            "qos_algorithm_params": {}, "currently_attached": True, "uuid": "x"}})
        objs.append({"class": "VDI", "id": vdi_id, "snapshot": {
            "name_label": f"disk {vdi_id}", "name_description": "", "SR": "Ref:40", "virtual_size": str(size),
            "type": "user", "sharable": False, "read_only": False, "other_config": {"k": "v"}, "xenstore_data": {},
            "sm_config": {}, "tags": [], "uuid": "y", "VBDs": [f"Ref:{10 + i}"]}})
    objs.append({"class": "SR", "id": "Ref:40", "snapshot": {"name_label": "Local storage", "type": "ext",
                                                           "content_type": "user"}})
    objs.append({"class": "VIF", "id": "Ref:30", "snapshot": {
        "VM": "Ref:0", "network": "Ref:50", "device": "0", "MAC": "aa:bb:cc:00:11:22", "MTU": "1500",
        "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}}})
    objs.append({"class": "network", "id": "Ref:50", "snapshot": {"name_label": "Pool-wide network associated with eth0",
                                                                "bridge": "xenbr0"}})
    return objs


def xapi_xva(disks: dict[str, bytes], checksum: str = "xxhash", vm_name: str = "from-xapi",
             keepalive_at: int | None = None) -> bytes:
    """An XVA as xapi writes it: ova.xml, then each disk's non-zero chunks (first and last always),
    each followed by its checksum entry; *keepalive_at*: a 0-byte chunk replaces that chunk number."""
    parts = [entry("ova.xml", ova(xapi_objects({k: len(v) for k, v in disks.items()}, vm_name)))]
    for prefix in sorted(disks):
        data = disks[prefix]
        last = (len(data) - 1) // MIB
        index = 0
        for block in range(last + 1):
            chunk = data[block * MIB:(block + 1) * MIB]
            if keepalive_at is not None and index == keepalive_at:
                parts += [entry(f"{prefix}/{index:08d}", b""),
                          entry(f"{prefix}/{index:08d}.{checksum}", digest(b"", checksum))]
                index += 1
            if block in (0, last) or chunk.strip(b"\0"):
                name = f"{prefix}/{index:08d}"
                parts += [entry(name, chunk), entry(f"{name}.{checksum}", digest(chunk, checksum))]
            index += 1
    return b"".join(parts) + xva.TAR_END


def digest(data: bytes, kind: str) -> bytes:
    return (xva.xxh64_hex(data) if kind == "xxhash" else hashlib.sha1(data).hexdigest()).encode()


def disk_bytes(size: int, writes: dict[int, bytes]) -> bytes:
    image = bytearray(size)
    for offset, data in writes.items():
        image[offset:offset + len(data)] = data
    return bytes(image)


def parse(stream: bytes, sizes: dict[str, int], tmp: Path, step: int = 65536, force: bool = False
          ) -> dict[str, bytes]:
    """Feed *stream* to the parser in *step*-byte pieces; the disks it wrote."""
    parser = xva.XvaParser(force)
    fds: dict[str, int] = {}
    try:
        for i in range(0, len(stream), step):
            if parser.feed(stream[i:i + step]) == xva.NEED_DISKS:
                targets = []
                for prefix, size in sizes.items():
                    path = tmp / prefix.replace(":", "_")
                    fds[prefix] = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
                    os.ftruncate(fds[prefix], size)
                    targets.append(xva.DiskTarget(prefix, fds[prefix], size))
                parser.set_disks(targets)
                parser.feed(b"")
        parser.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
    return {p: (tmp / p.replace(":", "_")).read_bytes() for p in sizes}


# ---------------------------------------------------------------------------------------- the format


def test_writer_output_is_xapis_layout(tmp_path: Path) -> None:
    """ova.xml first (a bare XML-RPC value, export_vsn 2), chunks Ref:<n>/%08d each followed by its
    XXH64 .xxhash, zero chunks left out except the first and last, disks in lexicographic prefix order."""
    a = tmp_path / "a"
    a.write_bytes(disk_bytes(3 * MIB + 100, {MIB + 7: b"data"}))
    b = tmp_path / "b"
    b.write_bytes(disk_bytes(2 * MIB, {}))
    writer = xva.XvaWriter(b"<value><struct></struct></value>", [xva.DiskSource("Ref:2", str(a), 3 * MIB + 100),
                                                                 xva.DiskSource("Ref:10", str(b), 2 * MIB)])
    out = b"".join(iter(writer.next_piece, b""))
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == ["ova.xml", "Ref:10/00000000", "Ref:10/00000000.xxhash", "Ref:10/00000001",
                         "Ref:10/00000001.xxhash", "Ref:2/00000000", "Ref:2/00000000.xxhash", "Ref:2/00000001",
                         "Ref:2/00000001.xxhash", "Ref:2/00000003", "Ref:2/00000003.xxhash"]
        assert tar.extractfile("ova.xml").read() == b"<value><struct></struct></value>"  # type: ignore[union-attr]
        chunk = tar.extractfile("Ref:2/00000001").read()  # type: ignore[union-attr]
        assert len(chunk) == MIB and chunk[7:11] == b"data"
        text = tar.extractfile("Ref:2/00000001.xxhash").read().decode()  # type: ignore[union-attr]
        assert text == xva.xxh64_hex(chunk) and len(text) == 16 and text == text.upper()
        assert len(tar.extractfile("Ref:2/00000003").read()) == 100  # type: ignore[union-attr]


def test_ova_xml_is_a_bare_rpclib_value() -> None:
    """No XML declaration, untyped ints, export_vsn 2; and it decodes back."""
    text = ova([{"class": "VM", "id": "Ref:0", "snapshot": {"memory": 5, "name_label": "a"}}])
    assert text.startswith(b"<value><struct>") and b"<?xml" not in text
    assert b"<member><name>export_vsn</name><value>2</value></member>" in text
    version, objects = xva.decode_ova(text)
    assert version["export_vsn"] == "2" and objects[0]["snapshot"]["memory"] == "5"


@pytest.mark.parametrize("checksum", ["xxhash", "checksum"])
@pytest.mark.parametrize("wrap", ["plain", "gzip", "zstd"])
def test_hand_built_xapi_xva_parses(tmp_path: Path, checksum: str, wrap: str) -> None:
    """An XVA as xapi writes it (SHA-1 .checksum or XXH64 .xxhash, zero-chunk gaps, a short last
    chunk, two disks), plain, gzip or zstd, in odd-sized pieces: the disks come out byte-exact."""
    disks = {"Ref:3": disk_bytes(4 * MIB + 512, {0: b"boot", 2 * MIB + 9: b"middle", 4 * MIB + 500: b"end"}),
             "Ref:12": disk_bytes(3 * MIB, {MIB: b"x" * MIB})}
    stream = xapi_xva(disks, checksum)
    if wrap == "gzip":
        stream = gzip.compress(stream)
    elif wrap == "zstd":
        stream = zstandard.ZstdCompressor().compress(stream)
    out = parse(stream, {k: len(v) for k, v in disks.items()}, tmp_path, step=7777)
    assert out == disks


def test_keepalive_zero_byte_chunk_shifts_nothing(tmp_path: Path) -> None:
    """xapi's keep-alive: a 0-byte chunk takes a chunk number and the data continues under the next
    numbers; positions follow the previous chunk, not index x 1 MiB."""
    disk = disk_bytes(6 * MIB, {0: b"a", 4 * MIB: b"b", 6 * MIB - 1: b"z"})
    out = parse(xapi_xva({"Ref:1": disk}, keepalive_at=2), {"Ref:1": len(disk)}, tmp_path)
    assert out["Ref:1"] == disk


def test_parser_ignores_the_tail_after_the_disks(tmp_path: Path) -> None:
    """Once every disk is full the rest of the stream is not read."""
    disk = disk_bytes(MIB, {5: b"q"})
    out = parse(xapi_xva({"Ref:1": disk}) + b"trailing junk" * 100, {"Ref:1": MIB}, tmp_path)
    assert out["Ref:1"] == disk


def hostile(stream: bytes, tmp: Path, sizes: dict[str, int] | None = None) -> xva.XvaError:
    with pytest.raises(xva.XvaError) as info:
        parse(stream, sizes if sizes is not None else {"Ref:1": 4 * MIB}, tmp)
    return info.value


def good_prefix(size: int = 4 * MIB) -> bytes:
    return entry("ova.xml", ova(xapi_objects({"Ref:1": size})))


def test_bad_checksum_fails(tmp_path: Path) -> None:
    """A chunk whose .xxhash or .checksum differs: IMPORT_ERROR_SOME_CHECKSUMS_FAILED (force ignores it)."""
    chunk = b"\1" * MIB
    stream = (good_prefix(2 * MIB) + entry("Ref:1/00000000", chunk) + entry("Ref:1/00000000.checksum", b"0" * 40)
              + entry("Ref:1/00000001", chunk) + entry("Ref:1/00000001.xxhash", digest(chunk, "xxhash")) + xva.TAR_END)
    assert hostile(stream, tmp_path, {"Ref:1": 2 * MIB}).code == "IMPORT_ERROR_SOME_CHECKSUMS_FAILED"
    assert parse(stream, {"Ref:1": 2 * MIB}, tmp_path, force=True)["Ref:1"] == chunk * 2


@pytest.mark.parametrize("case", ["unordered", "repeated", "wrong prefix", "path trick", "huge chunk",
                                  "past the end", "missing checksum", "truncated", "not a tar", "link",
                                  "no ova first", "huge ova", "huge index"])
def test_hostile_tars_fail_cleanly(tmp_path: Path, case: str) -> None:
    """Each deviation is a clear XvaError, found without reading more than the stream."""
    one = b"\1" * MIB

    def chunk(name: str, data: bytes = one) -> bytes:
        return entry(name, data) + entry(name + ".xxhash", digest(data, "xxhash"))

    streams = {
        "unordered": good_prefix() + chunk("Ref:1/00000001") + chunk("Ref:1/00000000"),
        "repeated": good_prefix() + chunk("Ref:1/00000000") + chunk("Ref:1/00000000"),
        "wrong prefix": good_prefix() + chunk("Ref:2/00000000"),
        "path trick": good_prefix() + chunk("../../etc/passwd"),
        "huge chunk": good_prefix() + big_header("Ref:1/00000000", 1 << 40),
        "past the end": good_prefix() + chunk("Ref:1/00000000") + chunk("Ref:1/00000009"),
        "missing checksum": good_prefix() + entry("Ref:1/00000000", one) + entry("Ref:1/00000001", one),
        "truncated": good_prefix() + chunk("Ref:1/00000000")[:5000],
        "not a tar": b"\x00\x01garbage" * 200,
        "link": good_prefix()[:0] + _link_header(),
        "no ova first": chunk("Ref:1/00000000"),
        "huge ova": big_header("ova.xml", 1 << 50),
        "huge index": good_prefix() + chunk("Ref:1/9999999999"),
    }
    start = time.monotonic()
    error = hostile(streams[case], tmp_path)
    assert time.monotonic() - start < 5
    assert error.code.startswith("IMPORT_")


def big_header(name: str, size: int) -> bytes:
    """A GNU tar header announcing *size* bytes (base-256 size field)."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _link_header() -> bytes:
    info = tarfile.TarInfo("ova.xml")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/shadow"
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def test_zstd_bomb_is_bounded(tmp_path: Path) -> None:
    """A tiny zstd stream expanding to 1 GiB of zeros: refused (not a tar) without holding it in memory."""
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 30))
    assert len(bomb) < 100_000
    parser = xva.XvaParser()
    with pytest.raises(xva.XvaError):
        parser.feed(bomb)
        parser.finish()


# ---------------------------------------------------------------------------------------- daemons


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    a = RealDaemon(tmp_path_factory.mktemp("xva-a"))
    b = RealDaemon(tmp_path_factory.mktemp("xva-b"))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def xen_api(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The npm connector with this module's scripts, installed once; and node's path."""
    prefix = npm_xen_api(tmp_path_factory, "npm-xva", "xen_api_xva.mjs", "xen_api_stream_import.mjs")
    return prefix, str(shutil.which("node"))


def session(daemon: RealDaemon, user: str = "admin") -> Any:
    s = XenAPI.Session(daemon.url)
    s.login_with_password(user, PASSWORD, "1.0", "xva-tests")
    return s


def default_sr(x: Any) -> str:
    return x.pool.get_default_SR(x.pool.get_all()[0])


def vdi_file(x: Any, vdi: str) -> str:
    sr = x.VDI.get_SR(vdi)
    location = x.PBD.get_device_config(x.SR.get_PBDs(sr)[0])["location"]
    return os.path.join(location, x.VDI.get_location(vdi))


def make_vm(x: Any, disks: dict[int, dict[int, bytes]], sizes: dict[int, int], name: str = "xva-vm") -> str:
    """A halted VM with disks (userdevice -> writes) and a NIC on xenbr0."""
    sr = default_sr(x)
    vm = x.VM.create(vm_record(name_label=name, other_config={"colour": "blue"}, VCPUs_max="3"))
    for userdevice, writes in disks.items():
        vdi = x.VDI.create({"SR": sr, "virtual_size": str(sizes[userdevice]), "type": "user", "sharable": False,
                            "read_only": False, "other_config": {"n": str(userdevice)},
                            "name_label": f"disk{userdevice}"})
        with open(vdi_file(x, vdi), "r+b") as f:
            for offset, data in writes.items():
                f.seek(offset)
                f.write(data)
        x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": str(userdevice), "bootable": userdevice == 0,
                      "mode": "RW", "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                      "qos_algorithm_params": {}})
    net = next(r for r, rec in x.network.get_all_records().items() if rec["bridge"] == "xenbr0")
    x.VIF.create({"device": "0", "network": net, "VM": vm, "MAC": "", "MTU": "1500", "other_config": {},
                  "qos_algorithm_type": "", "qos_algorithm_params": {}})
    return vm


def request(daemon: RealDaemon, method: str, target: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def head_only_put(daemon: RealDaemon, target: str, length: int) -> int:
    """The status of a PUT whose body is announced but never sent."""
    sock, reply = daemon.raw_request(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
    sock.close()
    return int(reply.split(b" ", 2)[1])


def wait_task(x: Any, task: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = x.task.get_record(task)
        if record["status"] not in ("pending", "cancelling"):
            return record  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"task {task} still pending")


def disks_of(x: Any, vm: str) -> dict[str, bytes]:
    out = {}
    for vbd in x.VM.get_VBDs(vm):
        record = x.VBD.get_record(vbd)
        if record["type"] == "Disk":
            with open(vdi_file(x, record["VDI"]), "rb") as f:
                out[record["userdevice"]] = f.read()
    return out


def vdi_counts(x: Any) -> int:
    return len(x.VDI.get_all())


def inventory(x: Any) -> tuple[list[str], Any, int]:
    """What a failed import must leave as it found it: the default SR's files, the VDI counts, the VMs."""
    sr_dir = x.PBD.get_device_config(x.SR.get_PBDs(default_sr(x))[0])["location"]
    return sorted(os.listdir(sr_dir)), vdi_counts(x), len(x.VM.get_all())


CONFIG_FIELDS = ("name_label", "name_description", "memory_static_max", "memory_dynamic_min", "VCPUs_max",
                 "VCPUs_at_startup", "PV_kernel", "PV_args", "other_config", "actions_after_crash", "platform",
                 "is_a_template", "HVM_boot_policy")


@pytest.mark.parametrize("compression", ["", "gzip", "zstd"])
def test_round_trip_to_a_second_daemon(pair: Any, compression: str) -> None:
    """A VM exported from one daemon and imported into another: same disks byte for byte (holes
    kept), same configuration, new uuids and MACs; the task's result is the XML-RPC VM ref set."""
    a, b = pair
    sa, sb = session(a), session(b)
    xa, xb = sa.xenapi, sb.xenapi
    try:
        vm = make_vm(xa, {0: {0: b"MBR", 3 * MIB + 17: b"payload" * 1000}, 1: {MIB: b"\xff" * MIB}},
                     {0: 5 * MIB + 123, 1: 3 * MIB}, name=f"rt-{compression or 'plain'}")
        query = f"/export?ref={vm}&session_id={sa._session}" + (f"&use_compression={compression}" if compression else "")
        status, headers, body = request(a, "GET", query)
        assert status == 200, body
        assert headers["content-type"] == "application/octet-stream" and "content-length" not in headers
        assert wait_task(xa, headers["task-id"])["status"] == "success"
        if compression == "zstd":
            assert body[:4] == xva.ZSTD_MAGIC
        elif compression == "gzip":
            assert body[:2] == xva.GZIP_MAGIC
        task = xb.task.create("import", "")
        status, headers, reply = request(b, "PUT", f"/import?session_id={sb._session}&task_id={task}"
                                                  f"&sr_id={default_sr(xb)}", body)
        assert status == 200, reply
        assert headers["task-id"] == task
        record = wait_task(xb, task)
        assert record["status"] == "success", record
        assert record["result"].startswith("<value><array><data><value>OpaqueRef:")
        (new,) = xmlrpc.client.loads(f"<params><param>{record['result']}</param></params>")[0][0]
        before, after = xa.VM.get_record(vm), xb.VM.get_record(new)
        assert {k: after[k] for k in CONFIG_FIELDS} == {k: before[k] for k in CONFIG_FIELDS}
        assert after["uuid"] != before["uuid"] and after["power_state"] == "Halted"
        assert disks_of(xb, new) == disks_of(xa, vm)
        (vif,) = after["VIFs"]
        assert xb.VIF.get_MAC(vif) != xa.VIF.get_MAC(xa.VM.get_VIFs(vm)[0])
        assert xb.network.get_bridge(xb.VIF.get_network(vif)) == "xenbr0"
        for vbd in after["VBDs"]:
            assert xb.VDI.get_SR(xb.VBD.get_VDI(vbd)) == default_sr(xb)
    finally:
        sa.xenapi.session.logout()
        sb.xenapi.session.logout()


def test_import_of_xapi_written_xva_with_basic_auth(pair: Any) -> None:
    """An XVA as xapi writes it (.checksum and zero gaps, zstd) imports with HTTP Basic; restore=true
    keeps the MAC."""
    _, b = pair
    disk = disk_bytes(3 * MIB, {5: b"hello", 2 * MIB: b"world"})
    body = zstandard.ZstdCompressor().compress(xapi_xva({"Ref:7": disk}, "checksum", vm_name="xapi-made"))
    import base64
    auth = base64.b64encode(f"vmadmin:{PASSWORD}".encode()).decode()
    status, headers, reply = request(b, "PUT", "/import?restore=true", body, {"Authorization": f"Basic {auth}"})
    assert status == 200, reply
    s = session(b)
    try:
        x = s.xenapi
        record = wait_task(x, headers["task-id"])
        assert record["status"] == "success", record
        (vm,) = x.VM.get_by_name_label("xapi-made")
        assert disks_of(x, vm) == {"0": disk}
        assert x.VIF.get_MAC(x.VM.get_VIFs(vm)[0]) == "aa:bb:cc:00:11:22"
    finally:
        s.xenapi.session.logout()


def test_broken_transfers_leave_nothing(pair: Any) -> None:
    """A stream cut short, or with a bad checksum: the task fails and no VDI, VM or file is left."""
    _, b = pair
    s = session(b)
    x = s.xenapi
    try:
        before = inventory(x)
        disk = disk_bytes(3 * MIB, {5: b"hello", 2 * MIB: b"world"})
        good = xapi_xva({"Ref:7": disk}, vm_name="broken")
        bad = bytearray(good)
        at = bad.index(b"world")
        bad[at] = ord("W")  # the chunk no longer matches its .xxhash
        for body, code in ((good[: len(good) // 2], "IMPORT_ERROR_PREMATURE_EOF"),
                           (bytes(bad), "IMPORT_ERROR_SOME_CHECKSUMS_FAILED")):
            task = x.task.create("import", "")
            status, _, reply = request(b, "PUT", f"/import?session_id={s._session}&task_id={task}", body)
            assert status == 200 and reply == b"", reply  # xapi's 200 before the body: the task says why
            record = wait_task(x, task)
            assert record["status"] == "failure" and record["error_info"][0] == code, record
            assert inventory(x) == before
    finally:
        s.xenapi.session.logout()


def test_import_cancelled_mid_body_leaves_nothing(pair: Any) -> None:
    """task.cancel during an import (a transfer's task goes straight to ``cancelled``): the rest of
    the body is never imported; no VM, VDI or file is left."""
    _, b = pair
    s = session(b)
    x = s.xenapi
    try:
        before = inventory(x)
        body = xapi_xva({"Ref:7": disk_bytes(3 * MIB, {5: b"hello", 2 * MIB: b"world"})}, vm_name="cancelled")
        task = x.task.create("import", "")
        half = len(body) // 2
        with socket.create_connection(("127.0.0.1", b.port), timeout=30) as sock:
            sock.sendall(f"PUT /import?session_id={s._session}&task_id={task} HTTP/1.1\r\nHost: x\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:half])
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
            x.task.cancel(task)
            sock.sendall(body[half:])
            time.sleep(0.3)
        assert wait_task(x, task)["status"] == "cancelled"
        deadline = time.monotonic() + 10
        while inventory(x) != before and time.monotonic() < deadline:  # the files go in a worker thread
            time.sleep(0.05)
        assert inventory(x) == before
        assert not x.VM.get_by_name_label("cancelled")
    finally:
        s.xenapi.session.logout()


def test_a_crash_mid_import_leaves_nothing_after_the_restart(tmp_path: Path) -> None:
    """The daemon killed (SIGKILL) while an import's disks are being written: once it is started
    again, no VDI, VM or file of that import exists (the disks were never under their names)."""
    daemon = RealDaemon(tmp_path)
    try:
        s = session(daemon)
        before = inventory(s.xenapi)
        sr_dir = s.xenapi.PBD.get_device_config(s.xenapi.SR.get_PBDs(default_sr(s.xenapi))[0])["location"]
        body = xapi_xva({"Ref:7": disk_bytes(8 * MIB, {5: b"hello", 6 * MIB: b"world"})}, vm_name="crashed")
        task = s.xenapi.task.create("import", "")
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
            sock.sendall(f"PUT /import?session_id={s._session}&task_id={task} HTTP/1.1\r\nHost: x\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
            deadline = time.monotonic() + 20
            while set(os.listdir(sr_dir)) <= set(before[0]):  # the import's disk is being written
                assert time.monotonic() < deadline, os.listdir(sr_dir)
                time.sleep(0.02)
            daemon.stop(signal.SIGKILL)
        daemon.start()
        s = session(daemon)
        assert inventory(s.xenapi) == before
        assert not s.xenapi.VM.get_by_name_label("crashed")
        s.xenapi.session.logout()
    finally:
        daemon.stop()


def test_a_crash_between_the_disks_and_their_records_is_finished_or_undone_at_start(tmp_path: Path) -> None:
    """An import's disks are whole (``.ready``) before the objects are committed and go under their
    names after: at the next start a ready disk whose VDI was committed is put in place, and one
    without a record (the crash came first) is removed with its claim."""
    daemon = RealDaemon(tmp_path)
    try:
        s = session(daemon)
        x = s.xenapi
        vdi = x.VDI.create({"SR": default_sr(x), "virtual_size": str(MIB), "type": "user", "sharable": False,
                            "read_only": False, "other_config": {}, "name_label": "committed"})
        path = vdi_file(x, vdi)
        with open(path, "r+b") as f:
            f.write(b"imported data")
        sr_dir = os.path.dirname(path)
        s.xenapi.session.logout()
        daemon.stop()
        os.rename(path, path + ".ready")  # the crash came after the commit, before the publish
        stray = os.path.join(sr_dir, "0f0f0f0f-1111-2222-3333-444444444444.img")
        open(os.path.join(sr_dir, ".xapid-owned", os.path.basename(stray)), "w").close()
        with open(stray + ".ready", "wb") as f:  # ... and another import's, before its commit
            f.write(b"never committed")
        daemon.start()
        s = session(daemon)
        x = s.xenapi
        with open(path, "rb") as f:
            assert f.read(13) == b"imported data"
        assert x.VDI.get_missing(vdi) is False and x.VDI.get_name_label(vdi) == "committed"
        assert not os.path.exists(path + ".ready") and not os.path.exists(stray + ".ready")
        assert not os.path.exists(os.path.join(sr_dir, ".xapid-owned", os.path.basename(stray)))
        assert not [v for v in x.VDI.get_all() if x.VDI.get_location(v) == os.path.basename(stray)]
        s.xenapi.session.logout()
    finally:
        daemon.stop()


def test_a_client_gone_while_a_disk_is_made_leaves_no_disk_and_no_descriptor(tmp_path: Path) -> None:
    """The connection breaks while the pool makes disk 1 of 2: the cleanup waits for that job and removes
    its disk; disk 2 is never started (before: it was made beside the cleanup and left behind, and the
    parser was handed disk 1's closed descriptor)."""
    from types import SimpleNamespace

    from twisted.internet.defer import Deferred

    from xapid.backend.storage import FileSR
    from xapid.errors import XenAPIError
    from xapid.transfer.xva_import import ImportSink, _Plan

    jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    class StepRunner:  # the thread pool, each job run when the test says
        def run(self, fn: Any, *args: Any) -> Deferred[Any]:
            jobs.append((fn, args, Deferred()))
            return jobs[-1][2]

    driver = FileSR(tmp_path / "sr")
    driver.attach(create=True)
    api = SimpleNamespace(runner=StepRunner(), store=SimpleNamespace(find=lambda ref: None))
    routes = SimpleNamespace(api=api, _fail_task=lambda task, exc: XenAPIError("IMPORT_ERROR_PREMATURE_EOF", task))
    sink = ImportSink(routes, "OpaqueRef:sr", driver, "OpaqueRef:task", SimpleNamespace(release=lambda: None),
                      restore=False, force=False)  # type: ignore[arg-type]
    plan = _Plan()
    plan.vdis = [("Ref:1", {"virtual_size": MIB}), ("Ref:2", {"virtual_size": MIB})]
    sink._plan = lambda objects: plan  # type: ignore[method-assign]
    sink.parser.ova = ("", {})  # type: ignore[assignment]
    given: list[Any] = []
    sink.parser.set_disks = given.append  # type: ignore[method-assign]
    fds_before = len(os.listdir("/proc/self/fd"))
    prepared = Deferred.fromCoroutine(sink._prepare())
    prepared.addErrback(lambda f: f.trap(XenAPIError))
    sink.abort("connection lost")  # while disk 1 is being made
    ran = []
    while jobs:
        fn, args, d = jobs.pop(0)
        ran.append(fn.__name__)
        d.callback(fn(*args))
    assert ran == ["_begin_disk", "_remove_files"]
    assert [p.name for p in (tmp_path / "sr").iterdir() if p.is_file()] == []
    assert os.listdir(tmp_path / "sr" / ".xapid-owned") == [] and not given
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_an_xva_of_too_many_disks_is_refused_before_any_file(pair: Any) -> None:
    """257 disks (each would be a file held open to the end): the task fails, nothing is created."""
    _, b = pair
    s = session(b)
    x = s.xenapi
    try:
        before = inventory(x)
        objects = xapi_objects({"Ref:1": MIB}, "many")
        disk = next(o for o in objects if o["class"] == "VDI")
        objects += [{**disk, "id": f"Ref:{1000 + i}"} for i in range(256)]  # disks of no VBD are imported too
        body = entry("ova.xml", ova(objects)) + xva.TAR_END
        task = x.task.create("import", "")
        status, _, _ = request(b, "PUT", f"/import?session_id={s._session}&task_id={task}", body)
        record = wait_task(x, task)
        assert record["status"] == "failure" and record["error_info"][0].startswith("IMPORT_ERROR"), record
        assert "257 disks (at most 256)" in " ".join(record["error_info"])
        assert inventory(x) == before and not x.VM.get_by_name_label("many")
    finally:
        s.xenapi.session.logout()


def test_export_refuses_running_and_exports_templates(pair: Any) -> None:
    """A running VM cannot be exported (409, VM_BAD_POWER_STATE); a template can; export_metadata
    gives ova.xml alone with a Content-Length."""
    a, _ = pair
    s = session(a)
    x = s.xenapi
    try:
        vm = make_vm(x, {0: {0: b"t"}}, {0: MIB}, name="tmpl")
        x.VM.start(vm, False, False)
        status, _, body = request(a, "GET", f"/export?uuid={x.VM.get_uuid(vm)}&session_id={s._session}")
        assert status == 409 and b"VM_BAD_POWER_STATE" in body
        x.VM.hard_shutdown(vm)
        x.VM.set_is_a_template(vm, True)
        status, _, body = request(a, "GET", f"/export?ref={vm}&session_id={s._session}")
        assert status == 200 and body.startswith(b"ova.xml\0")
        status, headers, body = request(a, "GET", f"/export_metadata?uuid={x.VM.get_uuid(vm)}&session_id={s._session}")
        assert status == 200 and int(headers["content-length"]) == len(body)
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            assert tar.getnames() == ["ova.xml"]
            version, objects = xva.decode_ova(tar.extractfile("ova.xml").read())  # type: ignore[union-attr]
        assert version["export_vsn"] == "2"
        assert [o["id"] for o in objects][0] == "Ref:0" and objects[0]["snapshot"]["is_a_template"] is True
    finally:
        s.xenapi.session.logout()


@pytest.mark.parametrize("user,expected", [("reader", 403), ("operator", 403), ("vmadmin", 200), ("admin", 200),
                                           (None, 401)])
def test_roles(pair: Any, user: str | None, expected: int) -> None:
    """Export and import need vm-admin (xapi's http/get_export, http/put_import); none is 401."""
    a, _ = pair
    s = session(a)
    x = s.xenapi
    try:
        vm = x.VM.get_by_name_label("rt-plain")[0] if x.VM.get_by_name_label("rt-plain") else make_vm(
            x, {0: {}}, {0: MIB}, name="rt-plain")
        token = ""
        if user is not None:
            other = session(a, user)
            token = f"&session_id={other._session}"
        status, _, _ = request(a, "GET", f"/export?ref={vm}{token}")
        assert status == expected
        body = xapi_xva({"Ref:1": bytes(MIB)}, vm_name=f"role-{user}")
        if expected == 200:
            status, headers, _ = request(a, "PUT", f"/import?x=1{token}", body)
            assert status == 200 and wait_task(x, headers["task-id"])["status"] == "success"
        else:  # refused before a byte of the (announced, never sent) body is read
            assert head_only_put(a, f"/import?x=1{token}", 1 << 30) == expected
    finally:
        s.xenapi.session.logout()


def test_bad_parameters(pair: Any) -> None:
    """Unknown VM 404, no VM 400, bad compression 400, ISO SR 400, unknown SR 404."""
    a, _ = pair
    s = session(a)
    x = s.xenapi
    try:
        token = f"session_id={s._session}"
        assert request(a, "GET", f"/export?ref=OpaqueRef:nope&{token}")[0] == 404
        assert request(a, "GET", f"/export?{token}")[0] == 400
        vm = make_vm(x, {}, {}, name="params")
        assert request(a, "GET", f"/export?ref={vm}&use_compression=lz4&{token}")[0] == 400
        iso = next(r for r, rec in x.SR.get_all_records().items() if rec["content_type"] == "iso")
        assert request(a, "PUT", f"/import?sr_id={iso}&{token}", b"x")[0] == 400
        assert request(a, "PUT", f"/import?sr_uuid=nope&{token}", b"x")[0] == 404
    finally:
        s.xenapi.session.logout()


def test_encoded_result_is_a_ref_set() -> None:
    """The import task's result is the XML-RPC ``<value>`` of a VM ref set."""
    assert encode_value(["OpaqueRef:a"]) == b"<value><array><data><value>OpaqueRef:a</value></data></array></value>"


@pytest.mark.parametrize("compression", ["zstd"])
def test_npm_xen_api_get_and_put_resource_xva(pair: Any, xen_api: tuple[Path, str], compression: str) -> None:
    """Xen Orchestra's connector exports a VM (getResource /export, a task) and imports the XVA
    (putResource /import into an SR, a task): a new VM with the same disks."""
    import json
    import subprocess

    prefix, node = xen_api
    a, _ = pair
    s = session(a)
    x = s.xenapi
    try:
        vm = make_vm(x, {0: {0: b"npm", 2 * MIB + 3: os.urandom(50_000)}}, {0: 4 * MIB}, name="npm-xva")
        run = subprocess.run([node, "xen_api_xva.mjs", a.url, "vmadmin", PASSWORD, vm, default_sr(x), compression],
                             cwd=prefix, capture_output=True, text=True, timeout=120)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert "error" not in result, (result, run.stderr)
        assert result["exported"]["head"] == xva.ZSTD_MAGIC.hex()
        new = result["imported"]
        assert new and new != vm and result["importedName"] == "npm-xva"
        assert disks_of(x, new) == disks_of(x, vm)
    finally:
        s.xenapi.session.logout()


def test_slots_and_a_client_that_goes_away(pair: Any) -> None:
    """Two exports that stall their readers hold the user's two transfer slots (a third is 503);
    once their clients go away the tasks fail, the slots come back and the VM is exportable."""
    a, _ = pair
    s = session(a, "vmadmin")
    x = s.xenapi
    try:
        vms = [make_vm(x, {0: {0: os.urandom(24 * MIB)}}, {0: 24 * MIB}, name=f"stall{i}") for i in range(3)]
        socks, tasks = [], []
        for vm in vms[:2]:  # one export at a time per VM (its current operation)
            target = f"/export?ref={vm}&session_id={s._session}"
            sock = socket.create_connection(("127.0.0.1", a.port), timeout=30)
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200")
            tasks.append(next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                              if line.lower().startswith(b"task-id")))
            socks.append(sock)
        target = f"/export?ref={vms[2]}&session_id={s._session}"
        status, headers, _ = request(a, "GET", target)
        assert status == 503 and "retry-after" in headers
        for sock in socks:
            sock.close()
        for task in tasks:
            assert wait_task(x, task)["status"] == "failure"
        status, _, body = request(a, "GET", target)
        assert status == 200 and len(body) > 24 * MIB
    finally:
        s.xenapi.session.logout()


def test_npm_xen_api_put_resource_of_unknown_length(pair: Any, xen_api: tuple[Path, str]) -> None:
    """Xen Orchestra's connector uploads a Readable without a length (it announces 1 PiB, probes
    with an empty body, streams, then hangs up without waiting for a reply): thanks to xapi's early
    200 both an XVA (/import, complete at the tar's end) and a raw disk (/import_raw_vdi, complete
    at the VDI's size) import, and the tasks carry the results."""
    import json
    import subprocess

    prefix, node = xen_api
    a, _ = pair
    s = session(a)
    x = s.xenapi
    try:
        size = 6 * MIB + 4096
        vm = make_vm(x, {0: {0: b"unsized", 3 * MIB + 1: os.urandom(300_000), size - 5: b"end!!"}}, {0: size},
                     name="npm-unsized")
        (vbd,) = [v for v in x.VM.get_VBDs(vm) if x.VBD.get_type(v) == "Disk"]
        source = x.VBD.get_VDI(vbd)
        target = x.VDI.create({"SR": default_sr(x), "virtual_size": str(size), "type": "user", "sharable": False,
                               "read_only": False, "other_config": {}, "name_label": "unsized-target"})
        vms_before = set(x.VM.get_all())
        run = subprocess.run([node, "xen_api_stream_import.mjs", a.url, "vmadmin", PASSWORD, vm, default_sr(x),
                              source, target], cwd=prefix, capture_output=True, text=True, timeout=120)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert "error" not in result, (result, run.stderr[-3000:])
        assert "missing length" in run.stderr  # the connector really took its unknown-length path
        new = result["imported"]
        assert new and new not in vms_before and x.VM.get_name_label(new) == "npm-unsized"
        assert disks_of(x, new) == disks_of(x, vm)
        assert result["rawSize"] == size and target in result["rawResult"]
        with open(vdi_file(x, target), "rb") as f, open(vdi_file(x, source), "rb") as g:
            assert f.read() == g.read()
        # the connector's probes (empty bodies announced as 1 PiB) left no VM, VDI or file behind
        assert set(x.VM.get_all()) == vms_before | {new}
        sr_dir = os.path.dirname(vdi_file(x, target))
        assert not [name for name in os.listdir(sr_dir) if name.endswith(".partial")]
    finally:
        s.xenapi.session.logout()
