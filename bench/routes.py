"""`python -m bench.routes` (`make bench` runs it after the main run): what each dialect's route costs.

One embedding model whose compute is nearly off the CPU (no-encoder's shape, feature-extraction), one group per
CPU behind nginx, and the same short text sent through the task JSON route, OpenAI's /v1/embeddings (base64, as
the SDK asks), TEI's /embed and KServe v2's infer over REST (JSON) and over gRPC (through nginx's gRPC listener,
loaded by bench.grpc_load), at concurrency 64, the routes interleaved over two rounds. Each level reports
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

from bench import cpu, grpc_load, models, report, wrk
from bench.__main__ import TUNING, drain, log
from bench.systems import NeuronserveSystem

NAME = "embed"
GRPC = "grpc"
TEXT = "The little engine said it thought it could, all the way up the mountain."
ROUTES = {
    "task JSON": ("/models/embed", {"inputs": TEXT}),
    "OpenAI": ("/v1/embeddings", {"model": NAME, "input": TEXT, "encoding_format": "base64"}),
    "TEI": ("/models/embed/embed", {"inputs": TEXT}),
    "KServe v2 REST": ("/v2/models/embed/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                              "data": [TEXT]}]}),
    "KServe v2 gRPC": (GRPC, None),
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
        system.path, system.body = "/models/embed", json.dumps({"inputs": TEXT})
        b1 = system.probe()

        def load(route: str, duration: float, ramp: float = 0.0):
            path, body = ROUTES[route]
            if path == GRPC:
                return grpc_load.run(system.stack.grpc_front, grpc_request(), CONCURRENCY, duration, ramp_s=ramp)
            system.path, system.body = path, json.dumps(body)
            return wrk.run(system.targets, CONCURRENCY, duration, ramp_s=ramp, timeout_s=60)

        for route in ROUTES:
            load(route, 4.0)        # every bucket warm
            drain(system, b1)
        for _ in range(ROUNDS):
            for route in ROUTES:
                cpu0 = cpu.cpu_seconds(system.pids)
                res = load(route, DURATION, RAMP)
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
    report.save(args.out, "routes", lines, {"when": when, "rows": rows})
    return 0


def grpc_request() -> bytes:
    """The same text as one BYTES input of a ModelInferRequest."""
    from neuronserve.server import grpc_messages as pb

    request = pb.message("ModelInferRequest")(model_name=NAME)
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXT.encode())
    return request.SerializeToString()


if __name__ == "__main__":
    raise SystemExit(main())
