"""The baseline: a faithful reimplementation of the original aws-samples "best practices for FastAPI on
Inferentia" server, run on the CPU.

What the original does, and so what this does:
- one server process per core (there: one container per NeuronCore, NEURON_RT_VISIBLE_CORES=n; here: one
  process pinned to CPU n with os.sched_setaffinity, torch intra-op threads 1), each on its own port, with
  no front: the client spreads its requests over the ports itself;
- hypercorn (default settings: one worker) serving a FastAPI app;
- `num_models_per_server` (2) copies of the batch-1 traced model, loaded with torch.jit.load, each with its
  own tokenizer, reached at GET /predictions_neuron_core_{n}/model_{i}?seq_0=<question>&seq_1=<context>;
- the handler is `async def` and does everything inline on the event loop: tokenize this one request padded
  to max_length (128 there; here the artifact's sequence length), run the model, argmax the start and end
  logits, turn the tokens back into a string, answer {"detail": answer}. So one request at a time per
  process, whatever the number of copies.

One deliberate difference: the original logs the question and the answer at WARNING on every request
(`quiet = False`); this one does not, which only makes the baseline faster.

It loads the batch-1 bucket's trace of a neuronserve-compiled model directory (the same traced model the
other two measurements run) and its saved tokenizer. Run one process with

    BASELINE_MODEL_DIR=<compiled model dir> BASELINE_CORE=0 \
        python -m hypercorn 'bench.baseline_server:create_app()' -b 127.0.0.1:8081

or all of them with `Baseline(model_dir, cpus).start()`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

COPIES = 2          # the original's num_models_per_server
ROUTE = "/predictions_neuron_core_{core}/model_{copy}"


def create_app(model_dir: str | None = None, core: int | None = None, copies: int | None = None):
    """The FastAPI app of one core's server (arguments default to BASELINE_MODEL_DIR, BASELINE_CORE,
    BASELINE_COPIES)."""
    import torch
    import transformers
    from fastapi import FastAPI, responses

    from neuronserve.build.artifact import read_manifest

    model_dir = Path(model_dir or os.environ["BASELINE_MODEL_DIR"])
    core = int(os.environ.get("BASELINE_CORE", "0") if core is None else core)
    copies = int(os.environ.get("BASELINE_COPIES", str(COPIES)) if copies is None else copies)
    torch.set_num_threads(1)
    manifest = read_manifest(model_dir, backend="cpu")
    seq = max(manifest.sequence_lengths)
    artifact = model_dir / manifest.bucket(1, seq).file
    models = {f"model_{i}": torch.jit.load(str(artifact)).eval() for i in range(copies)}
    tokenizers = {name: transformers.AutoTokenizer.from_pretrained(str(model_dir / manifest.tokenizer))
                  for name in models}
    input_names = manifest.input_names

    app = FastAPI()

    @app.get("/")
    async def read_root():
        return {"Status": "Healthy"}

    # the original's handler, CPU edition: everything inline on the event loop
    @app.get(f"/predictions_neuron_core_{core}/{{model_id}}")
    async def infer(model_id: str, seq_0: str = "", seq_1: str = ""):
        if model_id not in models:
            return responses.JSONResponse(status_code=404, content={
                "detail": f"Model {model_id} does not exist. Try a model name up to model_{copies - 1}"})
        tokenizer = tokenizers[model_id]
        encoded = tokenizer(seq_0, seq_1, return_tensors="pt", max_length=seq, padding="max_length",
                            truncation=True)
        with torch.inference_mode():
            output = models[model_id](*(encoded[name] for name in input_names))
        start = int(torch.argmax(output[0]))
        end = int(torch.argmax(output[1])) + 1
        ids = encoded["input_ids"][0]
        span = ids[start:end] if end > start else ids[start:]
        answer = tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(span))
        return responses.JSONResponse(status_code=200, content={"detail": answer})

    return app


def request_path(core: int, copy: int, question: str, context: str) -> str:
    """The GET path (with query) the original's clients send to core `core`, model copy `copy`."""
    query = urllib.parse.urlencode({"seq_0": question, "seq_1": context})
    return ROUTE.format(core=core, copy=copy) + "?" + query


class Baseline:
    """One pinned hypercorn process per CPU in `cpus`, on consecutive ports from `base_port`."""

    def __init__(self, model_dir: Path, cpus: list[int], base_port: int, *, copies: int = COPIES,
                 log_dir: Path | None = None):
        self.model_dir, self.cpus, self.base_port, self.copies = Path(model_dir), list(cpus), base_port, copies
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.base_port + i}" for i in range(len(self.cpus))]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        for i, cpu in enumerate(self.cpus):
            env = {**os.environ, "BASELINE_MODEL_DIR": str(self.model_dir), "BASELINE_CORE": str(i),
                   "BASELINE_COPIES": str(self.copies), "PYTHONPATH": root,
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            log = open(self.log_dir / f"baseline-{i}.log", "ab") if self.log_dir else subprocess.DEVNULL
            # the affinity is set before exec, so hypercorn's spawned worker inherits it
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "hypercorn", "bench.baseline_server:create_app()",
                 "-b", f"127.0.0.1:{self.base_port + i}"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                start_new_session=True, preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu})))
            if log is not subprocess.DEVNULL:
                log.close()

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for url in self.urls:
            while True:
                dead = [p.args for p in self.procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"baseline server exited before it was ready: {dead[0]}")
                try:
                    with urllib.request.urlopen(url + "/", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"baseline server {url} not ready after {timeout:g} s")
                time.sleep(0.25)

    def stop(self) -> None:
        import signal

        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []

    def __enter__(self) -> "Baseline":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
