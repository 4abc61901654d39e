"""`neuronserve top`: every core's utilization and memory beside every group's traffic, in 80x24.

A `Top` takes one snapshot per period: the device sampler (monitor.py: neuron-monitor, nvidia-smi or
/proc/stat) for the cores, and each group's /metrics (scrape.py) for requests/s, p99, queue depth, batch
fill, padding share and busy fraction, as differences from the previous snapshot. `render` lays a snapshot out for a
terminal of a given size: cores in a grid whose cells shrink until every core fits, then one line per group.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from rich.console import Console, Group
from rich.text import Text

from neuronserve.measure import scrape
from neuronserve.config import format_core_list
from neuronserve.measure.monitor import CoreSample, DeviceSample
from neuronserve.measure.probe import Probe

GIB = 1 << 30


@dataclass(frozen=True)
class Watched:
    """A group `top` watches: its name, its cores, where its /metrics are."""

    name: str
    cores: tuple[int, ...]
    metrics_url: str


@dataclass
class GroupRow:
    name: str
    cores: str
    rates: scrape.Rates | None = None     # None on the first snapshot (nothing to compare with yet)
    error: str | None = None              # /metrics unreachable or unreadable


@dataclass
class Snapshot:
    at: float                             # wall-clock time (time.time())
    backend: str
    device: DeviceSample
    groups: list[GroupRow] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class Top:
    """Takes snapshots; keeps the previous scrape of each group to turn counters into rates."""

    def __init__(self, sampler, groups: list[Watched], backend: str,
                 fetch: Callable[[str], str] | None = None, clock: Callable[[], float] = time.monotonic):
        self.sampler, self.groups, self.backend = sampler, groups, backend
        self.fetch, self.clock = fetch or Probe(timeout_s=1.0).text, clock
        self.prev: dict[str, tuple[float, scrape.Counters]] = {}

    def snapshot(self) -> Snapshot:
        device = self.sampler.sample()
        rows = []
        for g in self.groups:
            row = GroupRow(g.name, format_core_list(list(g.cores)))
            try:
                counters = scrape.parse(self.fetch(g.metrics_url))
            except (OSError, ValueError) as e:
                row.error = f"/metrics: {getattr(e, 'reason', None) or e}"
                self.prev.pop(g.name, None)
            else:
                now = self.clock()
                if g.name in self.prev:
                    then, before = self.prev[g.name]
                    row.rates = scrape.rates(before, counters, now - then)
                self.prev[g.name] = (now, counters)
            rows.append(row)
        return Snapshot(time.time(), self.backend, device, rows)

    def close(self) -> None:
        self.sampler.close()


# ---------------------------------------------------------------- rendering

def _util_style(util: float | None) -> str:
    if util is None:
        return "dim"
    return "green" if util < 50 else "yellow" if util < 85 else "bold red"


def _bar(util: float | None, width: int) -> str:
    filled = 0 if util is None else round(max(0.0, min(util, 100.0)) / 100 * width)
    return "█" * filled + "░" * (width - filled)


def _pct(x: float | None, width: int = 4) -> str:
    return f"{x:>{width - 1}.0f}%" if x is not None else "-".rjust(width)


def _mem(core: CoreSample) -> str:
    if core.mem_used is None:
        return ""
    total = f"/{core.mem_total / GIB:.0f}G" if core.mem_total else "G"
    return f"{core.mem_used / GIB:.1f}{total}"


# cell layouts, widest first: (bar width, show memory, show the "nc"/"gpu"/"cpu" label)
_CELLS = ((10, True, True), (6, True, True), (10, False, True), (6, False, True), (0, False, True), (0, False, False))


def _cell(core: CoreSample, label: str, bar: int, mem: bool, label_w: int) -> Text:
    t = Text(f"{label}{core.index}".ljust(label_w) if label else str(core.index).rjust(label_w), style="bold")
    if bar:
        t.append(_bar(core.util, bar) + " ", style=_util_style(core.util))
    t.append(_pct(core.util), style=_util_style(core.util))
    if mem:
        t.append(" " + _mem(core).rjust(9), style="cyan")
    return t


def _core_lines(device: DeviceSample, width: int, max_rows: int) -> list[Text]:
    """The core grid: the widest cell layout whose rows fit in max_rows (the narrowest one always used last)."""
    cores = device.cores
    if not cores:
        return []
    digits = len(str(max(c.index for c in cores)))
    has_mem = any(c.mem_used is not None for c in cores)
    for bar, mem, named in _CELLS:
        if mem and not has_mem:
            continue
        label = device.label if named else ""
        label_w = len(label) + digits + (1 if named else 0)
        sep = 2 if named else 1
        cell_w = max(len(_cell(c, label, bar, mem, label_w)) for c in cores)
        cols = max(1, (width + sep) // (cell_w + sep))
        rows = -(-len(cores) // cols)
        if rows <= max_rows or not named:
            break
    lines = []
    for r in range(rows):
        line = Text()
        for c in cores[r * cols:(r + 1) * cols]:
            if len(line):
                line.append(" " * sep)
            cell = _cell(c, label, bar, mem, label_w)
            cell.pad_right(cell_w - len(cell))
            line.append_text(cell)
        lines.append(line)
    return lines


# PAD: the share of executed token positions that were padding (the bucket grid's cost)
_GROUP_COLS = (("GROUP", 15, "<"), ("CORES", 7, "<"), ("REQ/S", 8, ">"), ("P99 ms", 8, ">"), ("QUEUE", 6, ">"),
               ("FILL", 5, ">"), ("PAD", 4, ">"), ("BUSY", 5, ">"), ("ERR/S", 6, ">"), ("STATE", 6, "<"))


def _fit(s: str, width: int, align: str) -> str:
    s = s if len(s) <= width else s[:width - 1] + "…"
    return s.ljust(width) if align == "<" else s.rjust(width)


def _group_line(row: GroupRow) -> Text:
    r = row.rates
    if row.error:
        cells = [row.name, row.cores, "", "", "", "", "", "", "", "down"]
    else:
        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        def frac(x):
            return _pct(None if x is None else x * 100)

        state = "…" if r is None else {1.0: "ready", 0.0: "warmup"}.get(r.ready, "?")
        cells = [row.name, row.cores, num(r and r.rps, ".1f"), num(r and r.p99_s and r.p99_s * 1000, ".1f"),
                 num(r and r.queue_depth, ".0f"), frac(r and r.batch_fill), frac(r and r.padding), frac(r and r.busy),
                 num(r and r.errors_ps, ".1f"), state]
    text = Text(" ".join(_fit(str(c), w, a) for c, (_, w, a) in zip(cells, _GROUP_COLS)))
    if row.error:
        text.stylize("red")
    elif r is not None and r.errors_ps > 0:
        text.stylize("yellow")
    return text


def render(snap: Snapshot, width: int = 80, height: int = 24) -> Group:
    """Lay a snapshot out in width x height: header, core grid, group table (cut with a '+N more' line)."""
    d = snap.device
    header = Text("neuronserve top", style="bold")
    header.append(f"  {snap.backend} · {len(d.cores)} cores · {len(snap.groups)} groups")
    if d.host_mem_total:
        header.append(f" · host mem {(d.host_mem_used or 0) / GIB:.1f}/{d.host_mem_total / GIB:.0f}G")
    header.append(time.strftime(" · %H:%M:%S", time.localtime(snap.at)), style="dim")
    header.truncate(width)
    lines: list[Text] = [header]
    if d.error:
        lines.append(Text(_fit(f"{d.source}: {d.error}", width, "<").rstrip(), style="yellow"))
    # what the groups need: a blank line, the heading, one line each
    group_budget = len(snap.groups) + 2
    core_budget = max(1, height - len(lines) - min(group_budget, height // 2) - 1)
    lines.extend(_core_lines(d, width, core_budget))
    lines.append(Text(""))
    lines.append(Text(" ".join(_fit(n, w, a) for n, w, a in _GROUP_COLS), style="bold reverse"))
    room = height - len(lines) - 1              # rich leaves the cursor on the last line: keep it free
    shown = snap.groups if len(snap.groups) <= room else snap.groups[:max(room - 1, 0)]
    lines.extend(_group_line(r) for r in shown)
    if len(shown) < len(snap.groups):
        lines.append(Text(f"+{len(snap.groups) - len(shown)} more groups (a taller terminal shows them)",
                          style="dim"))
    for line in lines:
        line.truncate(width)
        line.no_wrap = True
    return Group(*lines)


def for_plan(plan, period_s: float = 1.0) -> Top:
    """A Top over every group of a plan, with the sampler of the plan's backend."""
    from neuronserve.measure.monitor import sampler_for

    sampler = sampler_for(plan.host.backend, tools_dir=plan.config.neuron.tools_dir, period_s=period_s)
    groups = [Watched(g.name, tuple(g.cores), f"http://{g.address}/metrics") for g in plan.groups]
    return Top(sampler, groups, plan.host.backend)


def print_once(top: Top, interval_s: float, console: Console, as_json: bool = False) -> Snapshot:
    """Two snapshots `interval_s` apart (rates need a difference), then print the second."""
    top.snapshot()
    time.sleep(interval_s)
    snap = top.snapshot()
    if as_json:
        console.file.write(snap.to_json() + "\n")
    else:
        console.print(render(snap, console.width, console.height))
    return snap


def run_live(top: Top, interval_s: float, console: Console, iterations: int | None = None) -> None:
    """Redraw in place every `interval_s` until Ctrl-C (or `iterations` frames, for tests)."""
    from rich.live import Live

    try:
        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            n = 0
            while iterations is None or n < iterations:
                live.update(render(top.snapshot(), console.width, console.height), refresh=True)
                n += 1
                time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
