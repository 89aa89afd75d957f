"""GET /export_raw_vdi and PUT /import_raw_vdi: raw and VHD disk transfers, against a real daemon
over real sockets, plus the VHD/chunked formats and the sparse helpers on their own (hostile input
included).  qemu-img (qemu-utils) checks the VHDs independently."""

from __future__ import annotations

import http.client
import os
import re
import socket
import struct
import subprocess
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
from twisted.python.failure import Failure

from support import PASSWORD, RealDaemon, npm_xen_api
from xapid.transfer import sparse, vhd
from xapid.transfer.limits import TransferLimitError, TransferSlots

MIB = 1 << 20


# ---------------------------------------------------------------------------------------- helpers


def vhd_bytes(data_path: Path, size: int) -> bytes:
    """The VHD the writer makes of a disk file (its allocated blocks)."""
    fd = os.open(data_path, os.O_RDONLY)
    try:
        blocks = sparse.allocated_blocks(fd, size, vhd.BLOCK_SIZE)
        layout = vhd.VhdLayout(size, blocks, timestamp=1.7e9)
        parts = [layout.head()]
        for b in blocks:
            parts += [layout.bitmap(), sparse.read_block(fd, b, vhd.BLOCK_SIZE, size)]
        return b"".join(parts + [layout.tail()])
    finally:
        os.close(fd)


def apply_ops(ops: list[vhd.Op], image: bytearray) -> None:
    for op in ops:
        image[op.offset:op.offset + op.length] = bytes(op.length) if op.data is None else op.data


def parse_all(parser: Any, data: bytes, step: int = 7777) -> bytearray:
    image = bytearray(parser.limit)
    for i in range(0, len(data), step):
        apply_ops(parser.feed(data[i:i + step]), image)
    apply_ops(parser.finish(), image)
    return image


def make_disk(path: Path, size: int, writes: dict[int, bytes]) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path.read_bytes()


def qemu_to_raw(vhd_path: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd_path), str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


def refix_footer(raw: bytearray, at: int = 0) -> None:
    raw[at + 64:at + 68] = b"\0\0\0\0"
    raw[at + 64:at + 68] = struct.pack(">I", vhd.checksum(bytes(raw[at:at + 512]), 64))


def refix_header(raw: bytearray) -> None:
    raw[512 + 36:512 + 40] = b"\0\0\0\0"
    raw[512 + 36:512 + 40] = struct.pack(">I", vhd.checksum(bytes(raw[512:1536]), 36))


# ---------------------------------------------------------------------------------------- formats


def test_vhd_writer_output_is_read_by_qemu_img(tmp_path):
    """Only allocated blocks are emitted, and qemu-img reads the VHD back byte-exact (a size not a
    multiple of the block size, data in the last partial block)."""
    size = 21 * MIB
    original = make_disk(tmp_path / "d.img", size, {5 * MIB: os.urandom(3000), size - 100: b"x" * 100})
    image = vhd_bytes(tmp_path / "d.img", size)
    assert len(image) == 512 + 1024 + 512 + 2 * (512 + vhd.BLOCK_SIZE) + 512  # 2 of 11 blocks
    (tmp_path / "d.vhd").write_bytes(image)
    info = subprocess.run(["qemu-img", "info", "-f", "vpc", str(tmp_path / "d.vhd")], capture_output=True,
                          text=True, check=True).stdout
    assert f"({size} bytes)" in info
    assert qemu_to_raw(tmp_path / "d.vhd", tmp_path / "back.img") == original


def test_vhd_parser_reads_own_and_qemu_images(tmp_path):
    size = 9 * MIB
    original = make_disk(tmp_path / "d.img", size, {0: b"boot" * 100, 7 * MIB + 3: os.urandom(5000)})
    assert parse_all(vhd.VhdParser(size), vhd_bytes(tmp_path / "d.img", size)) == original
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", str(tmp_path / "d.img"),
                    str(tmp_path / "q.vhd")], check=True)
    data = (tmp_path / "q.vhd").read_bytes()
    parser = vhd.VhdParser(2 * size, len(data))
    assert bytes(parse_all(parser, data, 65536)[:size]) == original


def test_vhd_parser_knows_the_end_from_the_footer(tmp_path):
    """``ended`` once every block and then the footer (equal to the leading copy) arrived, not before;
    a stream whose last bytes differ from its leading copy keeps the old rule (the body's end)."""
    size = 9 * MIB
    make_disk(tmp_path / "d.img", size, {0: b"boot" * 100, 7 * MIB + 3: os.urandom(5000)})
    data = vhd_bytes(tmp_path / "d.img", size)
    parser = vhd.VhdParser(size)
    parser.feed(data[:-1])
    assert not parser.ended
    parser.feed(data[-1:] + b"\0" * 4096)  # what follows the footer is not part of the VHD
    assert parser.ended and parser.finish() == []
    odd = data[:-vhd.SECTOR] + bytes(vhd.SECTOR - 1) + b"x"  # a trailer that is not the footer copy
    other = vhd.VhdParser(size)
    other.feed(odd)
    assert not other.ended
    with pytest.raises(vhd.FormatError):
        other.finish()


def test_vhd_parser_partial_bitmap_and_absent_blocks(tmp_path):
    """Sectors with a clear bitmap bit read as zeros; blocks absent from the BAT produce no write."""
    size = 4 * MIB
    make_disk(tmp_path / "d.img", size, {0: b"\1" * 4096})
    raw = bytearray(vhd_bytes(tmp_path / "d.img", size))
    bitmap_at = 512 + 1024 + 512
    raw[bitmap_at:bitmap_at + 1] = b"\x80"  # only sector 0 present
    raw[bitmap_at + 1:bitmap_at + 512] = bytes(511)
    parser = vhd.VhdParser(size)
    ops = parser.feed(bytes(raw)) + parser.finish()
    written = [(op.offset, op.length, op.data is None) for op in ops]
    assert written == [(0, 512, False), (512, vhd.BLOCK_SIZE - 512, True)]  # block 1 absent: untouched


def test_vhd_parser_cost_is_linear_for_a_striped_bitmap_in_small_pieces():
    """A block whose bitmap alternates every sector (8192 runs), sent 512 bytes at a time: each
    piece visits only the runs it overlaps (it was runs x pieces, 12 s of reactor for 4 MiB)."""
    block = 4 * MIB
    layout = vhd.VhdLayout(block, [0], timestamp=1.7e9, block_size=block)
    bitmap = (b"\xaa" * (block // 512 // 8)).ljust(layout.bitmap_bytes, b"\0")
    raw = layout.head() + bitmap + b"\1" * block + layout.tail()
    parser = vhd.VhdParser(block)
    start = time.process_time()
    image = parse_all(parser, raw, 512)
    assert time.process_time() - start < 2.0
    sector = bytes(512)
    assert image == (b"\1" * 512 + sector) * (block // 1024)  # odd sectors: bit clear, zeros


def test_vhd_parser_holds_a_full_bat_compactly():
    """A VHD announcing 300 000 allocated blocks (600 GiB, what any vm-admin may
    upload): the parser's plan of blocks holds 8 bytes a block (tuples took ~110)."""
    import tracemalloc

    blocks = 300_000
    size = blocks * vhd.BLOCK_SIZE
    layout = vhd.VhdLayout(size, list(range(blocks)), timestamp=1.7e9)
    head = layout.head()
    parser = vhd.VhdParser(size, len(head) + blocks * (layout.bitmap_bytes + vhd.BLOCK_SIZE) + 512)
    tracemalloc.start()
    try:
        parser.feed(head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB, peak


class _PoolRunner:
    """A runner that runs each call in a thread of its own and waits for it (deterministic)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, fn: Any, *args: Any) -> Any:
        from twisted.internet.defer import fail, succeed

        self.calls.append(getattr(fn, "__name__", repr(fn)))
        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - delivered as a failed Deferred, as the pool does
                box["error"] = exc

        worker = threading.Thread(target=go)
        worker.start()
        worker.join()
        return fail(box["error"]) if "error" in box else succeed(box.get("value"))


def _vhd_sink(parser: vhd.VhdParser, size: int) -> tuple[Any, _PoolRunner]:
    """A RawImportSink around *parser* with stand-ins for its task, routes and disk (writes dropped)."""
    from types import SimpleNamespace

    from xapid.transfer.raw_import import RawImportSink

    runner = _PoolRunner()
    task = SimpleNamespace(ref="OpaqueRef:t", cancelling=lambda: False, progress=lambda _: None)
    routes = SimpleNamespace(api=SimpleNamespace(runner=runner))
    target = SimpleNamespace(size=size, apply=lambda ops: None)
    return RawImportSink(routes, task, None, parser, target, None, "sr", "vdi", None, "u", None), runner


def _outcome(written: Any) -> Any:
    """What a write's (already fired) Deferred gave: its result or its Failure."""
    box: list[Any] = []
    if written is not None:
        written.addBoth(box.append)
    return box[0] if box else None


def test_a_large_vhd_bat_is_parsed_in_the_thread_pool_not_on_the_reactor():
    """A BAT of a million allocated entries takes ~0.3 s of CPU to check: the sink feeds the piece
    completing it in the runner (the reactor stays free); a small VHD is parsed inline as before."""
    blocks = 1_000_000
    size = blocks * vhd.BLOCK_SIZE
    layout = vhd.VhdLayout(size, list(range(blocks)), timestamp=1.7e9)
    head = layout.head()
    parser = vhd.VhdParser(size)
    parsed_in: list[int] = []
    parse_bat = parser._bat

    def recording_bat(raw: bytes) -> None:
        parsed_in.append(threading.get_ident())
        parse_bat(raw)

    parser._bat = recording_bat  # type: ignore[method-assign]
    sink, runner = _vhd_sink(parser, size)
    block = layout.bitmap() + b"\1" * vhd.BLOCK_SIZE
    for piece in [head[i:i + 65536] for i in range(0, len(head), 65536)] + [block]:
        assert not isinstance(_outcome(sink.write(piece)), Failure)
    assert parsed_in and parsed_in[0] != threading.get_ident()
    assert runner.calls == ["feed"]  # the piece completing the BAT only; the block's data stays inline
    assert sink.received == len(head) + len(block) and sink._batch_bytes == vhd.BLOCK_SIZE

    small = vhd.VhdLayout(8 * MIB, [0], timestamp=1.7e9)
    sink, runner = _vhd_sink(vhd.VhdParser(8 * MIB), 8 * MIB)
    assert sink.write(small.head()) is None and runner.calls == []


def test_a_hostile_large_bat_parsed_in_the_thread_pool_is_the_same_import_error():
    blocks = 100_000
    size = blocks * vhd.BLOCK_SIZE
    bad = bytearray(vhd.VhdLayout(size, list(range(blocks)), timestamp=1.7e9).head())
    bad[1536 + 4 * 500:1536 + 4 * 501] = bad[1536:1540]  # entry 500 points at block 0's place
    with pytest.raises(vhd.FormatError) as inline:
        vhd.VhdParser(size).feed(bytes(bad))
    sink, runner = _vhd_sink(vhd.VhdParser(size), size)
    failure = _outcome(sink.write(bytes(bad)))
    assert runner.calls == ["feed"] and isinstance(failure, Failure)
    assert failure.value.status == 400 and str(failure.value) == str(inline.value)
    assert sink._error.code == "IMPORT_ERROR" and sink._error.description == ["IMPORT_ERROR", str(inline.value)]


@pytest.mark.parametrize("damage, message", [
    ("footer_checksum", "footer checksum"),
    ("cookie", "conectix"),
    ("header_checksum", "header checksum"),
    ("too_big", "exceeds the VDI's virtual_size"),
    ("bat_outside", "beyond the"),
    ("bat_overlap", "inside the metadata or another block"),
    ("block_size", "power of two"),
    ("entries", "BAT of"),
    ("fixed", "fixed VHD"),
    ("truncated", "truncated"),
])
def test_hostile_vhd_is_refused_quickly(tmp_path, damage, message):
    size = 8 * MIB
    make_disk(tmp_path / "d.img", size, {0: b"a" * 10, 3 * MIB: b"b" * 10})
    raw = bytearray(vhd_bytes(tmp_path / "d.img", size))
    bat = 1536
    limit, body_length = size, len(raw)
    if damage == "footer_checksum":
        raw[40] ^= 1
    elif damage == "cookie":
        raw[0:8] = b"notavhd!"
    elif damage == "header_checksum":
        raw[512 + 30] ^= 1
    elif damage == "too_big":
        limit = size - 512
    elif damage == "bat_outside":
        raw[bat + 4:bat + 8] = struct.pack(">I", 0x7FFFFFF0)
    elif damage == "bat_overlap":
        raw[bat + 4:bat + 8] = raw[bat:bat + 4]
    elif damage == "block_size":
        raw[512 + 32:512 + 36] = struct.pack(">I", 3 << 20)
        refix_header(raw)
    elif damage == "entries":
        raw[512 + 28:512 + 32] = struct.pack(">I", 0xFFFFFFFF)
        refix_header(raw)
    elif damage == "fixed":
        raw[60:64] = struct.pack(">I", 2)
        refix_footer(raw)
    elif damage == "truncated":
        raw = raw[: len(raw) - 600]
        body_length = None
    parser = vhd.VhdParser(limit, body_length)
    start = time.monotonic()
    with pytest.raises(vhd.FormatError, match=message):
        parser.feed(bytes(raw))
        parser.finish()
    assert time.monotonic() - start < 1.0


def test_chunked_protocol_parser():
    frame = struct.pack("<QI", 4096, 5) + b"hello" + struct.pack("<QI", 10, 3) + b"abc"
    parser = vhd.ChunkedParser(8192)
    image = parse_all(parser, frame + bytes(12), step=5)
    assert image[4096:4101] == b"hello" and image[10:13] == b"abc" and image.count(0) == 8192 - 8
    with pytest.raises(vhd.FormatError, match="end marker"):
        p = vhd.ChunkedParser(8192)
        p.feed(frame)
        p.finish()
    with pytest.raises(vhd.FormatError, match="beyond the disk"):
        vhd.ChunkedParser(8192).feed(struct.pack("<QI", 8190, 5) + b"hello")


def test_sparse_extents_and_changed_blocks(tmp_path):
    size = 16 * MIB
    make_disk(tmp_path / "a.img", size, {3 * MIB: b"x" * 10, 10 * MIB: b"y" * 10})
    make_disk(tmp_path / "b.img", size, {3 * MIB: b"x" * 10, 10 * MIB: b"z" * 10, 14 * MIB: b"w"})
    a, b = os.open(tmp_path / "a.img", os.O_RDONLY), os.open(tmp_path / "b.img", os.O_RDONLY)
    try:
        assert sparse.allocated_blocks(a, size, 2 * MIB) == [1, 5]
        assert sparse.changed_blocks(b, size, a, size, 2 * MIB) == [5, 7]
    finally:
        os.close(a)
        os.close(b)


def test_transfer_slots_total_and_per_user():
    slots = TransferSlots(total=3, per_user=2)
    a1, a2 = slots.acquire("alice"), slots.acquire("alice")
    with pytest.raises(TransferLimitError, match="alice"):
        slots.acquire("alice")
    with slots.acquire("bob"):
        with pytest.raises(TransferLimitError) as info:
            slots.acquire("carol")
        assert info.value.status == 503
    a1.release()
    a1.release()  # idempotent
    assert slots.running == 1 and slots.running_for("alice") == 1 and slots.running_for("bob") == 0
    slots.acquire("alice")
    a2.release()


# ---------------------------------------------------------------------------------------- daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = RealDaemon(tmp_path_factory.mktemp("rawvdi"), config="[limits]\nmax_transfers = 4\n"
                                                             "max_transfers_per_user = 2\n")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def api(daemon):
    proxy = xmlrpc.client.ServerProxy(daemon.url)
    session = proxy.session.login_with_password("admin", PASSWORD)["Value"]
    return proxy, session


def call(api: Any, method: str, *args: Any) -> Any:
    proxy, session = api
    obj = proxy
    for part in method.split("."):
        obj = getattr(obj, part)
    result = obj(session, *args)
    assert result["Status"] == "Success", result
    return result["Value"]


def new_vdi(api: Any, size: int, name: str = "disk") -> tuple[str, Path]:
    sr = call(api, "pool.get_default_SR", call(api, "pool.get_all")[0])
    ref = call(api, "VDI.create", {"name_label": name, "name_description": "", "SR": sr, "virtual_size": str(size),
                                   "type": "user", "sharable": False, "read_only": False, "other_config": {},
                                   "xenstore_data": {}, "sm_config": {}, "tags": []})
    return ref, sr_dir(api, sr) / call(api, "VDI.get_location", ref)


def sr_dir(api: Any, sr: str) -> Path:
    pbd = call(api, "PBD.get_record", call(api, "SR.get_PBDs", sr)[0])
    return Path(pbd["device_config"]["location"])


def request(daemon: Any, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; a body the daemon refuses before reading it (it answers
    and closes at once) is not an error: the reply is read all the same."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=60)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        sock.sendall((head + "\r\n").encode())
        try:
            if body:
                sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = http.client.HTTPResponse(sock, method=method)
        reply.begin()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        sock.close()


def fill(path: Path, writes: dict[int, bytes]) -> bytes:
    with open(path, "r+b") as f:
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path.read_bytes()


def task_record(api: Any, ref: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        rec = call(api, "task.get_record", ref)
        if rec["status"] != "pending" or time.monotonic() > deadline:
            return rec
        time.sleep(0.05)


def test_raw_export_and_reimport_byte_exact_with_holes(daemon, api, tmp_path):
    size = 24 * MIB
    ref, path = new_vdi(api, size)
    original = fill(path, {MIB: os.urandom(70000), 20 * MIB + 5: b"tail data"})
    s = api[1]
    status, headers, body = request(daemon, "GET", f"/export_raw_vdi?session_id={s}&vdi={ref}&format=raw")
    assert status == 200 and body == original
    assert headers["content-type"] == "application/octet-stream"
    uuid = call(api, "VDI.get_uuid", ref)
    assert f'filename="{uuid}.raw"' in headers["content-disposition"]
    rec = task_record(api, headers["task-id"])
    assert rec["status"] == "success" and ref in rec["result"]
    # re-import into a new VDI of the SR (xapi's sr_id + Content-Length form)
    sr = call(api, "VDI.get_SR", ref)
    status, headers, reply = request(daemon, "PUT", f"/import_raw_vdi?session_id={s}&sr_id={sr}&format=raw", body)
    assert status == 200, reply
    assert reply == b"" and headers["connection"] == "close" and "content-length" not in headers  # xapi's early 200
    new = task_record(api, headers["task-id"])
    assert new["status"] == "success"
    new_ref = xmlrpc.client.loads(f"<params><param>{new['result']}</param></params>")[0][0]
    assert new_ref.startswith("OpaqueRef:") and call(api, "VDI.get_name_label", new_ref) == "Imported VDI"
    assert int(call(api, "VDI.get_virtual_size", new_ref)) == size
    new_path = sr_dir(api, sr) / call(api, "VDI.get_location", new_ref)
    assert new_path.read_bytes() == original
    assert new_path.stat().st_blocks * 512 < 2 * MIB  # holes stayed holes
    assert not list(new_path.parent.glob(new_path.name + ".*"))  # no .partial or .ready left beside it


def test_vhd_export_only_allocated_blocks_and_vhd_import(daemon, api, tmp_path):
    size = 40 * MIB
    ref, path = new_vdi(api, size)
    original = fill(path, {0: b"MBR" * 100, 33 * MIB: os.urandom(3 * MIB)})
    s = api[1]
    status, headers, body = request(daemon, "GET", f"/export_raw_vdi?session_id={s}&vdi={ref}&format=vhd")
    assert status == 200 and headers["content-type"] == "application/vhd"
    blocks = 3  # block 0 and blocks 16-17
    assert len(body) == 512 + 1024 + 512 + blocks * (512 + vhd.BLOCK_SIZE) + 512
    (tmp_path / "e.vhd").write_bytes(body)
    assert qemu_to_raw(tmp_path / "e.vhd", tmp_path / "e.img") == original
    target, target_path = new_vdi(api, size, "restore")
    status, headers, reply = request(daemon, "PUT", f"/import_raw_vdi?session_id={s}&vdi={target}&format=vhd", body)
    assert status == 200, reply
    assert task_record(api, headers["task-id"])["status"] == "success"
    assert target_path.read_bytes() == original
    assert target_path.stat().st_blocks * 512 <= 5 * MIB
    assert not list(target_path.parent.glob("*.partial"))


def test_vhd_import_of_a_stream_announced_longer_completes_at_its_footer(daemon, api, tmp_path):
    """A client streaming a VHD of unknown length announces more than it sends (Xen Orchestra: 1 PiB)
    and waits: the import completes once the footer after the last block arrives, with the
    connection still open, and the disk is the VHD's."""
    size = 8 * MIB
    source, source_path = new_vdi(api, size, "source")
    original = fill(source_path, {5: b"hello", 6 * MIB: os.urandom(4096)})
    image = vhd_bytes(source_path, size)
    target, target_path = new_vdi(api, size, "target")
    sock, head = daemon.raw_request(f"PUT /import_raw_vdi?session_id={api[1]}&vdi={target}&format=vhd HTTP/1.1\r\n"
                                    f"Host: x\r\nContent-Length: {1 << 50}\r\n\r\n".encode() + image)
    with sock:
        assert head.startswith(b"HTTP/1.1 200"), head
        task = re.search(rb"task-id: (\S+)", head, re.I).group(1).decode()
        assert task_record(api, task)["status"] == "success"  # the connection is still open
    assert target_path.read_bytes() == original


def test_vhd_import_with_a_bat_parsed_in_the_thread_pool(daemon, api):
    """A 64 GiB disk's BAT (32768 entries) is parsed off the reactor: the import is the same."""
    size = 64 << 30
    ref, path = new_vdi(api, size, "big")
    layout = vhd.VhdLayout(size, [1, 30000], timestamp=1.7e9)
    assert layout.entries >= vhd.THREAD_BAT_ENTRIES
    body = layout.head() + layout.bitmap() + b"a" * vhd.BLOCK_SIZE + layout.bitmap() + b"b" * vhd.BLOCK_SIZE
    status, headers, reply = request(daemon, "PUT", f"/import_raw_vdi?session_id={api[1]}&vdi={ref}&format=vhd",
                                     body + layout.tail())
    assert status == 200, reply
    assert task_record(api, headers["task-id"])["status"] == "success"
    with open(path, "rb") as f:
        assert sparse.allocated_blocks(f.fileno(), size, vhd.BLOCK_SIZE) == [1, 30000]
        assert os.pread(f.fileno(), 4, vhd.BLOCK_SIZE - 2) == b"\0\0aa"
        assert os.pread(f.fileno(), 2, 30001 * vhd.BLOCK_SIZE - 1) == b"b\0"


def test_base_differential_export_applied_over_a_copy_of_the_base(daemon, api, tmp_path):
    size = 32 * MIB
    ref, path = new_vdi(api, size)
    fill(path, {0: b"A" * MIB, 10 * MIB: b"B" * MIB, 20 * MIB: b"C" * 100})
    base = call(api, "VDI.snapshot", ref, {})
    current = fill(path, {10 * MIB + 7: b"changed", 30 * MIB: b"new block"})
    s = api[1]
    status, _, delta = request(daemon, "GET", f"/export_raw_vdi?session_id={s}&vdi={ref}&format=vhd&base={base}")
    assert status == 200
    assert len(delta) == 512 + 1024 + 512 + 2 * (512 + vhd.BLOCK_SIZE) + 512  # blocks 5 and 15 only
    restored = call(api, "VDI.copy", base, call(api, "VDI.get_SR", base))
    status, headers, reply = request(daemon, "PUT", f"/import_raw_vdi?session_id={s}&vdi={restored}&format=vhd",
                                     delta)
    assert status == 200, reply
    assert task_record(api, headers["task-id"])["status"] == "success"  # the outcome is on the task (xapi)
    restored_path = sr_dir(api, call(api, "VDI.get_SR", restored)) / call(api, "VDI.get_location", restored)
    assert restored_path.read_bytes() == current


def test_chunked_protocol_import(daemon, api):
    size = 8 * MIB
    ref, path = new_vdi(api, size)
    original = fill(path, {0: b"keep me"})
    body = struct.pack("<QI", 5 * MIB, 4) + b"data" + bytes(12)
    status, headers, reply = request(daemon, "PUT", f"/import_raw_vdi?session_id={api[1]}&vdi={ref}&format=raw"
                                                    "&chunked=true", body)
    assert status == 200, reply
    assert task_record(api, headers["task-id"])["status"] == "success"
    expected = bytearray(original)
    expected[5 * MIB:5 * MIB + 4] = b"data"
    assert path.read_bytes() == bytes(expected)


def test_given_task_gets_progress_and_result(daemon, api):
    ref, path = new_vdi(api, 4 * MIB)
    task = call(api, "task.create", "backup", "")
    status, headers, _ = request(daemon, "GET", f"/export_raw_vdi?session_id={api[1]}&vdi={ref}&task_id={task}")
    assert status == 200 and headers["task-id"] == task
    rec = task_record(api, task)
    assert rec["status"] == "success" and float(rec["progress"]) == 1.0 and ref in rec["result"]


def test_broken_import_leaves_the_disk_and_database_unchanged(daemon, api):
    size = 16 * MIB
    ref, path = new_vdi(api, size)
    original = fill(path, {2 * MIB: b"precious" * 1000})
    vdis_before = len(call(api, "VDI.get_all"))
    for target in (f"vdi={ref}", f"sr_id={call(api, 'VDI.get_SR', ref)}"):
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        sock.sendall(f"PUT /import_raw_vdi?session_id={api[1]}&{target}&format=raw HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode() + os.urandom(6 * MIB))
        time.sleep(0.3)
        sock.close()
    deadline = time.monotonic() + 10
    while list(path.parent.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(path.parent.glob("*.partial"))
    assert path.read_bytes() == original
    assert len(call(api, "VDI.get_all")) == vdis_before
    failed = [t for t in call(api, "task.get_all_records").values()
              if t["name_label"] == "Import of a raw VDI" and t["status"] == "failure"]
    assert len(failed) >= 2


def test_hostile_vhd_import_is_400_and_changes_nothing(daemon, api, tmp_path):
    size = 8 * MIB
    ref, path = new_vdi(api, size)
    original = fill(path, {MIB: b"keep" * 100})
    src = tmp_path / "s.img"
    make_disk(src, size, {0: b"x" * 10})
    bad = bytearray(vhd_bytes(src, size))
    bad[1536:1540] = struct.pack(">I", 0x7FFFFFF0)  # the BAT points far outside the body
    status, headers, reply = request(daemon, "PUT", f"/import_raw_vdi?session_id={api[1]}&vdi={ref}&format=vhd",
                                     bytes(bad))
    assert status == 200 and reply == b""  # as xapi: the 200 went out before the body; the task tells
    rec = task_record(api, headers["task-id"])
    assert rec["status"] == "failure" and rec["error_info"][0] == "IMPORT_ERROR" and "beyond" in rec["error_info"][1]
    assert path.read_bytes() == original


def test_refusals(daemon, api):
    size = 4 * MIB
    ref, path = new_vdi(api, size)
    s = api[1]
    assert request(daemon, "GET", f"/export_raw_vdi?vdi={ref}")[0] == 401
    assert request(daemon, "PUT", f"/import_raw_vdi?vdi={ref}&format=raw", b"x")[0] == 401
    proxy = xmlrpc.client.ServerProxy(daemon.url)
    reader = proxy.session.login_with_password("reader", PASSWORD)["Value"]
    operator = proxy.session.login_with_password("operator", PASSWORD)["Value"]
    assert request(daemon, "GET", f"/export_raw_vdi?session_id={reader}&vdi={ref}")[0] == 403
    assert request(daemon, "PUT", f"/import_raw_vdi?session_id={operator}&vdi={ref}&format=raw", b"x")[0] == 403
    vmadmin = proxy.session.login_with_password("vmadmin", PASSWORD)["Value"]
    assert request(daemon, "GET", f"/export_raw_vdi?session_id={vmadmin}&vdi={ref}")[0] == 200
    status, headers, _ = request(daemon, "GET", f"/export_raw_vdi?session_id={s}&vdi={ref}&format=qcow9")
    assert status == 404 and task_record(api, headers["task-id"])["status"] == "failure"
    assert request(daemon, "GET", f"/export_raw_vdi?session_id={s}&vdi=OpaqueRef:nope")[0] == 404
    assert request(daemon, "GET", f"/export_raw_vdi?session_id={s}")[0] == 400
    # a raw body ends at the VDI's size (the rest is not read: Xen Orchestra announces 1 PiB for a stream)
    status, headers, _ = request(daemon, "PUT", f"/import_raw_vdi?session_id={s}&vdi={ref}&format=raw",
                                 b"\x01" * size + b"\x02")
    assert status == 200 and task_record(api, headers["task-id"])["status"] == "success"
    assert path.read_bytes() == b"\x01" * size
    src_status, _, _ = request(daemon, "PUT", f"/import_raw_vdi?session_id={s}&sr_id={call(api, 'VDI.get_SR', ref)}"
                                              "&format=vhd", b"x")
    assert src_status == 400


def test_import_into_a_disk_attached_to_a_running_vm_is_vdi_in_use(daemon, api):
    from support import vm_record

    ref, path = new_vdi(api, 4 * MIB)
    vm = call(api, "VM.create", vm_record(name_label="user"))
    call(api, "VBD.create", {"VM": vm, "VDI": ref, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                             "empty": False, "other_config": {}, "qos_algorithm_type": "",
                             "qos_algorithm_params": {}})
    call(api, "VM.start", vm, False, False)
    status, _, reply = request(daemon, "PUT", f"/import_raw_vdi?session_id={api[1]}&vdi={ref}&format=raw", b"x" * 512)
    assert status == 409 and b"VDI_IN_USE" in reply
    call(api, "VM.hard_shutdown", vm)


def test_npm_xen_api_get_and_put_resource_round_trip(daemon, api, tmp_path_factory):
    """Xen Orchestra's connector exports a raw VDI (getResource) and imports it into another VDI
    (putResource), through tasks; the bytes come back identical."""
    import hashlib
    import json
    import shutil

    prefix = npm_xen_api(tmp_path_factory, "npm-raw-vdi", "xen_api_raw_vdi.mjs")
    node = str(shutil.which("node"))
    size = 6 * MIB
    ref, path = new_vdi(api, size)
    original = fill(path, {MIB: os.urandom(100000), 5 * MIB: b"end"})
    target, target_path = new_vdi(api, size, "copy")
    run = subprocess.run([node, "xen_api_raw_vdi.mjs", daemon.url, "admin", PASSWORD, ref, target], cwd=prefix,
                         capture_output=True, text=True, timeout=120)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256(original).hexdigest()
    assert "error" not in result, (result, run.stderr)
    assert result["exported"] == {"size": size, "sha256": digest}
    assert result["reimported"] == {"size": size, "sha256": digest}
    assert target_path.read_bytes() == original


def test_export_to_a_client_that_stops_reading_then_goes_away(daemon, api):
    """A raw export sent straight from the thread pool (sendfile): a client that reads the head and
    a little, then closes, fails the task within seconds, frees its transfer slot, and the daemon
    keeps answering; the next export of the same disk is byte-exact, and keep-alive still works after it."""
    size = 256 * MIB
    ref, path = new_vdi(api, size)
    fill(path, {0: b"first", 100 * MIB: os.urandom(MIB), size - 4: b"last"})
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.sendall(f"GET /export_raw_vdi?session_id={api[1]}&vdi={ref} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    task = next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n") if line.startswith(b"task-id"))
    time.sleep(0.3)  # the socket buffers fill up; the sender waits for the client
    sock.close()
    rec = task_record(api, task)
    assert rec["status"] == "failure" and rec["error_info"][0] == "INTERNAL_ERROR", rec
    assert call(api, "pool.get_all")
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    for _ in range(2):  # a second request on the same connection: the direct path left it usable
        conn.request("GET", f"/export_raw_vdi?session_id={api[1]}&vdi={ref}")
        reply = conn.getresponse()
        body = reply.read()
        assert reply.status == 200 and len(body) == size
        assert body[:5] == b"first" and body[-4:] == b"last" and body == path.read_bytes()
    conn.close()


# ---------------------------------------------------- raw imports read by the thread pool (direct)


def _import_head(api: Any, target: str, length: int) -> bytes:
    return (f"PUT /import_raw_vdi?session_id={api[1]}&{target}&format=raw HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        assert more, data
        data += more
    lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}


def test_large_raw_import_in_uneven_pieces_is_byte_exact_and_keeps_holes(daemon, api):
    """A known-length raw body (read from the socket by the thread pool) sent in pieces of odd
    sizes with pauses, some of it with the head: the disk is exactly the body, and its zero
    runs are holes (over a disk whose old data must read as zeros afterwards)."""
    size = 40 * MIB
    ref, path = new_vdi(api, size)
    fill(path, {0: os.urandom(3 * MIB), 30 * MIB: os.urandom(2 * MIB)})  # old data, zeros in the body there
    body = bytearray(size)
    body[5 * MIB + 123:5 * MIB + 123 + 700000] = os.urandom(700000)
    body[17 * MIB:18 * MIB] = os.urandom(MIB)
    body[size - 9:] = b"last data"
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    try:
        sock.sendall(_import_head(api, f"vdi={ref}", size) + body[:1000])
        at = 1000
        for n, piece in enumerate((77, 3 * MIB + 5, 65536, 1, 12 * MIB + 7)):
            sock.sendall(body[at:at + piece])
            at += piece
            time.sleep(0.7 if n == 2 else 0.05)  # one pause longer than the reader's half-second poll
        sock.sendall(body[at:])
        status, headers = _read_head(sock)
        assert status == 200
        assert sock.recv(100) == b""  # closed once the import is done, as xapi does
    finally:
        sock.close()
    rec = task_record(api, headers["task-id"])
    assert rec["status"] == "success", rec
    assert path.read_bytes() == bytes(body)
    assert path.stat().st_blocks * 512 <= 4 * MIB  # 1.7 MiB of data: the zeros were not written


def test_raw_import_longer_than_the_disk_stops_at_its_size(daemon, api):
    size = 6 * MIB
    ref, path = new_vdi(api, size)
    body = os.urandom(size) + b"\xff" * (3 * MIB)
    status, headers, _ = request(daemon, "PUT", f"/import_raw_vdi?session_id={api[1]}&vdi={ref}&format=raw", body)
    assert status == 200
    assert task_record(api, headers["task-id"])["status"] == "success"
    assert path.read_bytes() == body[:size]


def test_raw_import_cancelled_while_the_client_pauses_changes_nothing(daemon, api):
    size = 32 * MIB
    ref, path = new_vdi(api, size)
    original = fill(path, {MIB: b"keep me" * 100})
    task = call(api, "task.create", "restore", "")
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    try:
        sock.sendall(_import_head(api, f"vdi={ref}&task_id={task}", size) + os.urandom(3 * MIB))
        status, headers = _read_head(sock)
        assert status == 200 and headers["task-id"] == task
        time.sleep(0.3)
        call(api, "task.cancel", task)
        rec = task_record(api, task)
        assert rec["status"] == "cancelled", rec
        deadline = time.monotonic() + 10  # the import stops while the client is still connected
        while list(path.parent.glob("*.partial")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(path.parent.glob("*.partial"))
        sock.sendall(os.urandom(MIB))  # the rest is discarded, never written
        time.sleep(0.3)
        assert path.read_bytes() == original
    finally:
        sock.close()


def test_raw_import_client_gone_mid_body_fails_the_task_and_removes_the_new_disk(daemon, api):
    sr = call(api, "pool.get_default_SR", call(api, "pool.get_all")[0])
    vdis_before = set(call(api, "VDI.get_all"))
    files_before = set(sr_dir(api, sr).iterdir())
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    try:
        sock.sendall(_import_head(api, f"sr_id={sr}", 64 * MIB) + os.urandom(9 * MIB))
        status, headers = _read_head(sock)
        assert status == 200
    finally:
        sock.close()
    rec = task_record(api, headers["task-id"])
    assert rec["status"] == "failure" and rec["error_info"][0] == "IMPORT_ERROR", rec
    deadline = time.monotonic() + 10
    while set(sr_dir(api, sr).iterdir()) != files_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(sr_dir(api, sr).iterdir()) == files_before
    assert set(call(api, "VDI.get_all")) == vdis_before


def test_probe_without_body_then_the_real_import_at_once(daemon, api):
    """Xen Orchestra's connector probes with the head alone (1 PiB announced) and hangs up, then
    sends the real upload at once: the probe's import is over before the next one is checked
    (no OTHER_OPERATION_IN_PROGRESS), and the upload lands."""
    size = 3 * MIB
    ref, path = new_vdi(api, size)
    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as probe:
        probe.sendall(_import_head(api, f"vdi={ref}", 1 << 50))
        assert _read_head(probe)[0] == 200
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(_import_head(api, f"vdi={ref}", 1 << 50))
        status, headers = _read_head(sock)
        assert status == 200
        sock.sendall(data)
    assert task_record(api, headers["task-id"])["status"] == "success"
    assert path.read_bytes() == data


def test_raw_import_into_sr_refuses_a_size_beyond_the_disk_limit_before_the_body(daemon, api):
    """A Content-Length above the largest disk an import creates is refused (413) from the head
    alone: no file, no VDI, no task left pending."""
    sr = call(api, "pool.get_default_SR", call(api, "pool.get_all")[0])
    vdis_before = set(call(api, "VDI.get_all"))
    files_before = set(sr_dir(api, sr).iterdir())
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(_import_head(api, f"sr_id={sr}", (64 << 40) + 1))
        status, _ = _read_head(sock)
    assert status == 413
    assert set(sr_dir(api, sr).iterdir()) == files_before
    assert set(call(api, "VDI.get_all")) == vdis_before
