"""The `neuronserve` command: a thin layer over functions the tests call directly.

Every command reads one config (`--config`, default /etc/neuronserve/neuronserve.toml plus conf.d/*.toml).
Errors a user can fix print one readable message and exit 2 (config, plan) or 1 (everything else).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from neuronserve import __version__
from neuronserve.errors import NeuronserveError

CONFIG_HELP = "Config file; conf.d/*.toml beside it are merged in name order."


def fail_cleanly(fn):
    """Turn NeuronserveError into `neuronserve: error: ...` and its exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NeuronserveError as e:
            click.echo(f"neuronserve: error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def config_option(fn):
    return click.option("--config", "-c", "config_path", type=click.Path(path_type=Path, dir_okay=False),
                        default=None, show_default="/etc/neuronserve/neuronserve.toml", help=CONFIG_HELP)(fn)


def backend_option(fn):
    return click.option("--backend", type=click.Choice(["auto", "neuron", "cuda", "cpu"]), default=None,
                        help="Override server.backend from the config.")(fn)


def load_config(config_path: Path | None, backend: str | None = None):
    from neuronserve import config

    cfg = config.load(config_path)
    if backend:
        cfg.server.backend = backend
    return cfg


def load_plan(config_path: Path | None, backend: str | None = None):
    from neuronserve.devices import discover_host
    from neuronserve.plan import make_plan

    cfg = load_config(config_path, backend)
    return make_plan(cfg, discover_host(cfg.server.backend))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="neuronserve")
def main():
    """Serve Hugging Face models on every NeuronCore, GPU or CPU core of this host.

    \b
    Typical use on an Inf2 host:
      neuronserve doctor                    # is the driver, runtime and Python environment right?
      neuronserve compile bert-qa           # trace [models.bert-qa] for this accelerator
      neuronserve plan                      # which core groups, ports and pinning the config gives
      neuronserve apply                     # render units + nginx, start or roll the groups
      neuronserve status                    # per group: unit, PID, cores, ready, requests/s
      neuronserve bench --concurrency 16    # throughput and latency through nginx
      neuronserve top                       # live per-core utilization beside each group

    Everything is driven by /etc/neuronserve/neuronserve.toml (see `neuronserve config --reference`).
    """


@main.command("config")
@config_option
@click.option("--reference", is_flag=True, help="Print every setting with its default and meaning, then exit.")
@fail_cleanly
def config_cmd(config_path, reference):
    """Check the config file and print the merged result.

    Exits 2 with `file:line: key: message` for each problem found.
    """
    from neuronserve import config

    if reference:
        for key, default, doc in config.settings_reference():
            click.echo(f"{key} = {default}\n    {doc}" if doc else f"{key} = {default}")
        return
    cfg = load_config(config_path)
    click.echo(f"# ok: {', '.join(str(s) for s in cfg.sources)}")
    click.echo(cfg.model_dump_json(indent=2))


@main.command("plan")
@config_option
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@fail_cleanly
def plan_cmd(config_path, backend, as_json):
    """Show the core groups the config gives on this host, without changing anything.

    Each group is one gunicorn process (one systemd unit) that owns its cores, listens on 127.0.0.1 and
    holds `copies` copies of its model. nginx spreads requests over the groups of a model.
    """
    import json

    plan = load_plan(config_path, backend)
    if as_json:
        click.echo(json.dumps({
            "backend": plan.host.backend, "kind": plan.host.kind, "python": plan.python,
            "groups": [{"name": g.name, "unit": g.unit, "model": g.model, "cores": g.cores, "cpus": g.cpus,
                        "port": g.port, "env": g.env} for g in plan.groups]}, indent=2))
        return
    click.echo(f"backend {plan.host.backend} ({plan.host.kind}, {len(plan.host.cores)} cores, "
               f"found by {plan.host.source}); python {plan.python}")
    click.echo(f"{'GROUP':<24} {'CORES':<10} {'CPUS':<12} {'PORT':<6} COPIES  UNIT")
    for g in plan.groups:
        click.echo(f"{g.name:<24} {g.core_list:<10} {g.settings.cpus:<12} {g.port:<6} {g.settings.copies:<7} {g.unit}")


if __name__ == "__main__":
    main()
