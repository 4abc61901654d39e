"""The Prometheus metrics one group's worker exports on /metrics (names are a contract: `top` and `bench` read them).

Every series carries the labels model and group. A registry per app, so tests can build several apps in one
process and a worker's output holds only its own series.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

# the *_created series double the scrape for nothing `top` or `bench` reads
disable_created_metrics()

# latencies from a sub-millisecond cache hit to a timed-out request
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FILL_BUCKETS = (0.125, 0.25, 0.5, 0.75, 0.875, 1.0)


class Metrics:
    """The group's series, with model/group labels already applied; safe to update from any thread."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, group: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model": model, "group": group}
        names = list(labels)

        def make(kind, name, doc, extra=(), **kw):
            return kind(name, doc, names + list(extra), registry=self.registry, **kw)

        self._requests = make(Counter, "neuronserve_requests", "inference requests answered, by HTTP status code",
                              ("code",))
        self.request_duration = make(Histogram, "neuronserve_request_duration_seconds",
                                     "inference request time inside the app, end to end",
                                     buckets=DURATION_BUCKETS).labels(**labels)
        self.queue_depth = make(Gauge, "neuronserve_queue_depth", "items waiting for a model copy").labels(**labels)
        # what queue_depth is measured against (max_queue): a saturation alert needs it beside the depth
        self.queue_capacity = make(Gauge, "neuronserve_queue_capacity",
                                   "items the queue holds before requests get 503 (max_queue)").labels(**labels)
        self.batch_size = make(Histogram, "neuronserve_batch_size", "real items per executed batch",
                               buckets=BATCH_BUCKETS).labels(**labels)
        self.batch_fill = make(Histogram, "neuronserve_batch_fill", "real items / the bucket's batch size",
                               buckets=FILL_BUCKETS).labels(**labels)
        self._busy = make(Counter, "neuronserve_busy_seconds", "time each model copy spent executing batches",
                          ("copy",))
        self.inferences = make(Counter, "neuronserve_inferences", "items inferred").labels(**labels)
        # padding waste = 1 - tokens / token_slots: what the bucket grid costs in compute
        self.tokens = make(Counter, "neuronserve_tokens", "real tokens in executed batches").labels(**labels)
        self.token_slots = make(Counter, "neuronserve_token_slots",
                                "token positions executed (batch size x sequence length of each batch's bucket)"
                                ).labels(**labels)
        self.queue_time = make(Histogram, "neuronserve_queue_seconds",
                               "time an item waited in the queue before its batch started",
                               buckets=DURATION_BUCKETS).labels(**labels)
        self._bucket_calls = make(Counter, "neuronserve_bucket_calls", "batches executed per compiled bucket",
                                  ("bucket",))
        self._weight_bytes = make(Gauge, "neuronserve_weight_bytes",
                                  "bytes of model weights each copy holds, by memory (host or device); copies "
                                  "that share one set (CPU) each report it", ("copy", "memory"))
        self.borrowed_batches = make(Counter, "neuronserve_borrowed_batches",
                                     "batches that also ran on CPUs borrowed from idle groups").labels(**labels)
        # `neuronserve apply` drains a group until this reaches 0 before it stops it
        self.in_flight = make(Gauge, "neuronserve_requests_in_flight",
                              "inference requests received and not yet answered").labels(**labels)
        self.ready = make(Gauge, "neuronserve_ready", "1 once the warm-up gave the known answer").labels(**labels)
        self._labels = labels
        self.answered = 0       # every request, read by the systemd status line (a plain int: one thread writes)
        self._by_code: dict[int, Counter] = {}
        self._by_bucket: dict[str, Counter] = {}

    def request(self, code: int, seconds: float) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._requests.labels(code=str(code), **self._labels)
        counter.inc()
        self.answered += 1
        self.request_duration.observe(seconds)

    def weights(self, copy: int, held: dict[str, int]) -> None:
        """What one copy's loaded modules hold: {"host": bytes, "device": bytes}."""
        for memory, size in held.items():
            self._weight_bytes.labels(copy=str(copy), memory=memory, **self._labels).set(size)

    def busy(self, copy: int) -> Counter:
        """The busy-seconds counter of one copy (created at zero so rates exist before the first batch)."""
        return self._busy.labels(copy=str(copy), **self._labels)

    def batch(self, items: int, bucket: tuple[int, int], tokens: int, waits: list[float], *,
              exact: bool = False) -> None:
        """One executed batch: its real items and tokens in `bucket` (batch, sequence), and how long each item
        had waited in the queue. Batches run at their own shape (`exact`) count under bucket="exact": one series,
        not one per shape."""
        batch, seq = bucket
        self.batch_size.observe(items)
        self.batch_fill.observe(items / batch)
        self.inferences.inc(items)
        self.tokens.inc(tokens)
        self.token_slots.inc(batch * seq)
        for wait in waits:
            self.queue_time.observe(wait)
        key = "exact" if exact else f"{batch}x{seq}"
        counter = self._by_bucket.get(key)
        if counter is None:
            counter = self._by_bucket[key] = self._bucket_calls.labels(bucket=key, **self._labels)
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
