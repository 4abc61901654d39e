"""The in-process ceiling: the traced model called directly, no HTTP, no tokenizer, no batcher.

Throughput: one process per core group, pinned to the group's CPUs with torch intra-op threads = its CPU
count (what a neuronserve group gets), all started together and each calling the same artifact the server
loads, back to back, for a fixed time. Their items/s add up to what the host can do at that batch size; the
best batch size is the ceiling a server can approach.

Latency: one lone process calling batch 1, on one core group and on all the CPUs at once (which a lone
request could use when nothing else runs). The all-CPU one is kept loaded too, and measured again beside the
served concurrency-1 levels.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Throughput:
    batch: int
    items_per_s: float              # all groups together
    per_call_s: float               # mean wall time of one batch call, averaged over the groups
    per_call_cpu_s: float           # mean CPU time of one batch call (what it costs whatever else runs)


@dataclass
class Latency:
    cpus: list[int]
    threads: int
    median_s: float
    p99_s: float
    calls: int


def sample_arrays(model_dir: Path, payload: dict, batch: int, seq: int):
    """Every row the tokenized `payload` (a request's `inputs`), padded to [batch, seq] like the server does."""
    from neuronserve import tasks
    from neuronserve.build.artifact import read_manifest
    from neuronserve.tasks import load_tokenizer

    manifest = read_manifest(model_dir, verify=False)
    tokenizer = load_tokenizer(model_dir / manifest.tokenizer)
    request = tasks.parse(manifest.task, payload, None, manifest)
    items = tasks.encode(manifest.task, tokenizer, request.items, seq, True)
    return tasks.pad(items * batch, batch, seq, manifest.input_names)


def _load(model_dir: Path, payload: dict, batch: int, cpus: list[int], seq: int | None = None):
    """The runner and inputs of shape [batch, seq] (default: the longest bucket): a compiled bucket's trace, or
    any shape of the shared one."""
    import torch

    from neuronserve.build import backends
    from neuronserve.build.artifact import SHARED_FILE, read_manifest

    os.sched_setaffinity(0, cpus)
    manifest = read_manifest(model_dir, verify=False)
    seq = seq or max(manifest.sequence_lengths)
    try:
        file = manifest.bucket(batch, seq).file
    except KeyError:
        file = SHARED_FILE
    run = backends.get("cpu").load(model_dir / file, copy_index=0, threads=len(cpus))
    inputs = [torch.from_numpy(a) for a in sample_arrays(model_dir, payload, batch, seq)]
    for _ in range(2):          # the first calls of a TorchScript module optimise it
        run(*inputs)
    return run, inputs


def _timed_calls(run, inputs, min_s: float, min_calls: int) -> tuple[list[float], float]:
    """Wall seconds of each call, and the process' CPU seconds over all of them."""
    times = []
    cpu0 = time.process_time()
    end = time.perf_counter() + min_s
    while time.perf_counter() < end or len(times) < min_calls:
        t0 = time.perf_counter()
        run(*inputs)
        times.append(time.perf_counter() - t0)
    return times, time.process_time() - cpu0


def _reference_worker(model_dir, payload, batch, cpus, conn, seq=None):
    """Load once, then for every `seconds` received run back to back for that long and send the figures back
    (elapsed seconds, each call's seconds, CPU seconds); None ends it."""
    run, inputs = _load(Path(model_dir), payload, batch, cpus, seq)
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        t0 = time.perf_counter()
        times, cpu_s = _timed_calls(run, inputs, seconds, 3)
        conn.send((time.perf_counter() - t0, times, cpu_s))


class Reference:
    """The ceiling at one batch size, kept loaded in one pinned process per core group (intra-op threads: its
    CPUs), so that it can be measured again at any time: beside every served level, since this host's speed
    drifts by 10 % and more over minutes, and a ratio holds only between figures taken side by side.

        with Reference(model_dir, payload, batch, groups) as ref:
            ref.measure(seconds) -> Throughput
            ref.call_times(seconds) -> each call's seconds (one group: a lone caller's latencies)
    """

    def __init__(self, model_dir: Path, payload: dict, batch: int, groups: list[list[int]], seq: int | None = None):
        ctx = mp.get_context("spawn")      # a fresh interpreter per group: no torch thread pool inherited
        self.batch = batch
        self._conns, self._procs = [], []
        try:
            for g in groups:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_reference_worker, args=(str(model_dir), payload, batch, g, child, seq),
                                daemon=True)
                p.start()
                self._conns.append(parent)
                self._procs.append(p)
        except BaseException:   # the groups started so far must not outlive a failed start
            self.close()
            raise

    def __enter__(self) -> "Reference":
        try:
            for c in self._conns:
                self._recv(c)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def measure(self, seconds: float) -> Throughput:
        """Every group at once (all loaded and waiting, so they start within a millisecond), for `seconds`."""
        got = self._run(seconds)
        return Throughput(batch=self.batch,
                          items_per_s=sum(len(times) * self.batch / elapsed for elapsed, times, _ in got),
                          per_call_s=statistics.fmean(statistics.fmean(times) for _, times, _ in got),
                          per_call_cpu_s=statistics.fmean(cpu_s / len(times) for _, times, cpu_s in got))

    def call_times(self, seconds: float) -> list[float]:
        if len(self._conns) != 1:
            raise ValueError("a lone caller's latency needs a Reference of one group")
        return self._run(seconds)[0][1]

    def _run(self, seconds: float) -> list:
        for c in self._conns:
            c.send(seconds)
        return [self._recv(c) for c in self._conns]

    @staticmethod
    def _recv(conn, timeout: float = 600.0):
        if not conn.poll(timeout):
            raise RuntimeError("a ceiling process did not answer")
        return conn.recv()

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def throughput(model_dir: Path, payload: dict, batch: int, groups: list[list[int]], seconds: float,
               seq: int | None = None) -> Throughput:
    """All groups at once, each calling batch `batch` (of sequence `seq`) back to back for `seconds`."""
    with Reference(model_dir, payload, batch, groups, seq) as ref:
        return ref.measure(seconds)


def latency(model_dir: Path, payload: dict, cpus: list[int], seconds: float) -> Latency:
    """A lone batch-1 caller on `cpus`, as many intra-op threads."""
    with Reference(model_dir, payload, 1, [cpus]) as ref:
        return latency_of(ref.call_times(seconds), cpus)


def latency_of(times: list[float], cpus: list[int]) -> Latency:
    from neuronserve.measure.stats import percentile

    times = sorted(times)
    return Latency(cpus=list(cpus), threads=len(cpus), median_s=statistics.median(times),
                   p99_s=percentile(times, 99), calls=len(times))
