"""Statistics bench and top report: nearest-rank percentiles, histogram quantiles, /metrics deltas."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from neuronserve.measure import scrape
from neuronserve.measure.stats import histogram_quantile, percentile, summarize


def test_nearest_rank_percentiles_of_a_known_set():
    # the textbook nearest-rank example: ranks ceil(p/100 * 5)
    values = [15, 20, 35, 40, 50]
    assert [percentile(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    hundred = list(range(1, 101))
    assert (percentile(hundred, 50), percentile(hundred, 90), percentile(hundred, 99)) == (50, 90, 99)
    ten = list(range(1, 11))
    assert (percentile(ten, 50), percentile(ten, 90), percentile(ten, 99), percentile(ten, 100)) == (5, 9, 10, 10)
    assert percentile([7.5], 0.1) == 7.5


@pytest.mark.parametrize("p", [0, -1, 100.5])
def test_percentile_rejects_out_of_range(p):
    with pytest.raises(ValueError):
        percentile([1, 2], p)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_counts_errors_by_kind_and_excludes_them_from_latency():
    latencies = [0.004, 0.001, 0.003, 0.002, 0.010, 0.005, 0.006, 0.007, 0.008, 0.009]   # unsorted on purpose
    s = summarize(latencies, ["http 503", "timeout", "http 503"], window_s=2.0)
    assert s.ok == 10 and s.throughput == 5.0
    assert s.errors == {"http 503": 2, "timeout": 1} and s.error_count == 3
    assert (s.p50, s.p90, s.p99, s.max) == (0.005, 0.009, 0.010, 0.010)
    assert s.mean == pytest.approx(0.0055)


def test_summary_of_nothing_but_errors():
    s = summarize([], ["connection refused"], window_s=1.0)
    assert s.ok == 0 and s.throughput == 0 and s.p99 is None and s.errors == {"connection refused": 1}


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 10), (0.5, 60), (1.0, 100), (float("inf"), 100)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 40 / 50)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 39 / 40)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)
    # a rank in the +Inf bucket answers the highest finite bound
    assert histogram_quantile(0.9, [(0.1, 10), (float("inf"), 20)]) == 0.1
    assert histogram_quantile(0.99, [(0.1, 0), (float("inf"), 0)]) is None
    assert histogram_quantile(0.5, []) is None


def _registry():
    reg = CollectorRegistry()
    labels = ["model", "group"]
    m = {
        "requests": Counter("neuronserve_requests_total", "", labels + ["code"], registry=reg),
        "duration": Histogram("neuronserve_request_duration_seconds", "", labels, registry=reg,
                              buckets=(0.005, 0.01, 0.05, 0.1)),
        "queue": Gauge("neuronserve_queue_depth", "", labels, registry=reg),
        "fill": Histogram("neuronserve_batch_fill", "", labels, registry=reg, buckets=(0.25, 0.5, 1.0)),
        "busy": Counter("neuronserve_busy_seconds_total", "", labels + ["copy"], registry=reg),
        "inferences": Counter("neuronserve_inferences_total", "", labels, registry=reg),
        "ready": Gauge("neuronserve_ready", "", labels, registry=reg),
    }
    return reg, m


def test_rates_between_two_scrapes_of_real_exposition_text():
    reg, m = _registry()
    g = dict(model="bert", group="bert-0")
    m["ready"].labels(**g).set(1)
    m["requests"].labels(code="200", **g).inc(100)
    m["busy"].labels(copy="0", **g).inc(3.0)
    m["busy"].labels(copy="1", **g).inc(1.0)
    before = scrape.parse(generate_latest(reg).decode())
    assert before.requests == 100 and before.copies == 2 and before.ready == 1

    for _ in range(98):
        m["requests"].labels(code="200", **g).inc()
        m["duration"].labels(**g).observe(0.003)
    for _ in range(2):
        m["requests"].labels(code="503", **g).inc()
        m["duration"].labels(**g).observe(0.08)
    m["fill"].labels(**g).observe(0.5)
    m["fill"].labels(**g).observe(1.0)
    m["busy"].labels(copy="0", **g).inc(1.5)
    m["busy"].labels(copy="1", **g).inc(0.5)
    m["queue"].labels(**g).set(7)
    after = scrape.parse(generate_latest(reg).decode())

    r = scrape.rates(before, after, dt=2.0)
    assert r.rps == 50.0 and r.errors_ps == 1.0
    assert r.queue_depth == 7 and r.batch_fill == 0.75 and r.ready == 1
    assert r.busy == pytest.approx((1.5 + 0.5) / 2.0 / 2)
    # rank 99 of 100 falls in the (0.05, 0.1] bucket holding the two slow requests
    assert r.p99_s == pytest.approx(0.05 + 0.05 * (99 - 98) / 2)


def test_a_restarted_group_does_not_give_negative_rates():
    reg, m = _registry()
    g = dict(model="bert", group="bert-0")
    m["requests"].labels(code="200", **g).inc(500)
    before = scrape.parse(generate_latest(reg).decode())
    reg2, m2 = _registry()
    m2["requests"].labels(code="200", **g).inc(10)
    r = scrape.rates(before, scrape.parse(generate_latest(reg2).decode()), dt=1.0)
    assert r.rps == 10.0 and r.p99_s is None and r.busy is None


def test_parse_rejects_garbage():
    with pytest.raises(ValueError):
        scrape.parse("neuronserve_requests_total{code=\"200\" 1\n")
