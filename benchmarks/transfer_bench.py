"""Raw disk transfer benchmark (issue 17): a sparse raw VDI exported and imported over loopback.

    python benchmarks/transfer_bench.py [--quick]

The client is Python's http.client: the export read with ``readinto`` into one reused 4 MiB
buffer, the import sent with ``socket.sendfile`` and timed until its task succeeded (the 200
comes before the body, as xapi's).

A real daemon (``python -m xapid serve``, sim backend) holds a VDI of 4 GiB with 512 MiB of
random data (``--quick``: 1 GiB with 128 MiB).  Measured in the same run:

* the baseline: ``cat`` of the disk file to ``/dev/null`` (holes read as zeros, as the export
  sends them), page cache warm;
* a second reference, the loopback ceiling: 1 GiB of zeros between two sockets of this process
  (4 MiB sends, ``recv_into`` a reused buffer): no HTTP, no disk — what loopback TCP carries here;
* ``GET /export_raw_vdi?format=raw`` read to nowhere; ``format=vhd`` too (only allocated blocks);
* ``PUT /import_raw_vdi?format=raw`` of the same image into a second VDI (from a sparse file);
* the daemon's RSS (``/proc/<pid>/status`` VmRSS) before and at its peak during the transfers;
* the p99 latency of a small call (``VM.get_all_records`` … ``pool.get_all``) during the export,
  against its idle value.

Goals: export and import throughput ≥ 0.5× cat's; RSS growth ≤ 32 MB; p99 during ≤ 3× idle.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

sys.path.insert(0, str(HERE))
from common import handle_signals, machine, rss_kib  # noqa: E402
from support import PASSWORD, RealDaemon  # noqa: E402

MIB = 1 << 20


class RssWatch(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, rss_kib(pid), False

    def run(self) -> None:
        while not self.stop_flag:
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)


def small_calls(url: str, session: str, seconds: float | None, stop: threading.Event | None = None) -> list[float]:
    proxy = xmlrpc.client.ServerProxy(url)
    pool = proxy.pool.get_all(session)["Value"][0]
    times: list[float] = []
    end = time.monotonic() + (seconds or 1e9)
    while not times or (time.monotonic() < end and not (stop is not None and stop.is_set())):
        t = time.perf_counter()
        proxy.pool.get_record(session, pool)
        times.append(time.perf_counter() - t)
        time.sleep(0.01)
    return times


def loopback_gib_s(total: int = 1 << 30, path: Path | None = None) -> float:
    """GiB/s of zeros through a loopback TCP connection in this process (sender thread, recv_into);
    with *path*, the file sent with ``socket.sendfile`` as the import's client sends it (the
    import's ceiling: the client's side and the socket, no HTTP, no disk writes)."""
    import socket

    if path is not None:
        total = path.stat().st_size
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    zeros = memoryview(bytes(4 * MIB))

    def send() -> None:
        if path is not None:
            with open(path, "rb") as f:
                peer.sendfile(f)
            peer.close()
            return
        left = total
        while left:
            left -= peer.send(zeros[:min(left, len(zeros))])
        peer.close()

    sender = threading.Thread(target=send)
    buf = memoryview(bytearray(4 * MIB))
    start = time.perf_counter()
    sender.start()
    while client.recv_into(buf):
        pass
    elapsed = time.perf_counter() - start
    sender.join()
    client.close()
    server.close()
    return total / elapsed / (1 << 30)


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))] if values else float("nan")


def timed_get(port: int, target: str) -> tuple[float, int]:
    """GET *target*, the body read into one reused 4 MiB buffer (``readinto``: the client copies nothing)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("GET", target)
    reply = conn.getresponse()
    assert reply.status == 200, reply.status
    total = 0
    buf = memoryview(bytearray(4 * MIB))
    while True:
        n = reply.readinto(buf)
        if not n:
            break
        total += n
    conn.close()
    return time.perf_counter() - start, total


def timed_put(port: int, target: str, path: Path, url: str, session: str) -> tuple[float, float]:
    """PUT the file with ``socket.sendfile`` (the client copies nothing), then wait for the task:
    the 200 comes before the body (xapi's import protocol), the import is done when its task is.
    Seconds until the whole body was sent, and until the task succeeded."""
    size = path.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.putrequest("PUT", target)
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    assert conn.sock is not None
    with open(path, "rb") as f:
        conn.sock.sendfile(f)
    sent = time.perf_counter() - start
    reply = conn.getresponse()
    body = reply.read()
    assert reply.status == 200, (reply.status, body)
    task = reply.getheader("task-id")
    conn.close()
    proxy = xmlrpc.client.ServerProxy(url)
    while True:
        record = proxy.task.get_record(session, task)["Value"]
        if record["status"] != "pending":
            break
        time.sleep(0.005)
    assert record["status"] == "success", record
    return sent, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 GiB disk with 128 MiB of data")
    parser.add_argument("--smoke", action="store_true", help="64 MiB disk with 8 MiB of data (the test suite's)")
    args = parser.parse_args(argv)
    size, data = (64 * MIB, 8 * MIB) if args.smoke else (1 << 30, 128 * MIB) if args.quick else (4 << 30, 512 * MIB)
    handle_signals("transfer_bench.py")
    print(machine(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="xapid-transfer-bench-"))
    daemon = RealDaemon(tmp)
    try:
        proxy = xmlrpc.client.ServerProxy(daemon.url)
        s = proxy.session.login_with_password("admin", PASSWORD)["Value"]
        pool = proxy.pool.get_all(s)["Value"][0]
        sr = proxy.pool.get_default_SR(s, pool)["Value"]
        record = {"name_label": "bench", "name_description": "", "SR": sr, "virtual_size": str(size), "type": "user",
                  "sharable": False, "read_only": False, "other_config": {}, "xenstore_data": {}, "sm_config": {},
                  "tags": []}
        vdi = proxy.VDI.create(s, record)["Value"]
        target = proxy.VDI.create(s, record)["Value"]
        pbd = proxy.PBD.get_record(s, proxy.SR.get_PBDs(s, sr)["Value"][0])["Value"]
        path = Path(pbd["device_config"]["location"]) / proxy.VDI.get_location(s, vdi)["Value"]
        print(f"disk: {size >> 20} MiB, {data >> 20} MiB of data in 8 extents", file=sys.stderr)
        with open(path, "r+b") as f:
            piece = data // 8
            for n in range(8):
                f.seek(n * (size // 8))
                f.write(os.urandom(piece))
        cat = shutil.which("cat") or "cat"
        subprocess.run([cat, str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        start = time.perf_counter()
        subprocess.run([cat, str(path)], stdout=subprocess.DEVNULL, check=True)
        cat_s = time.perf_counter() - start
        loop = max(loopback_gib_s(size) for _ in range(2)) if args.smoke else max(loopback_gib_s() for _ in range(2))
        upload = max(loopback_gib_s(path=path) for _ in range(2))
        idle = small_calls(daemon.url, s, 0.5 if args.smoke else 3.0)
        rss0 = rss_kib(daemon.proc.pid)
        watch = RssWatch(daemon.proc.pid)
        watch.start()
        stop = threading.Event()
        during: list[float] = []
        caller = threading.Thread(target=lambda: during.extend(small_calls(daemon.url, s, None, stop)))
        caller.start()
        export_s, got = timed_get(daemon.port, f"/export_raw_vdi?session_id={s}&vdi={vdi}&format=raw")
        stop.set()
        caller.join()
        assert got == size
        vhd_s, vhd_len = timed_get(daemon.port, f"/export_raw_vdi?session_id={s}&vdi={vdi}&format=vhd")
        stop = threading.Event()
        during_import: list[float] = []
        caller = threading.Thread(target=lambda: during_import.extend(small_calls(daemon.url, s, None, stop)))
        caller.start()
        sent_s, import_s = timed_put(daemon.port, f"/import_raw_vdi?session_id={s}&vdi={target}&format=raw", path,
                                     daemon.url, s)
        stop.set()
        caller.join()
        watch.stop_flag = True
        watch.join()
        gib = size / (1 << 30)
        print(f"cat baseline         : {cat_s:6.2f} s  {gib / cat_s:6.2f} GiB/s")
        print(f"loopback ceiling     :         {loop:6.2f} GiB/s  (TCP over lo, no HTTP, no disk)")
        print(f"sendfile ceiling     :         {upload:6.2f} GiB/s  (the disk file sendfile'd over lo, recv_into)")
        print(f"export raw           : {export_s:6.2f} s  {gib / export_s:6.2f} GiB/s  "
              f"ratio {cat_s / export_s:4.2f}x cat (goal >= 0.5), {gib / export_s / loop:4.2f}x loopback")
        print(f"export vhd           : {vhd_s:6.2f} s  {vhd_len >> 20} MiB sent (allocated blocks only)")
        print(f"import raw           : {import_s:6.2f} s  {gib / import_s:6.2f} GiB/s  "
              f"ratio {cat_s / import_s:4.2f}x cat (goal >= 0.5), {gib / import_s / loop:4.2f}x loopback, "
              f"{gib / import_s / upload:4.2f}x sendfile ceiling; body sent after {sent_s:.2f} s")
        print(f"daemon RSS           : {rss0 / 1024:6.1f} MiB idle, peak {watch.peak / 1024:6.1f} MiB, "
              f"growth {(watch.peak - rss0) / 1024:5.1f} MiB (goal <= 32 MB)")
        print(f"small call p99       : idle {p99(idle) * 1e3:6.2f} ms, during export {p99(during) * 1e3:6.2f} ms, "
              f"ratio {p99(during) / p99(idle):4.2f}x (goal <= 3), {len(during)} calls; during import "
              f"{p99(during_import) * 1e3:6.2f} ms, ratio {p99(during_import) / p99(idle):4.2f}x, "
              f"{len(during_import)} calls")
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
