"""`neuronserve status`: per group its unit state, PID, cores, port, readiness and requests/s; who holds the cores.

Core holders come from the host discovery (neuron-ls on Neuron). A holder is legitimate when it runs inside
the active unit of the group that owns cores on that device; anything else holding a NeuronCore is stale (a
leftover of a stopped unit, a process started by hand, a unit the config no longer has): it is the usual cause
of "NeuronCore(s) not available" when a group starts.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from neuronserve.measure import scrape
from neuronserve.config import format_core_list
from neuronserve.devices import Holder
from neuronserve.plan import Plan
from neuronserve.measure.probe import Probe
from neuronserve.render import TARGET
from neuronserve.operate.systemctl import Systemctl


@dataclass
class GroupStatus:
    name: str
    unit: str
    state: str                  # ActiveState (SubState), e.g. "active (running)"
    pid: int | None             # the unit's main process (gunicorn master)
    restarts: int | None        # times systemd restarted it (Restart=on-failure)
    cores: str
    port: int
    ready: bool
    rps: float | None           # requests/s over the sampling interval; None when not ready


@dataclass
class HolderStatus:
    pid: int
    command: str
    cores: tuple[int, ...]
    unit: str | None            # the systemd unit the process runs in
    stale: bool
    why: str


@dataclass
class Status:
    backend: str
    target: str
    groups: list[GroupStatus]
    holders: list[HolderStatus]
    drained: bool = False       # `neuronserve drain`: the front answers its readiness with 503


def unit_of(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The systemd service a process runs in, from its cgroup path; None when it is in none (or is gone)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        for part in reversed(line.split(":", 2)[-1].split("/")):
            if part.endswith(".service"):
                return part
    return None


def classify(plan: Plan, holders: list[Holder], active_units: set[str],
             unit_of: Callable[[int], str | None] = unit_of) -> list[HolderStatus]:
    """Which core holders belong to a running group of this plan, and which are stale (and why)."""
    by_unit = {g.unit: g for g in plan.groups}
    out = []
    for h in holders:
        unit = unit_of(h.pid)
        group = by_unit.get(unit)
        if group is None:
            why = (f"runs in {unit}, which is not a group of this config" if unit
                   else "not started by neuronserve (no systemd unit)")
            stale = True
        elif unit not in active_units:
            why, stale = f"left over: {unit} is not active", True
        elif not set(group.cores) & set(h.cores):
            why, stale = f"{unit} owns cores {group.core_list}, not these", True
        else:
            why, stale = f"group {group.name}", False
        out.append(HolderStatus(pid=h.pid, command=h.command, cores=tuple(h.cores), unit=unit, stale=stale, why=why))
    return out


def collect(plan: Plan, *, systemctl: Systemctl | None = None, probe: Probe | None = None,
            holders: list[Holder] | None = None, unit_of: Callable[[int], str | None] = unit_of,
            drained: bool = False, interval_s: float = 1.0, sleep=time.sleep, clock=time.monotonic) -> Status:
    systemctl = systemctl or Systemctl()
    probe = probe or Probe()
    rows, before = [], {}
    for g in plan.groups:
        p = systemctl.show(g.unit, "ActiveState", "SubState", "MainPID", "NRestarts")
        pid = int(p["MainPID"] or 0) or None
        ready = probe.ready(g.port)
        rows.append(GroupStatus(name=g.name, unit=g.unit, state=f"{p['ActiveState'] or 'unknown'} ({p['SubState']})",
                                pid=pid, restarts=int(p["NRestarts"]) if p["NRestarts"].isdigit() else None,
                                cores=g.core_list, port=g.port, ready=ready, rps=None))
        if ready:
            before[g.name] = probe.metrics(g.port)
    # requests/s: the difference of two scrapes of neuronserve_requests_total
    if before:
        t0 = clock()
        sleep(interval_s)
        dt = max(clock() - t0, 1e-6)
        for row in rows:
            text0 = before.get(row.name)
            text1 = probe.metrics(row.port) if text0 is not None else None
            if text0 is not None and text1 is not None:
                row.rps = scrape.rates(scrape.parse(text0), scrape.parse(text1), dt).rps
    active = {r.unit for r in rows if r.state.startswith("active ")}
    return Status(backend=plan.host.backend, target=systemctl.is_active(TARGET), groups=rows,
                  holders=classify(plan, holders if holders is not None else plan.host.holders, active, unit_of),
                  drained=drained)


def as_text(status: Status) -> str:
    drained = "   front: DRAINED (readiness 503; `neuronserve undrain` re-admits)" if status.drained else ""
    lines = [f"{TARGET}: {status.target}   backend: {status.backend}{drained}",
             f"{'GROUP':<20} {'STATE':<22} {'PID':>7} {'RESTARTS':>8} {'CORES':<8} {'PORT':<6} {'READY':<6} REQ/S"]
    for r in status.groups:
        lines.append(f"{r.name:<20} {r.state:<22} {r.pid or '-':>7} {'-' if r.restarts is None else r.restarts:>8} "
                     f"{r.cores:<8} {r.port:<6} {'yes' if r.ready else 'no':<6} "
                     f"{'-' if r.rps is None else f'{r.rps:.1f}'}")
    if status.backend != "neuron" and not status.holders:
        lines.append(f"core holders: none reported ({status.backend} cores are not reserved by a process)")
    elif not status.holders:
        lines.append("core holders: no process holds a NeuronCore (neuron-ls)")
    else:
        lines.append("core holders (neuron-ls):")
        for h in status.holders:
            mark = "STALE" if h.stale else "ok"
            lines.append(f"  {mark:<5} PID {h.pid:<8} cores {format_core_list(h.cores):<10} {h.why}: {h.command}")
        if any(h.stale for h in status.holders):
            lines.append("  a stale holder keeps its cores from the groups: stop it (kill PID), then "
                         "`neuronserve apply`")
    return "\n".join(lines)


def as_json(status: Status) -> str:
    return json.dumps(asdict(status), indent=2)


def healthy(status: Status) -> bool:
    """Every group active and ready, and no stale core holder: `status` exits 0 only then."""
    return all(r.ready and r.state.startswith("active ") for r in status.groups) and not any(
        h.stale for h in status.holders)
