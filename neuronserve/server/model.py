"""One group's served model: the checked artifact, its tokenizer, the batcher and the copies, and readiness.

The routes call `tensor_items` (client-tokenized tensors -> items) and `infer` (parsed task items, tokenized on
the tokenizer thread on their way to the queue, or tensor items -> a finished Work, or a ServeError carrying the
HTTP status).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Awaitable, Callable

import numpy as np

from neuronserve import tasks
from neuronserve.build import backends
from neuronserve.build.artifact import SHARED_FILE, read_manifest
from neuronserve.errors import ArtifactError
from neuronserve.server import lending
from neuronserve.server.batcher import Batcher, ServeError, Work
from neuronserve.server.executor import Executor, Loader
from neuronserve.server.metrics import Metrics
from neuronserve.server.settings import ServerSettings

log = logging.getLogger("neuronserve.server")

# a request still waiting after this long gets a watcher for its client's departure (a task reading the
# connection, about 20 us of event-loop CPU): one answered sooner would cost the copies at most this long if its
# client had left, while watching every request would cost a sizeable part of a small model's serving CPU
WATCH_AFTER_S = 0.25


class ServedModel:
    """Raises ArtifactError (with what to do) when the artifact is missing, damaged or for another backend."""

    def __init__(self, settings: ServerSettings, *, load: Loader | None = None):
        self.settings = settings
        self.name = settings.model
        self.manifest = manifest = read_manifest(settings.model_dir, backend=settings.backend)
        if manifest.warmup is None:
            raise ArtifactError(f"{settings.model_dir}: the manifest has no warm-up answer to check; "
                                "recompile with this neuronserve")
        self.task = manifest.task
        self.tokenizer = tasks.load_tokenizer(settings.model_dir / manifest.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.metrics = Metrics(settings.model, settings.group)
        # a batch runs at its own shape when one trace serves every bucket (CPU, CUDA) and nobody asked for buckets
        exact = not settings.pad_to_buckets and all(b.file == SHARED_FILE for b in manifest.buckets)
        self.batcher = Batcher([(b.batch, b.seq) for b in manifest.buckets], max_queue=settings.max_queue,
                               max_delay_s=settings.max_batch_delay_ms / 1000,
                               return_wait_share=settings.return_wait_share, exact_shapes=exact,
                               max_batch_tokens=settings.max_batch_tokens or None)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self.metrics.queue_capacity.set(settings.max_queue)
        try:
            warmup = tasks.warmup_batches(self.task, self.tokenizer, manifest)
        except tasks.BadInput as e:
            raise ArtifactError(f"{settings.model_dir}: the manifest's warm-up inputs are unusable: {e}") from None
        self.executor = Executor(manifest, settings.model_dir, load=load or backends.get(settings.backend).load,
                                 copies=settings.copies, threads=settings.threads, tokenizer=self.tokenizer,
                                 batcher=self.batcher,
                                 metrics=self.metrics, warmup=warmup, stuck_after_s=settings.timeout_s,
                                 on_change=self._copies_changed,
                                 lending=lending.for_group(settings, self.metrics.borrowed_batches.inc))
        self._tokenizer_thread = TokenizerThread(self.task, self.tokenizer, self.batcher, settings.truncation)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._became_ready: asyncio.Event | None = None
        self._outcome: asyncio.Future | None = None
        self._state_lock = threading.Lock()
        self._warmed = False     # every copy passed the warm-up once (a replacement loading later keeps it)
        self.ready = False
        self.reason = "loading the model copies"

    # ---------------------------------------------------------------- lifecycle and readiness

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start loading and warming the copies in their threads; `ready` turns true when all pass."""
        self._loop = loop
        self._became_ready = asyncio.Event()
        self._outcome = loop.create_future()
        self._tokenizer_thread.start(loop)
        self.executor.start(loop)

    async def wait_ready(self) -> None:
        """Returns once every copy passed the warm-up (at once if that happened already)."""
        await self._became_ready.wait()

    async def started(self) -> str | None:
        """None once every copy passed the warm-up; the reason if one failed before that."""
        return await asyncio.shield(self._outcome)

    def stop(self, timeout_s: float) -> list[str]:
        """Refuse new work, let each copy finish its batch, and join every thread within `timeout_s`: the names
        of those still running then (a copy stuck inside its runner cannot be interrupted)."""
        self.batcher.close()
        self._tokenizer_thread.stop()
        threads = [self._tokenizer_thread.thread, *self.executor.stop()]
        deadline = time.monotonic() + timeout_s
        for t in threads:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in threads if t is not None and t.is_alive()]

    def _copies_changed(self) -> None:
        with self._state_lock:
            copies = list(self.executor.copies)
            failed = [c.reason for c in copies if c.state == "failed"]
            loaded = sum(c.state == "ready" for c in copies)
            was = self.ready
            if failed:
                self.ready, self.reason = False, failed[0]
                if not self._warmed:
                    self._settle(failed[0])
            elif loaded == len(copies) or self._warmed:
                self._warmed = True
                self.ready, self.reason = True, ""
            else:
                self.reason = f"loading: {loaded} of {len(copies)} copies warmed up"
            self.metrics.ready.set(1 if self.ready else 0)
        if self.ready and not was:
            self._settle(None)
            log.info("%s ready: %d copies passed the known-answer warm-up", self.settings.group, len(copies))

    def _settle(self, failure: str | None) -> None:
        """From a copy thread: the start's outcome, on the loop (the first one counts)."""
        def settle():
            if failure is None:
                self._became_ready.set()
            if not self._outcome.done():
                self._outcome.set_result(failure)
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:    # the loop closed: the worker is stopping
            pass

    # ---------------------------------------------------------------- the request path

    def tensor_items(self, tensors: dict[str, np.ndarray]) -> list[tasks.Encoded]:
        """Client-tokenized int tensors [n, s] by input name -> one item per row (all s tokens long)."""
        names = self.manifest.input_names
        unknown = sorted(set(tensors) - set(names))
        if unknown:
            raise ServeError(400, f"unknown input(s) {', '.join(unknown)}; {self.name} takes {', '.join(names)} "
                                  "(INT64 [batch, sequence]) or text as one BYTES input")
        if "input_ids" not in tensors:
            raise ServeError(400, "input_ids is required with token tensors")
        shape = tensors["input_ids"].shape
        for name, array in tensors.items():
            if array.dtype.kind not in "iu":
                raise ServeError(400, f"input {name}: integer token ids expected (INT64), got {array.dtype}")
            if array.ndim != 2 or array.shape != shape:
                raise ServeError(400, f"input {name}: shape {list(array.shape)}; every token input must be "
                                      f"[batch, sequence] and the same shape as input_ids {list(shape)}")
        n, s = shape
        if n == 0 or s == 0:
            raise ServeError(422, f"input_ids has shape {list(shape)}: nothing to infer")
        if s > self.batcher.max_seq:
            raise ServeError(422, f"sequence length {s} is longer than the largest compiled bucket "
                                  f"({self.batcher.max_seq})")
        limits = {"input_ids": self.vocab_size, "attention_mask": 2, "token_type_ids": 2}
        for name, array in tensors.items():
            if array.min() < 0 or array.max() >= limits[name]:
                raise ServeError(422, f"input {name}: values must lie in 0..{limits[name] - 1}")
        arrays = {name: a.astype(np.int64, copy=False) for name, a in tensors.items()}
        return [tasks.Encoded({name: a[row] for name, a in arrays.items()}, s) for row in range(n)]

    async def infer(self, items: list, *, tokenize: bool, options: dict | None, deadline: float,
                    disconnected: Callable[[], Awaitable] | None = None) -> Work:
        """Queue `items` (parsed task items with `tokenize`, else tasks.Encoded), wait for every row (and
        answer, decoded with the request's task `options` unless they are None); ServeError on refusal, timeout
        or client gone, tasks.BadInput on text the tokenizer refuses. `deadline` is a time.monotonic() value;
        `disconnected` returns once the client left.

        Text goes to the tokenizer thread, which queues it for the copies itself: the request's only wake-up
        on the event loop is its answer."""
        if not self.ready:
            raise ServeError(503, f"{self.name} is not ready: {self.reason}", retry_after=5)
        future = self._loop.create_future()
        work = Work(items, future, options=options)
        if tokenize:
            self._tokenizer_thread.submit(work)
        else:
            self.batcher.submit(work)
        # one awaited future, ended by the copies, the tokenizer, the deadline or the watcher, whichever comes
        # first
        timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), _end, future, ServeError(
            504, f"no answer within {self.settings.timeout_s:g} s (timeout_s)"))
        watch = None if disconnected is None else self._loop.call_later(WATCH_AFTER_S, _watch, future, disconnected)
        try:
            await future
            return work
        finally:    # also when this handler itself is cancelled
            timer.cancel()
            if watch is not None:
                watch.cancel()
            work.cancelled = True    # the tokenizer and the copies skip what is still queued

    def outputs(self, work: Work) -> dict[str, np.ndarray]:
        """The raw outputs as [n, ...] arrays by output name; per-token rows of different lengths are
        zero-padded to the longest (only text requests have them: token tensors share one length)."""
        out = {}
        for k, name in enumerate(self.manifest.output_names):
            rows = [r[k] for r in work.rows]
            width = max(r.shape[0] for r in rows) if rows[0].ndim else 0
            if rows[0].ndim and any(r.shape[0] != width for r in rows):
                stacked = np.zeros((len(rows), width, *rows[0].shape[1:]), dtype=np.float32)
                for i, r in enumerate(rows):
                    stacked[i, :r.shape[0]] = r
            else:
                stacked = np.stack(rows).astype(np.float32, copy=False)
            out[name] = stacked
        return out


class TokenizerThread:
    """Tokenizes off the event loop and queues the result for the copies; requests that arrive together are
    tokenized in one batched call. Only a refusal goes back to the loop (as the request's error)."""

    def __init__(self, task: str, tokenizer, batcher: Batcher, truncation: bool):
        self.task, self.tokenizer, self.batcher, self.truncation = task, tokenizer, batcher, truncation
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # a daemon all the same: a stop reports a thread that outlived graceful_timeout_s instead of hanging
        self.thread = threading.Thread(target=self._run, name="tokenizer", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._jobs.put(None)

    def submit(self, work: Work) -> None:
        """Tokenize `work.items` (parsed task items), replace them by their encoding and queue the work."""
        self._jobs.put(work)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while True:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)     # finish these, then stop
                    break
                jobs.append(more)
            works = [w for w in jobs if not w.cancelled]     # timed out or client gone while waiting here
            for work, result in zip(works, self._encode(works)):
                if not isinstance(result, Exception):
                    work.items = result
                    try:
                        self.batcher.submit(work)
                        continue
                    except ServeError as e:
                        result = e
                self._loop.call_soon_threadsafe(_end, work.future, result)

    def _encode(self, works: list[Work]) -> list:
        """Per work its encoded items, or the exception that refused them; works asking the same truncation
        are tokenized in one call."""
        out: list = [None] * len(works)
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault(self._truncation(w.options), []).append(i)
        for (truncation, direction), members in groups.items():
            def one(items):
                return tasks.encode(self.task, self.tokenizer, items, self.batcher.max_seq, truncation, direction)

            if len(members) > 1:
                try:
                    flat = one([item for i in members for item in works[i].items])
                except Exception:
                    pass    # some request's input is bad: tokenize one by one to tell whose
                else:
                    at = 0
                    for i in members:
                        out[i] = flat[at:at + len(works[i].items)]
                        at += len(works[i].items)
                    continue
            for i in members:
                try:
                    out[i] = one(works[i].items)
                except Exception as e:
                    out[i] = e
        return out

    def _truncation(self, options: dict | None) -> tuple[bool, str | None]:
        """(truncate?, from which side: None for the tokenizer's) for a request's task options."""
        if not options:
            return self.truncation, None
        truncation = options.get("truncation")
        return self.truncation if truncation is None else truncation, options.get("truncation_direction")


def _end(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def _watch(future: asyncio.Future, disconnected: Callable[[], Awaitable]) -> None:
    """Watch for the client's departure, for as long as its request still waits."""
    if future.done():
        return
    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(lambda w: w.cancelled() or _end(future, ServeError(499, "client disconnected")))
    future.add_done_callback(lambda f: watcher.cancel())
