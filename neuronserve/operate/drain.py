"""Take this host out of a fleet's load balancer before an upgrade, and back in: `neuronserve drain` / `undrain`.

drain writes the flag file (layout.drain_flag); while it exists the nginx front answers its own readiness,
/v2/health/ready, with 503, so a load balancer that health-checks it stops sending new requests. Requests that
still arrive (before the balancer's checks fail) are served as usual. drain then waits until the groups are
quiet: no request in flight and none answered for `quiet_s`, which means the balancer has let go. The groups
can then be stopped, upgraded or `apply`-ed without a failed request; `undrain` removes the flag, and the
balancer re-admits the host after its next successful checks.

The flag is state (under /var/lib/neuronserve), not runtime: a drained host that reboots stays drained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from neuronserve.errors import ServiceError
from neuronserve.layout import Layout
from neuronserve.measure import scrape
from neuronserve.measure.probe import Probe
from neuronserve.plan import Plan

POLL_S = 0.5


@dataclass
class Quiet:
    """What the groups were doing at one look: requests answered so far and in flight, summed over groups."""

    answered: float
    in_flight: float


def look(plan: Plan, probe: Probe) -> Quiet:
    answered = in_flight = 0.0
    for g in plan.groups:
        text = probe.metrics(g.port)
        if text is None:            # a stopped group serves nothing: quiet
            continue
        c = scrape.parse(text)
        answered += c.requests
        in_flight += c.in_flight or 0.0
    return Quiet(answered, in_flight)


def drained(layout: Layout) -> bool:
    return layout.drain_flag.exists()


def drain(plan: Plan, layout: Layout, *, quiet_s: float = 5.0, timeout_s: float = 120.0, wait: bool = True,
          probe: Probe | None = None, progress: Callable[[str], None] = lambda line: None,
          sleep=time.sleep, clock=time.monotonic) -> float:
    """Make the front unready, then wait until no request came for `quiet_s` and none is in flight.

    Returns the seconds waited. Raises ServiceError when requests keep coming after `timeout_s`: the load
    balancer is not checking /v2/health/ready of this front (the flag stays: the host is still drained)."""
    if not plan.config.nginx.enabled:
        raise ServiceError("drain turns the nginx front's readiness to 503, and nginx.enabled is false: there is no "
                           "front for a load balancer to check. Take this host out at the balancer itself")
    flag = layout.drain_flag
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text("drained by `neuronserve drain`; `neuronserve undrain` removes this file\n")
    progress(f"front unready ({flag} written): load balancers checking /v2/health/ready stop sending")
    if not wait:
        return 0.0
    probe = probe or Probe()
    t0 = clock()
    last = look(plan, probe)
    quiet_since = t0
    while True:
        sleep(POLL_S)
        now_look, now = look(plan, probe), clock()
        if now_look.in_flight or now_look.answered != last.answered:
            quiet_since = now
        last = now_look
        if now - quiet_since >= quiet_s:
            progress(f"drained: no request for {quiet_s:g} s, none in flight ({now - t0:.1f} s)")
            return now - t0
        if now - t0 > timeout_s:
            raise ServiceError(
                f"requests still arrive {timeout_s:g} s after the front turned unready ({last.in_flight:g} in "
                f"flight): is the load balancer health-checking http://<this host>/v2/health/ready? The host stays "
                f"drained; `neuronserve undrain` re-admits it")


def undrain(layout: Layout, *, progress: Callable[[str], None] = lambda line: None) -> bool:
    """Remove the flag; False when the host was not drained."""
    try:
        layout.drain_flag.unlink()
    except FileNotFoundError:
        return False
    progress("front ready again: load balancers re-admit this host after their next successful checks")
    return True
