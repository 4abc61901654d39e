"""Idle CPUs lent between the CPU core groups of one host, so that a lone request runs on every idle core.

A CPU group owns its CPUs (the unit's CPUAffinity=) and runs its batches there. When a group runs a batch with
nothing else to do and another group sits idle, the batch may also use that group's CPUs: the copy's thread
widens its own affinity to them and raises its intra-op threads for that one call, then drops back (both are
per-thread in torch's OpenMP backend). A lone BERT-base request on a 2-CPU host: 655 ms on one CPU, 413 ms
on two.

The groups are separate processes and coordinate through files in a shared directory (/run/neuronserve/cpus
under systemd), two per CPU:

- `cpuN.owner`: the owning group holds a shared flock on it for its whole life, so a borrower can tell a CPU
  whose group runs from one whose group is gone (it finds the other groups' CPUs by listing the directory:
  a group's environment never names the others, and adding or removing a group restarts no other group);
- `cpuN`: while any of its batches runs, the owner holds a shared flock on it; a borrower takes an exclusive,
  non-blocking flock: it gets it only while the owner runs nothing, and the owner's next batch waits for the
  borrowed batch to end (at most `patience`, then it runs anyway: a hung borrower must not stop another group);
  the owner also publishes how busy it is there (mean batch time, mean idle gap, end of its last batch, start
  of the busy spell it is in, through mmap). A group that has work, running or waiting for its CPU to come back,
  is not borrowed from; nor is one between two requests of a steady stream, which looks idle for a moment but
  wants its CPUs right back: only a group busy less than BUSY_BELOW of the time lends.

flocks die with their process, so a crashed group never leaves a CPU taken. Whether lending pays depends on the
model and the bucket. Re-sizing torch's thread pools and clearing its oneDNN cache (torch.set_num_threads does
both) costs milliseconds of CPU around a lent batch, outside the batch itself: a tiny BERT's 5 ms batches served
half as many requests per second at concurrency 1 with lending. So only buckets whose fastest own batch takes
at least `min_batch_s` are lent, and per bucket lending stops once two lent batches were not clearly faster
than the fastest own one.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import struct
import threading
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from neuronserve.server.clock import REAL, Clock

log = logging.getLogger("neuronserve.server")

# owner's mean busy spell and idle gap (seconds), monotonic end of its last busy spell, start of the one it is in
# (0 while idle), behind a sequence number the owner makes odd while it writes: other groups read the four
# values from another process at any moment, and a read that saw a write in progress (odd, or changed) is retried
SEQ_SIZE, SLOT = 8, struct.Struct("dddd")
SLOT_SIZE = SEQ_SIZE + SLOT.size
READ_TRIES = 10_000             # a write takes about a microsecond: a read retried this often gets a whole one
STUCK_READS = 1_000             # the same odd number this many reads in a row: an owner killed mid-write
# borrow from a group only if it has been busy less than this share of the time: one that serves a steady
# stream (busy ~100 %, idle for a client's round trip between batches) keeps its CPUs
BUSY_BELOW = 0.75
# a lent batch must take less than this share of the fastest own batch of its bucket for lending to go on
FASTER = 0.9
LENT_WINDOW = 8                 # lent batch times kept per bucket: the recent ones decide, not the first
REVISIT = 64                    # lone batches a bucket runs on its own CPUs before it tries lending again
SMOOTHING = 0.5                 # weight of the past in the owner's running means: a change of load shows at once
CPU_FILE = re.compile(r"cpu(\d+)")


def cpu_file(directory: Path, cpu: int) -> Path:
    return Path(directory) / f"cpu{cpu}"


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class _CpuFile:
    """One CPU's files, opened by one holder (flocks belong to the open file, so each copy has its own)."""

    def __init__(self, directory: Path, cpu: int):
        self.cpu = cpu
        path = cpu_file(directory, cpu)
        self.fd = _open(path)
        self.owner_fd = _open(path.with_name(path.name + ".owner"))
        if os.fstat(self.fd).st_size < SLOT_SIZE:
            os.ftruncate(self.fd, SLOT_SIZE)
        self.slot = mmap.mmap(self.fd, SLOT_SIZE)
        self.seq = sequence(self.slot)

    def try_lock(self, how: int) -> bool:
        return _try_lock(self.fd, how)

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def owner_alive(self) -> bool:
        if _try_lock(self.owner_fd, fcntl.LOCK_EX):
            fcntl.flock(self.owner_fd, fcntl.LOCK_UN)
            return False
        return True

    def owner_busy_share(self, now: float) -> float:
        busy, gap, last_end, since = read_slot(self.slot)
        if since:
            return 1.0
        # the current idle spell counts once it is longer than the usual gap
        idle = max(gap, now - last_end)
        return busy / (busy + idle) if busy + idle > 0 else 0.0

    def lendable(self, now: float) -> bool:
        """Take the CPU for one batch if its group runs nothing, is alive and has been mostly idle."""
        if self.owner_busy_share(now) >= BUSY_BELOW or not self.try_lock(fcntl.LOCK_EX):
            return False
        if self.owner_alive():
            return True
        self.unlock()       # nobody owns it (its group is gone): not ours to use
        return False

    def publish(self, busy: float, gap: float, last_end: float, since: float = 0.0) -> None:
        """Only the CPU's own group writes its slot."""
        seq = self.seq[0]
        seq += seq % 2                  # even again after an owner that died mid-write
        self.seq[0] = seq + 1
        SLOT.pack_into(self.slot, SEQ_SIZE, busy, gap, last_end, since)
        self.seq[0] = seq + 2


def sequence(buffer) -> memoryview:
    """A slot's sequence number as one aligned 8-byte word, read and written in one access (struct.pack_into
    zeroes its field before it writes, and a reader in between would take the zero for a finished write)."""
    return memoryview(buffer)[:SEQ_SIZE].cast("Q")


def read_slot(buffer) -> tuple[float, float, float, float]:
    """(busy, gap, last_end, since) of a slot (an mmap, or bytes read from its file), never half of one write."""
    seq = sequence(buffer)
    stuck, last = 0, None
    for _ in range(READ_TRIES):
        before = seq[0]
        values = SLOT.unpack_from(buffer, SEQ_SIZE)
        after = seq[0]
        if before == after:
            if before % 2 == 0:
                return values
            stuck = stuck + 1 if before == last else 0
            if stuck >= STUCK_READS:
                return values       # its last values as they are: the group is gone, its CPU soon unowned
            last = before
    return values


def for_group(settings, on_lent: Callable[[], None]) -> "Lending | None":
    """The group's Lending from its ServerSettings; None when it does not lend (not a CPU group)."""
    from neuronserve.config import parse_core_list

    if not (settings.lend_dir and settings.cpus):
        return None
    # an owner waits this long for a borrowed CPU before running anyway: well inside the request timeout
    return Lending(Path(settings.lend_dir), parse_core_list(settings.cpus), threads=settings.threads,
                   patience_s=settings.timeout_s / 4, min_batch_s=settings.lend_min_batch_ms / 1000,
                   on_lent=on_lent)


class Lending:
    """One group's side: its own CPUs, its published load, and what lending measured per bucket."""

    def __init__(self, directory: Path, own: list[int], *, threads: int, patience_s: float, min_batch_s: float,
                 set_threads: Callable[[int], None] | None = None, on_lent: Callable[[], None] = lambda: None,
                 clock: Clock = REAL):
        self.directory = Path(directory)
        self.own = sorted(own)
        self.threads = threads
        self.patience_s = patience_s
        self.min_batch_s = min_batch_s
        self.on_lent = on_lent
        # every time and wait here and in the seats: tests play the load and the patience on simulated time. A
        # group compares the times others publish with its own, so the groups of a host all run on the real clock
        # (CLOCK_MONOTONIC: one for the whole host)
        self.clock = clock
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.set_threads = set_threads
        self.directory.mkdir(parents=True, exist_ok=True)
        self._publisher = [_CpuFile(self.directory, c) for c in self.own]
        for f in self._publisher:
            fcntl.flock(f.owner_fd, fcntl.LOCK_SH)      # for this process's life: these CPUs have a group
            f.publish(0.0, 0.0, 0.0)                    # not what a predecessor left: it may have died busy
        self._lock = threading.Lock()
        self._running = 0
        self._since = 0.0                       # when the group last went from idle to busy
        self._busy_mean = self._gap_mean = 0.0
        self._last_end = 0.0
        self._own_best: dict[tuple[int, int], float] = {}
        self._lent: dict[tuple[int, int], deque[float]] = {}
        self._refused: dict[tuple[int, int], int] = {}     # lone batches not lent since lending stopped

    def seat(self) -> "Seat":
        """The per-copy handle."""
        return Seat(self)

    def others(self) -> list[int]:
        """The CPUs other groups in the directory own (alive or not: `lendable` checks)."""
        found = (CPU_FILE.fullmatch(name) for name in os.listdir(self.directory))
        return sorted({int(m.group(1)) for m in found if m} - set(self.own))

    def lends(self, bucket: tuple[int, int]) -> bool:
        """Whether a lone batch of `bucket` borrows: it must be long enough to be worth it, and its recent lent
        batches faster than its best on its own CPUs. Where they were not, every REVISIT-th lone batch tries
        again, as the other groups' load (and so what a borrowed CPU gives) changes."""
        best = self._own_best.get(bucket)     # known from the warm-up on: every bucket runs there, own CPUs only
        if best is None or best < self.min_batch_s:
            return False
        lent = self._lent.get(bucket, ())
        if len(lent) < 2 or min(lent) < FASTER * best:
            self._refused.pop(bucket, None)
            return True
        refused = self._refused[bucket] = self._refused.get(bucket, 0) + 1
        if refused < REVISIT:
            return False
        self._refused[bucket] = 0
        return True

    def record(self, bucket: tuple[int, int], seconds: float, *, lent: bool) -> None:
        """One batch's time, for `lends`."""
        if lent:
            self._lent.setdefault(bucket, deque(maxlen=LENT_WINDOW)).append(seconds)
        elif seconds < self._own_best.get(bucket, float("inf")):
            self._own_best[bucket] = seconds

    # the group's load, published for borrowers: called around every batch of every copy
    def _started(self, now: float) -> int:
        with self._lock:
            self._running += 1
            if self._running == 1:
                if self._last_end:
                    self._gap_mean = SMOOTHING * self._gap_mean + (1 - SMOOTHING) * (now - self._last_end)
                self._since = now
                for f in self._publisher:
                    f.publish(self._busy_mean, self._gap_mean, self._last_end, now)
            return self._running

    def _ended(self, now: float, bucket: tuple[int, int], seconds: float | None, lent: bool) -> None:
        """A batch ended (`seconds` None: given up on, its time unknown)."""
        with self._lock:
            self._running -= 1
            if seconds is not None:
                self.record(bucket, seconds, lent=lent)
            if self._running == 0:
                self._busy_mean = SMOOTHING * self._busy_mean + (1 - SMOOTHING) * (now - self._since)
                self._last_end = now
                for f in self._publisher:
                    f.publish(self._busy_mean, self._gap_mean, now)


class Seat:
    def __init__(self, lending: Lending):
        self.lending = lending
        self.own = [_CpuFile(lending.directory, c) for c in lending.own]
        self._others: dict[int, _CpuFile] = {}      # opened on first sight, kept open
        self.borrowed: list[_CpuFile] = []
        self._bucket: tuple[int, int] | None = None  # the batch running, until its end is counted (once)
        self._end_lock = threading.Lock()

    @contextmanager
    def run(self, bucket: tuple[int, int], *, lone: bool) -> Iterator[None]:
        """Around one batch of `bucket`. `lone`: the group has nothing else queued."""
        lending = self.lending
        # the group is busy from here, waiting for a CPU of its own that is lent out included: counted as idle,
        # that wait made a loaded group look lendable, and two groups under load took turns borrowing each
        # other's CPU, each waiting out the other's lent batch
        clock = lending.clock
        running = lending._started(clock.monotonic())
        self._bucket = bucket
        held = [f for f in self.own if self._wait_shared(f)]
        started = clock.monotonic()
        if lone and running == 1 and lending.lends(bucket):
            self.borrowed = [f for f in map(self._other, lending.others()) if f.lendable(started)]
        borrowed = self.borrowed
        try:
            if borrowed:
                os.sched_setaffinity(0, lending.own + [f.cpu for f in borrowed])
                lending.set_threads(lending.threads + len(borrowed))
                lending.on_lent()
            yield
        finally:
            ended = clock.monotonic()
            if borrowed:
                lending.set_threads(lending.threads)
                os.sched_setaffinity(0, lending.own)
            self.release_borrowed()
            self._end(ended, ended - started, bool(borrowed))
            for f in held:
                f.unlock()

    def abandon(self) -> None:
        """The watchdog gave up on this copy's batch: give the borrowed CPUs back, and end the batch for the
        group's load (a retired copy's batch counted as running kept the group busy for good, so that it never
        lent or borrowed again); should the batch ever return, its end is not counted twice."""
        self.release_borrowed()
        self._end(self.lending.clock.monotonic(), None, False)

    def release_borrowed(self) -> None:
        borrowed, self.borrowed = self.borrowed, []
        for f in borrowed:
            f.unlock()

    def _end(self, now: float, seconds: float | None, lent: bool) -> None:
        with self._end_lock:
            bucket, self._bucket = self._bucket, None
        if bucket is not None:
            self.lending._ended(now, bucket, seconds, lent)

    def _other(self, cpu: int) -> _CpuFile:
        f = self._others.get(cpu)
        if f is None:
            f = self._others[cpu] = _CpuFile(self.lending.directory, cpu)
        return f

    def _wait_shared(self, f: _CpuFile) -> bool:
        if f.try_lock(fcntl.LOCK_SH):
            return True
        # lent out: the borrowed batch ends soon. Polled, not blocking, so that a borrower that hangs costs at
        # most `patience` (flock has no timeout)
        clock = self.lending.clock
        deadline = clock.monotonic() + self.lending.patience_s
        pause = 0.0002
        while clock.monotonic() < deadline:
            clock.sleep(pause)
            pause = min(2 * pause, 0.005)
            if f.try_lock(fcntl.LOCK_SH):
                return True
        log.warning("CPU %d still lent to another group after %.1f s; running on it anyway", f.cpu,
                    self.lending.patience_s)
        return False


class _Unlent:
    def run(self, bucket, *, lone: bool):
        return nullcontext()

    def abandon(self) -> None:
        pass


UNLENT = _Unlent()      # the seat of every copy of a group that neither lends nor borrows
