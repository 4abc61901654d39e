"""The worker's sd_notify messages, read from a notify socket of the test's own (as systemd reads its own), with
the group run as its unit runs it: gunicorn, the worker class, and the config's on_starting hook. Under the real
systemd: tests/systemd/test_units.py."""
from __future__ import annotations

import re
import shutil
import signal
import socket
import time

import httpx
import numpy as np
import pytest

from neuronserve.build.artifact import read_manifest, write_manifest
from server_kit import Gunicorn, settings_for

HOOK = ("-c", "python:neuronserve.server.systemd_notify")    # what the rendered gunicorn config imports
WATCHDOG_S = 0.6


class NotifySocket:
    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[tuple[float, str]] = []

    def until(self, what: str, timeout: float = 120) -> str:
        """Read messages until one with a line starting with `what`; that message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            self.seen.append((time.monotonic(), data))
            if any(line.startswith(what) for line in data.splitlines()):
                return data
        raise AssertionError(f"no {what} within {timeout} s; got {[m for _, m in self.seen]}")

    def close(self):
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    s = NotifySocket(tmp_path / "notify")
    yield s
    s.close()


def test_ready_comes_from_the_worker_once_every_copy_is_warm_then_watchdog_status_and_stopping(
        model_repo, tmp_path, notify):
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}
    with Gunicorn(settings_for(model_repo / "cls", copies=2), tmp_path / "gunicorn.log", extra_env=env,
                  args=HOOK) as g:
        ready = notify.until("READY=1")
        # the unit is ready exactly when the group is: its readiness route agrees at once
        assert httpx.get(g.url + "/v2/health/ready", timeout=5).status_code == 200
        assert "STATUS=ready: 2 of 2 copies warm, " in ready, ready
        before = [m for _, m in notify.seen]
        assert not any("arbiter" in m for m in before), before       # gunicorn's master kept quiet
        assert any(m.startswith("STATUS=loading 2 copies of cls") for m in before), before
        # the event loop pings while it turns, and says how busy it is
        for _ in range(5):
            httpx.post(g.url + "/models/cls", json={"inputs": "fine"}, timeout=30).raise_for_status()
        pings = [notify.until("WATCHDOG=1") for _ in range(3)]
        assert all(p == "WATCHDOG=1" for p in pings)
        assert any(re.search(r"copies warm, [1-9][0-9.]* requests/s", m) for _, m in notify.seen), notify.seen
        g.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.until("STOPPING=1", 60)
        assert g.wait_exit(60) == 0
        assert "did not stop" not in g.log()


def test_a_wrong_warm_up_answer_fails_the_start_with_its_reason(model_repo, tmp_path, notify):
    bad = tmp_path / "cls"
    shutil.copytree(model_repo / "cls", bad)
    manifest = read_manifest(bad)
    manifest.warmup.expected = {k: (np.asarray(v) + 0.5).tolist() for k, v in manifest.warmup.expected.items()}
    write_manifest(bad, manifest)
    with Gunicorn(settings_for(bad, copies=1), tmp_path / "gunicorn.log", extra_env={"NOTIFY_SOCKET": notify.path},
                  args=HOOK) as g:
        status = notify.until("STATUS=failed: ")
        assert status == "STATUS=failed: copy 0: warm-up gave a wrong answer: " + status.split("answer: ", 1)[1]
        assert not any("READY=1" in m for _, m in notify.seen), notify.seen
        # gunicorn's boot-error code: the master stops, and systemd (RestartPreventExitStatus=3) does not retry
        assert g.wait_exit(60) == 3
        assert "cannot start cls-0: copy 0: warm-up gave a wrong answer" in g.log()
