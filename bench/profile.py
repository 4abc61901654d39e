"""`python -m bench.profile`: where a neuronserve worker's time goes under load, sampled with py-spy.

Starts neuronserve for one bench model (default tiny, where the serving path shows), loads it through nginx with
wrk at one concurrency, records every group worker with `py-spy record --format raw --threads` for the load's
duration, and prints per thread the share of samples and the functions with the most inclusive and self time.
The raw collapsed stacks stay in bench-results/profile/ for flame graphs (e.g. inferno, speedscope).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from bench import cpu, models, wrk
from bench.__main__ import TUNING, log
from bench.systems import NeuronserveSystem


def worker_pids(system: NeuronserveSystem) -> list[int]:
    """The gunicorn workers (children of each group's master), where the app runs."""
    masters = [p.popen.pid for p in system.stack.procs if p.name != "nginx"]
    return [pid for pid in cpu.tree_pids(masters) if pid not in masters]


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread (by native id) of a process, from /proc/<pid>/task."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / cpu.TICKS
    return out


def summarize(raw: Path, top: int = 25) -> str:
    """Collapsed stacks ('thread;frame;frame count' lines) -> per thread share, top inclusive and self frames."""
    threads: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        threads[frames[0]] += n
        for f in set(frames[1:]):
            inclusive[f] += n
        if len(frames) > 1:
            own[frames[-1]] += n
    if not total:
        return f"{raw}: no samples"
    out = [f"{raw.name}: {total} samples"]
    out += [f"  {100 * n / total:5.1f}%  {t}" for t, n in threads.most_common()]
    out.append("  inclusive:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out.append("  self:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    ap.add_argument("--model", default="tiny", choices=sorted(models.BATCH_SIZES))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--idle", action="store_true", help="include idle (waiting) samples")
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = args.out.resolve() / "work"
    out_dir = args.out.resolve() / "profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0))
    models.prepare(args.model, work, log=log)
    system = NeuronserveSystem(args.model, work, cpus, batch_sizes=models.BATCH_SIZES[args.model], **TUNING)
    system.start()
    try:
        wrk.run(system.targets, args.concurrency, 3)     # warm every bucket
        raws = []
        recorders = []
        for pid in worker_pids(system):
            raw = out_dir / f"{args.model}-c{args.concurrency}-{pid}.txt"
            raws.append(raw)
            cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(args.duration), "--format", "raw",
                   "--threads", "--nonblocking", "-o", str(raw)] + (["--idle"] if args.idle else [])
            recorders.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        results = []
        load = threading.Thread(target=lambda: results.append(wrk.run(system.targets, args.concurrency,
                                                                      args.duration)))
        pids = worker_pids(system)
        nginx = [p.popen.pid for p in system.stack.procs if p.name == "nginx"]
        before = {pid: thread_cpu(pid) for pid in pids}
        nginx0 = cpu.cpu_seconds(nginx)
        load.start()
        load.join()
        after = {pid: thread_cpu(pid) for pid in pids}
        nginx_s = cpu.cpu_seconds(nginx) - nginx0
        for r in recorders:
            r.wait()
        res = results[0]
        log(f"load: {res.throughput:.1f} req/s, p50 {res.p50 * 1000:.1f} ms, p99 {res.p99 * 1000:.1f} ms, "
            f"errors {res.errors}")
        # CPU per answered request, by thread: sampling shares overcount threads that wait for the CPU
        print(f"nginx: {1000 * nginx_s / res.ok:.3f} ms CPU per request")
        for pid, raw in zip(pids, raws):
            print(summarize(raw))
            for tid, t in sorted(after[pid].items()):
                spent = t - before[pid].get(tid, 0.0)
                if spent > 0:
                    print(f"  thread {tid}: {1000 * spent / res.ok * len(pids):.3f} ms CPU per request of this group")
    finally:
        system.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
