"""One group worker's life, in one place: start, ready, serve, stop.

    startup:  the model's threads start (tokenizer, copies loading and warming up); gRPC listens once every
              copy passed the warm-up; systemd hears READY=1 then, or, when a copy failed its warm-up first, the
              reason in STATUS= and the worker exits with gunicorn's boot-error code so that the start fails
    serving:  WATCHDOG=1 from the event loop (a hung loop gets the unit restarted) and a STATUS= line with the
              ready copies and the recent requests/s
    shutdown: STOPPING=1; gRPC calls in flight finish; the batcher refuses new work, each copy ends its batch,
              and every thread is joined within graceful_timeout_s; what did not stop is logged by name

uvicorn's worker has already stopped accepting and answered the HTTP requests in flight when shutdown runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from neuronserve.server.grpc_service import GrpcService
from neuronserve.server.model import ServedModel
from neuronserve.server.systemd_notify import Notifier

log = logging.getLogger("neuronserve.server")

BOOT_ERROR = 3      # gunicorn's WORKER_BOOT_ERROR: the master stops (and systemd sees the unit fail) instead of
                    # respawning a worker that cannot start
# how often the status line is refreshed when systemd asked for no watchdog
STATUS_EVERY_S = 5.0


class Lifecycle:
    def __init__(self, model: ServedModel, grpc: GrpcService | None = None, notifier: Notifier | None = None, *,
                 clock: Callable[[], float] = time.monotonic, exit: Callable[[int], None] = os._exit):
        self.model = model
        self.grpc = grpc
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.exit = exit            # tests record it; the worker leaves at once (no request is in flight)
        self._tasks: list[asyncio.Task] = []
        self._seen = (0.0, 0)       # (clock, requests answered) at the last status line

    async def startup(self) -> None:
        model, settings = self.model, self.model.settings
        model.start(asyncio.get_running_loop())
        log.info("%s: serving %s (%s, %s) from %s with %d copies x %d threads, buckets %s", settings.group,
                 model.name, model.task, settings.backend, settings.model_dir, settings.copies, settings.threads,
                 " ".join(f"{b.batch}x{b.seq}" for b in model.manifest.buckets))
        if self.notifier.active:
            self.notifier.status(f"loading {settings.copies} copies of {model.name}")
            self._seen = (self.clock(), model.metrics.answered)
            self._tasks = [asyncio.ensure_future(self._announce()), asyncio.ensure_future(self._heartbeat())]
        if self.grpc is not None:
            await self.grpc.start()

    async def shutdown(self) -> list[str]:
        """Stop everything; the names of the threads still running after graceful_timeout_s."""
        settings = self.model.settings
        self.notifier.stopping(f"stopping: {settings.group} finishes its batches")
        for task in self._tasks:
            task.cancel()
        if self.grpc is not None:   # calls in flight may take as long as a request may
            await self.grpc.stop(settings.timeout_s)
        # joining blocks: off the loop, which may still have a gRPC callback to run
        stuck = await asyncio.get_running_loop().run_in_executor(None, self.model.stop, settings.graceful_timeout_s)
        if stuck:
            log.warning("%s: %d threads did not stop within %g s (graceful_timeout_s): %s", settings.group,
                        len(stuck), settings.graceful_timeout_s, ", ".join(stuck))
        self.notifier.close()
        return stuck

    def status_line(self) -> str:
        """What `systemctl status` shows: ready copies and requests/s since the last line."""
        model = self.model
        now, answered = self.clock(), model.metrics.answered
        then, before = self._seen
        self._seen = (now, answered)
        rate = (answered - before) / (now - then) if now > then else 0.0
        ready = sum(c.state == "ready" for c in model.executor.copies)
        state = "ready" if model.ready else f"not ready ({model.reason})"
        return f"{state}: {ready} of {len(model.executor.copies)} copies warm, {rate:.1f} requests/s"

    async def _announce(self) -> None:
        failure = await self.model.started()
        if failure is None:
            self.notifier.ready(self.status_line())
            return
        # under systemd the start job waits for READY=1: failing the start is how its reason reaches the sysadmin
        log.error("cannot start %s: %s", self.model.settings.group, failure)
        for handler in log.handlers:
            handler.flush()
        self.notifier.status(f"failed: {failure}")
        self.exit(BOOT_ERROR)

    async def _heartbeat(self) -> None:
        watchdog_s = self.notifier.watchdog_s
        period = watchdog_s / 3 if watchdog_s else STATUS_EVERY_S
        while True:
            if watchdog_s:
                self.notifier.watchdog()
            self.notifier.status(self.status_line())
            await asyncio.sleep(period)
