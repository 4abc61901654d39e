"""`make bench` (python -m bench): the in-process ceiling, neuronserve and the original design, side by side.

For each model (bert-base, tiny, then no-encoder: the model's compute nearly off the CPU, as on an accelerator):
  1. build and compile it (kept under bench-results/work between runs);
  2. the in-process ceiling: every batch size, one pinned process per core group, all at once; the batch-1
     latency of a lone caller on one group and on all CPUs (the latter measured again beside the served
     concurrency-1 levels);
  3. neuronserve (one group per CPU behind nginx) and the baseline (one pinned hypercorn process per CPU), both
     up at once: start, check one answer from every backend, warm every bucket with a short unmeasured burst;
     then for each concurrency and each system in turn (their levels interleaved): measure the ceiling's best
     batch again (kept loaded in its pinned processes), run wrk closed loop, record throughput (counted after
     a ramp: see bench/wrk.py), latency and the CPU the system's processes used, drain (a checked request to
     every backend must come back at batch-1 speed). A last ceiling measurement closes the run: every level is
     compared with the ceiling measured on either side of it, since this host's speed drifts over minutes.
Writes bench-results/results.{md,json} and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import ceiling, cpu, models, report, wrk
from bench.systems import PAYLOAD, BaselineSystem, NeuronserveSystem

# seconds per level, per model, and the first seconds of it left out of the throughput (the ramp: no answer
# comes before the first batch is done). BERT-base completes ~1.5 items/s per core in batches of up to 4, 2.7 s
# each: a 9 s ramp is over 3 batch times, and the 36 s window holds about 13 batches per core, so a batch more or
# less at either edge would move a plain count by a few percent: the rate is a slope that weighs the edges
# least (bench/wrk.py). The tiny model's batches take 5 to 80 ms.
DURATION = {"bert-base": 45.0, "tiny": 10.0, "no-encoder": 8.0}
RAMP = {"bert-base": 9.0, "tiny": 2.0, "no-encoder": 2.0}
CEILING_SECONDS = {"bert-base": 8.0, "tiny": 4.0, "no-encoder": 3.0}
# the ceiling's best batch measured again before every level: at least 3 calls (7 s at BERT-base's batch 4)
PROBE_SECONDS = {"bert-base": 6.0, "tiny": 2.0, "no-encoder": 2.0}
# no-encoder's levels: only its highest throughputs matter (the serving paths' own)
LEVELS = {"bert-base": [1, 4, 16, 64], "tiny": [1, 4, 16, 64], "no-encoder": [16, 64]}
# neuronserve's tuning for the run (the config a 1-CPU group wants: one copy, one thread, no added delay)
TUNING = dict(copies=1, threads_per_copy=1, max_batch_delay_ms=0.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drain(system, b1_latency_s: float, limit_s: float = 300.0) -> None:
    """Wait until every backend answers a checked request about as fast as a lone batch-1 call: what the last
    level left queued is done."""
    fast = 1.5 * b1_latency_s + 0.25
    deadline = time.monotonic() + limit_s
    while system.probe() > fast:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system.label} did not drain within {limit_s:g} s")


def measure_systems(systems: list, result: dict, model_dir: Path, cpus: list[int], levels: list[int],
                    duration: float, ramp: float, probe_s: float) -> dict[str, list[dict]]:
    """Every system up at once, their levels interleaved (c=1 of each, then c=4 of each, ...), and the ceiling's
    best batch measured again before every level and after the last: each level is compared with the ceiling
    taken on either side of it, and with the other system's level next to it. The concurrency-1 levels are also
    held against a lone in-process batch-1 caller on all CPUs, measured before the first and after each."""
    ceil = result["ceiling"]
    b1 = ceil["latency_group"]["median_s"]
    best = report.best_ceiling(ceil)
    rows: dict[str, list[dict]] = {s.label: [] for s in systems}
    order = []
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(ceiling.Reference(model_dir, PAYLOAD, best["batch"], [[c] for c in cpus]))
        lone = stack.enter_context(ceiling.Reference(model_dir, PAYLOAD, 1, [cpus])) if 1 in levels else None
        for system in systems:
            log(f"  {system.label}: starting")
            system.start()
            stack.callback(system.stop)
            system.probe()
            # every bucket once at least, so no level pays for TorchScript's first-call optimisation
            warm = max(levels)
            log(f"  {system.label}: warm-up burst at concurrency {warm}")
            wrk.run(system.targets, warm, min(duration, max(4.0, 6 * best_call(ceil))))
            drain(system, b1)
        probes, lone_times = [], []

        def probe() -> None:
            probes.append(vars(ref.measure(probe_s)))
            log(f"  ceiling batch {best['batch']}: {probes[-1]['items_per_s']:.2f} items/s")

        def lone_probe() -> None:
            lone_times.append(lone.call_times(probe_s))
            log(f"  in-process batch 1 on {len(cpus)} CPUs: "
                f"{ceiling.latency_of(lone_times[-1], cpus).median_s * 1000:.1f} ms")

        for c in levels:
            for system in systems:
                probe()
                if c == 1 and not lone_times:
                    lone_probe()
                row = measure_level(system, c, ceil, duration, ramp)
                rows[system.label].append(row)
                order.append(row)
                drain(system, b1)
                if c == 1:
                    lone_probe()
                    before, after = lone_times[-2:]
                    row["latency_all"] = {**vars(ceiling.latency_of(before + after, cpus)),
                                          "before_median_s": statistics.median(before),
                                          "after_median_s": statistics.median(after)}
        probe()
    for row, before, after in zip(order, probes, probes[1:]):
        row["ceiling"] = {"batch": best["batch"], "before": before["items_per_s"], "after": after["items_per_s"],
                          **{k: (before[k] + after[k]) / 2 for k in ("items_per_s", "per_call_s", "per_call_cpu_s")}}
        # the model's CPU per call at the time of the level: the sweep's figures scaled by the drift since
        row["model_cpu_s"] *= row["ceiling"]["per_call_cpu_s"] / best["per_call_cpu_s"]
    return rows


def measure_level(system, c: int, ceil: dict, duration: float, ramp: float) -> dict:
    before = system.batches()
    cpu0, host0, wrk0 = cpu.cpu_seconds(system.pids), cpu.host_busy_seconds(), cpu.children_seconds()
    res = wrk.run(system.targets, c, duration, ramp_s=ramp, timeout_s=120)
    cpu1, host1, wrk1 = cpu.cpu_seconds(system.pids), cpu.host_busy_seconds(), cpu.children_seconds()
    after = system.batches()
    if before is None:
        batches, items = res.ok, res.ok
        model_cpu = res.ok * report.per_call_at(ceil, 1)
    else:
        batches, fill, items = (a - b for a, b in zip(after, before))
        model_cpu = report.model_cpu_seconds(ceil, batches, fill, items)
    # throughput over the window after the ramp; the counts and CPU over the whole level, wrk's own rate
    # (biased low by the time to the first answer) beside it
    row = {"concurrency": c, "throughput": res.throughput, "p50": res.p50, "p90": res.p90, "p99": res.p99,
           "max": res.max, "completed": res.completed, "errors": res.errors, "duration_s": res.duration_s,
           "throughput_whole": res.throughput_whole, "ramp_s": res.ramp_s, "window_s": res.window_s,
           "window_completed": res.window_completed, "first_s": res.first_s, "last_s": res.last_s,
           "batches": batches, "batch_items": items,
           "cpu_s": cpu1 - cpu0, "model_cpu_s": model_cpu, "client_cpu_s": wrk1 - wrk0,
           # CPU that neither the system nor the client used: other work on the host, a noisy level
           "foreign_cpu_s": max(0.0, (host1 - host0) - (cpu1 - cpu0) - (wrk1 - wrk0))}
    log(f"  {system.label} c={c}: {res.throughput:.2f} req/s after {ramp:g} s "
        f"({res.throughput_whole:.2f} over the whole level), p50 {fmt_ms(res.p50)} p99 {fmt_ms(res.p99)} ms"
        f"{', errors ' + str(res.errors) if res.errors else ''}; {items / max(batches, 1):.2f} items per batch; "
        f"CPU {row['cpu_s']:.1f} s "
        f"(model ~{model_cpu:.1f} s at the sweep's speed), client {row['client_cpu_s']:.1f} s, "
        f"other {row['foreign_cpu_s']:.1f} s")
    return row


def best_call(ceil: dict) -> float:
    return max(r["per_call_s"] for r in ceil["throughput"])


def fmt_ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def measure_ceiling(name: str, model_dir: Path, cpus: list[int]) -> dict:
    seconds = CEILING_SECONDS[name]
    rows = []
    for b in models.BATCH_SIZES[name]:
        t = ceiling.throughput(model_dir, PAYLOAD, b, [[c] for c in cpus], seconds)
        rows.append(vars(t))
        log(f"  ceiling batch {b}: {t.items_per_s:.1f} items/s ({t.per_call_s * 1000:.1f} ms per call, "
            f"{t.per_call_cpu_s * 1000:.1f} ms CPU)")
    lat_group = ceiling.latency(model_dir, PAYLOAD, [cpus[0]], seconds)
    lat_all = ceiling.latency(model_dir, PAYLOAD, cpus, seconds)
    log(f"  in-process batch 1: {lat_group.median_s * 1000:.1f} ms on one CPU, "
        f"{lat_all.median_s * 1000:.1f} ms on {len(cpus)} CPUs")
    return {"throughput": rows, "latency_group": vars(lat_group), "latency_all": vars(lat_all)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    ap.add_argument("--models", default=",".join(DURATION), help=f"comma-separated: {', '.join(DURATION)}")
    ap.add_argument("--levels", default=None, help="concurrency levels (default per model)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level (default per model)")
    ap.add_argument("--ramp", type=float, default=None,
                    help="seconds at the start of each level left out of the throughput (default per model)")
    ap.add_argument("--systems", default="neuronserve,baseline", help="which served systems to measure")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cpus = sorted(os.sched_getaffinity(0))
    levels = {name: [int(x) for x in args.levels.split(",")] if args.levels else LEVELS[name] for name in DURATION}
    work = args.out.resolve() / "work"
    names = args.models.split(",")
    unknown = sorted(set(names) - set(DURATION))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}: the bench has {', '.join(DURATION)}")
    timing = {name: (args.duration or DURATION[name], RAMP[name] if args.ramp is None else args.ramp)
              for name in names}
    for name, (duration, ramp) in timing.items():
        if not 0 <= ramp < round(duration):
            ap.error(f"{name}: the ramp ({ramp:g} s) must be shorter than a level ({duration:g} s)")
    results: dict[str, dict] = {}
    started = time.monotonic()
    for name in names:
        duration, ramp = timing[name]
        log(f"{name}: preparing")
        model_dir = models.prepare(name, work, log=lambda m: log(m))
        result: dict = {"name": name, "cpus": len(cpus), "ceiling": measure_ceiling(name, model_dir, cpus)}
        systems = [NeuronserveSystem(name, work, cpus, batch_sizes=models.BATCH_SIZES[name], **TUNING)
                   if system_name == "neuronserve" else BaselineSystem(name, model_dir, work, cpus)
                   for system_name in args.systems.split(",")]
        log(f"{name}: {', '.join(s.label for s in systems)}, levels interleaved")
        result.update(measure_systems(systems, result, model_dir, cpus, levels[name], duration, ramp,
                                      PROBE_SECONDS[name]))
        results[name] = result
    meta = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": len(cpus),
            "cpu_model": cpu_model(), "levels": {name: levels[name] for name in names}, "tuning": TUNING,
            "note": f"wrk closed loop, "
                    f"{', '.join(f'{k} {d:g} s (throughput after {r:g} s)' for k, (d, r) in timing.items())} "
                    f"per level; "
                    f"run took {(time.monotonic() - started) / 60:.1f} min"}
    md, js = report.write(args.out, results, meta)
    print()
    print(md.read_text())
    log(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
