"""Prometheus for real against the running stack: every group's /metrics passes `promtool check metrics`, and a
Prometheus started here with the files `render --prometheus` writes scrapes every group through the nginx front
(/_neuronserve/metrics/<group>), evaluates every rule, and answers every dashboard query."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from promql import PROMETHEUS, PROMTOOL, dashboard_queries, needs_prometheus, needs_promtool, plain
from server_kit import free_port

from neuronserve import monitoring
from neuronserve.config import MonitoringSection
from neuronserve.plan import loopback
from neuronserve.render import write_files

SCRAPE_S = 1
WAIT_S = 60.0


def infer(stack, n: int) -> None:
    for i in range(n):
        r = httpx.post(stack.front_url + "/models/emb", json={"inputs": f"series number {i}"}, timeout=30)
        assert r.status_code == 200, r.text


def poll(what: str, check, timeout: float = WAIT_S):
    """check() until it returns something truthy; its last value in the failure otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s (last: {got!r})")
        time.sleep(0.5)


@needs_promtool
def test_every_groups_metrics_pass_promtool(stack):
    infer(stack, 3)        # counters and histograms with samples, not only their headers
    for group, url in stack.group_urls.items():
        text = httpx.get(url + "/metrics", timeout=10).text
        assert "neuronserve_requests_total{" in text and "neuronserve_queue_capacity{" in text
        result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
            (group, result.stdout + result.stderr)


@pytest.fixture
def prometheus(stack, tmp_path):
    """A Prometheus with the rendered config (scraping every second), ready; its API's base URL."""
    out = tmp_path / "prometheus"
    write_files(monitoring.prometheus_files(out, stack.layout, monitoring.fleet(stack.plan),
                                            MonitoringSection(scrape_interval_s=SCRAPE_S)))
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={out / monitoring.CONFIG_FILE}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address={url.removeprefix('http://')}"],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        def ready():
            assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                return httpx.get(url + "/-/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        poll("prometheus ready", ready)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api(url: str, path: str, **params):
    r = httpx.get(url + "/api/v1/" + path, params=params, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    return r.json()["data"]


@needs_prometheus
def test_prometheus_scrapes_every_group_through_the_front(stack, prometheus):
    front = loopback(stack.plan.config.nginx.listen)
    planned = {g.name for g in stack.plan.groups}

    def all_up():
        targets = api(prometheus, "targets", state="active")["activeTargets"]
        return len(targets) == len(planned) and all(t["health"] == "up" for t in targets) and targets

    targets = poll("every target up", all_up)
    assert {(t["labels"]["host"], t["labels"]["model"], t["labels"]["group"], t["scrapeUrl"]) for t in targets} == \
        {(front, "emb", g, f"http://{front}/_neuronserve/metrics/{g}") for g in planned}

    ready = api(prometheus, "query", query="neuronserve_ready")["result"]
    assert {(r["metric"]["host"], r["metric"]["group"], r["metric"]["job"], r["value"][1]) for r in ready} == \
        {(front, g, monitoring.JOB, "1") for g in planned}
    # the groups' own model and group labels kept, not renamed exported_*
    assert not any(k.startswith("exported_") for r in ready for k in r["metric"])


@needs_prometheus
def test_rules_evaluate_and_dashboard_queries_run_on_real_series(stack, prometheus):
    poll("first scrape", lambda: api(prometheus, "query", query="neuronserve_ready")["result"])
    infer(stack, 10)

    def rate_recorded():
        rows = api(prometheus, "query", query="sum(group:neuronserve_requests:rate) > 0")["result"]
        return rows and float(rows[0]["value"][1])

    poll("requests/s recorded from the scrapes", rate_recorded)

    def rules_evaluated():
        rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
        return all(r["health"] != "unknown" for r in rules) and rules

    rules = poll("every rule evaluated", rules_evaluated)
    assert {r["health"] for r in rules} == {"ok"}, [(r["name"], r.get("lastError")) for r in rules]
    assert not [r for r in rules if r.get("type") == "alerting" and r["name"] == "NeuronserveGroupDown"
                and r["state"] != "inactive"]
    empty = []
    for query in dashboard_queries():
        if query.startswith("label_values("):
            continue
        if not api(prometheus, "query", query=plain(query))["result"]:
            empty.append(query)
    # only the errors panel may be empty: this stack answered every request with 200
    assert all('code!~"2.."' in q for q in empty), empty
