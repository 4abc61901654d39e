"""Latency statistics for `bench` and `top`: exact percentiles of a sample, and quantiles of a histogram.

Percentiles of a measured sample use the **nearest-rank** method: the p-th percentile of n sorted values is
the value at rank ceil(p/100 * n) (1-based), so it is always one of the measured latencies, never an
interpolation, and p100 is the maximum. For n = 10 values 1..10: p50 = 5, p90 = 9, p99 = 10.

Quantiles of a Prometheus histogram (what `top` gets from a group's /metrics) follow Prometheus'
`histogram_quantile`: find the bucket holding the rank and interpolate linearly inside it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank p-th percentile (0 < p <= 100) of values already sorted ascending."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is outside (0, 100]")
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


@dataclass
class Summary:
    """What one load level measured. Latencies in seconds; throughput counts successful requests only."""

    ok: int
    errors: dict[str, int]          # kind ("http 503", "timeout", "connection", ...) -> count
    window_s: float                 # measured window: ramp end -> last measured completion
    throughput: float               # successful requests per second over the window
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    extra: dict = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def summarize(latencies: Iterable[float], errors: Iterable[str], window_s: float) -> Summary:
    """Summary of successful latencies and error kinds measured over `window_s` seconds."""
    lat = sorted(latencies)
    kinds = dict(sorted(Counter(errors).items()))
    ok = len(lat)
    throughput = ok / window_s if window_s > 0 else 0.0
    if not lat:
        return Summary(ok, kinds, window_s, throughput, None, None, None, None, None)
    return Summary(ok, kinds, window_s, throughput, sum(lat) / ok,
                   *(percentile(lat, p) for p in PERCENTILES), lat[-1])


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus-style quantile (0 <= q <= 1) of cumulative buckets [(upper bound, count <= bound), ...].

    Linear interpolation inside the bucket that holds rank q * total; the lowest bucket starts at 0; a rank in
    the +Inf bucket answers the highest finite bound. None when the histogram holds no observations.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > prev_count:
            if math.isinf(bound):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = (bound if not math.isinf(bound) else prev_bound), count
    return prev_bound
