"""`python -m bench.versus REV`: the serving CPU per request of this checkout against an earlier commit's, side by
side in one run (the host's speed drifts over minutes; two runs on two days compare nothing).

REV is checked out in a git worktree under the work directory; its own code compiles the no-encoder
question-answering model (`make bench`'s serving-capacity model: the compute nearly off the CPU, so the figure is
the serving path's) and its workers serve it, the processes pointed at the worktree by PYTHONPATH. Both stacks
(one group per CPU behind nginx each) are up at once and loaded in turn with wrk at concurrency 64 through the
task JSON route with `make bench`'s question, over interleaved rounds; each level reports requests/s and the CPU
the stack's processes used per request. Writes
bench-results/versus.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench import cpu, models, report, wrk
from bench.__main__ import TUNING, drain, log
from bench.systems import NeuronserveSystem

NAME = "no-encoder"
CONCURRENCY, DURATION, RAMP, ROUNDS = 64, 8.0, 2.0, 3
PREPARE = "import sys; from pathlib import Path; from bench import models; models.prepare(sys.argv[1], Path(sys.argv[2]))"


def checkout(rev: str, work: Path) -> tuple[str, Path]:
    """(the commit's short hash, its worktree), made once."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, check=True).stdout.strip()
    tree = work / "versus" / sha
    if not (tree / "neuronserve").is_dir():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), sha], check=True,
                       capture_output=True)
    return sha, tree


def earlier_templates() -> dict[str, str]:
    """Template overrides for an earlier commit's workers: this checkout's gunicorn config without the systemd
    notify hook, which that code may not have (outside systemd the hook does nothing)."""
    import neuronserve

    text = (Path(neuronserve.__file__).parent / "templates" / "gunicorn.conf.py.j2").read_text()
    return {"gunicorn.conf.py.j2": "".join(line for line in text.splitlines(True)
                                           if "systemd_notify" not in line and "READY=1" not in line)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the earlier commit (a hash, tag or branch)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    args = ap.parse_args(argv)
    work = (args.out / "work").absolute()
    cpus = sorted(os.sched_getaffinity(0))
    sha, tree = checkout(args.rev, work)
    before_root = work / "versus" / f"{sha}-run"
    log(f"compiling {NAME} with {sha}'s code")
    subprocess.run([sys.executable, "-c", PREPARE, NAME, str(before_root)], cwd=tree, check=True)
    models.prepare(NAME, work, log=log)
    common = dict(batch_sizes=models.BATCH_SIZES[NAME], **TUNING)
    systems = {sha: NeuronserveSystem(NAME, before_root, cpus, env={"PYTHONPATH": str(tree)},
                                      templates=earlier_templates(), **common),
               "this checkout": NeuronserveSystem(NAME, work, cpus, **common)}
    rows: dict[str, list[dict]] = {label: [] for label in systems}
    try:
        for system in systems.values():
            system.start()
        probes = {label: system.probe() for label, system in systems.items()}
        for label, system in systems.items():
            wrk.run(system.targets, CONCURRENCY, 4.0)       # every bucket warm
            drain(system, probes[label])
        for _ in range(ROUNDS):
            for label, system in systems.items():
                cpu0 = cpu.cpu_seconds(system.pids)
                res = wrk.run(system.targets, CONCURRENCY, DURATION, ramp_s=RAMP, timeout_s=60)
                cpu_s = cpu.cpu_seconds(system.pids) - cpu0
                row = {"throughput": res.throughput, "completed": res.completed, "errors": res.errors,
                       "cpu_ms_per_request": 1000 * cpu_s / max(res.completed, 1)}
                rows[label].append(row)
                log(f"  {label}: {row['throughput']:.0f} req/s, {row['cpu_ms_per_request']:.3f} ms of CPU a "
                    f"request, errors {res.errors or 0}")
                drain(system, probes[label])
    finally:
        for system in systems.values():
            system.stop()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    before = statistics.median(r["cpu_ms_per_request"] for r in rows[sha])
    lines = [f"# Serving CPU, {sha} vs this checkout: {when}", "",
             f"no-encoder question answering through the task JSON route, {len(cpus)} groups behind nginx each, concurrency "
             f"{CONCURRENCY}, {DURATION:g} s levels, {ROUNDS} rounds interleaved; medians:", "",
             "| code | req/s | CPU per request (ms) | req/s per core of CPU | / before |", "|---|---:|---:|---:|---:|"]
    for label, rs in rows.items():
        ms = statistics.median(r["cpu_ms_per_request"] for r in rs)
        lines.append(f"| {label} | {statistics.median(r['throughput'] for r in rs):.0f} | {ms:.3f} | "
                     f"{1000 / ms:.0f} | {ms / before:.2f} |")
    report.save(args.out, "versus", lines, {"when": when, "rev": sha, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
