"""A simulated clock (neuronserve.server.clock.Clock's interface) for the batcher and lending tests: time moves
only when the test calls `advance`, so a test asserts exact windows (a batch taken at t0 + max_batch_delay, not
a moment before) and never sleeps through them. The tests step in binary fractions of a second (0.25, 1/64):
their sums are exact, so windows compare with ==.

Threads under test block on it: `wait` (a condition's wait) until a notify or an advance past its deadline,
`sleep` until an advance past its end. `blocked()` tells the test they are there, so that it advances only time
they wait on. A wait woken by a notify stays listed until its thread runs on, so after a notify a test does not
rely on `blocked()`, nor advances while that thread may be about to wait again (it would read the time before
the advance and register its deadline after it, late by the advance).

Real time is only a guard: a thread blocked STUCK_S of it (nothing advanced the clock: the test is stuck) raises
TimeoutError rather than hang the run.
"""
from __future__ import annotations

import math
import threading

STUCK_S = 10.0


def _stuck(what: str) -> TimeoutError:
    return TimeoutError(f"{what} for {STUCK_S} s of real time on the simulated clock")


class SimulatedClock:
    def __init__(self, start: float = 1000.0):
        # not 0: the code under test takes a time of 0 for "never" (no batch ended yet)
        self._now = start
        self._lock = threading.Condition()      # guards the two below; notified when they change
        # per blocked call: its deadline (inf: none) and the condition its thread waits on (None: a sleep)
        self._blocked: dict[object, tuple[float, threading.Condition | None]] = {}

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        """condition.wait(timeout) on simulated time; the caller holds `condition`."""
        with self._lock:
            key = self._block(timeout, condition)
        if key is None:
            return
        try:
            # advance notifies with `condition` held, and this thread holds it until wait() lets it go: a deadline
            # passed after the registration is never missed
            if not condition.wait(STUCK_S):
                raise _stuck("waited")
        finally:
            with self._lock:
                self._blocked.pop(key, None)    # still there when a notify woke it

    def sleep(self, seconds: float) -> None:
        with self._lock:
            key = self._block(seconds, None)
            # advance takes the entry out once its end has passed
            if key is not None and not self._lock.wait_for(lambda: key not in self._blocked, STUCK_S):
                del self._blocked[key]
                raise _stuck("slept")

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds`, waking the waits and sleeps whose deadline that passes."""
        with self._lock:
            self._now += seconds
            due = [key for key, (deadline, _) in self._blocked.items() if deadline <= self._now]
            conditions = dict.fromkeys(c for _, c in map(self._blocked.pop, due) if c is not None)
            self._lock.notify_all()
        # taken with the clock's lock let go: a waiter takes the clock's lock while it holds its condition
        for condition in conditions:
            with condition:
                condition.notify_all()

    def blocked(self, count: int = 1) -> list[float]:
        """The deadlines (inf: none) of the waits and sleeps blocked on the clock, once there are `count`."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._blocked) >= count, STUCK_S):
                raise _stuck(f"fewer than {count} threads blocked")
            return sorted(deadline for deadline, _ in self._blocked.values())

    def _block(self, seconds: float | None, condition: threading.Condition | None) -> object | None:
        """Register a blocked call (the lock held: its deadline is read from the time now and registered at once,
        so that no advance comes between the two); None when it has nothing to wait for."""
        if seconds is not None and seconds <= 0:
            return None
        key = object()
        self._blocked[key] = (math.inf if seconds is None else self._now + seconds, condition)
        self._lock.notify_all()
        return key
