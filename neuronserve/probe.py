"""HTTP checks of one group on 127.0.0.1: is it ready (warm-up passed), what does its /metrics say."""
from __future__ import annotations

import urllib.error
import urllib.request

from neuronserve import scrape


class Probe:
    """HTTP checks of one group on 127.0.0.1: readiness and requests in flight."""

    def __init__(self, timeout_s: float = 2.0):
        self.timeout_s = timeout_s

    def _get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=self.timeout_s) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, ""
        except (OSError, ValueError):
            return 0, ""

    def ready(self, port: int) -> bool:
        return self._get(port, "/v2/health/ready")[0] == 200

    def metrics(self, port: int) -> str | None:
        status, text = self._get(port, "/metrics")
        return text if status == 200 else None

    def in_flight(self, port: int) -> float | None:
        """Requests the group is working on, or None when it does not export the gauge (or is unreachable)."""
        text = self.metrics(port)
        return None if text is None else scrape.parse(text).in_flight
