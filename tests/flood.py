"""A password-guessing flood against a xapid port, run as its own process (its threads then share
no GIL with the process measuring the legitimate client).

    python tests/flood.py --port PORT --first 2 --sources 10 --connections 150 --seconds 3 \
        [--user victim] [--mode rpc|basic]

Opens *connections* keep-alive HTTP connections spread over the source addresses 127.0.0.<first>
… 127.0.0.<first+sources-1> (Linux routes all of 127.0.0.0/8 on loopback), each in a thread,
and sends wrong-password logins in a loop for *seconds*: ``session.login_with_password`` over
XML-RPC (``rpc``), or ``GET /host_rrd`` with HTTP Basic (``basic``).  Prints ``ready`` once every
thread has connected, then one JSON line: answers received, by kind, and the elapsed time.
Used by tests/test_login_throttle.py and benchmarks/login_flood.py.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import secrets
import sys
import threading
import time
import xmlrpc.client
from collections import Counter


def attack(port: int, source: str, user: str, mode: str, box: dict[str, float], ready: threading.Barrier,
           counts: Counter, lock: threading.Lock) -> None:
    local: Counter = Counter()
    conn: http.client.HTTPConnection | None = None

    def connect() -> http.client.HTTPConnection:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
        c.connect()
        return c

    try:
        conn = connect()
    except OSError:
        local["connect_error"] += 1
    try:
        ready.wait(60)
    except threading.BrokenBarrierError:
        pass
    deadline = box["deadline"]
    while time.monotonic() < deadline:
        password = secrets.token_hex(8)
        try:
            if conn is None:
                conn = connect()
            if mode == "rpc":
                body = xmlrpc.client.dumps((user, password), "session.login_with_password").encode()
                conn.request("POST", "/", body, {"Content-Type": "text/xml"})
            else:
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                conn.request("GET", "/host_rrd", headers={"Authorization": f"Basic {token}"})
            reply = conn.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException):
            local["error"] += 1
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)
            continue
        if mode == "rpc":
            if reply.status == 200 and b"SESSION_AUTHENTICATION_FAILED" in data:
                local["failed"] += 1
            elif reply.status == 200 and b"Success" in data:
                local["success"] += 1
            else:
                local[f"http_{reply.status}"] += 1
        else:
            local["failed" if reply.status == 401 else f"http_{reply.status}"] += 1
        if reply.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    with lock:
        counts.update(local)


def main() -> int:
    parser = argparse.ArgumentParser(description="Wrong-password login flood from 127.0.0.x sources.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, default=2, help="first source: 127.0.0.FIRST")
    parser.add_argument("--sources", type=int, default=10, help="how many source addresses")
    parser.add_argument("--connections", type=int, default=150)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--user", default="victim")
    parser.add_argument("--mode", choices=("rpc", "basic"), default="rpc")
    args = parser.parse_args()
    sources = [f"127.0.0.{args.first + i}" for i in range(args.sources)]
    counts: Counter = Counter()
    lock = threading.Lock()
    box: dict[str, float] = {"deadline": 0.0}
    # the flood runs for *seconds* from the moment every thread has connected
    ready = threading.Barrier(args.connections + 1,
                              action=lambda: box.update(deadline=time.monotonic() + args.seconds))
    threads = [threading.Thread(target=attack, args=(args.port, sources[i % len(sources)], args.user, args.mode,
                                                     box, ready, counts, lock), daemon=True)
               for i in range(args.connections)]
    for t in threads:
        t.start()
    try:
        ready.wait(60)
    except threading.BrokenBarrierError:
        box["deadline"] = time.monotonic() + args.seconds
    started = time.monotonic()
    print("ready", flush=True)
    for t in threads:
        t.join(args.seconds + 60)
    elapsed = time.monotonic() - started
    print(json.dumps({"answers": sum(v for k, v in counts.items() if not k.endswith("error")),
                      "counts": dict(counts), "seconds": elapsed, "sources": sources}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
