"""Helpers for the fault and bad-input tests: the e2e stack fixtures, worker PIDs, background load, figures.

- `e2e_stack`: tests/e2e/conftest.py loaded as a module, so these tests build their stacks the same way
  (`build_stack`, `started`, the `model_repo` / `stack_factory` fixtures) instead of a second copy of that code.
- `worker_pid(stack, group)`: the PID of a group's uvicorn worker (the gunicorn master's only child).
- `Load`: closed-loop load (neuronserve.measure.loadgen) through the front in a background thread.
- `record(basetemp, key, data)`: figures (requests sent/failed per fault, seconds until back, cases run) merged
  into <pytest basetemp>/fault-figures.json and printed, so the closing note can quote them.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

from neuronserve.measure import loadgen

TESTS = Path(__file__).resolve().parents[1]
FIGURES = "fault-figures.json"


def _load_e2e_stack():
    spec = importlib.util.spec_from_file_location("neuronserve_e2e_stack", TESTS / "e2e" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e_stack = _load_e2e_stack()


def master_pid(stack, group: str) -> int:
    return next(p.popen.pid for p in stack.procs if p.name == group)


def worker_pid(stack, group: str) -> int | None:
    """The group's worker, or None while gunicorn has none (between a worker's death and its replacement)."""
    master = master_pid(stack, group)
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.1) -> float:
    """Seconds it took `predicate` to turn true; AssertionError naming `what` after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not after {timeout:g} s")
        time.sleep(poll)
    return time.monotonic() - t0


class Load:
    """`concurrency` keep-alive connections sending `body` to `url` for `duration_s`, in a background thread.

    Every request counts (no ramp): `result()` gives sent, ok, failed and the failure kinds.
    """

    def __init__(self, url: str, body: bytes, *, concurrency: int, duration_s: float):
        target = loadgen.make_target(url, "POST", body, {"Content-Type": "application/json"})
        self._m: loadgen.Measurement | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._m = asyncio.run(loadgen.run_closed([target], concurrency, duration_s=duration_s, ramp_s=0,
                                                         timeout_s=60))
            except BaseException as e:      # re-raised in result()
                self._error = e

        self._thread = threading.Thread(target=run, name="load", daemon=True)
        self._thread.start()

    def result(self) -> dict:
        self._thread.join(timeout=300)
        if self._error is not None:
            raise self._error
        assert self._m is not None, "the load did not finish"
        kinds: dict[str, int] = {}
        for kind in self._m.errors:
            kinds[kind] = kinds.get(kind, 0) + 1
        sent = len(self._m.latencies) + len(self._m.errors)
        return {"sent": sent, "ok": len(self._m.latencies), "failed": len(self._m.errors), "errors": kinds,
                "max_latency_s": round(max(self._m.latencies, default=0.0), 2)}


def record(basetemp: Path, key: str, data: dict) -> None:
    """Merge {key: data} into <basetemp>/fault-figures.json and print it (pytest -s, or the report on failure)."""
    path = Path(basetemp) / FIGURES
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[key] = data
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"figures {key}: {json.dumps(data, sort_keys=True)}")


def start_stack(workdir: Path, models: dict[str, dict], *, repo: Path, server: dict | None = None,
                dropins: dict[str, str] | None = None):
    """A stack on a model repository of the test's own (a damaged or slow artifact), with conf.d drop-ins beside
    its config (settings the e2e builder has no argument for). Started but NOT awaited: a group that must fail
    or never become ready would fail Stack.wait_ready, so the test waits for what it expects. The caller stops it.
    """
    for name, text in (dropins or {}).items():
        (workdir / "conf.d").mkdir(parents=True, exist_ok=True)
        (workdir / "conf.d" / name).write_text(text)
    stack = e2e_stack.build_stack(workdir, repo, models, server=server)
    stack.start()
    return stack


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
