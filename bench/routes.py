"""`python -m bench.routes` (`make bench` runs it after the main run): what each dialect's route costs.

One embedding model whose compute is nearly off the CPU (no-encoder's shape, feature-extraction), one group per
CPU behind nginx, and the same short text sent through the task JSON route, OpenAI's /v1/embeddings (base64, as
the SDK asks) and TEI's /embed, at concurrency 64, the routes interleaved over two rounds. Each level reports
requests/s and the CPU the stack's processes used per request (the model's share included: about 0.02 ms here),
so the routes compare like for like. Writes bench-results/routes.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path

from bench import cpu, models, wrk
from bench.__main__ import TUNING, drain, log
from bench.systems import NeuronserveSystem

NAME = "embed"
TEXT = "The little engine said it thought it could, all the way up the mountain."
ROUTES = {
    "task JSON": ("/models/embed", {"inputs": TEXT}),
    "OpenAI": ("/v1/embeddings", {"model": NAME, "input": TEXT, "encoding_format": "base64"}),
    "TEI": ("/models/embed/embed", {"inputs": TEXT}),
}
CONCURRENCY, DURATION, RAMP, ROUNDS = 64, 8.0, 2.0, 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.routes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    args = ap.parse_args(argv)
    work = (args.out / "work").absolute()
    cpus = sorted(os.sched_getaffinity(0))
    models.prepare(NAME, work, log=log, task="feature-extraction", size="no-encoder")
    system = NeuronserveSystem(NAME, work, cpus, batch_sizes=models.BATCH_SIZES["no-encoder"],
                               task="feature-extraction", **TUNING)
    rows: dict[str, list[dict]] = {route: [] for route in ROUTES}
    system.start()
    try:
        for route, (path, body) in ROUTES.items():
            system.path, system.body = path, json.dumps(body)
            b1 = system.probe()
            wrk.run(system.targets, CONCURRENCY, 4.0)        # every bucket warm
            drain(system, b1)
        for _ in range(ROUNDS):
            for route, (path, body) in ROUTES.items():
                system.path, system.body = path, json.dumps(body)
                cpu0 = cpu.cpu_seconds(system.pids)
                res = wrk.run(system.targets, CONCURRENCY, DURATION, ramp_s=RAMP, timeout_s=60)
                cpu_s = cpu.cpu_seconds(system.pids) - cpu0
                row = {"throughput": res.throughput, "completed": res.completed, "errors": res.errors,
                       "cpu_s": cpu_s, "cpu_ms_per_request": 1000 * cpu_s / max(res.completed, 1),
                       "p50_ms": res.p50 * 1000, "p99_ms": res.p99 * 1000}
                rows[route].append(row)
                log(f"  {route}: {row['throughput']:.0f} req/s, {row['cpu_ms_per_request']:.3f} ms of CPU a "
                    f"request, p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} ms, errors {res.errors or 0}")
                drain(system, b1)
    finally:
        system.stop()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Route cost: {when}", "", f"no-encoder embeddings, {len(cpus)} groups behind nginx, concurrency "
             f"{CONCURRENCY}, {DURATION:g} s levels ({RAMP:g} s ramp), {ROUNDS} rounds interleaved; medians:", "",
             "| route | req/s | CPU per request (ms) | req/s per core of CPU | / task JSON |", "|---|---:|---:|---:|---:|"]
    base = statistics.median(r["cpu_ms_per_request"] for r in rows["task JSON"])
    for route, rs in rows.items():
        ms = statistics.median(r["cpu_ms_per_request"] for r in rs)
        lines.append(f"| {route} | {statistics.median(r['throughput'] for r in rs):.0f} | {ms:.3f} | "
                     f"{1000 / ms:.0f} | {ms / base:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routes.md").write_text("\n".join(lines) + "\n")
    (args.out / "routes.json").write_text(json.dumps({"when": when, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
