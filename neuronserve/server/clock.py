"""The clock the batcher and CPU lending read: time, timed waits on a condition, sleeps.

They take it as a parameter (the real one by default) so that their tests drive the batching delay, the wait for
returning clients and the lending patience on simulated time (tests/simclock.py): exact windows, and no test
that sleeps through them or fails when a loaded machine runs it late.
"""
from __future__ import annotations

import threading
import time


class Clock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        """condition.wait(timeout): the caller holds `condition`; None waits for a notify, however long."""
        condition.wait(timeout)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


REAL = Clock()
