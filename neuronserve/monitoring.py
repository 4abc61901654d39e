"""Config + plan -> the files a Prometheus needs to watch neuronserve: its config, the targets, the rules.

The groups listen on 127.0.0.1, so Prometheus reaches each one through its host's nginx front, at
/_neuronserve/metrics/<group>: one file_sd target per (host, group), labelled host, model and group. Every host
in [monitoring] hosts is taken to serve the plan's groups (one config across the fleet); a caller with hosts that
differ passes each host's groups to `prometheus_files` itself. The alert thresholds come from [monitoring] too.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from neuronserve.config import MonitoringSection
from neuronserve.errors import RenderError
from neuronserve.layout import Layout
from neuronserve.plan import Group, Plan, loopback
from neuronserve.render import render_template, template_env

CONFIG_FILE = "prometheus.yml"
TARGETS_FILE = "neuronserve-targets.yml"
RULES_FILE = "neuronserve-rules.yml"
JOB = "neuronserve"
# the front's location for one group's /metrics (nginx.conf.j2)
METRICS_PATH = "/_neuronserve/metrics/{group}"
# rate() wants at least four samples in its window to survive one missed scrape
RATE_SAMPLES = 4


def fleet(plan: Plan) -> dict[str, list[Group]]:
    """Each front Prometheus scrapes -> the groups behind it: [monitoring] hosts, or this host's front, each
    serving the plan's groups."""
    cfg = plan.config
    if not cfg.nginx.enabled:
        raise RenderError("Prometheus reaches the groups through the nginx front (/_neuronserve/metrics/<group>), "
                          "and nginx.enabled is false: enable it, or scrape each group's 127.0.0.1:<port>/metrics "
                          "from a Prometheus on this host")
    return {host: plan.groups for host in cfg.monitoring.hosts or [loopback(cfg.nginx.listen)]}


def prometheus_files(out_dir: Path, layout: Layout, hosts: Mapping[str, Sequence[Group]],
                     settings: MonitoringSection) -> dict[Path, str]:
    """out_dir/prometheus.yml, neuronserve-targets.yml and neuronserve-rules.yml: path -> content, for
    render.write_files. `hosts` maps each front's address:port to the groups it serves."""
    jenv = template_env(layout)
    targets = [dict(host=host, path=METRICS_PATH.format(group=g.name), model=g.model, group=g.name)
               for host, groups in hosts.items() for g in groups]
    out_dir = Path(out_dir)
    return {
        out_dir / CONFIG_FILE: render_template(jenv, "prometheus.yml.j2", job=JOB, settings=settings,
                                       targets_file=TARGETS_FILE, rules_file=RULES_FILE),
        out_dir / TARGETS_FILE: render_template(jenv, "prometheus-targets.yml.j2", targets=targets),
        out_dir / RULES_FILE: render_template(jenv, "prometheus-rules.yml.j2", job=JOB, settings=settings,
                                      window=f"{RATE_SAMPLES * settings.scrape_interval_s}s",
                                      p99_objective_s=settings.p99_objective_ms / 1000),
    }


def render_prometheus(plan: Plan, layout: Layout, out_dir: Path) -> dict[Path, str]:
    """What `neuronserve render --prometheus DIR` writes: the plan's groups on every host of [monitoring]."""
    return prometheus_files(out_dir, layout, fleet(plan), plan.config.monitoring)
