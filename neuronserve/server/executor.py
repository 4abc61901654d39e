"""N model copies, each on its own thread, pulling batches from the shared Batcher.

A copy loads one runner per compiled file (backends.get(backend).load; buckets may share one trace), runs the
known-answer warm-up, and only then takes work. It pads a batch (tasks.pad), runs it, cuts the outputs into
per-item rows (decoding answers for requests that want them, here, off the event loop) and hands them back with
one call_soon_threadsafe per batch.

A copy stuck in one batch for longer than the request timeout is given up on: a fresh copy with the same index
is loaded to take its place, and the stuck thread exits if its batch ever returns.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from neuronserve import tasks
from neuronserve.build import backends
from neuronserve.build.artifact import SHARED_FILE, Manifest
from neuronserve.server.batcher import SEQ_MULTIPLE, Batch, Batcher, ServeError
from neuronserve.server.lending import UNLENT, Lending
from neuronserve.server.metrics import Metrics

log = logging.getLogger("neuronserve.server")

Loader = Callable[..., Callable]   # (path, *, copy_index, threads) -> runner, as Backend.load
# TorchScript's profiling executor re-optimises a graph over its first calls (the first about 2x, the second
# about 1.2x a steady call for the tiny BERT at batch 16; seconds with cold caches): a copy runs every bucket
# this many times before it takes requests
WARMUP_RUNS = 3
PROBE_RUNS = 4         # of each of the two shapes that decide the length of exact shapes, the first not counted


@dataclass(eq=False)
class Copy:
    index: int
    state: str = "loading"              # loading | ready | failed
    reason: str = ""
    busy_since: float | None = None     # monotonic time the running batch started
    retired: bool = False               # given up on while stuck: exits once its batch returns
    lock: threading.Lock = field(default_factory=threading.Lock)
    seat: object = UNLENT               # its Lending.seat(): the CPUs it may borrow for a lone batch


class Executor:
    def __init__(self, manifest: Manifest, model_dir: Path, *, load: Loader, copies: int, threads: int,
                 tokenizer, batcher: Batcher, metrics: Metrics, warmup: list, stuck_after_s: float,
                 on_change: Callable[[], None], lending: Lending | None = None):
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.load = load
        self.threads = threads
        self.tokenizer = tokenizer              # decoders that name tokens read it
        self.batcher = batcher
        self.metrics = metrics
        self.warmup = warmup                    # tasks.warmup_batches(...) for this manifest
        self.stuck_after_s = stuck_after_s
        self.on_change = on_change              # called (from copy threads) when a copy's state changes
        self.per_token = tasks.get(manifest.task).per_token
        self.lending = lending
        self.copies = [Copy(i) for i in range(copies)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for copy in self.copies:
            self._spawn(copy)
        self._thread(self._watchdog, "copy-watchdog")

    def stop(self) -> list[threading.Thread]:
        """Stop taking batches (with the batcher closed, each copy ends after its batch): the threads to join."""
        self._stop.set()
        return list(self._threads)

    def _spawn(self, copy: Copy) -> None:
        self._thread(self._serve, f"copy-{copy.index}", copy)

    def _thread(self, target, name: str, *args) -> None:
        # daemon: a copy stuck inside its runner must not hold the worker's exit (a stop reports it instead)
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _watchdog(self) -> None:
        period = min(1.0, self.stuck_after_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            for pos, copy in enumerate(self.copies):
                since = copy.busy_since
                if since is not None and now - since > self.stuck_after_s and self._release(copy, ran=False):
                    copy.retired = True
                    copy.seat.abandon()     # other groups' CPUs must not wait for a stuck batch, nor see it busy
                    log.warning("copy %d stuck in one batch for %.0f s; loading a replacement", copy.index,
                                now - since)
                    fresh = Copy(copy.index)
                    self.copies[pos] = fresh
                    self._spawn(fresh)

    def _release(self, copy: Copy, *, ran: bool) -> bool:
        """End the copy's running batch exactly once, whether the copy (`ran`) or the watchdog gets there first."""
        with copy.lock:
            since = copy.busy_since
            if since is None:
                return False
            copy.busy_since = None
        self.batcher.done(time.monotonic() - since if ran else None)
        return True

    def _set_state(self, copy: Copy, state: str, reason: str = "") -> None:
        copy.state, copy.reason = state, reason
        self.on_change()

    # ---------------------------------------------------------------- one copy's thread

    def _serve(self, copy: Copy) -> None:
        try:
            # one load per file: buckets that share a trace share its weights (and, on the CPU, so do copies)
            loaded = {file: self.load(self.model_dir / file, copy_index=copy.index, threads=self.threads)
                      for file in dict.fromkeys(b.file for b in self.manifest.buckets)}
            runners = {(b.batch, b.seq): loaded[b.file] for b in self.manifest.buckets}
            shared = loaded.get(SHARED_FILE)    # runs the batches of exact shapes (Batch.exact)
            self.metrics.weights(copy.index, backends.weight_bytes(loaded.values()))
        except Exception as e:  # a device or framework failure: the message is what the operator needs
            log.error("copy %d: cannot load the model: %s", copy.index, e)
            self._set_state(copy, "failed", f"copy {copy.index}: cannot load the model: {e}")
            return
        if self.lending:
            copy.seat = self.lending.seat()
        mismatch = self._check_warmup(runners, shared, copy.seat)
        if mismatch:
            log.error("copy %d: warm-up gave a wrong answer, not serving: %s", copy.index, mismatch)
            self._set_state(copy, "failed", f"copy {copy.index}: warm-up gave a wrong answer: {mismatch}")
            return
        self._set_state(copy, "ready")
        busy = self.metrics.busy(copy.index)
        # one set of input arrays per bucket, refilled for each batch: the runner is done with them when it
        # returns (outputs are its own tensors), and only this thread uses them
        buffers = {(b, s): [np.zeros((b, s), dtype=np.int64) for _ in self.manifest.input_names]
                   for b, s in runners}
        while not copy.retired and not self._stop.is_set():
            batch = self.batcher.next_batch()
            if batch is None:
                return
            with copy.lock:
                copy.busy_since = time.monotonic()
            try:
                self._run(runners.get((batch.batch, batch.seq)) or shared, buffers, batch, busy, copy.seat)
            finally:
                self._release(copy, ran=True)

    def _check_warmup(self, runners: dict, shared, seat) -> str | None:
        """Run the known-answer items (their bucket checked), then every bucket until it ran WARMUP_RUNS times,
        so that no request pays for TorchScript optimising a graph on its first calls; with exact shapes, also
        the two shapes that decide their lengths (Batcher.length_probe)."""
        try:
            outputs, items = [], []
            runs = dict.fromkeys(runners, 0)
            for arrays, chunk in self.warmup:
                b, s = arrays[0].shape
                with seat.run((b, s), lone=False):
                    outputs.append((self._call(runners[(b, s)], arrays), chunk))
                runs[(b, s)] += 1
                items.extend(chunk)
            got = tasks.warmup_outputs(outputs, self.manifest.output_names)
            mismatch = tasks.warmup_mismatch(self.manifest, got, items)
            if mismatch:
                return mismatch
            for (b, s), runner in runners.items():
                arrays = tasks.pad(items[:b], b, s, self.manifest.input_names)
                ran = runs[(b, s)]
                for run in range(max(WARMUP_RUNS - ran, 1)):
                    seconds = self._warm((b, s), runner, arrays, seat)
                    if run or ran:      # the batch planner's first estimates: not a shape's first run
                        self.batcher.observe((b, s), seconds)
            if self.batcher.exact_shapes and shared is not None:
                self._probe_lengths(runners, shared, items, seat)
            return None
        except Exception as e:
            return f"the warm-up run failed: {e}"

    def _probe_lengths(self, runners: dict, shared, items: list, seat) -> None:
        """Run Batcher.length_probe's two shapes in turn (a change of load weighs on both), each PROBE_RUNS times,
        the first not counted, on the largest bucket's inputs cut down to them (what they hold does not change the
        time); the batcher then knows whether exact shapes round their length up."""
        b, s = max(runners, key=lambda bs: (bs[0] * bs[1], bs))
        largest = tasks.pad(items[:b], b, s, self.manifest.input_names)
        probe = [((b, s), [a[:b, :s].copy() for a in largest]) for b, s in self.batcher.length_probe]
        for run in range(PROBE_RUNS):
            for shape, arrays in probe:
                seconds = self._warm(shape, shared, arrays, seat)
                if run:
                    self.batcher.observe(shape, seconds)
        (own, own_s), (rounded, rounded_s) = ((shape, self.batcher.timings.mean[shape]) for shape, _ in probe)
        log.info("%s in %.1f ms, %s in %.1f ms: batches run at their longest item's %s", own, 1000 * own_s,
                 rounded, 1000 * rounded_s, "own length" if self.batcher.own_lengths()
                 else f"length rounded up to a multiple of {SEQ_MULTIPLE}")

    def _warm(self, shape: tuple[int, int], runner, arrays: list[np.ndarray], seat) -> float:
        """One warm-up run's seconds, through the seat: lending compares a lent batch with these own-CPU times."""
        with seat.run(shape, lone=False):
            started = time.perf_counter()
            self._call(runner, arrays)
            return time.perf_counter() - started

    @staticmethod
    def _call(runner, arrays: list[np.ndarray]) -> list[np.ndarray]:
        out = runner(*[torch.from_numpy(a) for a in arrays])
        return [o.numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in out]

    def _run(self, runner, buffers: dict, batch: Batch, busy, seat) -> None:
        entries = batch.entries
        items = [w.items[i] for w, i in entries]
        now = time.monotonic()
        waits = [now - w.t0 for w, _ in entries]
        bucket = (batch.batch, batch.seq)
        try:
            arrays = tasks.pad(items, batch.batch, batch.seq, self.manifest.input_names, out=buffers.get(bucket))
            with seat.run(bucket, lone=self.batcher.depth == 0):
                # the run alone: a wait for this group's CPU, lent out, is no cost of the shape
                started = time.perf_counter()
                try:
                    outputs = self._call(runner, arrays)
                finally:
                    seconds = time.perf_counter() - started
                    busy.inc(seconds)
        except Exception as e:
            log.exception("batch of %d in shape (%d, %d) failed", len(items), batch.batch, batch.seq)
            self._loop.call_soon_threadsafe(_fail, entries, ServeError(500, f"inference failed: {e}"))
            return
        self.batcher.observe(bucket, seconds)
        self.metrics.batch(len(items), bucket, sum(item.length for item in items), waits, exact=batch.exact)
        live = [row for row, (work, _) in enumerate(entries) if not work.cancelled]
        wanted = [row for row in live if entries[row][0].options is not None]
        answers = dict.fromkeys(live)
        if wanted:
            try:
                chosen = outputs if len(wanted) == len(items) else [o[wanted] for o in outputs]
                answers.update(zip(wanted, tasks.decode(
                    self.manifest.task, self.manifest, chosen, [items[row] for row in wanted],
                    [entries[row][0].options for row in wanted], self.tokenizer)))
            except Exception as e:  # a decode bug must fail these requests, not the copy
                log.exception("decoding answers failed")
                answers.update(dict.fromkeys(wanted, ServeError(500, f"decoding the answer failed: {e}")))
        results = []
        for row in live:
            work, i = entries[row]
            length = items[row].length
            rows = tuple(o[row, :length] if self.per_token else o[row] for o in outputs)
            results.append((work, i, rows, answers[row]))
        if results:
            self._loop.call_soon_threadsafe(_deliver, results)


# ---------------------------------------------------------------- on the event loop

def _deliver(results: list) -> None:
    for work, i, rows, answer in results:
        if work.future.done():
            continue
        if isinstance(answer, ServeError):
            work.future.set_exception(answer)
            continue
        work.rows[i] = rows
        if work.answers is not None:
            work.answers[i] = answer
        work.pending -= 1
        if work.pending == 0:
            # not the work itself: future -> work -> future would leave every request to the garbage collector
            work.future.set_result(None)


def _fail(entries: list, error: ServeError) -> None:
    for work, _ in entries:
        if not work.future.done():
            work.future.set_exception(error)
