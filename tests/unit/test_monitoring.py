"""The Prometheus files `render --prometheus` writes, checked by promtool itself: the config with its targets and
rules beside it (`check config`), the rules (`check rules`), and each alert firing past its configured threshold
and not short of it (`test rules` on tests/data/prometheus/rules-test.yml). The shipped Grafana dashboard and the
rules read only series a group exports, taken from the server's own registry."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promql import (DASHBOARD, PROMTOOL, RULES_TEST, SCRAPE_SERIES, dashboard_queries, exported_series,
                    metric_names, needs_promtool, plain, read_names)

from neuronserve import config, monitoring
from neuronserve.devices import cpu
from neuronserve.errors import ConfigError, RenderError
from neuronserve.layout import Layout
from neuronserve.plan import make_plan
from neuronserve.render import HEADER, write_files

MODELS = """
[models.emb]
task = "feature-extraction"
source = "/srv/src/emb"
copies = 1
groups = 1

[models.cls]
task = "text-classification"
source = "/srv/src/cls"
groups = 1
"""
# what rules-test.yml was written for
THRESHOLDS = 'hosts = ["h1:8080"]\np99_objective_ms = 200\nqueue_saturation = 0.75\npadding_waste = 0.4\n'


def load(tmp_path: Path, monitoring_keys: str = "", nginx: str = "") -> config.Config:
    path = tmp_path / "neuronserve.toml"
    path.write_text(f'[server]\nbackend = "cpu"\n[nginx]\nlisten = "0.0.0.0:18080"\n{nginx}\n'
                    f"[monitoring]\n{monitoring_keys}\n{MODELS}")
    return config.load(path)


def rendered(tmp_path: Path, monitoring_keys: str = "", out: str = "prometheus") -> dict[Path, str]:
    cfg = load(tmp_path, monitoring_keys)
    plan = make_plan(cfg, cpu.discover(affinity={0, 1}), python=sys.executable)
    files = monitoring.render_prometheus(plan, Layout(tmp_path / "root", cfg), tmp_path / out)
    write_files(files)
    return files


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rules_of(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def test_targets_one_per_host_and_group_through_each_front(tmp_path):
    files = rendered(tmp_path, 'hosts = ["10.0.0.5:8080", "[fd00::6]:8080"]')
    targets = yaml.safe_load(files[tmp_path / "prometheus" / monitoring.TARGETS_FILE])
    got = {(t["targets"][0], t["labels"]["__metrics_path__"], t["labels"]["host"], t["labels"]["model"],
            t["labels"]["group"]) for t in targets}
    assert all(len(t["targets"]) == 1 for t in targets) and len(targets) == 4
    assert got == {(h, f"/_neuronserve/metrics/{g}", h, g.rsplit("-", 1)[0], g)
                   for h in ("10.0.0.5:8080", "[fd00::6]:8080") for g in ("emb-0", "cls-0")}
    assert all(HEADER in content for content in files.values())


def test_without_hosts_this_hosts_front_is_scraped(tmp_path):
    targets = yaml.safe_load(rendered(tmp_path)[tmp_path / "prometheus" / monitoring.TARGETS_FILE])
    assert {t["labels"]["host"] for t in targets} == {t["targets"][0] for t in targets} == {"127.0.0.1:18080"}


def test_rules_carry_the_configured_thresholds(tmp_path):
    files = rendered(tmp_path, THRESHOLDS + "scrape_interval_s = 5\n")
    exprs = {r.get("alert") or r["record"]: r["expr"] for r in rules_of(tmp_path / "prometheus" /
                                                                        monitoring.RULES_FILE)}
    assert exprs["NeuronserveLatencyOverObjective"].endswith("> 0.2")
    assert exprs["NeuronserveQueueSaturated"].endswith("> 0.75")
    assert exprs["NeuronservePaddingWaste"].endswith("> 0.4")
    assert "[20s]" in exprs["group:neuronserve_padding:waste"]       # rates span 4 scrapes
    assert "scrape_interval: 5s" in files[tmp_path / "prometheus" / monitoring.CONFIG_FILE]


@pytest.mark.parametrize("hosts, message", [
    ('["10.0.0.5"]', "is not address:port"), ('["10.0.0.5:99999"]', "is not address:port"),
    ('["a b:80"]', "is not address:port"), ('["h:80", "h:80"]', "listed twice")])
def test_bad_hosts_are_refused_with_file_and_line(tmp_path, hosts, message):
    with pytest.raises(ConfigError, match=rf"neuronserve.toml:\d+: monitoring.hosts: .*{message}"):
        load(tmp_path, f"hosts = {hosts}")


def test_without_a_front_there_is_nothing_to_scrape_through(tmp_path):
    cfg = load(tmp_path, nginx="enabled = false")
    plan = make_plan(cfg, cpu.discover(affinity={0, 1}), python=sys.executable)
    with pytest.raises(RenderError, match="nginx.enabled is false"):
        monitoring.render_prometheus(plan, Layout(tmp_path / "root", cfg), tmp_path / "out")


@needs_promtool
def test_promtool_checks_the_config_with_its_targets_and_rules(tmp_path):
    rendered(tmp_path, 'hosts = ["10.0.0.5:8080", "10.0.0.6:8080"]')
    result = promtool("check", "config", str(tmp_path / "prometheus" / monitoring.CONFIG_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    # the targets file is read too (a missing one would only be a warning)
    assert "WARNING" not in result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout
    rules = promtool("check", "rules", str(tmp_path / "prometheus" / monitoring.RULES_FILE))
    assert rules.returncode == 0, rules.stdout + rules.stderr


@needs_promtool
def test_each_alert_fires_past_its_configured_threshold_and_not_short_of_it(tmp_path):
    out = tmp_path / "prometheus"
    rendered(tmp_path, THRESHOLDS)
    (out / RULES_TEST.name).write_text(RULES_TEST.read_text())
    result = promtool("test", "rules", RULES_TEST.name, cwd=out)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert tested == {r["alert"] for r in rules_of(out / monitoring.RULES_FILE) if "alert" in r}
    # the same series at the default thresholds (80 %, 50 %, 500 ms) stay short of them: the config decides
    defaults = tmp_path / "defaults"
    rendered(tmp_path, 'hosts = ["h1:8080"]', out="defaults")
    (defaults / RULES_TEST.name).write_text(RULES_TEST.read_text())
    result = promtool("test", "rules", RULES_TEST.name, cwd=defaults)
    assert result.returncode != 0
    for alert in ("NeuronserveQueueSaturated", "NeuronservePaddingWaste", "NeuronserveLatencyOverObjective"):
        assert f"alertname: {alert}," in result.stdout + result.stderr, alert
    assert "alertname: NeuronserveGroupDown," not in result.stdout + result.stderr


def test_metric_names_of_an_expression():
    assert metric_names('histogram_quantile(0.99, sum by (host, le) (rate(a_bucket{code!~"2.."}[5m])))') == {"a_bucket"}
    assert metric_names("1 - sum(rate(a_total[1m])) by (group) / ignoring(x) b_total offset 5m > 1e-3") == \
        {"a_total", "b_total"}
    assert metric_names('up{job="x"} == 0 or max by (g) (c:d:e) unless count_values("f", g)') == {"up", "c:d:e", "g"}
    # a sample name exists only with its type's suffix: a counter has no bare name, a gauge no _total
    exported = exported_series()
    assert {"neuronserve_requests_total", "neuronserve_queue_depth", "neuronserve_request_duration_seconds_bucket",
            "neuronserve_queue_capacity"} <= exported
    assert not {"neuronserve_requests", "neuronserve_queue_depth_total", "neuronserve_ready_count"} & exported


def test_dashboard_reads_only_what_the_server_exports():
    queries = dashboard_queries()
    assert len(queries) >= 15
    read = set().union(*(read_names(q) for q in queries))
    assert read and read <= exported_series(), read - exported_series()
    # every panel the issue asks for
    for name in ("neuronserve_requests_total", "neuronserve_request_duration_seconds_bucket",
                 "neuronserve_queue_depth", "neuronserve_batch_size_sum", "neuronserve_batch_fill_sum",
                 "neuronserve_tokens_total", "neuronserve_token_slots_total", "neuronserve_busy_seconds_total",
                 "neuronserve_ready", "neuronserve_weight_bytes"):
        assert name in read, name


def test_rules_read_only_what_the_server_and_the_scrape_export(tmp_path):
    rendered(tmp_path)
    rules = rules_of(tmp_path / "prometheus" / monitoring.RULES_FILE)
    recorded = {r["record"] for r in rules if "record" in r}
    read = set().union(*(metric_names(r["expr"]) for r in rules))
    assert read <= exported_series() | SCRAPE_SERIES | recorded, read - exported_series() - recorded


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    """promtool parses each panel's query, Grafana's variables filled in, as a recording rule."""
    panels = [q for q in dashboard_queries() if not q.startswith("label_values(")]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": plain(q)} for i, q in enumerate(panels)]}]}))
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(panels)} rules found" in result.stdout
    assert DASHBOARD.is_file()


def test_cli_render_prometheus(tmp_path):
    from click.testing import CliRunner

    from neuronserve.cli import main

    load(tmp_path, 'hosts = ["10.0.0.5:8080"]')
    out = tmp_path / "prom"
    args = ["render", "--config", str(tmp_path / "neuronserve.toml"), "--prometheus", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == sorted([monitoring.CONFIG_FILE, monitoring.TARGETS_FILE,
                                                            monitoring.RULES_FILE])
    assert f"changed 3 file(s) under {out}" in first.output
    assert not (tmp_path / "root").exists() and "10-neuronserve.conf" not in first.output   # only Prometheus's
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.output.startswith("changed 0 file(s)")


SHIPPED_HEADER = ("# neuronserve's rules as `neuronserve render --prometheus DIR` writes them with the default "
                  "[monitoring] thresholds")


def test_shipped_rules_are_the_render_with_the_defaults(tmp_path):
    shipped = Path(__file__).parents[2] / "deploy" / "prometheus" / monitoring.RULES_FILE
    files = monitoring.prometheus_files(tmp_path, Layout(tmp_path / "root", config.Config()), {},
                                        config.MonitoringSection())
    # all but the first line: the render's says "edit /etc/...", the shipped copy says what it is
    first, _, rest = shipped.read_text().partition("\n")
    assert first == SHIPPED_HEADER
    assert rest == files[tmp_path / monitoring.RULES_FILE].partition("\n")[2], \
        f"{shipped} is out of date: copy it from `neuronserve render --prometheus DIR` with no [monitoring] keys"
