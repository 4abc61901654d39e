"""The one HTTP client of the operating commands, and the one readiness poller.

apply (readiness, drain), status, top and bench (/metrics), up, bench and the demo (waiting for readiness) all
GET through a Probe: httpx without proxies from the environment (the groups are on the loopback), one
connection pool per Probe, short timeouts, and an unreachable server reported as status 0 rather than raised.
"""
from __future__ import annotations

import time
from typing import Callable

import httpx

from neuronserve.measure import scrape

READY_PATH = "/v2/health/ready"


class ProbeError(OSError):
    """A page that could not be fetched (unreachable, or not 200)."""


class Probe:
    def __init__(self, timeout_s: float = 2.0):
        self.timeout_s = timeout_s
        self._client = httpx.Client(timeout=timeout_s, trust_env=False)

    def get(self, url: str) -> tuple[int, str]:
        """(status, body); status 0 when nothing answered."""
        try:
            r = self._client.get(url)
        except httpx.HTTPError:
            return 0, ""
        return r.status_code, r.text

    def text(self, url: str) -> str:
        """The body of a page that must answer 200 (a /metrics page): ProbeError otherwise."""
        status, body = self.get(url)
        if status != 200:
            raise ProbeError(f"{url}: " + (f"HTTP {status}" if status else "no answer"))
        return body

    def ready_at(self, base_url: str) -> bool:
        return self.get(base_url + READY_PATH)[0] == 200

    def ready(self, port: int) -> bool:
        return self.ready_at(f"http://127.0.0.1:{port}")

    def metrics(self, port: int) -> str | None:
        status, text = self.get(f"http://127.0.0.1:{port}/metrics")
        return text if status == 200 else None

    def in_flight(self, port: int) -> float | None:
        """Requests the group is working on, or None when it does not export the gauge (or is unreachable)."""
        text = self.metrics(port)
        return None if text is None else scrape.parse(text).in_flight

    def close(self) -> None:
        self._client.close()


def wait_ready(urls: dict[str, str], timeout_s: float, *, probe: Probe | None = None,
               check: Callable[[], None] = lambda: None, progress: Callable[[str], None] | None = None,
               last: str | None = None, poll_s: float = 0.25, sleep=time.sleep,
               clock=time.monotonic) -> list[str]:
    """Poll each name's base URL until it answers ready; the names still not ready after `timeout_s` (none
    when all are). `check` runs before each round and raises to give up early (a process exited); `last` is
    polled only once the others are ready (the front, which routes to them)."""
    probe = probe or Probe()
    deadline = clock() + timeout_s
    pending = dict(urls)
    while pending:
        check()
        for name in [n for n in pending if n != last or len(pending) == 1]:
            if probe.ready_at(pending[name]):
                del pending[name]
                if progress:
                    progress(f"{name} ready")
        if not pending or clock() > deadline:
            break
        sleep(poll_s)
    return list(pending)
