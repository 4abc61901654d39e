"""Closed-loop load through the nginx front, counting every request sent and every failure, until told to stop.

usage: load.py URL BODY CONCURRENCY STOP_FILE MAX_SECONDS
Runs in the container's network namespace (the test starts it with `nsenter -n`). Each request opens its own
connection, so a failure is the server's doing and never a client reusing a keep-alive connection nginx just
closed. Stops when STOP_FILE exists (or after MAX_SECONDS) and prints one JSON summary line; each failure in it is
[started, kind, seconds taken], started counted from "t0" (CLOCK_MONOTONIC, the machine's).
"""
from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from urllib.parse import urlsplit


def main() -> None:
    url, body, concurrency, stop_file, max_s = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), sys.argv[4], \
        float(sys.argv[5])
    parts = urlsplit(url)
    lock = threading.Lock()
    stats = {"sent": 0, "ok": 0, "failed": 0, "codes": {}, "errors": {}, "max_latency_s": 0.0, "failures": []}
    t0 = time.monotonic()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            start = time.monotonic()
            code, error = None, None
            try:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                conn.request("POST", parts.path, body, {"Content-Type": "application/json", "Connection": "close"})
                resp = conn.getresponse()
                resp.read()
                code = resp.status
                conn.close()
            except Exception as e:          # every failure kind counts, by name
                error = type(e).__name__
            took = time.monotonic() - start
            with lock:
                stats["sent"] += 1
                stats["max_latency_s"] = max(stats["max_latency_s"], took)
                if code is not None:
                    stats["codes"][str(code)] = stats["codes"].get(str(code), 0) + 1
                if code == 200:
                    stats["ok"] += 1
                else:
                    stats["failed"] += 1
                    kind = error or f"HTTP {code}"
                    stats["errors"][kind] = stats["errors"].get(kind, 0) + 1
                    stats["failures"].append([round(start - t0, 2), kind, round(took, 3)])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    while not os.path.exists(stop_file) and time.monotonic() - t0 < max_s:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=70)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    stats["t0"] = t0        # CLOCK_MONOTONIC is the machine's: the test places the failures on its own timeline
    stats["failures"] = stats["failures"][:50]
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
