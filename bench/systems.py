"""The two served systems under test, behind one small interface the orchestration drives.

    system.start(); system.targets (wrk targets); system.probe() (one real request to every backend, checked);
    system.pids (process trees whose CPU counts); system.batches() (batches, items/bucket sum, items so far);
    system.stop()

- Neuronserve: the real stack (`neuronserve up`'s Stack: one gunicorn group per CPU behind nginx) from a config
  written for the run; the client talks to nginx.
- Baseline: the original design (baseline_server.py), one pinned hypercorn process per CPU; the client spreads
  its connections over the ports.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

from bench import wrk
from neuronserve.measure import scrape
from neuronserve.operate.up import free_port_block, local_ports

from bench.baseline_server import COPIES, Baseline, request_path

# the original sample's default request (its GET without parameters answers this): 114 tokens, one 128 bucket
QUESTION = "What does the little engine say"
CONTEXT = ("In the childrens story about the little engine a small locomotive is pulling a large load up a "
           "mountain. Since the load is heavy and the engine is small it is not sure whether it will be able to do "
           "the job. This is a story about how an optimistic attitude empowers everyone to achieve more. In the "
           "story the little engine says: 'I think I can' as it is pulling the heavy load all the way to the top "
           "of the mountain. On the way down it says: I thought I could.")
PAYLOAD = {"question": QUESTION, "context": CONTEXT}



def override_templates(layout, templates: dict[str, str] | None):
    """`layout` with these template overrides written to its /etc/neuronserve/templates (an earlier commit's
    code served with this checkout's rendering: bench/versus.py)."""
    for name, text in (templates or {}).items():
        layout.template_override_dir.mkdir(parents=True, exist_ok=True)
        (layout.template_override_dir / name).write_text(text)
    return layout


def one_model_stack(work: Path, repo: Path, keys: dict, *, name: str, backend: str = "cpu",
                    cpus: list[int] | None = None, nginx: bool = True, env: dict | None = None,
                    templates: dict[str, str] | None = None):
    """An unstarted Stack serving repo/<name> as [models.<name>] with `keys` (task, groups, copies, ...), on free
    loopback ports, gRPC off; `cpus` for the CPU backend (default: this process's), other backends discovered."""
    from neuronserve import config
    from neuronserve.devices import cpu as cpu_devices, discover_host
    from neuronserve.layout import Layout
    from neuronserve.plan import make_plan
    from neuronserve.operate.up import Stack

    ports = local_ports(len(cpus or [0]))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "neuronserve.toml"
    values = {"source": "/unused", **keys}
    path.write_text(f"""# written by `python -m bench` for one run
[server]
backend = "{backend}"
model_repository = "{repo}"
base_port = {ports["server"]["base_port"]}
python = "{sys.executable}"
log_level = "warning"
timeout_s = 120
[nginx]
enabled = {"true" if nginx else "false"}
listen = "{ports["nginx"]["listen"]}"
grpc_listen = ""
[models.{name}]
""" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    cfg = config.load(path, dropins=False)
    host = cpu_devices.discover(set(cpus)) if backend == "cpu" and cpus else discover_host(backend)
    plan = make_plan(cfg, host, python=sys.executable)
    return Stack(plan, override_templates(Layout(work / "root", cfg), templates), nginx=nginx, grace_s=10, env=env)


def _request(method: str, url: str, body: bytes | None = None, timeout: float = 300.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class NeuronserveSystem:
    label = "neuronserve"

    def __init__(self, name: str, root: Path, cpus: list[int], *, copies: int = 1, threads_per_copy: int = 1,
                 max_batch_delay_ms: float = 1.0, batch_sizes: list[int] | None = None, task: str | None = None,
                 env: dict[str, str] | None = None, templates: dict[str, str] | None = None):
        from bench.models import TASK

        self.name, self.root, self.cpus, self.env = name, root, cpus, env
        self.templates = templates or {}        # template overrides by name (/etc/neuronserve/templates)
        self.tuning = dict(copies=copies, threads_per_copy=threads_per_copy, max_batch_delay_ms=max_batch_delay_ms)
        self.batch_sizes = batch_sizes
        self.task = task or TASK
        self.stack = None
        # the request every connection sends: the task JSON of the QA payload, unless a caller sets another
        self.path, self.body = f"/models/{name}", json.dumps({"inputs": PAYLOAD})

    def config_text(self, ports: dict[str, dict]) -> str:
        from bench.models import SEQ, source_dir

        t = self.tuning
        return f"""# written by `python -m bench` for one run
[server]
backend = "cpu"
model_repository = "{self.root / 'models'}"
base_port = {ports["server"]["base_port"]}
grpc_base_port = {ports["server"]["grpc_base_port"]}
python = "{sys.executable}"
log_level = "warning"
timeout_s = 120

[nginx]
listen = "{ports["nginx"]["listen"]}"
grpc_listen = "{ports["nginx"]["grpc_listen"]}"

[cpu]
threads_per_copy = {t['threads_per_copy']}

[models.{self.name}]
task = "{self.task}"
source = "{source_dir(self.name, self.root)}"
batch_sizes = {json.dumps(self.batch_sizes)}
sequence_lengths = [{SEQ}]
copies = {t['copies']}
max_batch_delay_ms = {t['max_batch_delay_ms']}
max_queue = 1024
"""

    def start(self) -> None:
        from neuronserve import config
        from neuronserve.devices import cpu as cpu_devices
        from neuronserve.layout import Layout
        from neuronserve.plan import make_plan
        from neuronserve.operate.up import Stack

        work = self.root / "run" / f"neuronserve-{self.name}"
        work.mkdir(parents=True, exist_ok=True)
        path = work / "neuronserve.toml"
        path.write_text(self.config_text(local_ports(len(self.cpus))))
        cfg = config.load(path, dropins=False)
        host = cpu_devices.discover(set(self.cpus))
        plan = make_plan(cfg, host, python=sys.executable)
        self.stack = Stack(plan, override_templates(Layout(work / "root", cfg), self.templates), nginx=True,
                           grace_s=10, env=self.env)
        self.stack.start()
        try:
            self.stack.wait_ready(600)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None

    @property
    def targets(self) -> list[wrk.Target]:
        return [wrk.Target(self.stack.front_url, (wrk.Request("POST", self.path, self.body, "application/json"),))]

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.stack.procs]

    def probe(self) -> float:
        """One checked request to every group directly (it queues behind whatever the group still has):
        the slowest one's seconds."""
        slowest = 0.0
        for url in self.stack.group_urls.values():
            t0 = time.monotonic()
            status, body = _request("POST", url + self.path, self.body.encode())
            slowest = max(slowest, time.monotonic() - t0)
            if status != 200 or (self.task == "question-answering" and not {"answer", "score", "start", "end"} <= set(
                    json.loads(body))):
                raise RuntimeError(f"neuronserve {url}: unexpected answer {status} {body[:300]!r}")
        return slowest

    def batches(self) -> tuple[float, float, float]:
        """(batches executed, sum of items/bucket, items) over every group so far, from /metrics."""
        batches = fill = items = 0.0
        for url in self.stack.group_urls.values():
            _, text = _request("GET", url + "/metrics", timeout=30)
            c = scrape.parse(text.decode())
            # each executed batch observes batch_fill once and adds its items to inferences_total
            batches, fill, items = batches + c.fill_count, fill + c.fill_sum, items + c.inferences
        return batches, fill, items


class BaselineSystem:
    label = "baseline"

    def __init__(self, name: str, model_dir: Path, root: Path, cpus: list[int]):
        self.name, self.model_dir, self.cpus = name, model_dir, cpus
        self.log_dir = root / "run" / f"baseline-{name}"
        self.server: Baseline | None = None

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server = Baseline(self.model_dir, self.cpus, free_port_block(len(self.cpus)), log_dir=self.log_dir)
        self.server.start()
        try:
            self.server.wait_ready(600)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def targets(self) -> list[wrk.Target]:
        # like the original benchmark: every core's port, every model copy on it, in turn
        return [wrk.Target(url, tuple(wrk.Request("GET", request_path(core, copy, QUESTION, CONTEXT))
                                      for copy in range(COPIES)))
                for core, url in enumerate(self.server.urls)]

    @property
    def pids(self) -> list[int]:
        return self.server.pids

    def probe(self) -> float:
        slowest = 0.0
        for core, url in enumerate(self.server.urls):
            t0 = time.monotonic()
            status, body = _request("GET", url + request_path(core, 0, QUESTION, CONTEXT))
            slowest = max(slowest, time.monotonic() - t0)
            answer = json.loads(body)
            if status != 200 or not isinstance(answer.get("detail"), str):
                raise RuntimeError(f"baseline {url}: unexpected answer {status} {body[:300]!r}")
        return slowest

    def batches(self) -> None:
        return None     # batch 1 always: one model call per answered request
