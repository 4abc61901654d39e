"""The batcher and the copies, on a real tiny compiled classifier: bucket choice, splitting, the batching delay,
the bounded queue, dropped requests of clients that left, and the timeout (with the stuck copy replaced). The
Batcher's own tests run on a simulated clock (tests/simclock.py), the copies behind it (ServedModel) on the real one."""
from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest
import torch

from neuronserve import tasks
from neuronserve.build.artifact import read_manifest
from neuronserve.server.batcher import Batch, Batcher, ServeError, Work
from neuronserve.server.model import ServedModel
from neuronserve.tasks import load_tokenizer
from server_kit import GatedLoader, compiled, settings_for
from simclock import SimulatedClock

TASK = "text-classification"
DEFAULTS = tasks.get(TASK).defaults     # a request without parameters
BUCKETS = [(1, 32), (1, 128), (4, 32), (4, 128)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_dir):
    return compiled(tmp_path_factory.getbasetemp() / "server-artifacts", tiny_model_dir(TASK), TASK)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir(TASK))


def items(tokenizer, *words: int) -> list[tasks.Encoded]:
    """Real tokenized items, one per count: 'word word ...' is count + 2 tokens long."""
    return tasks.encode(TASK, tokenizer, [" ".join(["word"] * n) for n in words], 128, truncation=False)


def work(its) -> Work:
    return Work(list(its), None, options=None)


def taken(batch) -> list[int]:
    return [w.items[i].length for w, i in batch.entries]


class Copy(threading.Thread):
    """A copy asking a Batcher on a SimulatedClock for its next batch on a thread of its own, as the executor's
    do, so that the test can advance the clock while it waits. A batch asked for on the test's own thread must
    come at once: there a timed wait never ends (nothing advances the clock), and fails on the clock's guard."""

    def __init__(self, batcher: Batcher):
        super().__init__(daemon=True)       # one left waiting by a failed test does not hold up the run
        self.batcher = batcher
        self.result: list[tuple[float, Batch | None]] = []
        self.start()

    def run(self) -> None:
        batch = self.batcher.next_batch()
        self.result.append((self.batcher.clock.monotonic(), batch))

    def got(self) -> tuple[float, Batch | None]:
        """(the simulated time it got its batch, the batch)."""
        self.join(10)       # a guard against a hang, not a measured window
        assert self.result, "the copy got no batch"
        return self.result[0]


# ---------------------------------------------------------------- the Batcher on its own

def test_picks_the_smallest_bucket_that_fits(tokenizer):
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=0)
    b.submit(work(items(tokenizer, 3)))
    assert b.next_batch()[:2] == (1, 32)
    b.done()
    b.submit(work(items(tokenizer, 3, 5, 8)))
    assert b.next_batch()[:2] == (4, 32)
    b.done()
    b.submit(work(items(tokenizer, 3, 60)))          # the longest item sets the sequence bucket
    batch = b.next_batch()
    assert batch[:2] == (4, 128) and taken(batch) == [5, 62]


# ---------------------------------------------------------------- the planner, on recorded run times

class Length:
    """A stand-in item: the planner reads only its length."""

    def __init__(self, length: int):
        self.length = length


def queued(b: Batcher, *lengths: int) -> Work:
    w = work([Length(n) for n in lengths])
    b.submit(w)
    return w


# the tiny BERT's buckets with run times as a warm-up would record them (s): the fixed cost per call dominates
# small batches, as on an accelerator
RECORDED = {(1, 32): 0.010, (4, 32): 0.016, (8, 32): 0.024, (1, 128): 0.020, (4, 128): 0.050, (8, 128): 0.090}


def planner(exact: bool = False, **kw) -> Batcher:
    b = Batcher(RECORDED, max_queue=256, max_delay_s=0, exact_shapes=exact, **kw)
    for shape, seconds in RECORDED.items():
        b.observe(shape, seconds)
    return b


def test_the_plan_with_the_least_time_per_item_wins():
    b = planner()
    queued(b, 10, 10)
    # 2 items: batch 4 costs 0.016 / 2 = 0.008 an item, two batch-1 calls 0.010 each
    assert b.next_batch()[:2] == (4, 32)
    b.done()
    # one long item among short ones: the short ones go together in a 32 bucket, the long one waits for the next
    w = queued(b, 10, 10, 10, 100, 10)
    batch = b.next_batch()
    assert batch[:2] == (4, 32) and [i for _, i in batch.entries] == [0, 1, 2, 4]
    b.done()
    assert b.next_batch()[:2] == (1, 128) and b.depth == 0 and w.items[3].length == 100


def test_with_more_than_a_batch_waiting_items_near_in_length_ride_together_and_the_oldest_goes_first():
    b = planner()
    lengths = [120, 20, 110, 25, 115, 30, 100, 28, 20, 22, 24, 26]
    w = queued(b, *lengths)
    batch = b.next_batch()
    # the oldest (120 tokens) must go now: with the other long ones in a 128 bucket, not with short ones that a
    # 32 bucket holds for a fifth of the time
    assert batch[:2] == (4, 128) and sorted(lengths[i] for _, i in batch.entries) == [100, 110, 115, 120]
    b.done()
    batch = b.next_batch()
    assert batch[:2] == (8, 32) and all(w.items[i].length <= 30 for _, i in batch.entries)


def test_exact_shapes_run_the_batch_at_its_own_length_rounded_up_to_8_until_the_probe_ran():
    b = planner(exact=True)
    queued(b, 10, 11, 12)
    # 3 items of at most 12 tokens: (3, 16) is estimated from the line through the recorded times, and beats
    # the 4 x 32 bucket
    batch = b.next_batch()
    assert (batch.batch, batch.seq, batch.exact) == (3, 16, True)
    b.done()
    b.observe((3, 16), 0.001)
    assert b.timings.estimate((3, 16)) == 0.001     # measured shapes use their own running mean


@pytest.mark.parametrize("own_s, rounded_s, seq", [(0.014, 0.016, 12), (0.019, 0.016, 16)])
def test_exact_shapes_run_at_their_own_length_where_the_warm_up_found_it_faster(own_s, rounded_s, seq):
    # the warm-up runs Batcher.length_probe: 4 items at 25 and at 32 tokens here (the smallest bucket's 32)
    b = planner(exact=True)
    assert b.length_probe == ((4, 25), (4, 32))
    b.observe((4, 25), own_s)
    b.observe((4, 32), rounded_s)
    queued(b, 10, 11, 12)
    batch = b.next_batch()
    assert (batch.batch, batch.seq, batch.exact) == (3, seq, True)


def test_one_slow_run_does_not_keep_a_shape_from_running_again():
    b = planner(exact=True)
    for seconds in (0.020, 0.0205):
        b.observe((2, 24), seconds)
    b.observe((4, 24), 0.031)
    b.observe((4, 24), 0.090)       # interrupted (or its CPU was late): a rise counts for little
    assert b.timings.estimate((4, 24)) == pytest.approx(0.031 + 0.05 * (0.090 - 0.031))
    b.observe((4, 24), 0.030)       # a faster run counts for half at once
    assert b.timings.estimate((4, 24)) == pytest.approx(0.031 + 0.05 * (0.090 - 0.031) + 0.5 * (
        0.030 - 0.031 - 0.05 * (0.090 - 0.031)))
    # a first run of (3, 24) slower than a whole batch of 4 (TorchScript optimising a new shape): per item no
    # dearer than 2 items at that length, 3 equal items still go together rather than 2 now and 1 a batch later
    b.observe((3, 24), 0.050)
    assert b.timings.estimate((3, 24)) == pytest.approx(3 * b.timings.estimate((2, 24)) / 2)
    queued(b, 18, 18, 18)
    assert len(b.next_batch().entries) == 3 and b.depth == 0
    b.done(0.025)
    # a shape never run at a length some smaller batch ran at: bounded by it, below the line through the rest
    assert b.timings.estimate((16, 24)) <= 16 * 0.031 / 4 + 1e-12


def test_max_batch_tokens_caps_a_plan_but_never_a_single_item():
    b = planner(exact=True, max_batch_tokens=256)
    queued(b, 100, 100, 100)
    assert b.next_batch()[:2] == (2, 104)       # 3 x 104 would be 312 slots
    b.done()
    assert b.next_batch()[:2] == (1, 104)


def test_without_recorded_times_the_first_items_take_the_cheapest_bucket_or_their_own_shape():
    exact = Batcher(RECORDED, max_queue=64, max_delay_s=0, exact_shapes=True)
    queued(exact, 10, 60, 10)
    batch = exact.next_batch()
    assert (batch.batch, batch.seq, batch.exact) == (3, 64, True)
    buckets = Batcher(RECORDED, max_queue=64, max_delay_s=0)
    queued(buckets, 10, 60, 10)
    batch = buckets.next_batch()
    assert (batch.batch, batch.seq, batch.exact) == (4, 128, False)


def test_splits_a_large_request_in_arrival_order(tokenizer):
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=0)
    w = work(items(tokenizer, *range(1, 11)))
    b.submit(w)
    sizes = []
    for _ in range(3):
        batch = b.next_batch()
        assert all(entry[0] is w for entry in batch.entries)
        sizes.append([i for _, i in batch.entries])
        b.done()
    assert sizes == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert b.depth == 0


def test_backs_off_when_no_bucket_holds_the_whole_head(tokenizer):
    # long sequences are compiled for batch 1 only: a long item goes alone, the short ones after it together
    b = Batcher([(1, 128), (8, 32)], max_queue=64, max_delay_s=0)
    b.submit(work(items(tokenizer, 2, 70, 2, 2)))
    got = []
    while b.depth:
        batch = b.next_batch()
        got.append((batch.batch, batch.seq, taken(batch)))
        b.done()
    assert got == [(1, 128, [4]), (1, 128, [72]), (8, 32, [4, 4])]


def test_lone_request_on_an_idle_server_does_not_wait(tokenizer):
    clock = SimulatedClock()
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=30, clock=clock)
    b.submit(work(items(tokenizer, 3)))
    assert b.next_batch() is not None   # at once (see Copy): no copy was busy, so no waiting


def test_waits_for_more_while_another_copy_is_busy(tokenizer):
    clock = SimulatedClock()
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=0.25, clock=clock)
    b.submit(work(items(tokenizer, 3)))
    assert b.next_batch() is not None          # one copy now executing
    clock.advance(0.125)
    t0 = clock.monotonic()
    b.submit(work(items(tokenizer, 3)))
    copy = Copy(b)
    assert clock.blocked() == [t0 + 0.25]      # waits max_batch_delay from the item's arrival for company
    clock.advance(0.25 - 1 / 64)
    assert not copy.result                     # not a moment less
    clock.advance(1 / 64)
    at, batch = copy.got()
    assert at == t0 + 0.25 and len(batch.entries) == 1


def test_a_full_batch_goes_without_waiting_out_the_delay(tokenizer):
    clock = SimulatedClock()
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=30, clock=clock)
    b.submit(work(items(tokenizer, 3)))
    assert b.next_batch() is not None          # one copy busy: a partial batch would wait 30 s
    copy = Copy(b)
    assert clock.blocked() == [math.inf]       # nothing queued: waiting for work
    t0 = clock.monotonic()
    b.submit(work(items(tokenizer, 3, 3)))
    b.submit(work(items(tokenizer, 3, 3)))     # 4 queued = the largest batch
    at, batch = copy.got()
    assert at == t0 and len(batch.entries) == 4


def test_an_idle_copy_waits_for_the_clients_its_last_batch_answered(tokenizer):
    # last batch: 2 items in 2 s, share 0.25 -> an idle copy with 1 queued waits up to 0.5 s for the second
    clock = SimulatedClock()
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=0, return_wait_share=0.25, clock=clock)
    b.submit(work(items(tokenizer, 3, 3)))
    assert len(b.next_batch().entries) == 2
    b.done(2.0)
    ended = clock.monotonic()
    b.submit(work(items(tokenizer, 3)))
    copy = Copy(b)
    assert clock.blocked() == [ended + 0.5]
    clock.advance(0.25)
    b.submit(work(items(tokenizer, 4)))
    at, batch = copy.got()
    assert at == ended + 0.25 and taken(batch) == [5, 6]       # the second client back joined the first
    b.done(2.0)
    # nobody else comes: the first one back runs alone once the wait is over, no later
    ended = clock.monotonic()
    b.submit(work(items(tokenizer, 3)))
    copy = Copy(b)
    assert clock.blocked() == [ended + 0.5]
    clock.advance(0.5 - 1 / 64)
    assert not copy.result
    clock.advance(1 / 64)
    at, batch = copy.got()
    assert at == ended + 0.5 and taken(batch) == [5]
    b.done(2.0)
    # a lone client (one item in the group when the last batch ended) never waits
    b.submit(work(items(tokenizer, 3)))
    assert taken(b.next_batch()) == [5]         # at once (see Copy)
    # two clients taking turns in batches of one: when the batch ends one is queued and the other, just answered,
    # is on its way back; the copy waits for it rather than running the queued one alone again
    b.submit(work(items(tokenizer, 4)))
    clock.advance(0.75)     # the batch runs on; the queued one has waited longer than the wait by its end
    b.done(2.0)
    ended = clock.monotonic()
    copy = Copy(b)
    assert clock.blocked() == [ended + 0.5]     # counted from the batch's end
    b.submit(work(items(tokenizer, 3)))
    at, batch = copy.got()
    assert at == ended and taken(batch) == [6, 5]
    b.done(2.0)


def test_two_halves_taking_turns_join_again():
    # 4 clients split into 2 + 2 that take turns: when a batch of 2 ends the other 2 are queued and the 2 just
    # answered are on their way back. The wait is a share of the time of a batch of all 4 (0.1 x 31 ms), not of
    # the batches of 2 that ran (0.1 x 20 ms): long enough for the 2 back 2.5 ms later to join
    clock = SimulatedClock()
    b = Batcher(RECORDED, max_queue=64, max_delay_s=0, return_wait_share=0.1, exact_shapes=True, clock=clock)
    b.observe((2, 24), 0.020)
    b.observe((4, 24), 0.031)
    queued(b, 18, 18)
    assert len(b.next_batch().entries) == 2
    queued(b, 18, 18)
    clock.advance(0.020)
    b.done(0.020)
    ended = clock.monotonic()
    copy = Copy(b)
    assert clock.blocked() == [pytest.approx(ended + 0.0031)]
    clock.advance(0.0025)
    queued(b, 18, 18)
    at, batch = copy.got()
    assert at == ended + 0.0025 and len(batch.entries) == 4 and (batch.batch, batch.seq) == (4, 24)


def test_a_copy_given_up_on_does_not_count_as_a_batch_time(tokenizer):
    clock = SimulatedClock()
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=0, return_wait_share=0.5, clock=clock)
    b.submit(work(items(tokenizer, 3, 3)))
    b.next_batch()
    b.done(None)            # the watchdog's release: no run time known, none learnt
    b.submit(work(items(tokenizer, 3)))
    assert taken(b.next_batch()) == [5]         # at once (see Copy)


def test_full_queue_refuses_with_retry_after(tokenizer):
    b = Batcher(BUCKETS, max_queue=5, max_delay_s=0)
    b.submit(work(items(tokenizer, 1, 1, 1)))
    with pytest.raises(ServeError) as e:
        b.submit(work(items(tokenizer, 1, 1, 1)))
    assert e.value.status == 503 and e.value.retry_after
    b.submit(work(items(tokenizer, 1, 1)))      # what still fits is taken
    with pytest.raises(ServeError) as e:
        b.submit(work(items(tokenizer, *[1] * 6)))
    assert e.value.status == 413                # could never fit: not a retry case


def test_cancelled_work_is_dropped_before_it_runs(tokenizer):
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=0)
    gone, kept = work(items(tokenizer, 3, 3)), work(items(tokenizer, 5))
    b.submit(gone)
    b.submit(kept)
    gone.cancelled = True
    batch = b.next_batch()
    assert [e[0] for e in batch.entries] == [kept] and b.dropped == 2


def test_close_wakes_waiting_copies(tokenizer):
    clock = SimulatedClock()
    b = Batcher(BUCKETS, max_queue=64, max_delay_s=0, clock=clock)
    copy = Copy(b)
    assert clock.blocked() == [math.inf]       # waiting for work
    b.close()
    assert copy.got()[1] is None
    with pytest.raises(ServeError):
        b.submit(work(items(tokenizer, 1)))


# ---------------------------------------------------------------- the copies behind it (ServedModel)

async def started(model: ServedModel, timeout: float = 60) -> None:
    model.start(asyncio.get_running_loop())
    deadline = time.monotonic() + timeout
    while not model.ready:
        assert time.monotonic() < deadline, model.reason
        await asyncio.sleep(0.05)


def eager_logits(artifact, tokenizer, texts):
    """The reference: the traced batch-1 artifact of each item's own length bucket, run directly."""
    out = []
    for item in tasks.encode(TASK, tokenizer, texts, 128, truncation=False):
        seq = 32 if item.length <= 32 else 128
        module = torch.jit.load(str(artifact / read_manifest(artifact).bucket(1, seq).file))
        arrays = tasks.pad([item], 1, seq, ["input_ids", "attention_mask", "token_type_ids"])
        out.append(module(*map(torch.from_numpy, arrays))[0][0].detach().numpy())
    return np.stack(out)


def test_batched_answers_equal_one_by_one(artifact, tokenizer):
    texts = [f"sentence number {i} " + "word " * (i * 7) for i in range(9)]   # lengths over both seq buckets
    loader = GatedLoader()

    async def main():
        model = ServedModel(settings_for(artifact, copies=2, max_batch_delay_ms=20), load=loader)
        await started(model)
        loader.armed.set()
        try:
            works = await asyncio.gather(*(model.infer(texts[i:i + 3], tokenize=True, options=DEFAULTS,
                                                       deadline=time.monotonic() + 60) for i in range(0, 9, 3)))
        finally:
            assert model.stop(10) == []     # every thread joined
        return model, works

    model, works = asyncio.run(main())
    logits = np.concatenate([model.outputs(w)["logits"] for w in works])
    np.testing.assert_allclose(logits, eager_logits(artifact, tokenizer, texts), atol=1e-4)
    answers = [a for w in works for a in w.answers]
    assert [a[0]["label"] for a in answers] == [("NEGATIVE", "POSITIVE")[int(np.argmax(r))] for r in logits]
    assert all(b <= 4 for b, _ in loader.batches) and sum(b for b, _ in loader.batches) >= 9
    # the warm-up measured the two shapes that decide whether exact shapes round their length up
    assert model.batcher.exact_shapes and all(shape in model.batcher.timings.mean
                                              for shape in model.batcher.length_probe)


def test_client_gone_is_dropped_and_timeout_gets_504_then_the_copy_is_replaced(artifact, tokenizer):
    loader = GatedLoader(gated={0})     # the first copy's runner (one trace for every bucket) hangs once armed

    async def main():
        model = ServedModel(settings_for(artifact, copies=1, timeout_s=1.0), load=loader)
        await started(model)
        loader.armed.set()
        try:
            hung = asyncio.ensure_future(model.infer(["the copy hangs in this one"], tokenize=True, options=None,
                                                     deadline=time.monotonic() + 1.0))
            while not loader.entered.is_set():
                await asyncio.sleep(0.01)
            left = asyncio.Event()
            queued = asyncio.ensure_future(model.infer(["this client leaves while queued"], tokenize=True,
                                                       options=None, deadline=time.monotonic() + 30,
                                                       disconnected=left.wait))
            await asyncio.sleep(0.05)
            left.set()
            with pytest.raises(ServeError) as gone:
                await queued
            with pytest.raises(ServeError) as timed_out:
                await hung
            # the watchdog gives the stuck copy up and loads a fresh one, which serves the next request
            deadline = time.monotonic() + 60
            while loader.loads < 2:     # the first copy's one load, then its replacement's
                assert time.monotonic() < deadline, "no replacement copy was loaded"
                await asyncio.sleep(0.05)
            after = await model.infer(["served by the replacement"], tokenize=True, options=DEFAULTS,
                                      deadline=time.monotonic() + 60)
            return gone.value, timed_out.value, after, model
        finally:
            loader.release()
            assert model.stop(10) == []     # every thread joined

    gone, timed_out, after, model = asyncio.run(main())
    assert gone.status == 499
    assert timed_out.status == 504 and "timeout_s" in str(timed_out)
    assert after.answers[0][0]["label"] in ("NEGATIVE", "POSITIVE")
    assert model.batcher.dropped == 1    # the departed client's item never ran
    assert model.ready


def weight_pointers(module) -> list[int]:
    """The data pointers of a frozen TorchScript module's weights (graph constants once frozen)."""
    return [node.output().toIValue().data_ptr() for node in module.graph.findAllNodes("prim::Constant")
            if node.output().type().kind() == "TensorType"]


def test_buckets_and_copies_share_one_set_of_weights(artifact):
    from neuronserve.build import backends

    loads = []

    def load(path, **kw):
        run = backends.get("cpu").load(path, **kw)
        loads.append((path.name, run))
        return run

    manifest = read_manifest(artifact)
    assert len(manifest.buckets) == 4 and {b.file for b in manifest.buckets} == {"model.pt"}

    async def main():
        model = ServedModel(settings_for(artifact, copies=2), load=load)
        await started(model)
        assert model.stop(10) == []     # every thread joined
        return model.metrics.render().decode()

    metrics = asyncio.run(main())
    # one load per copy, of the one file every bucket names; and both copies hold the same weights
    assert [name for name, _ in loads] == ["model.pt", "model.pt"]
    (_, a), (_, b) = loads
    assert a.module is b.module
    pointers = weight_pointers(a.module)
    assert len(pointers) > 10 and pointers == weight_pointers(b.module)
    # /metrics: each copy reports the one set it holds (the tiny BERT's float32 weights)
    held = sum(node.output().toIValue().nbytes for node in a.module.graph.findAllNodes("prim::Constant")
               if node.output().type().kind() == "TensorType")
    for copy in ("0", "1"):
        line = next(x for x in metrics.splitlines() if x.startswith("neuronserve_weight_bytes{")
                    and f'copy="{copy}"' in x and 'memory="host"' in x)
        assert float(line.rsplit(" ", 1)[1]) == held
