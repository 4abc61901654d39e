"""`python -m bench.load_shapes` (`make bench` runs it): served throughput against the best plan's ceiling at every
load, with batches padded to the bucket grid and with batches at their own shape, side by side.

all-MiniLM-L6-v2 compiled for buckets batch [1, 8, 32] x seq [32, 128]; two stacks up at once, each one group
per CPU behind nginx, one copy per group: one with `pad_to_buckets = true` (every batch padded to a compiled
bucket, as before the batch planner), one as configured by default (a batch at its own shape). wrk closed loop
at concurrency 1, 2, 4, 8, 16, 64 sends one short sentence through the task JSON route, the two stacks taking
turns, ROUNDS runs each per level, averaged. The ceiling of a level is the best plan for that load: each group's
share of the clients as one batch at its own shape (batch min(c/2, 32), at the sentence's own length or that
rounded up to 8, whichever ran faster in-process at the start, as the server's warm-up decides), called in-process
back to back, one pinned process per CPU, measured before and after the level's runs and averaged (with fewer
clients than groups, that share of it).

Beside each ratio, where the host's CPU went per request: the stack's processes (groups and nginx) and the
client (wrk), against the model's own compute per item in the ceiling. On this host they share the CPUs the
model runs on, so what the serving path and the client cost per request bounds the ratio (on an accelerator
the model's compute leaves the CPU). Writes bench-results/load-shapes.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from bench import ceiling, cpu, report, wrk
from bench.__main__ import log
from bench.memory import compile_with
from bench.systems import one_model_stack
from neuronserve import tasks
from neuronserve.build.artifact import read_manifest
from neuronserve.server.batcher import round_up

TEXT = "A short sentence, as a search query or a chat message would send it."
LEVELS = [1, 2, 4, 8, 16, 64]
DURATION, RAMP, CEILING_S = 6.0, 1.5, 3.0
ROUNDS = 2                  # served runs of each system per level, in turn
BATCH_SIZES, SEQUENCE_LENGTHS = [1, 8, 32], [32, 128]


def stack(repo: Path, work: Path, cpus: list[int], pad_to_buckets: bool):
    return one_model_stack(work, repo, {"task": "feature-extraction", "copies": 1, "max_batch_delay_ms": 0.0,
                                        "max_queue": 1024, "pad_to_buckets": pad_to_buckets},
                           name="minilm", cpus=cpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load_shapes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    args = ap.parse_args(argv)
    work = (args.out / "work" / "load-shapes").absolute()
    cpus = sorted(os.sched_getaffinity(0))
    repo = work / "models"
    log("compiling MiniLM for buckets batch [1, 8, 32] x seq [32, 128]")
    compile_with(None, repo / "minilm", BATCH_SIZES, SEQUENCE_LENGTHS)
    model_dir = repo / "minilm"
    manifest = read_manifest(model_dir)
    length = tasks.encode(manifest.task, tasks.load_tokenizer(model_dir / manifest.tokenizer), [TEXT], 128,
                          truncation=True)[0].length
    rounded = round_up(length)
    speed = {n: ceiling.throughput(model_dir, TEXT, 4, [[c] for c in cpus], CEILING_S, seq=n).items_per_s
             for n in dict.fromkeys((length, rounded))}
    seq = max(speed, key=speed.get)
    log(f"  4 items at {length} tokens: {speed[length]:.0f}/s, at {rounded}: {speed[rounded]:.0f}/s")
    payload = {"inputs": TEXT}
    systems = {"padded to buckets": stack(repo, work / "buckets", cpus, True),
               "own shape": stack(repo, work / "exact", cpus, False)}
    rows = []
    try:
        for s in systems.values():
            s.start()
        for s in systems.values():
            s.wait_ready(600)
        targets = {label: [wrk.Target(s.front_url, (wrk.Request("POST", "/models/minilm", json.dumps(payload),
                                                                  "application/json"),))]
                   for label, s in systems.items()}
        for label in systems:
            wrk.run(targets[label], 16, 3.0)        # every shape's first calls
        for level in LEVELS:
            batch = max(1, min(level // len(cpus), max(BATCH_SIZES)))

            def best_items_per_s() -> float:
                return ceiling.throughput(model_dir, TEXT, batch, [[c] for c in cpus], CEILING_S,
                                          seq=seq).items_per_s

            # the host's speed drifts by several % within minutes: the ceiling on both sides of the served runs,
            # and ROUNDS runs of each system in turn, averaged
            before = best_items_per_s()
            runs: dict[str, list[dict]] = {label: [] for label in systems}
            for _ in range(ROUNDS):
                for label, s in systems.items():
                    pids = [p.popen.pid for p in s.procs]
                    stack0, client0 = cpu.cpu_seconds(pids), cpu.children_seconds()
                    res = wrk.run(targets[label], level, DURATION, ramp_s=RAMP, timeout_s=60)
                    done = max(res.completed, 1)
                    runs[label].append({"throughput": res.throughput, "p50_ms": res.p50 * 1000,
                                        "p99_ms": res.p99 * 1000, "errors": res.errors,
                                        "stack_cpu_ms": 1000 * (cpu.cpu_seconds(pids) - stack0) / done,
                                        "client_cpu_ms": 1000 * (cpu.children_seconds() - client0) / done})
            best = (before + best_items_per_s()) / 2
            # fewer clients than groups keep only that many groups busy
            items_per_s = best * min(1.0, level / len(cpus))
            # the model's own CPU per item at the best plan: every CPU busy with it
            model_ms = 1000 * len(cpus) / best
            row = {"concurrency": level, "ceiling_batch": batch, "ceiling_seq": seq,
                   "ceiling_items_per_s": items_per_s, "ceiling_spread": abs(before - best) * 2 / best}
            for label, measured in runs.items():
                mean = {k: sum(r[k] for r in measured) / len(measured) for k in measured[0] if k != "errors"}
                row[label] = {**mean, "runs": [r["throughput"] for r in measured], "model_cpu_ms": model_ms,
                              "errors": [r["errors"] for r in measured],
                              "over_ceiling": mean["throughput"] / items_per_s,
                              # CPU per request beyond the model's compute: serving path, front and client
                              "overhead_cpu_ms": mean["stack_cpu_ms"] + mean["client_cpu_ms"] - model_ms}
            rows.append(row)
            log(f"  c={level}: ceiling {items_per_s:.0f}/s (batch {batch} x {seq}); " + "; ".join(
                f"{label} {row[label]['throughput']:.0f}/s ({row[label]['over_ceiling']:.2f})" for label in systems))
    finally:
        for s in systems.values():
            s.stop()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Load shapes: {when}", "",
             f"all-MiniLM-L6-v2, buckets batch {BATCH_SIZES} x seq {SEQUENCE_LENGTHS}, {len(cpus)} groups of one CPU "
             f"behind nginx, one {length}-token sentence per request; ceiling: the best plan for the load, "
             f"in-process, measured before and after each level (their spread in brackets); served: the mean of "
             f"{ROUNDS} runs", "",
             "| concurrency | ceiling (items/s) | padded to buckets | / ceiling | own shape | / ceiling |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["padded to buckets"], r["own shape"]
        lines.append(f"| {r['concurrency']} | {r['ceiling_items_per_s']:.0f} ({100 * r['ceiling_spread']:.0f} %) | "
                     f"{a['throughput']:.0f} | "
                     f"{a['over_ceiling']:.2f} | {b['throughput']:.0f} | {b['over_ceiling']:.2f} |")
    lines += ["", "Where the CPU went per request at the batch's own shape (ms of CPU): the model's compute per "
              "item at the best plan, the stack (groups and nginx, the model's compute included) and the client (wrk); "
              "the overhead is what the serving path, the front and the client take beyond the model's compute, "
              "on the same CPUs:", "",
              "| concurrency | model | stack | client | overhead | overhead / model |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["own shape"]
        lines.append(f"| {r['concurrency']} | {b['model_cpu_ms']:.3f} | {b['stack_cpu_ms']:.3f} | "
                     f"{b['client_cpu_ms']:.3f} | {b['overhead_cpu_ms']:.3f} | "
                     f"{b['overhead_cpu_ms'] / b['model_cpu_ms']:.2f} |")
    report.save(args.out, "load-shapes", lines, {"when": when, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
