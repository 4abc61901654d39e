"""What the systemd tests share: unit properties, readiness, polling and a closed-loop load through nginx."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

LOAD = Path(__file__).parent / "load.py"
FRONT = "http://127.0.0.1:8080/models/tiny"
BODY = json.dumps({"inputs": "a short sentence to classify"})


def prop(box, unit: str, name: str) -> str:
    return box.run(["systemctl", "show", unit, f"--property={name}", "--value"]).stdout.strip()


def worker_pid(box, unit: str) -> int | None:
    """The gunicorn worker: the one child of the unit's main process (None while there is not exactly one)."""
    main = prop(box, unit, "MainPID")
    kids = box.run(["pgrep", "-P", main], check=False).stdout.split()
    return int(kids[0]) if len(kids) == 1 else None


def ready(box, port: int) -> bool:
    r = box.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                 f"http://127.0.0.1:{port}/v2/health/ready"], check=False)
    return r.stdout.strip() == "200"


def nginx_says(box) -> str:
    """The front's last error and access log lines, for a failed assertion's message."""
    return box.sh("tail -n 15 /var/log/nginx/error.log; tail -n 15 /var/log/nginx/neuronserve.access.log",
                  check=False).stdout


def wait_until(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Load:
    """tests/systemd/load.py in the container's network namespace, through nginx; or, with `box` None, on the host
    (a fleet's clients, through its load balancer), its stop file in `state`."""

    def __init__(self, box, concurrency: int, max_s: float = 240, url: str = FRONT, body: str = BODY,
                 state: Path | None = None):
        self.stop_file = (state or box.state) / f"stop-{time.monotonic_ns()}"
        argv = [sys.executable, str(LOAD), url, body, str(concurrency), str(self.stop_file), str(max_s)]
        self.proc = (box.popen_in_netns(argv, stdout=subprocess.PIPE, text=True) if box
                     else subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))

    def finish(self) -> dict:
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=120)
        return json.loads(out)
