"""The real stack on 127.0.0.1: models compiled for the CPU, gunicorn + uvicorn groups, nginx in front.

Fixtures:
- `model_repo`: a model repository with two tiny random-init models compiled for the CPU by
  neuronserve.build.compile.compile_model: "emb" (feature-extraction) and "cls" (text-classification).
- `stack`: session-wide, started and ready: model "emb" in two groups, one per CPU core (the machine has
  two), one model copy each, behind nginx. Tests must leave it running and healthy.
- `two_models`: per module, "emb" and "cls" behind one front, one group each.
- `stack_factory(models, nginx=..., server=..., start=True, repo=...)`: a variant (auth token, rate limit, two models,
  ...) started and ready; stopped at the end of the test that asked for it. `stack_builder` is the same
  without the clean-up, for module-scoped stacks that stop themselves.

Every test in this directory is marked `e2e`. Ports are picked free at start; every process is stopped
(SIGTERM, then SIGKILL) even when a test fails.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from neuronserve import config
from neuronserve.devices import cpu
from neuronserve.layout import Layout
from neuronserve.plan import make_plan
from neuronserve.operate.up import Stack, local_ports

E2E_DIR = Path(__file__).parent
READY_TIMEOUT_S = 240.0     # a noisy 2-core machine loading two groups at once
GRACE_S = 10.0
BUCKETS = dict(batch_sizes=[1, 4], sequence_lengths=[32])
MODELS = {"emb": "feature-extraction", "cls": "text-classification"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, tiny_model_dir) -> Path:
    from neuronserve.build.compile import compile_model

    repo = tmp_path_factory.mktemp("models")
    for name, task in MODELS.items():
        compile_model(tiny_model_dir(task), repo / name, name=name, task=task, backend="cpu", target="cpu",
                      **BUCKETS)
    return repo


def two_cpus() -> set[int]:
    """The group cores: two CPUs this process may use (the CI machine has exactly two)."""
    cpus = sorted(os.sched_getaffinity(0))
    return set(cpus[:2])



def model_table(name: str, **keys) -> str:
    body = {"task": MODELS.get(name), "source": f"/unused/{name}", "copies": 1, "max_batch_delay_ms": 2.0, **keys}
    return f"[models.{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items())


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_stack(workdir: Path, model_repo: Path, models: dict[str, dict], nginx: dict | None = None,
                server: dict | None = None, cpu_keys: dict | None = None) -> Stack:
    """Write a config for `models` ({name: extra keys}), plan it on two CPU cores, return an unstarted Stack."""
    workdir.mkdir(parents=True, exist_ok=True)
    groups = sum(int(keys.get("groups", 1)) for keys in models.values())
    ports = local_ports(groups)
    server = {"backend": "cpu", "model_repository": str(model_repo), "log_level": "warning", "timeout_s": 20.0,
              "graceful_timeout_s": 5.0, **ports["server"], **(server or {})}
    nginx = {**ports["nginx"], **(nginx or {})}
    text = ("[server]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in server.items())
            + "[nginx]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in nginx.items())
            + "[cpu]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in (cpu_keys or {}).items())
            + "".join(model_table(name, **keys) for name, keys in models.items()))
    path = workdir / "neuronserve.toml"
    path.write_text(text)
    cfg = config.load(path)
    plan = make_plan(cfg, cpu.discover(affinity=two_cpus()), python=sys.executable)
    return Stack(plan, Layout(workdir / "root", cfg), grace_s=GRACE_S)


def started(stack: Stack) -> Stack:
    stack.start()
    try:
        stack.wait_ready(READY_TIMEOUT_S)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="session")
def stack_builder(tmp_path_factory, model_repo):
    """build(models, nginx=, server=, cpu=, start=True) -> Stack in a fresh directory; the caller stops it."""

    def build(models: dict[str, dict] | None = None, *, nginx: dict | None = None, server: dict | None = None,
              cpu: dict | None = None, start: bool = True, repo: Path | None = None) -> Stack:
        s = build_stack(tmp_path_factory.mktemp("stack"), repo or model_repo, models or {"emb": {"groups": 2}},
                        nginx, server, cpu)
        return started(s) if start else s

    return build


@pytest.fixture(scope="session")
def stack(stack_builder):
    s = stack_builder({"emb": {"groups": 2}})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def two_models(stack_builder):
    """Per module: "emb" and "cls" behind one front, one group each (routing by model at the front)."""
    s = stack_builder({"emb": {"groups": 1}, "cls": {"groups": 1}})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def stack_factory(stack_builder):
    """Like stack_builder, but every stack it made is stopped when the test ends."""
    made: list[Stack] = []

    def make(models: dict[str, dict] | None = None, **kwargs) -> Stack:
        start = kwargs.pop("start", True)
        s = stack_builder(models, start=False, **kwargs)
        made.append(s)
        return started(s) if start else s

    try:
        yield make
    finally:
        for s in made:
            s.stop()
