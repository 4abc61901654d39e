"""Lending idle CPUs between CPU groups (server/lending.py): real lock files and real affinity, two groups played
by two Lending objects in this process (flocks belong to open files, so they exclude each other here exactly as
between two workers), a crashed borrower played by a real child process. Time is simulated (tests/simclock.py):
the groups' load and an owner's patience are exact windows; a thread that waits for its CPU polls on the
simulated clock, and the test advances it."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading

import pytest

from neuronserve.server.lending import LENT_WINDOW, REVISIT, SLOT_SIZE, SMOOTHING, Lending, cpu_file, read_slot
from simclock import SimulatedClock

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="lending needs two CPUs")
A_CPU, B_CPU = CPUS[:2]
BUCKET = (1, 128)
POLL = 1 / 64       # a step of simulated time longer than an owner's pause between two looks at its lent CPU


class Threads:
    """The set_threads double: records what torch.set_num_threads would have been called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, n: int) -> None:
        self.calls.append(n)


@pytest.fixture
def groups(tmp_path):
    """Group a owns A_CPU, group b owns B_CPU; each may borrow the other's. Runs on A_CPU like a pinned worker."""
    made = {}
    clock = SimulatedClock()        # one for both groups, as the real one is for the groups of a host
    for name, own in (("a", A_CPU), ("b", B_CPU)):
        lent = []
        # min_batch_s 0: the batches here are instant
        lending = Lending(tmp_path, [own], threads=1, patience_s=5.0, min_batch_s=0.0, set_threads=Threads(),
                          on_lent=lambda lent=lent: lent.append(1), clock=clock)
        lending.record(BUCKET, 0.1, lent=False)             # as the warm-up does
        lending.lent_count = lent
        made[name] = lending
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {A_CPU})
    try:
        yield made["a"], made["b"]
    finally:
        os.sched_setaffinity(0, before)


def test_a_lone_batch_runs_on_the_idle_groups_cpu_too(groups):
    a, b = groups
    seat = a.seat()
    with seat.run(BUCKET, lone=True):
        assert os.sched_getaffinity(0) == {A_CPU, B_CPU}
        assert a.set_threads.calls == [2]
        # b's next batch would wait: its CPU is taken exclusively
        with open(cpu_file(a.directory, B_CPU), "rb") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    assert os.sched_getaffinity(0) == {A_CPU}
    assert a.set_threads.calls == [2, 1] and a.lent_count == [1]
    with open(cpu_file(a.directory, B_CPU), "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)      # given back


def test_no_borrowing_when_not_lone_or_the_owner_runs(groups):
    a, b = groups
    with a.seat().run(BUCKET, lone=False):
        assert os.sched_getaffinity(0) == {A_CPU}
    with b.seat().run(BUCKET, lone=False):          # b runs a batch: its CPU is not free
        with a.seat().run(BUCKET, lone=True):
            assert os.sched_getaffinity(0) == {A_CPU}
    # two batches of the same group at once: the second one is not lone
    first, second = a.seat(), a.seat()
    with first.run(BUCKET, lone=True):
        pass
    calls = len(a.set_threads.calls)
    with first.run(BUCKET, lone=False):
        with second.run(BUCKET, lone=True):
            assert os.sched_getaffinity(0) == {A_CPU}
    assert len(a.set_threads.calls) == calls


def test_a_group_serving_a_steady_stream_keeps_its_cpu(groups):
    a, b = groups
    now = a.clock.monotonic()
    # b: 100 ms batches with 1 ms gaps, its last one just ended: busy ~99 % of the time
    b._publisher[0].publish(0.1, 0.001, now)
    with a.seat().run(BUCKET, lone=True):
        assert os.sched_getaffinity(0) == {A_CPU}
    # the same group after a second of idling has been busy 10 % of the time: lent
    b._publisher[0].publish(0.1, 0.001, now - 1.0)
    with a.seat().run(BUCKET, lone=True):
        assert os.sched_getaffinity(0) == {A_CPU, B_CPU}


def test_the_owner_publishes_its_load(groups, tmp_path):
    a, b = groups
    clock = b.clock
    seat = b.seat()
    batch, gap = 1 / 32, 1 / 64
    for _ in range(3):
        with seat.run(BUCKET, lone=False):
            clock.advance(batch)
        clock.advance(gap)
    with open(cpu_file(tmp_path, B_CPU), "rb") as f:
        busy, gap_mean, last_end, since = read_slot(f.read(SLOT_SIZE))
    # running means from 0: three batches, two gaps (the first batch follows none)
    assert busy == pytest.approx(batch * (1 - SMOOTHING ** 3)) and gap_mean == pytest.approx(gap * (1 - SMOOTHING ** 2))
    assert last_end == clock.monotonic() - gap and since == 0
    # while it has work, running or waiting, it says so, and is not borrowed from whatever its history
    with seat.run(BUCKET, lone=False):
        with open(cpu_file(tmp_path, B_CPU), "rb") as f:
            assert read_slot(f.read(SLOT_SIZE))[3] == last_end + gap
        assert b._publisher[0].owner_busy_share(clock.monotonic()) == 1.0


def owner(lending: Lending) -> tuple[threading.Thread, list[float]]:
    """A batch of `lending`'s group on a thread of its own, so that the test can advance the clock while it waits
    for its CPU: [the simulated time it started running]."""
    entered = []

    def run():
        with lending.seat().run(BUCKET, lone=False):
            entered.append(lending.clock.monotonic())

    thread = threading.Thread(target=run, daemon=True)     # one left waiting by a failed test holds nothing up
    thread.start()
    return thread, entered


def test_the_owner_waits_for_a_lent_batch_then_runs(groups):
    a, b = groups
    clock = a.clock
    lent = threading.Event()
    release = threading.Event()

    def borrower():
        with a.seat().run(BUCKET, lone=True):
            lent.set()
            release.wait(10)

    t = threading.Thread(target=borrower, daemon=True)
    t.start()
    assert lent.wait(10)
    started = clock.monotonic()
    thread, entered = owner(b)
    for _ in range(16):                     # a quarter of a second lent out
        clock.blocked()                     # the owner pauses between two looks at its CPU
        assert entered == []                # still lent
        assert b._publisher[0].owner_busy_share(clock.monotonic()) == 1.0    # and b, waiting, shows it has work
        clock.advance(POLL)
    clock.blocked()
    released_at = clock.monotonic()
    release.set()
    t.join(10)
    assert not t.is_alive()
    clock.advance(POLL)
    thread.join(10)
    assert entered == [released_at + POLL]  # at its first look once the lent batch ended
    # the wait counts as b's busy time: b was loaded, not idle, so a's next lone batch leaves b's CPU alone
    # (counted as idle, it made two loaded groups take turns borrowing each other's CPU)
    with open(cpu_file(b.directory, B_CPU), "rb") as f:
        busy, gap, last_end, since = read_slot(f.read(SLOT_SIZE))
    assert busy == (1 - SMOOTHING) * (last_end - started) and last_end == released_at + POLL
    with a.seat().run(BUCKET, lone=True):
        assert os.sched_getaffinity(0) == {A_CPU}


def test_a_cpu_whose_group_is_gone_is_not_borrowed(tmp_path):
    """The files of a group that stopped stay behind; its CPU may now serve something else."""
    a = Lending(tmp_path, [A_CPU], threads=1, patience_s=5.0, min_batch_s=0.0, set_threads=Threads())
    a.record(BUCKET, 0.1, lent=False)
    subprocess.run([sys.executable, "-c", (
        "from neuronserve.server.lending import Lending\n"
        f"Lending({str(tmp_path)!r}, [{B_CPU}], threads=1, patience_s=1, min_batch_s=0, set_threads=print)\n")],
        check=True)
    assert a.others() == [B_CPU]
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {A_CPU})
    try:
        with a.seat().run(BUCKET, lone=True):
            assert os.sched_getaffinity(0) == {A_CPU}
    finally:
        os.sched_setaffinity(0, before)


def test_a_hung_borrower_costs_the_owner_at_most_its_patience(tmp_path):
    """A child process takes B's CPU and hangs; b's batch runs anyway after `patience`; once the child dies its
    lock is gone with it."""
    child = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(cpu_file(tmp_path, B_CPU))!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    clock = SimulatedClock()
    try:
        assert child.stdout.readline().strip() == "locked"
        b = Lending(tmp_path, [B_CPU], threads=1, patience_s=0.25, min_batch_s=0.0, set_threads=Threads(),
                    clock=clock)
        start = clock.monotonic()
        thread, entered = owner(b)
        while clock.monotonic() < start + 0.25:
            clock.blocked()             # the owner pauses between two looks at its CPU
            assert entered == []
            clock.advance(POLL)
        thread.join(10)
        assert entered == [start + 0.25]
    finally:
        child.kill()
        child.wait()
    # at once, on this thread: a wait here would never end (nothing advances the clock) and fail on its guard
    with b.seat().run(BUCKET, lone=False):
        pass


def test_the_watchdog_gives_back_a_stuck_copys_borrowed_cpus_and_ends_its_batch(groups):
    a, b = groups
    seat = a.seat()
    with seat.run(BUCKET, lone=True):
        assert seat.borrowed and a._running == 1
        seat.abandon()                      # what the watchdog does for a copy stuck in this batch
        assert a._running == 0              # the group no longer looks busy to the others
        with b.seat().run(BUCKET, lone=False):
            pass                            # b no longer waits
    # the stuck batch returned after all: its end is not counted again, and its time is not a lent batch's
    assert a._running == 0 and not a._lent.get(BUCKET)
    with a.seat().run(BUCKET, lone=True):
        assert os.sched_getaffinity(0) == {A_CPU, B_CPU}     # lends and borrows again


def test_lending_stops_for_a_bucket_where_it_is_not_faster(groups):
    a, b = groups
    a.record(BUCKET, 0.050, lent=False)                 # the fastest own batch, from the warm-up
    a.record(BUCKET, 0.060, lent=True)
    assert a.lends(BUCKET)                              # one slow lent batch may be a cold thread pool
    a.record(BUCKET, 0.048, lent=True)
    assert not a.lends(BUCKET)                          # 0.96 of own: not worth the other group's CPU
    with a.seat().run(BUCKET, lone=True):
        assert os.sched_getaffinity(0) == {A_CPU}
    assert not a.lends((4, 128))                        # not known from the warm-up: never lent
    a.record((4, 128), 0.200, lent=False)               # other buckets decide for themselves
    a.record((4, 128), 0.130, lent=True)
    a.record((4, 128), 0.120, lent=True)
    assert a.lends((4, 128))
    a.min_batch_s = 0.05
    a.record((8, 32), 0.010, lent=False)                # too short: the thread pools' re-sizing costs more
    assert not a.lends((8, 32))
    assert a.lends((4, 128))


def test_lending_decides_on_recent_lent_batches_and_tries_again(groups):
    """The history of lent batches is a window, and a bucket that stopped lending tries again now and then: the
    first fast lent batch does not decide for the worker's life, nor the first slow ones."""
    a, _ = groups
    a.record(BUCKET, 0.050, lent=False)
    a.record(BUCKET, 0.030, lent=True)                  # one fast lent batch, long ago ...
    for _ in range(LENT_WINDOW):
        a.record(BUCKET, 0.049, lent=True)              # ... then the other group got busy: no longer faster
    assert len(a._lent[BUCKET]) == LENT_WINDOW and not a.lends(BUCKET)
    refusals = [a.lends(BUCKET) for _ in range(2 * REVISIT)]
    # every REVISIT-th lone batch tries lending again (counting the refusal above)
    assert [i for i, lends in enumerate(refusals) if lends] == [REVISIT - 2, 2 * REVISIT - 2]
    for _ in range(LENT_WINDOW):
        a.record(BUCKET, 0.030, lent=True)              # the other group is idle again: lending pays
    assert a.lends(BUCKET)


def _publish_many(directory, count: int) -> None:
    from neuronserve.server.lending import _CpuFile

    slot = _CpuFile(directory, 0)
    for i in range(1, count + 1):
        slot.publish(float(i), float(i), float(i), float(i))


def test_a_slot_is_read_whole_while_its_owner_writes_it_from_another_process(tmp_path):
    """Other groups read an owner's four values at any moment: every read is one whole write (here all four
    equal), and a slot an owner left odd (killed mid-write) is still read, then written again."""
    import multiprocessing

    from neuronserve.server.lending import _CpuFile

    reader = _CpuFile(tmp_path, 0)
    writer = multiprocessing.get_context("fork").Process(target=_publish_many, args=(tmp_path, 200_000))
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        values = read_slot(reader.slot)
        assert len(set(values)) == 1, values
        reads += 1
    writer.join(60)
    assert writer.exitcode == 0 and read_slot(reader.slot) == (200_000.0,) * 4
    reader.seq[0] += 1          # a write that never finished
    assert read_slot(reader.slot) == (200_000.0,) * 4
    reader.publish(1.0, 2.0, 3.0, 0.0)
    assert read_slot(reader.slot) == (1.0, 2.0, 3.0, 0.0) and reader.seq[0] % 2 == 0
