"""The shared queue between the routes (event loop) and the model copies (one thread each).

A request becomes one Work holding its tokenized items; each item is a queue entry, so a request with more items
than the largest batch spreads over several batches (and copies). A copy asks `next_batch()` for work:

- on an idle server (no copy executing) it takes what is queued at once: a lone request gets no added latency;
- while another copy is busy it waits until the batch is full or the oldest item has waited max_batch_delay,
  trading a little latency for fuller batches under load;
- on an idle server with fewer items queued than were in the group when the last batch ended (that batch's, now
  answered, and those queued behind it), it waits a little (return_wait_share of a batch's run time) for the
  rest: most clients send their next request on the answer to the last (a closed loop), and without the wait the
  first one back runs alone while the others queue behind it, so that k clients of a group settle into batches
  of one that take turns;
- it takes entries in arrival order and picks the cheapest compiled (batch, seq) bucket that holds them (seq by the
  longest item); when no bucket holds them all, the tail goes back to the front of the queue for the next batch;
- entries of a cancelled Work (client gone, timed out) are dropped without running.

The queue is bounded (items): `submit` refuses with 503 + Retry-After when it is full.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from itertools import accumulate
from typing import Iterable, NamedTuple


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
        self.t0 = 0.0                               # monotonic time it was queued (submit)


class Batch(NamedTuple):
    batch: int
    seq: int
    entries: list   # [(Work, item index)], at most `batch` of them


class Batcher:
    def __init__(self, buckets: Iterable[tuple[int, int]], *, max_queue: int, max_delay_s: float,
                 return_wait_share: float = 0.0):
        # cheapest first: fewer padded token slots, then the shorter sequence (attention grows with its square)
        self.buckets = sorted(set(buckets), key=lambda bs: (bs[0] * bs[1], bs[1]))
        if not self.buckets:
            raise ValueError("no buckets")
        self.max_batch = max(b for b, _ in self.buckets)
        self.max_seq = max(s for _, s in self.buckets)
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self.return_wait_share = return_wait_share
        # entries in the batch taken last (by any copy: with several, a copy's done() may count another's batch,
        # which only sizes a bounded wait)
        self._last_taken = 0
        self._expected = 0              # items in the group when the last batch ended: what an idle copy waits for
        self._ended = 0.0               # monotonic time the last batch ended
        self._batch_s = 0.0             # running mean of a batch's run time (done() reports it)
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
            work.t0 = time.monotonic()
            self._queue.extend((work, i) for i in range(n))
            self._cond.notify()

    def next_batch(self) -> Batch | None:
        """Block until there is a batch to run (None once closed). Pair every batch with `done()`."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                queued = len(self._queue)
                since = self._queue[0][0].t0
                if self._running:
                    delay = self.max_delay_s if queued < self.max_batch else 0.0
                else:
                    # from the end of the last batch: what queued during it has waited, but not for the returners
                    delay = self.return_wait_share * self._batch_s if queued < self._expected else 0.0
                    since = max(since, self._ended)
                if delay > 0:
                    wait = since + delay - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                batch = self._take()
                if batch is None:
                    continue
                self._last_taken = len(batch.entries)
                self._running += 1
                if self._queue:
                    self._cond.notify()     # the rest is for another copy
                return batch

    def done(self, seconds: float | None = None) -> None:
        """A copy finished the batch it took, in `seconds` (None: it was given up on): it no longer counts as
        executing."""
        with self._cond:
            if seconds is not None:
                self._batch_s = seconds if not self._batch_s else 0.8 * self._batch_s + 0.2 * seconds
                self._expected = min(self._last_taken + len(self._queue), self.max_batch)
                self._ended = time.monotonic()
            self._running -= 1
            if self._queue:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> Batch | None:
        entries = []
        queue = self._queue
        while queue and len(entries) < self.max_batch:
            entry = queue.popleft()
            if entry[0].cancelled:
                self.dropped += 1
            else:
                entries.append(entry)
        if not entries:
            return None
        longest = list(accumulate((w.items[i].length for w, i in entries), max))
        n = len(entries)
        while True:
            seq_needed = longest[n - 1]
            for b, s in self.buckets:
                if b >= n and s >= seq_needed:
                    if n < len(entries):
                        queue.extendleft(reversed(entries[n:]))
                        del entries[n:]
                    return Batch(b, s, entries)
            n -= 1     # n == 1 always fits: submit refused items longer than every bucket
