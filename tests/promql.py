"""What the Prometheus tests share: the tools, the shipped dashboard's queries, the series the server exports, and
the metric names a PromQL expression reads."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from neuronserve.server.metrics import Metrics

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(not PROMTOOL, reason="promtool is not installed (Debian's prometheus package: "
                                                         "make sysdeps)")
needs_prometheus = pytest.mark.skipif(not (PROMTOOL and PROMETHEUS),
                                      reason="prometheus is not installed (Debian's prometheus package: make sysdeps)")
DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "neuronserve.json"
RULES_TEST = Path(__file__).parent / "data" / "prometheus" / "rules-test.yml"

# the sample names each metric type exposes (prometheus_client, *_created disabled by server/metrics.py)
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"), "info": ("_info",)}
# what Prometheus itself records for every target it scrapes
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                 "scrape_series_added"}
# Grafana's variables, as the dashboard's queries use them, made plain PromQL
GRAFANA_VARS = {"$__rate_interval": "1m", "$host": ".*", "$model": ".*"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# an identifier that starts a token ($grafana variables and exponents like 1e-3 do not) and calls nothing
_NAME = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*(?![\w:]|\s*\()")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)")


def exported_series() -> set[str]:
    """Every sample name a group's /metrics can hold, from the server's own registry (not a list kept here)."""
    return {family.name + suffix for family in Metrics("m", "g").registry.collect()
            for suffix in SUFFIXES[family.type]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: label matchers, ranges, strings, grouping labels, functions and
    keywords taken out."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _NAME.findall(text) if name not in _KEYWORDS}


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """Every query in a Grafana dashboard: its panels' targets and its query variables'."""
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(query)
    return exprs


def read_names(query: str) -> set[str]:
    """metric_names, also for Grafana's label_values(metric, label) variable queries."""
    m = _LABEL_VALUES.match(query)
    return {m.group(1)} if m else metric_names(query)


def plain(query: str) -> str:
    """A dashboard query with Grafana's variables replaced, for Prometheus itself."""
    for var, value in GRAFANA_VARS.items():
        query = query.replace(var, value)
    return query
