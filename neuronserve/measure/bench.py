"""`neuronserve bench`: load the front (or each group directly), measure, write JSON + CSV + a PNG.

One run measures a list of load levels, all closed loop (N requests always in flight) or all open loop
(Poisson arrivals at R requests/s). Each level: a ramp that is sent but not measured, then a window bounded by
a duration or a request count; its row holds throughput, p50/p90/p99/max latency (stats.py, nearest rank),
errors by kind, each group's share of the requests (the difference of its neuronserve_requests_total over
the window: no server change, and it sees through nginx) and the client's own CPU time, because on a small
host the client competes with the server.

`sweep` reproduces the original benchmark.sh: for each (groups, copies per group) it re-plans, brings the
stack up (`neuronserve up`'s Stack, or the installed units through `neuronserve apply` and a conf.d drop-in),
waits until every group is ready, measures every level and appends the rows.
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from neuronserve.measure import loadgen, scrape
from neuronserve.errors import NeuronserveError
from neuronserve.measure.probe import wait_ready
from neuronserve.measure.stats import summarize

# What one request carries, per task: a typical BERT-length text (the server pads it to a sequence bucket).
SAMPLE_INPUTS = {
    "question-answering": {
        "question": "Which cores does a group own?",
        "context": "neuronserve plans core groups from one configuration file. Each group is one gunicorn process "
                   "that owns its NeuronCores for as long as it lives, listens on the loopback address and holds "
                   "several copies of the model, which a dynamic batcher keeps busy. nginx spreads requests over "
                   "the groups of a model and routes around a group that is restarting."},
    "text-classification": "The service answered every request quickly and the results were exactly what we "
                           "needed for the release, so the whole team was pleased with it.",
    "feature-extraction": "A fast tokenizer and a dynamic batcher keep the request path cheap enough that the "
                          "accelerator, not the web server, sets the throughput of the whole host.",
}


class BenchError(NeuronserveError):
    pass


@dataclass(frozen=True)
class Load:
    """One load level: closed loop at `level` concurrent requests, or open loop at `level` requests/s."""

    mode: str           # closed | open
    level: float

    def __str__(self) -> str:
        return f"concurrency {self.level:g}" if self.mode == "closed" else f"rate {self.level:g}/s"


@dataclass
class Options:
    duration_s: float | None = 10.0
    count: int | None = None
    ramp_s: float = 2.0
    timeout_s: float = 30.0
    max_duration_s: float = 300.0       # the bound on a --requests level that never completes
    connections: int = 64               # open loop: most requests in flight
    seed: int = 0


@dataclass
class Row:
    """One measured level: a CSV row, a JSON record, a point of the plot. Latencies in milliseconds."""

    mode: str
    level: float
    ok: int
    errors: int
    throughput_rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    window_s: float
    client_cpu_s: float
    client_cpu_pct: float               # of one CPU, over the window
    client_us_per_request: float
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    share: dict[str, float] = field(default_factory=dict)     # group -> fraction of the requests it served
    groups: int | None = None           # sweep only
    copies: int | None = None

    def line(self) -> str:
        def ms(x):
            return "-" if x is None else f"{x:.1f}"
        errs = ", ".join(f"{k} {v}" for k, v in self.errors_by_kind.items()) or "0"
        share = " ".join(f"{g} {f:.0%}" for g, f in self.share.items())
        shape = f"{self.groups}x{self.copies} " if self.groups is not None else ""
        return (f"{shape}{self.mode} {self.level:g}: {self.throughput_rps:.1f} req/s  p50 {ms(self.p50_ms)}  "
                f"p90 {ms(self.p90_ms)}  p99 {ms(self.p99_ms)}  max {ms(self.max_ms)} ms  errors {errs}  "
                f"client CPU {self.client_cpu_pct:.0f}% ({self.client_us_per_request:.0f} us/req)"
                + (f"  share {share}" if share else ""))


def pick_model(cfg, model: str | None) -> str:
    """The model to load: the one named, else the config's only (or first) one."""
    if model is None:
        if not cfg.models:
            raise BenchError("no models configured: add a [models.<name>] table")
        return next(iter(cfg.models))
    if model not in cfg.models:
        raise BenchError(f"no [models.{model}] in the config; models: {', '.join(cfg.models) or 'none'}")
    return model


def loads_from(concurrency: list[float], rates: list[float]) -> list[Load]:
    """--concurrency and --rate lists -> loads (one mode per run: the plot has one x axis)."""
    if concurrency and rates:
        raise BenchError("give --concurrency (closed loop) or --rate (open loop), not both")
    if rates:
        if any(r <= 0 for r in rates):
            raise BenchError("--rate values are positive requests per second")
        return [Load("open", r) for r in rates]
    levels = concurrency or [8]
    if any(c < 1 or c != int(c) for c in levels):
        raise BenchError("--concurrency values are whole numbers of requests in flight, at least 1")
    return [Load("closed", int(c)) for c in levels]


# ---------------------------------------------------------------- requests

def request_body(task: str, model: str, protocol: str = "hf", payload: bytes | None = None) -> tuple[str, bytes]:
    """(path, JSON body) of one inference request: HF-style `{"inputs": ...}` or a KServe v2 BYTES tensor."""
    if protocol == "hf":
        path = f"/models/{model}"
        body = payload or json.dumps({"inputs": SAMPLE_INPUTS[task]}).encode()
    elif protocol == "v2":
        path = f"/v2/models/{model}/infer"
        value = SAMPLE_INPUTS[task]
        # question-answering travels as one JSON object string per element (see tasks.parse)
        data = [json.dumps(value) if isinstance(value, dict) else value]
        body = payload or json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                  "data": data}]}).encode()
    else:
        raise BenchError(f"unknown protocol {protocol!r}: hf or v2")
    return path, body


def targets_for(base_urls: list[str], path: str, body: bytes) -> list[loadgen.Target]:
    return [loadgen.make_target(u.rstrip("/") + path, "POST", body, {"Content-Type": "application/json"})
            for u in base_urls]


# ---------------------------------------------------------------- measuring

async def _scrape_all(metrics: dict[str, str]) -> dict[str, float | None]:
    """neuronserve_requests_total of each group (None where /metrics did not answer)."""
    async def one(url: str) -> float | None:
        try:
            status, body = await loadgen.fetch(url, 5.0)
            return scrape.parse(body.decode()).requests if status == 200 else None
        except (OSError, ValueError, asyncio.TimeoutError, loadgen.ProtocolError):
            return None
    values = await asyncio.gather(*(one(u) for u in metrics.values()))
    return dict(zip(metrics, values))


def _share(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float]:
    deltas = {g: after[g] - before[g] for g in before
              if before.get(g) is not None and after.get(g) is not None and after[g] >= before[g]}
    total = sum(deltas.values())
    return {g: d / total for g, d in deltas.items()} if total > 0 else {}


def measure(targets: list[loadgen.Target], load: Load, opts: Options,
            metrics: dict[str, str] | None = None) -> Row:
    """Run one load level and summarize it. `metrics`: group -> /metrics URL, for the per-group share."""
    metrics = metrics or {}

    async def go():
        hook = (lambda: _scrape_all(metrics)) if metrics else None
        common = dict(duration_s=opts.duration_s, count=opts.count, ramp_s=opts.ramp_s, timeout_s=opts.timeout_s,
                      max_duration_s=opts.max_duration_s, on_ramp_end=hook)
        if load.mode == "closed":
            m = await loadgen.run_closed(targets, int(load.level), **common)
        else:
            m = await loadgen.run_open(targets, load.level, connections=opts.connections, seed=opts.seed, **common)
        after = await _scrape_all(metrics) if metrics else {}
        return m, after

    m, after = loadgen.run(go())
    s = summarize(m.latencies, m.errors, m.window_s)
    done = s.ok + s.error_count

    def ms(x):
        return None if x is None else x * 1000.0
    return Row(mode=load.mode, level=load.level, ok=s.ok, errors=s.error_count, throughput_rps=s.throughput,
               p50_ms=ms(s.p50), p90_ms=ms(s.p90), p99_ms=ms(s.p99), max_ms=ms(s.max), mean_ms=ms(s.mean),
               window_s=s.window_s, client_cpu_s=m.cpu_s,
               client_cpu_pct=100.0 * m.cpu_s / s.window_s if s.window_s > 0 else 0.0,
               client_us_per_request=1e6 * m.cpu_s / done if done else 0.0,
               errors_by_kind=s.errors, share=_share(m.ramp_hook_result or {}, after) if metrics else {})


def run_levels(targets: list[loadgen.Target], loads: Iterable[Load], opts: Options,
               metrics: dict[str, str] | None = None, echo=None, **shape) -> list[Row]:
    rows = []
    for load in loads:
        row = measure(targets, load, opts, metrics)
        row.groups, row.copies = shape.get("groups"), shape.get("copies")
        rows.append(row)
        if echo:
            echo(row.line())
    return rows


# ---------------------------------------------------------------- results

CSV_FIELDS = ["groups", "copies", "mode", "level", "ok", "errors", "throughput_rps", "p50_ms", "p90_ms", "p99_ms",
              "max_ms", "mean_ms", "window_s", "client_cpu_s", "client_cpu_pct", "client_us_per_request",
              "errors_by_kind", "share"]


def _csv_value(v):
    if isinstance(v, dict):
        return ";".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_results(rows: list[Row], out_dir: Path, meta: dict) -> dict[str, Path]:
    """bench.json (meta + rows), bench.csv (one row per level) and bench.png (when matplotlib is present)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "csv": out_dir / "bench.csv"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            d = asdict(r)
            w.writerow([_csv_value(d[k]) for k in CSV_FIELDS])
    png = out_dir / "bench.png"
    if plot(rows, png, title=meta.get("title", "neuronserve bench")):
        paths["png"] = png
    return paths


def plot(rows: list[Row], path: Path, title: str) -> bool:
    """Throughput and p99 against the load level, one line per (groups x copies). False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    series: dict[str, list[Row]] = {}
    for r in rows:
        key = f"{r.groups} groups x {r.copies} copies" if r.groups is not None else "measured"
        series.setdefault(key, []).append(r)
    for key, rs in series.items():
        rs = sorted(rs, key=lambda r: r.level)
        xs = [r.level for r in rs]
        top.plot(xs, [r.throughput_rps for r in rs], marker="o", label=key)
        bottom.plot(xs, [r.p99_ms if r.p99_ms is not None else float("nan") for r in rs], marker="o", label=key)
    mode = rows[0].mode if rows else "closed"
    levels = [r.level for r in rows]
    if levels and min(levels) > 0 and max(levels) / min(levels) >= 8:
        bottom.set_xscale("log", base=2)        # 1, 4, 16, 64: evenly spaced
    top.set_ylabel("throughput (req/s)")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.set_xlabel("concurrency (requests in flight)" if mode == "closed" else "offered rate (req/s)")
    top.set_title(title)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    if len(series) > 1:
        top.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def meta(cfg, model: str, loads: list[Load], opts: Options, **extra) -> dict:
    return {"title": f"neuronserve bench: {model}", "model": model, "task": cfg.models[model].task,
            "backend": cfg.server.backend, "loads": [asdict(x) for x in loads], "options": asdict(opts),
            "host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


# ---------------------------------------------------------------- sweep over (groups, copies)

def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """ "1x1,2x1,2x2" -> [(groups, copies), ...]."""
    out = []
    for part in spec.replace(" ", "").split(","):
        g, sep, c = part.partition("x")
        if not sep or not g.isdigit() or not c.isdigit() or int(g) < 1 or int(c) < 1:
            raise BenchError(f"sweep shape {part!r}: expected GROUPSxCOPIES like 2x1")
        out.append((int(g), int(c)))
    return out


def group_urls(plan, model: str) -> dict[str, str]:
    """group -> its own base URL (http://127.0.0.1:<port>), for the groups serving `model`."""
    return {g.name: f"http://{g.address}" for g in plan.groups if g.model == model}


def metrics_of(groups: dict[str, str]) -> dict[str, str]:
    """group -> its /metrics URL, from group_urls."""
    return {g: url + "/metrics" for g, url in groups.items()}


def sweep(cfg, host, model: str | None, shapes: list[tuple[int, int]], loads: list[Load], opts: Options, *,
          workdir: Path, via: str = "up", direct: bool = False, ready_timeout_s: float = 300.0,
          protocol: str = "hf", payload: bytes | None = None, config_path: Path | None = None,
          echo=None) -> list[Row]:
    """For each (groups, copies): re-plan, bring the stack up, wait ready, measure every load, tear down."""
    from neuronserve.plan import make_plan

    model = pick_model(cfg, model)
    path, body = request_body(cfg.models[model].task, model, protocol, payload)
    rows: list[Row] = []
    for groups, copies in shapes:
        shaped = cfg.model_copy(deep=True)
        shaped.models[model].groups = groups
        shaped.models[model].copies = copies
        plan = make_plan(shaped, host)
        groups_at = group_urls(plan, model)
        metrics = metrics_of(groups_at)
        if echo:
            echo(f"# {groups} group(s) x {copies} copies: starting ({via})")
        # absolute: nginx resolves the rendered paths against its own prefix
        shape = _Shape(plan, via, (workdir / f"{groups}x{copies}").resolve(), ready_timeout_s, config_path,
                       model)
        with shape as front:
            bases = list(groups_at.values()) if direct else [front]
            rows += run_levels(targets_for(bases, path, body), loads, opts, metrics, echo,
                               groups=groups, copies=copies)
    return rows


class _Shape:
    """One (groups, copies) shape brought up and ready, as a context manager that yields the front URL.

    via "up": the plan's processes and nginx as children (neuronserve.operate.up.Stack) under a scratch root.
    via "apply": the installed units: a conf.d drop-in sorted last reshapes the model and `neuronserve apply`
    rolls the groups; on the way out the drop-in is removed and apply restores the configured shape.
    """

    DROPIN = "zz-neuronserve-bench.toml"

    def __init__(self, plan, via: str, root: Path, ready_timeout_s: float, config_path: Path | None, model: str):
        if via not in ("up", "apply"):
            raise BenchError(f"unknown --via {via!r}: up or apply")
        if via == "apply" and config_path is None:
            raise BenchError("--via apply needs the config file path")
        self.plan, self.via, self.root, self.ready_timeout_s = plan, via, root, ready_timeout_s
        self.config_path, self.model = config_path, model
        self.stack = None
        self.dropin: Path | None = None

    def __enter__(self) -> str:
        from neuronserve.operate.up import front_url_for

        try:
            if self.via == "up":
                from neuronserve.layout import Layout
                from neuronserve.operate.up import Stack

                self.stack = Stack(self.plan, Layout(self.root, self.plan.config), nginx=True)
                self.stack.start()
                self.stack.wait_ready(self.ready_timeout_s)
            else:
                m = self.plan.config.models[self.model]
                self.dropin = self.config_path.parent / "conf.d" / self.DROPIN
                self.dropin.parent.mkdir(exist_ok=True)
                self.dropin.write_text(f"# written by `neuronserve bench --sweep`; removed when it ends\n"
                                       f"[models.{self.model}]\ngroups = {m.groups}\ncopies = {m.copies}\n")
                self._apply()
                pending = wait_ready(group_urls(self.plan, self.model), self.ready_timeout_s)
                if pending:
                    raise BenchError(f"group(s) {', '.join(pending)} not ready after {self.ready_timeout_s:g}s")
        except BaseException:
            self.__exit__()
            raise
        return front_url_for(self.plan.config.nginx.listen)

    def _apply(self) -> None:
        cmd = [sys.executable, "-m", "neuronserve", "apply", "--config", str(self.config_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def __exit__(self, *exc) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None
        if self.dropin is not None:
            self.dropin.unlink(missing_ok=True)
            self.dropin = None
            self._apply()
