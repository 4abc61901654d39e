"""Helpers for the server's tests: compiled tiny artifacts (cached per session) and a real gunicorn process."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from neuronserve.build import backends
from neuronserve.build.compile import compile_model
from neuronserve.server.settings import ServerSettings

APP = "neuronserve.server.app:create_app()"
_compiled: dict[tuple, Path] = {}
_servers: dict[str, "Gunicorn"] = {}


def compiled(root: Path, source: Path, task: str, *, batch_sizes=(1, 4), sequence_lengths=(32, 128),
             name: str | None = None) -> Path:
    """`neuronserve compile` of `source` for the CPU into root/<name>, once per session for the same arguments."""
    name = name or task
    key = (str(source), task, tuple(batch_sizes), tuple(sequence_lengths), name)
    if key not in _compiled:
        out = Path(root) / f"{name}-{len(_compiled)}" / name
        compile_model(source, out, name=name, task=task, backend="cpu", target="cpu",
                      batch_sizes=batch_sizes, sequence_lengths=sequence_lengths)
        _compiled[key] = out
    return _compiled[key]


class GatedLoader:
    """The real CPU loader, with two holds for tests: runners of the loads numbered in `gated` block once
    `armed` (after the warm-up) until `release()`; with `hold_loading` every load waits for `loading.set()`."""

    def __init__(self, gated=(), *, hold_loading: bool = False):
        self.gated = set(gated)
        self.loads = 0
        self.loading = threading.Event()
        if not hold_loading:
            self.loading.set()
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.released = threading.Event()
        self.batches: list[tuple] = []

    def __call__(self, path, *, copy_index, threads):
        self.loading.wait(60)
        run = backends.get("cpu").load(path, copy_index=copy_index, threads=threads)
        gated = self.loads in self.gated
        self.loads += 1

        def runner(*inputs):
            if self.armed.is_set():
                self.batches.append(tuple(inputs[0].shape))
                if gated:
                    self.entered.set()
                    self.released.wait(60)
            return run(*inputs)

        return runner

    def release(self):
        self.released.set()


def settings_for(model_dir: Path, **overrides) -> ServerSettings:
    name = Path(model_dir).name
    # max_queue: room for the e2e tests' large requests
    values = dict(group=f"{name}-0", model=name, model_dir=model_dir, backend="cpu", copies=2, threads=1,
                  max_queue=512)
    values.update(overrides)
    return ServerSettings(**values)


def wait_ready(client, timeout: float = 60) -> None:
    """Until the in-process app (a Starlette TestClient) reports ready."""
    deadline = time.monotonic() + timeout
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/v2/health/ready").json()
        time.sleep(0.05)


@contextlib.contextmanager
def in_process():
    """start(artifact, **settings) -> a TestClient of the artifact's app (its lifespan running), ready; every app
    it started is stopped on leaving. One copy unless the settings say otherwise."""
    from fastapi.testclient import TestClient

    from neuronserve.server.app import create_app

    clients = []

    def start(artifact: Path, **overrides):
        client = TestClient(create_app(settings_for(artifact, **{"copies": 1, **overrides})))
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            client.__exit__(None, None, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """One group's worker as production runs it: gunicorn, one UvicornWorker, no preload, settings in the env."""

    def __init__(self, settings: ServerSettings, log_path: Path, *, port: int | None = None,
                 extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEURONSERVE_")}
        env.update(settings.to_env(), PYTHONUNBUFFERED="1", **(extra_env or {}))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "neuronserve.server.worker.Worker", "-w", "1",
             "--no-control-socket", "-b", f"127.0.0.1:{self.port}", "--timeout", "300", "--graceful-timeout", "30",
             *args, APP],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_live(self, timeout: float = 120) -> None:
        self._wait("/v2/health/live", timeout)

    def wait_ready(self, timeout: float = 180) -> None:
        self._wait("/v2/health/ready", timeout)

    def _wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{path} not 200 after {timeout} s:\n{self.log()}")

    def wait_exit(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gunicorn still running after {timeout} s:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> "Gunicorn":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def shared_server(config, settings: ServerSettings, log_dir: Path) -> Gunicorn:
    """A started Gunicorn for `settings`, shared by every test module of the session and stopped at its end
    (pytest's config cleanup). Starting returns at once: call wait_ready() before use."""
    key = settings.model_dump_json()
    if key not in _servers:
        server = Gunicorn(settings, Path(log_dir) / f"{settings.group}-{len(_servers)}.log")
        config.add_cleanup(server.stop)
        _servers[key] = server
    return _servers[key]
