"""Read a group's /metrics (Prometheus text) into the few numbers `top` and `bench` show.

The server exports, labelled model and group (see the server's metrics): neuronserve_requests_total{code},
neuronserve_request_duration_seconds (histogram), neuronserve_queue_depth, neuronserve_batch_fill
(histogram), neuronserve_busy_seconds_total{copy}, neuronserve_inferences_total, neuronserve_requests_in_flight,
neuronserve_ready, neuronserve_tokens_total and neuronserve_token_slots_total (padding waste).
Counters only mean something as a difference between two scrapes: `rates(before, after)`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from neuronserve.measure.stats import histogram_quantile

PREFIX = "neuronserve_"


@dataclass
class Counters:
    """One scrape of one group, summed over label sets other than the ones kept."""

    requests: float = 0.0                       # all codes
    requests_by_code: dict[str, float] = field(default_factory=dict)
    duration_buckets: dict[float, float] = field(default_factory=dict)   # le -> cumulative count
    queue_depth: float | None = None
    fill_sum: float = 0.0
    fill_count: float = 0.0
    busy_seconds: float = 0.0                   # summed over copies
    copies: int = 0
    inferences: float = 0.0
    tokens: float = 0.0                         # real tokens in executed batches
    token_slots: float = 0.0                    # token positions executed (padding included)
    in_flight: float | None = None
    ready: float | None = None


# series summed over every group and copy of a scrape, by the Counters field they add to
SUMMED = {"batch_fill_sum": "fill_sum", "batch_fill_count": "fill_count", "busy_seconds_total": "busy_seconds",
          "inferences_total": "inferences", "tokens_total": "tokens", "token_slots_total": "token_slots"}


def parse(text: str) -> Counters:
    """Prometheus exposition text -> Counters. Unknown metrics are ignored; malformed text raises ValueError."""
    c = Counters()
    by_code: dict[str, float] = defaultdict(float)
    buckets: dict[float, float] = defaultdict(float)
    busy_copies = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if not name.startswith(PREFIX):
                continue
            name = name[len(PREFIX):]
            if name == "requests_total":
                by_code[labels.get("code", "")] += value
            elif name == "request_duration_seconds_bucket":
                buckets[float(labels["le"])] += value
            elif name == "queue_depth":
                c.queue_depth = (c.queue_depth or 0.0) + value
            elif name in SUMMED:
                setattr(c, SUMMED[name], getattr(c, SUMMED[name]) + value)
                if name == "busy_seconds_total":
                    busy_copies.add((labels.get("group"), labels.get("copy")))
            elif name == "requests_in_flight":
                c.in_flight = (c.in_flight or 0.0) + value
            elif name == "ready":
                c.ready = min(value, c.ready) if c.ready is not None else value
    c.requests_by_code = dict(by_code)
    c.requests = sum(by_code.values())
    c.duration_buckets = dict(buckets)
    c.copies = len(busy_copies)
    return c


@dataclass
class Rates:
    """What happened between two scrapes `dt` seconds apart."""

    rps: float
    errors_ps: float            # responses with a code other than 2xx, per second
    p99_s: float | None         # from the duration histogram's bucket deltas (None: no request)
    queue_depth: float | None   # now
    batch_fill: float | None    # mean items / bucket batch size of the batches executed
    busy: float | None          # mean fraction of time each copy spent executing (0..1)
    ready: float | None
    padding: float | None = None    # share of the executed token positions that were padding (0..1)


def rates(before: Counters, after: Counters, dt: float) -> Rates:
    dt = max(dt, 1e-9)
    # a restarted group resets its counters: treat a drop as a fresh start, never as negative work
    def delta(a: float, b: float) -> float:
        return b - a if b >= a else b

    done = delta(before.requests, after.requests)
    ok_before = sum(v for k, v in before.requests_by_code.items() if k.startswith("2"))
    ok_after = sum(v for k, v in after.requests_by_code.items() if k.startswith("2"))
    errors = max(done - delta(ok_before, ok_after), 0.0)
    buckets = [(le, delta(before.duration_buckets.get(le, 0.0), n)) for le, n in after.duration_buckets.items()]
    fills = delta(before.fill_count, after.fill_count)
    fill = delta(before.fill_sum, after.fill_sum) / fills if fills > 0 else None
    busy = (delta(before.busy_seconds, after.busy_seconds) / dt / after.copies) if after.copies else None
    slots = delta(before.token_slots, after.token_slots)
    padding = 1.0 - delta(before.tokens, after.tokens) / slots if slots > 0 else None
    return Rates(rps=done / dt, errors_ps=errors / dt, p99_s=histogram_quantile(0.99, buckets),
                 queue_depth=after.queue_depth, batch_fill=fill,
                 busy=None if busy is None else min(max(busy, 0.0), 1.0), ready=after.ready, padding=padding)
