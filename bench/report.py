"""The ratio table: what the run measured, put side by side, checked against the targets, as markdown and JSON.

A model's result (plain JSON-able dicts, as written to bench-results/results.json):

    {"name": ..., "cpus": 2,
     "ceiling": {"throughput": [{"batch", "items_per_s", "per_call_s"}, ...],
                 "latency_group": {"median_s", "p99_s", ...},    # batch 1 on one core group
                 "latency_all": {...}},                          # batch 1 on every CPU
     "neuronserve": [level, ...], "baseline": [level, ...]}

    level = {"concurrency", "throughput", "p50", "p90", "p99", "max", "completed", "errors", "duration_s",
             "cpu_s", "model_cpu_s", "client_cpu_s", "foreign_cpu_s",
             "throughput_whole", "ramp_s", "window_s", "window_completed", "first_s", "last_s",
             "ceiling": {"batch", "items_per_s", "per_call_s", "per_call_cpu_s", "before", "after"},
             "latency_all": {"median_s", "p99_s", "calls", "before_median_s", "after_median_s", ...}}  # c=1 only

`throughput` is the answered rate in the window after the level's ramp (a slope: bench/wrk.py),
`throughput_whole` the rate over the whole level as wrk reports it; the counts, CPU seconds and latencies cover
the whole level. A level's "ceiling" is the ceiling's best batch measured right before and right after it
(their mean; absent in older results, where the sweep's best stands in): the host's speed drifts over minutes,
so each level is held against its own. For the same reason a concurrency-1 level carries the lone all-CPU
batch-1 caller measured right before and right after it ("latency_all", both measurements' calls pooled), which
its latency ratios use.

Only ratios within one run are compared: the machine's speed cancels out.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path

SYSTEMS = ("neuronserve", "baseline")
TARGET_CEILING = 0.97         # neuronserve / ceiling at every concurrency >= 4
TARGET_LATENCY = 1.05         # p99 at concurrency 1 / in-process batch-1 latency
TARGET_TINY_SPEEDUP = 3.0     # tiny model: neuronserve max req/s / baseline max req/s
# where the speed-up and serving-capacity targets are checked: the tiny model, and the one whose compute is
# nearly off the CPU (what the tiny-model targets stand for: the serving path in front of an accelerator)
SPEEDUP_MODELS = ("tiny", "no-encoder")
TARGET_CAPACITY = 2000.0      # requests/s per core the serving path sustains (its CPU cost per request <= 0.5 ms)


def save(out: Path, name: str, lines: list[str], data: dict) -> None:
    """A side run's results: out/<name>.md (the table, printed too) and out/<name>.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print("\n".join(lines))


def best_ceiling(ceiling: dict) -> dict:
    """The batch size with the most items/s."""
    return max(ceiling["throughput"], key=lambda r: r["items_per_s"])


def level_ceiling(level: dict | None, ceiling: dict) -> float:
    """Items/s of the ceiling measured beside `level` (the sweep's best where the level has none)."""
    ref = level and level.get("ceiling")
    return ref["items_per_s"] if ref else best_ceiling(ceiling)["items_per_s"]


def drift(level: dict, ceiling: dict) -> float:
    """CPU per call of the ceiling beside `level` over the sweep's, at the best batch: > 1 when the host got
    slower since the sweep."""
    ref = level.get("ceiling")
    return ref["per_call_cpu_s"] / best_ceiling(ceiling)["per_call_cpu_s"] if ref else 1.0


def per_call_at(ceiling: dict, batch: float, key: str = "per_call_cpu_s") -> float:
    """In-process CPU seconds (or `key`) of one call at `batch` items (linear between the measured sizes)."""
    rows = sorted(ceiling["throughput"], key=lambda r: r["batch"])
    sizes = [r["batch"] for r in rows]
    if batch <= sizes[0]:
        return rows[0][key]
    if batch >= sizes[-1]:
        return rows[-1][key] * batch / sizes[-1]
    i = bisect.bisect_left(sizes, batch)
    lo, hi = rows[i - 1], rows[i]
    if hi["batch"] == batch:
        return hi[key]
    f = (batch - lo["batch"]) / (hi["batch"] - lo["batch"])
    return lo[key] + f * (hi[key] - lo[key])


def model_cpu_seconds(ceiling: dict, batches: float, fill_sum: float, items: float) -> float:
    """CPU seconds the model itself needed for `batches` executed batches holding `items` items, whose
    items/bucket fractions add up to `fill_sum`: each batch ran a bucket of about items/fill_sum rows (exact when
    they all ran the same bucket), costing what the in-process ceiling measured for it."""
    if batches <= 0:
        return 0.0
    bucket = items / fill_sum if fill_sum > 0 else items / batches
    return batches * per_call_at(ceiling, bucket)


def serving_cpu_per_request(level: dict) -> float | None:
    """CPU seconds the serving path (everything but the model's own compute) spent per answered request."""
    ok = level["completed"] - level["errors"].get("status", 0)
    if ok <= 0 or level.get("cpu_s") is None or level.get("model_cpu_s") is None:
        return None
    return max(level["cpu_s"] - level["model_cpu_s"], 0.0) / ok


def cpu_efficiency(level: dict, ceiling: dict) -> float | None:
    """Requests answered per CPU-second of the system's processes, over the ceiling's items per CPU-second at
    its most efficient batch size: robust to other work on the host, which a throughput ratio is not."""
    best = max(r["batch"] / r["per_call_cpu_s"] for r in ceiling["throughput"] if r.get("per_call_cpu_s"))
    best /= drift(level, ceiling)
    ok = level["completed"] - level["errors"].get("status", 0)
    return ok / level["cpu_s"] / best if level.get("cpu_s") else None


def other_load(level: dict | None) -> float | None:
    """CPUs' worth of work from outside the measurement (neither system nor client) during a level."""
    if not level or level.get("foreign_cpu_s") is None or not level.get("duration_s"):
        return None
    return level["foreign_cpu_s"] / level["duration_s"]


def _at(levels: list[dict], concurrency: int) -> dict | None:
    return next((lv for lv in levels if lv["concurrency"] == concurrency), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio_rows(result: dict) -> list[dict]:
    """Per concurrency: the throughputs and the ratios the issue asks for, each system's against the ceiling
    measured beside its own level."""
    ns, base = result.get("neuronserve", []), result.get("baseline", [])
    levels = sorted({lv["concurrency"] for lv in ns + base})
    rows = []
    for c in levels:
        n, b = _at(ns, c), _at(base, c)
        ns_tp = n["throughput"] if n else None
        base_tp = b["throughput"] if b else None
        ceiling = level_ceiling(n or b, result["ceiling"])
        rows.append({"concurrency": c, "ceiling": ceiling, "neuronserve": ns_tp, "baseline": base_tp,
                     "neuronserve_over_ceiling": _ratio(ns_tp, ceiling),
                     "baseline_over_ceiling": _ratio(base_tp, level_ceiling(b, result["ceiling"])),
                     "neuronserve_over_baseline": _ratio(ns_tp, base_tp),
                     "neuronserve_p50": n and n["p50"], "neuronserve_p99": n and n["p99"],
                     "baseline_p50": b and b["p50"], "baseline_p99": b and b["p99"],
                     "neuronserve_cpu_efficiency": n and cpu_efficiency(n, result["ceiling"]),
                     "baseline_cpu_efficiency": b and cpu_efficiency(b, result["ceiling"]),
                     "other_load": max((x for x in (other_load(n), other_load(b)) if x is not None), default=None)})
    return rows


def summary(result: dict) -> dict:
    """The single numbers: latency ratios, the fall from 4 to 64, max-throughput speed-up, serving capacity."""
    ns, base = result.get("neuronserve", []), result.get("baseline", [])
    c1 = _at(ns, 1)
    c4, c64 = _at(ns, 4), _at(ns, 64)
    group, swept = result["ceiling"]["latency_group"], result["ceiling"].get("latency_all")
    beside = c1 and c1.get("latency_all")
    every = beside or swept
    best_b1 = min(group["median_s"], every["median_s"]) if every else group["median_s"]
    out = {
        "ceiling_items_per_s": best_ceiling(result["ceiling"])["items_per_s"],
        "ceiling_batch": best_ceiling(result["ceiling"])["batch"],
        "inprocess_b1_group_s": group["median_s"],
        "inprocess_b1_all_s": swept["median_s"] if swept else None,
        "inprocess_b1_all_beside_s": beside and beside["median_s"],
        "inprocess_b1_all_beside_p99_s": beside and beside["p99_s"],
        "p99_c1_over_b1_group": _ratio(c1 and c1["p99"], group["median_s"]),
        "p99_c1_over_b1_best": _ratio(c1 and c1["p99"], best_b1),
        # like for like, beside the level: what serving adds to a lone request's typical and tail latency
        "p50_c1_over_b1_all_p50": _ratio(c1 and c1["p50"], beside and beside["median_s"]),
        "p99_c1_over_b1_all_p99": _ratio(c1 and c1["p99"], beside and beside["p99_s"]),
        "c64_over_c4": _ratio(c64 and c64["throughput"], c4 and c4["throughput"]),
        "max_neuronserve": max((lv["throughput"] for lv in ns), default=None),
        "max_baseline": max((lv["throughput"] for lv in base), default=None),
        "min_over_ceiling_c4_up": min((r["neuronserve_over_ceiling"] for r in ratio_rows(result)
                                       if r["concurrency"] >= 4 and r["neuronserve_over_ceiling"] is not None),
                                      default=None),
    }
    out["max_neuronserve_over_max_baseline"] = _ratio(out["max_neuronserve"], out["max_baseline"])
    for system, levels in (("neuronserve", ns), ("baseline", base)):
        top = max(levels, key=lambda lv: lv["throughput"], default=None)
        cost = serving_cpu_per_request(top) if top else None
        out[f"{system}_serving_cpu_ms"] = cost * 1000 if cost is not None else None
        out[f"{system}_capacity_per_core"] = 1.0 / cost if cost else None
    return out


def targets(name: str, result: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; `met` is None when the run has no number for it."""
    s = summary(result)

    def fmt(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    def met(x, ok):
        return None if x is None else ok(x)

    rows = [
        (f"neuronserve / ceiling >= {TARGET_CEILING} at every concurrency >= 4", fmt(s["min_over_ceiling_c4_up"]),
         met(s["min_over_ceiling_c4_up"], lambda x: x >= TARGET_CEILING)),
        ("no fall at 64 against 4 (throughput 64 / 4 >= 1)", fmt(s["c64_over_c4"]),
         met(s["c64_over_c4"], lambda x: x >= 0.99)),   # 1 % is the run-to-run noise of one level
        (f"p99 at concurrency 1 / in-process batch-1 latency (one core group) <= {TARGET_LATENCY}",
         fmt(s["p99_c1_over_b1_group"]), met(s["p99_c1_over_b1_group"], lambda x: x <= TARGET_LATENCY)),
        (f"p99 at concurrency 1 / in-process batch-1 latency (best of one group, all CPUs) <= {TARGET_LATENCY}",
         fmt(s["p99_c1_over_b1_best"]), met(s["p99_c1_over_b1_best"], lambda x: x <= TARGET_LATENCY)),
    ]
    if name in SPEEDUP_MODELS:
        rows += [
            (f"max req/s neuronserve / baseline >= {TARGET_TINY_SPEEDUP:g}",
             fmt(s["max_neuronserve_over_max_baseline"], ".2f"),
             met(s["max_neuronserve_over_max_baseline"], lambda x: x >= TARGET_TINY_SPEEDUP)),
            (f"serving capacity >= {TARGET_CAPACITY:g} req/s per core (serving CPU per request, model excluded)",
             f"{fmt(s['neuronserve_capacity_per_core'], '.0f')} ({fmt(s['neuronserve_serving_cpu_ms'], '.3f')} ms)",
             met(s["neuronserve_capacity_per_core"], lambda x: x >= TARGET_CAPACITY)),
        ]
    return rows


def _n(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def markdown(results: dict[str, dict], meta: dict) -> str:
    lines = [f"# neuronserve bench: {meta.get('when', '')}", "",
             f"Host: {meta.get('cpu_model', '?')}, {meta.get('cpus', '?')} CPUs; {meta.get('note', '')}".rstrip(), ""]
    for name, result in results.items():
        s = summary(result)
        lines += [f"## {name}", "",
                  f"In-process ceiling: {_n(s['ceiling_items_per_s'])} items/s (batch {s['ceiling_batch']}, "
                  f"one process per core group, swept before the levels; measured again beside each level: "
                  f"the table's ceiling column); batch-1 latency {_ms(s['inprocess_b1_group_s'])} ms on one "
                  f"group, {_ms(s['inprocess_b1_all_s'])} ms on all CPUs"
                  + (f" ({_ms(s['inprocess_b1_all_beside_s'])} ms, p99 {_ms(s['inprocess_b1_all_beside_p99_s'])} "
                     f"ms, beside the concurrency-1 level, which the latency targets use)"
                     if s["inprocess_b1_all_beside_s"] else "") + ".", "",
                  "| concurrency | ceiling items/s beside the level | neuronserve req/s | baseline req/s "
                  "| neuronserve / ceiling | neuronserve / baseline | neuronserve p50 / p99 ms | baseline p50 / p99 ms "
                  "| CPU efficiency vs ceiling: neuronserve / baseline | other load (CPUs) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ratio_rows(result):
            lines.append(
                f"| {r['concurrency']} | {_n(r['ceiling'])} | {_n(r['neuronserve'])} | {_n(r['baseline'])} "
                f"| {_n(r['neuronserve_over_ceiling'], '.3f')} | {_n(r['neuronserve_over_baseline'], '.2f')} "
                f"| {_ms(r['neuronserve_p50'])} / {_ms(r['neuronserve_p99'])} "
                f"| {_ms(r['baseline_p50'])} / {_ms(r['baseline_p99'])} "
                f"| {_n(r['neuronserve_cpu_efficiency'], '.3f')} / {_n(r['baseline_cpu_efficiency'], '.3f')} "
                f"| {_n(r['other_load'], '.2f')} |")
        errors = {f"{system} c={lv['concurrency']}": lv["errors"] for system in SYSTEMS
                  for lv in result.get(system, []) if lv["errors"]}
        lines += ["", f"Serving CPU per request (model compute excluded), at the busiest level: neuronserve "
                      f"{_n(s['neuronserve_serving_cpu_ms'], '.3f')} ms "
                      f"({_n(s['neuronserve_capacity_per_core'], '.0f')} req/s per core), baseline "
                      f"{_n(s['baseline_serving_cpu_ms'], '.3f')} ms "
                      f"({_n(s['baseline_capacity_per_core'], '.0f')} req/s per core).", "",
                  "| target | measured | met |", "|---|---:|:---:|"]
        for text, value, ok in targets(name, result):
            lines.append(f"| {text} | {value} | {'-' if ok is None else 'yes' if ok else 'NO'} |")
        if s["p99_c1_over_b1_all_p99"] is not None:
            lines += ["", f"Concurrency 1 against the lone in-process caller on all CPUs beside it, like for like: "
                          f"p50 / its median {_n(s['p50_c1_over_b1_all_p50'], '.3f')}, "
                          f"p99 / its p99 {_n(s['p99_c1_over_b1_all_p99'], '.3f')}."]
        if errors:
            lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
        lines.append("")
    return "\n".join(lines)


def write(out_dir: Path, results: dict[str, dict], meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    enriched = {name: {**r, "ratios": ratio_rows(r), "summary": summary(r)} for name, r in results.items()}
    js = out_dir / "results.json"
    js.write_text(json.dumps({"meta": meta, "models": enriched}, indent=2) + "\n")
    md = out_dir / "results.md"
    md.write_text(markdown(results, meta))
    return md, js
