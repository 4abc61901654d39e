"""The shared queue between the routes (event loop) and the model copies (one thread each).

A request becomes one Work holding its tokenized items; each item is a queue entry, so a request with more items
than the largest batch spreads over several batches (and copies). A copy asks `next_batch()` for work:

- on an idle server (no copy executing) it takes what is queued at once: a lone request gets no added latency;
- while another copy is busy it waits until the batch is full or the oldest item has waited max_batch_delay,
  trading a little latency for fuller batches under load;
- on an idle server with fewer items queued than were in the group when the last batch ended (that batch's, now
  answered, and those queued behind it), it waits a little for the rest: return_wait_share of the estimated run
  time of a batch of all of them. Most clients send their next request on the answer to the last (a closed
  loop), and without the wait the first one back runs alone while the others queue behind it, so that k clients
  of a group settle into batches that take turns. The wait is a share of the whole batch's time, not of the
  last batch's: once the clients had split into two halves taking turns, the shorter batches of a half would
  shorten the wait that is to join them again;
- it plans the batch from what is queued (a window of up to WINDOW batches' worth, the oldest item always in it):
  with more than a batch waiting, the items nearest in length to one another (the shortest that still include
  the oldest), so short items do not ride in a long item's padding; then, from each shape's measured run time
  (`observe`: the warm-up's, then a running estimate while serving), the plan with the least time per item: how many
  of them, and in which compiled bucket or, when the artifact runs any shape (`exact_shapes`: a CPU or CUDA
  shared trace), at the batch's own shape (its items, and its longest item's length, or that rounded up to
  SEQ_MULTIPLE where the warm-up found rounding faster: `length_probe`). Before any
  time is known, the first items in arrival order in the cheapest bucket that holds them. What is not taken goes
  back to the front of the queue, in arrival order;
- entries of a cancelled Work (client gone, timed out) are dropped without running.

The queue is bounded (items): `submit` refuses with 503 + Retry-After when it is full.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from itertools import accumulate
from typing import Iterable, NamedTuple

from neuronserve.server.clock import REAL, Clock


class ServeError(Exception):
    """A request that cannot be served as asked; `status` is its HTTP code, the message is for the client."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Work:
    """One request's items on their way through the queue: the copies fill `rows` (and `answers` when the
    request wants decoded answers: its task `options`, else None); the event loop resolves `future` once every
    item is in."""

    __slots__ = ("items", "options", "rows", "answers", "pending", "future", "cancelled", "t0")

    def __init__(self, items: list, future, *, options: dict | None):
        self.items = items
        self.options = options
        self.rows: list = [None] * len(items)       # per item: tuple of output rows, in output_names order
        self.answers: list | None = None if options is None else [None] * len(items)
        self.pending = len(items)
        self.future = future
        self.cancelled = False                      # set on the loop, read by the copies: they skip its items
        self.t0 = 0.0                               # monotonic time it was queued (submit; the batcher's clock)


WINDOW = 4             # batches' worth of queued items a plan looks at
SEQ_MULTIPLE = 8       # an exact shape's sequence where lengths that are not multiples of it run slower
FALL, RISE = 0.5, 0.05  # weight of a shape's new run time below / above its running estimate


class Batch(NamedTuple):
    batch: int
    seq: int
    entries: list   # [(Work, item index)], at most `batch` of them
    exact: bool = False     # a shape of its own, not a compiled bucket


class Timings:
    """Run time per (batch, seq) shape: a running estimate of each shape measured, and for shapes not yet run, a
    least-squares line through them in token slots (batch x seq): on these encoders time grows with the slots.

    Two rules keep a shape from looking dearer than it is. A shape the planner thinks dear is not run, so not
    measured again, and one slow run could leave a group's four clients served three at a time for good, the
    fourth a whole batch behind:
    - a batch's time is its shape's cost plus whatever interrupted it (another process on its CPUs, a host slowed
      for a moment, a first call that TorchScript optimises), so the estimate follows a faster run at once and a
      slower one slowly;
    - per item, a call of more items at one length costs no more than one of fewer (the reason to batch): a
      shape's estimate is at most its batch times the least time per item of a smaller batch measured at its
      length."""

    def __init__(self):
        self.mean: dict[tuple[int, int], float] = {}
        self._sums = [0.0] * 5      # n, x, y, xx, xy over every shape's latest mean
        self._per_seq: dict[int, dict[int, float]] = {}     # seq -> {batch: its estimate}
        self._known: dict[tuple[int, int], float | None] = {}      # estimates given since the last observe

    def observe(self, shape: tuple[int, int], seconds: float) -> None:
        old = self.mean.get(shape)
        new = seconds if old is None else old + (FALL if seconds < old else RISE) * (seconds - old)
        self.mean[shape] = self._per_seq.setdefault(shape[1], {})[shape[0]] = new
        self._known.clear()
        x = float(shape[0] * shape[1])
        for y, sign in ((old, -1.0), (new, 1.0)):
            if y is not None:
                for k, v in enumerate((1.0, x, y, x * x, x * y)):
                    self._sums[k] += sign * v

    def estimate(self, shape: tuple[int, int]) -> float | None:
        # a plan asks for the same few shapes many times over
        if shape not in self._known:
            batch, seq = shape
            own = self.mean.get(shape)
            if own is None:
                own = self._line(batch * seq)
            bound = min((t / m for m, t in self._per_seq.get(seq, {}).items() if m < batch), default=None)
            self._known[shape] = own if bound is None else min(batch * bound, own if own is not None else math.inf)
        return self._known[shape]

    def _line(self, x: float) -> float | None:
        n, sx, sy, sxx, sxy = self._sums
        if n < 1.5:
            return None
        spread = n * sxx - sx * sx
        slope = max((n * sxy - sx * sy) / spread, 0.0) if spread > 1e-9 else sy / sx
        return max((sy - slope * sx) / n + slope * x, 0.0) if spread > 1e-9 else slope * x


class Batcher:
    def __init__(self, buckets: Iterable[tuple[int, int]], *, max_queue: int, max_delay_s: float,
                 return_wait_share: float = 0.0, exact_shapes: bool = False, max_batch_tokens: int | None = None,
                 clock: Clock = REAL):
        # cheapest first: fewer padded token slots, then the shorter sequence (attention grows with its square)
        self.buckets = sorted(set(buckets), key=lambda bs: (bs[0] * bs[1], bs[1]))
        if not self.buckets:
            raise ValueError("no buckets")
        self.max_batch = max(b for b, _ in self.buckets)
        self.max_seq = max(s for _, s in self.buckets)
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self.return_wait_share = return_wait_share
        self.exact_shapes = exact_shapes
        self.max_batch_tokens = max_batch_tokens       # batch x seq a plan may not exceed (one item always may)
        # the warm-up runs these two shapes: an exact shape runs at its longest item's own length if the first,
        # one over a multiple of SEQ_MULTIPLE, ran faster than the second, the next multiple; else rounded up to a
        # multiple (vector units and tensor cores may want one)
        rounded = min(max(2 * SEQ_MULTIPLE, round_up(min(s for _, s in self.buckets))), self.max_seq)
        self.length_probe = ((min(4, self.max_batch), rounded - SEQ_MULTIPLE + 1), (min(4, self.max_batch), rounded))
        self.timings = Timings()
        self.clock = clock      # every time and wait here: tests run the delays on simulated time
        # entries in the batch taken last (by any copy: with several, a copy's done() may count another's batch,
        # which only sizes a bounded wait)
        self._last_taken = 0
        self._last_seq = 0              # the sequence length of the batch taken last
        self._expected = 0              # items in the group when the last batch ended: what an idle copy waits for
        self._ended = 0.0               # the clock's time the last batch ended
        self._return_wait_s = 0.0       # how long an idle copy waits for them
        self._queue: deque[tuple[Work, int]] = deque()
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self.dropped = 0    # items skipped because their request was cancelled

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, work: Work) -> None:
        """Queue every item of `work` (called on the event loop; never blocks)."""
        n = len(work.items)
        if n > self.max_queue:
            raise ServeError(413, f"{n} inputs in one request, more than this server queues ({self.max_queue}); "
                                  "split the request")
        longest = max(item.length for item in work.items)
        if longest > self.max_seq:
            raise ServeError(422, f"{longest} tokens, longer than the largest sequence bucket ({self.max_seq})")
        with self._cond:
            if self._closed:
                raise ServeError(503, "shutting down", retry_after=1)
            if len(self._queue) + n > self.max_queue:
                raise ServeError(503, f"busy: {len(self._queue)} items queued (max_queue {self.max_queue}); "
                                      "retry later", retry_after=1)
            work.t0 = self.clock.monotonic()
            self._queue.extend((work, i) for i in range(n))
            self._cond.notify()

    def next_batch(self) -> Batch | None:
        """Block until there is a batch to run (None once closed). Pair every batch with `done()`."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._queue:
                    self.clock.wait(self._cond, None)
                    continue
                queued = len(self._queue)
                since = self._queue[0][0].t0
                if self._running:
                    delay = self.max_delay_s if queued < self.max_batch else 0.0
                else:
                    # from the end of the last batch: what queued during it has waited, but not for the returners
                    delay = self._return_wait_s if queued < self._expected else 0.0
                    since = max(since, self._ended)
                if delay > 0:
                    wait = since + delay - self.clock.monotonic()
                    if wait > 0:
                        self.clock.wait(self._cond, wait)
                        continue
                batch = self._take()
                if batch is None:
                    continue
                self._last_taken, self._last_seq = len(batch.entries), batch.seq
                self._running += 1
                if self._queue:
                    self._cond.notify()     # the rest is for another copy
                return batch

    def done(self, seconds: float | None = None) -> None:
        """A copy finished the batch it took, in `seconds` (None: it was given up on): it no longer counts as
        executing."""
        with self._cond:
            if seconds is not None:
                self._expected = min(self._last_taken + len(self._queue), self.max_batch)
                # all of them in one batch, at the last batch's length; this batch's time until shapes are known
                whole = self.timings.estimate(self._shape(self._expected, self._last_seq)[0])
                self._return_wait_s = self.return_wait_share * (seconds if whole is None else whole)
                self._ended = self.clock.monotonic()
            self._running -= 1
            if self._queue:
                self._cond.notify()

    def observe(self, shape: tuple[int, int], seconds: float) -> None:
        """A batch of `shape` ran in `seconds` (the copies report each one, the warm-up's included)."""
        with self._cond:
            self.timings.observe(shape, seconds)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> Batch | None:
        window = []
        queue = self._queue
        while queue and len(window) < WINDOW * self.max_batch:
            entry = queue.popleft()
            if entry[0].cancelled:
                self.dropped += 1
            else:
                window.append(entry)
        if not window:
            return None
        lengths = [w.items[i].length for w, i in window]
        plan = self._least_time(lengths) if self.timings.mean else None
        chosen, (batch, seq), exact = plan or self._first_fit(lengths)
        taken = set(chosen)
        queue.extendleft(reversed([e for j, e in enumerate(window) if j not in taken]))
        return Batch(batch, seq, [window[j] for j in sorted(chosen)], exact)

    def _first_fit(self, lengths: list[int]) -> tuple[list[int], tuple[int, int], bool]:
        """The first items in arrival order, as many as one shape holds: the cheapest bucket, or their own."""
        longest = list(accumulate(lengths[:self.max_batch], max))
        n = len(longest)
        while True:
            shape = self._exact(n, longest[n - 1])
            if shape is not None:
                return list(range(n)), shape, True
            for b, s in self.buckets:
                if b >= n and s >= longest[n - 1]:
                    return list(range(n)), (b, s), False
            n -= 1     # n == 1 always fits: submit refused items longer than every bucket

    def _least_time(self, lengths: list[int]) -> tuple[list[int], tuple[int, int], bool] | None:
        """The items and shape that waste the least time, the oldest item (0) among them.

        A plan's items are a run of neighbours in length order (no item rides with longer ones it could skip);
        its efficiency is what its items would cost at their best (each at the least time per item any shape
        holding it has) over its estimated time. The most efficient plan wins; ties go to more items."""
        order = sorted(range(len(lengths)), key=lambda j: (lengths[j], j))
        at = order.index(0)
        first, last = max(0, at - self.max_batch + 1), min(len(order), at + self.max_batch)
        # what the items a plan may hold would cost at their best, summed once: worth[k] for order[first:first+k]
        ideal: dict[int, float] = {}
        worth = [0.0]
        for j in order[first:last]:
            if lengths[j] not in ideal:
                ideal[lengths[j]] = self._ideal(lengths[j])
            worth.append(worth[-1] + ideal[lengths[j]])
        best = None
        for hi in range(at, last):
            longest = lengths[order[hi]]
            for lo in range(max(first, hi - self.max_batch + 1), at + 1):
                n = hi - lo + 1
                shape, own = self._shape(n, longest)
                if n > 1 and self.max_batch_tokens and shape[0] * shape[1] > self.max_batch_tokens:
                    continue
                seconds = self.timings.estimate(shape)
                if seconds is None:
                    return None
                efficiency = (worth[hi + 1 - first] - worth[lo - first]) / max(seconds, 1e-12)
                if best is None or efficiency > best[0] * (1 + 1e-9) or (
                        efficiency >= best[0] * (1 - 1e-9) and n > len(best[1])):
                    best = (efficiency, order[lo:hi + 1], shape, own)
        return None if best is None else best[1:]

    def _shape(self, n: int, longest: int) -> tuple[tuple[int, int], bool]:
        """(the shape n items up to `longest` tokens run in, whether it is their own): their own shape when the
        artifact runs any, else the cheapest bucket that holds them."""
        exact = self._exact(n, longest)
        if exact is not None:
            return exact, True
        return next((b, s) for b, s in self.buckets if b >= n and s >= longest), False

    def _ideal(self, length: int) -> float:
        """An item's time at its best: the least time per item of any full shape that holds it."""
        if self.exact_shapes:
            return (self.timings.estimate(self._exact(self.max_batch, length)) or 0.0) / self.max_batch
        return min((self.timings.estimate((b, s)) or 0.0) / b for b, s in self.buckets if s >= length)

    def _exact(self, n: int, longest: int) -> tuple[int, int] | None:
        """The batch's own shape, when the artifact runs any (None otherwise)."""
        if not self.exact_shapes:
            return None
        return (n, longest) if self.own_lengths() else (n, min(round_up(longest), self.max_seq))

    def own_lengths(self) -> bool:
        """Whether exact shapes run at their longest item's own length: the warm-up measured the first shape of
        length_probe faster than the second (measured, not estimated from the line)."""
        own, rounded = (self.timings.mean.get(shape) for shape in self.length_probe)
        return own is not None and rounded is not None and own < rounded


def round_up(length: int) -> int:
    """`length` rounded up to a multiple of SEQ_MULTIPLE."""
    return -(-length // SEQ_MULTIPLE) * SEQ_MULTIPLE
