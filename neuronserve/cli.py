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
from neuronserve.config import Task
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


def stack_root_option(fn):
    return click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
                        show_default=True,
                        help="The root the stack runs under (`neuronserve up --root DIR`); / for the systemd "
                             "units.")(fn)

def load_config(config_path: Path | None, backend: str | None = None):
    from neuronserve import config

    cfg = config.load(config_path)
    if backend:
        cfg.server.backend = backend
    return cfg


def load_plan(config_path: Path | None, backend: str | None = None):
    from neuronserve.context import HostContext

    return HostContext(load_config(config_path, backend)).plan


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
    holds `copies` copies of its model. nginx spreads requests over the groups of a model. For a compiled
    model, MEMORY is what the group's weights take (host on the CPU, each accelerator core's otherwise); a
    plan that needs more device memory than a core has is refused with the numbers.
    """
    import json

    plan = load_plan(config_path, backend)
    if as_json:
        click.echo(json.dumps({
            "backend": plan.host.backend, "kind": plan.host.kind, "python": plan.python,
            "groups": [{"name": g.name, "unit": g.unit, "model": g.model, "cores": g.cores, "cpus": g.cpus,
                        "port": g.port, "grpc_port": g.grpc_port, "env": g.env,
                        "memory": _memory_json(plan.footprints.get(g.name))} for g in plan.groups]}, indent=2))
        return
    click.echo(f"backend {plan.host.backend} ({plan.host.kind}, {len(plan.host.cores)} cores, "
               f"found by {plan.host.source}); python {plan.python}")
    click.echo(f"{'GROUP':<24} {'CORES':<10} {'CPUS':<12} {'PORT':<6} COPIES  {'UNIT':<34} MEMORY")
    for g in plan.groups:
        f = plan.footprints.get(g.name)
        memory = "not compiled yet" if f is None else f.why
        click.echo(f"{g.name:<24} {g.core_list:<10} {g.settings.cpus:<12} {g.port:<6} {g.settings.copies:<7} "
                   f"{g.unit:<34} {memory}")


def _memory_json(f) -> dict | None:
    return None if f is None else {"host_bytes": f.host_bytes, "device_bytes_per_core": f.device_bytes_per_core,
                                   "device_capacity_per_core": f.device_capacity, "how": f.why}


@main.command("doctor")
@config_option
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: {ok, findings: [{status, what, fix}]}.")
def doctor_cmd(config_path, backend, as_json):
    """Check that this host can serve the config, and say how to fix what is wrong.

    \b
    Looks at: the config; the devices (neuron-ls or sysfs, nvidia-smi, CPUs);
    /dev/neuron* permissions for server.user; a Python that imports
    torch-neuronx (Neuron) or torch; nginx; the plan; whether the groups'
    ports and nginx.listen are free; processes holding NeuronCores (a core
    serves one process); compiled models matching this host.

    Each finding is ok, warn or fail. Exits 1 when any check fails. A missing
    config is reported and the rest is checked with the defaults.
    """
    import json

    from neuronserve.operate import doctor

    findings = doctor.diagnose(config_path, backend=backend)
    click.echo(json.dumps(doctor.as_dict(findings), indent=2) if as_json else doctor.as_text(findings))
    sys.exit(1 if doctor.failed(findings) else 0)


@main.command("env")
@config_option
@click.option("--link", is_flag=True,
              help="Join the ML environment: server.python, else the newest DLAMI venv that imports the framework.")
@click.option("--python", "ml_python", metavar="PYTHON",
              help="Join this interpreter's environment instead (implies --link).")
@click.option("--unlink", is_flag=True, help="Remove the join: only neuronserve's own packages remain.")
@fail_cleanly
def env_cmd(config_path, link, ml_python, unlink):
    """Show or set where neuronserve's Python finds torch, torch-neuronx and transformers.

    \b
    The .deb/.rpm install neuronserve into /opt/neuronserve/venv with its own dependencies only; the ML
    stack stays in the host's ML environment (a DLAMI venv, or server.python). --link writes a .pth file
    into neuronserve's site-packages that appends that environment's site-packages after its own, so
    neuronserve's packages win and torch & co. come from the host. Both must run the same Python X.Y.
    The package's postinst runs `neuronserve env --link`; run it again after the ML environment changed.
    """
    from neuronserve.operate import mlenv

    if unlink:
        click.echo("unlinked" if mlenv.unlink() else "nothing was linked")
        return
    if link or ml_python:
        python = ml_python or mlenv.find_ml_python(load_config(config_path))
        if not python:
            raise mlenv.EnvError("no ML environment found (server.python is auto and no DLAMI venv imports "
                                 "the framework); name one: neuronserve env --link --python PATH")
        ml = mlenv.link(python)
        click.echo(f"linked {ml.python} (Python {ml.version}): {', '.join(ml.site_dirs)}")
    click.echo(f"neuronserve: {sys.executable} (Python {mlenv.own_version()})")
    click.echo(f"ML environment: {mlenv.joined() or 'none joined'}")
    for module, origin in mlenv.module_origins().items():
        click.echo(f"  {module:<14} {origin or '-'}")


def _list_of(kind: type, what: str):
    """A click callback: '1,4,16' -> [kind(1), kind(4), kind(16)]; unset -> []."""

    def parse(ctx, param, value):
        if not value:
            return []
        try:
            return [kind(x) for x in value.replace(" ", "").split(",") if x]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {what}") from None

    return parse


_number_list = _list_of(float, "numbers")
_int_list = _list_of(int, "integers")


@main.command("bench")
@config_option
@backend_option
@click.option("--model", help="Which [models.<name>] to load (default: the first one in the config).")
@click.option("--concurrency", callback=_number_list, metavar="N[,N...]",
              help="Closed loop: keep N requests in flight; a list measures each level in turn (default 8).")
@click.option("--rate", callback=_number_list, metavar="R[,R...]",
              help="Open loop instead: Poisson arrivals at R requests/s, whatever the server's speed.")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS",
              help="Measured time per level (default 10).")
@click.option("--requests", "count", type=click.IntRange(1), default=None, metavar="N",
              help="Measure N requests per level instead of a duration (still stopped after --max-duration).")
@click.option("--max-duration", type=click.FloatRange(0, min_open=True), default=300.0, show_default=True,
              metavar="SECONDS", help="Upper bound of a --requests level.")
@click.option("--ramp", type=click.FloatRange(0), default=2.0, show_default=True, metavar="SECONDS",
              help="Load sent before each level's window and left out of its numbers.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
              metavar="SECONDS", help="A request unanswered by then counts as a 'timeout' error.")
@click.option("--connections", type=click.IntRange(1), default=64, show_default=True,
              help="Open loop: most requests in flight; later arrivals wait (and count the wait).")
@click.option("--url", help="Load this base URL instead of the nginx front (nginx.listen).")
@click.option("--direct", is_flag=True, help="Skip nginx: spread the connections over the groups' own ports.")
@click.option("--protocol", type=click.Choice(["hf", "v2"]), default="hf", show_default=True,
              help='hf: POST /models/<model> {"inputs": ...}; v2: POST /v2/models/<model>/infer, a BYTES tensor.')
@click.option("--payload", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON body to send instead of the built-in sample for the model's task.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True, help="Where bench.json, bench.csv and bench.png go.")
@click.option("--sweep", "shapes", metavar="GxC[,GxC...]",
              help="For each shape (groups x copies per group): re-plan, bring the stack up, wait ready, measure.")
@click.option("--via", type=click.Choice(["up", "apply"]), default="up", show_default=True,
              help="How --sweep brings a shape up: foreground processes (up) or the installed units (apply).")
@click.option("--ready-timeout", type=click.FloatRange(0, min_open=True), default=300.0, show_default=True,
              metavar="SECONDS", help="--sweep: how long a shape may take to become ready.")
@fail_cleanly
def bench_cmd(config_path, backend, model, concurrency, rate, duration, count, max_duration, ramp, timeout,
              connections, url, direct, protocol, payload, out, shapes, via, ready_timeout):
    """Measure throughput and latency through nginx (or each group), and the client's own CPU cost.

    \b
    Each level prints and records: requests/s, p50/p90/p99/max latency (nearest-rank
    percentiles), errors by kind, each group's share of the requests (from its
    /metrics), and the client's CPU time: on a small host the client competes with
    the server, so read throughput beside it.

    \b
    Examples:
      neuronserve bench --concurrency 1,4,16,64 --duration 20
      neuronserve bench --rate 100,200,400 --requests 5000
      neuronserve bench --direct --concurrency 8          # without nginx
      neuronserve bench --sweep 1x1,1x2,2x1,2x2 --concurrency 4,16 --duration 15

    Writes OUT/bench.json, OUT/bench.csv and OUT/bench.png (throughput and p99 against
    the level; needs matplotlib).
    """
    from neuronserve.measure import bench
    from neuronserve.config import DEFAULT_PATH
    from neuronserve.context import HostContext
    from neuronserve.operate.up import front_url_for

    ctx = HostContext(load_config(config_path, backend))
    cfg = ctx.config
    model = bench.pick_model(cfg, model)
    loads = bench.loads_from(concurrency, rate)
    opts = bench.Options(duration_s=duration if duration or count else 10.0, count=count, ramp_s=ramp,
                         timeout_s=timeout, max_duration_s=max_duration, connections=connections)
    body = payload.read_bytes() if payload else None
    if shapes:
        if url:
            raise bench.BenchError("--sweep brings its own stack up: leave out --url")
        rows = bench.sweep(cfg, ctx.host, model, bench.parse_shapes(shapes), loads, opts, workdir=out / "stacks",
                           via=via, direct=direct, ready_timeout_s=ready_timeout, protocol=protocol,
                           payload=body, config_path=config_path or DEFAULT_PATH, echo=click.echo)
    else:
        groups = bench.group_urls(ctx.plan, model)
        bases = [url] if url else (list(groups.values()) if direct else [front_url_for(cfg.nginx.listen)])
        path, data = bench.request_body(cfg.models[model].task, model, protocol, body)
        rows = bench.run_levels(bench.targets_for(bases, path, data), loads, opts, bench.metrics_of(groups),
                                click.echo)
    paths = bench.write_results(rows, out, bench.meta(cfg, model, loads, opts, sweep=shapes, direct=direct))
    if "png" not in paths:
        click.echo("note: matplotlib is not installed, so no bench.png (pip install matplotlib)", err=True)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command("top")
@config_option
@backend_option
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="Time between refreshes (and between the two samples --once compares).")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (for scripts and logs).")
@click.option("--json", "as_json", is_flag=True, help="With --once: the snapshot as JSON.")
@fail_cleanly
def top_cmd(config_path, backend, interval, once, as_json):
    """Live view of every core and every group, readable in 80x24.

    \b
    Cores: utilization and device memory from neuron-monitor (Neuron), nvidia-smi
    (CUDA) or /proc/stat (CPU). Groups, from each one's /metrics over the last
    interval: requests/s, p99 latency, queue depth, batch fill (items per bucket
    batch), padding (share of the executed token positions that were padding),
    busy (fraction of time the model copies were executing), errors/s and state
    (ready after the known-answer warm-up). A group whose /metrics does not answer
    shows as down. Quit with Ctrl-C.
    """
    from rich.console import Console

    from neuronserve.measure import top

    if as_json and not once:
        raise click.UsageError("--json goes with --once")
    viewer = top.for_plan(load_plan(config_path, backend), interval)
    try:
        if once:
            top.print_once(viewer, interval, Console(), as_json)
        else:
            top.run_live(viewer, interval, Console())
    finally:
        viewer.close()


@main.command("compile")
@config_option
@backend_option
@click.argument("models", nargs=-1)
@click.option("--source", type=click.Path(path_type=Path), help="One-off form: the local Hugging Face model directory.")
@click.option("--task", type=click.Choice(list(Task.__args__)), metavar="TASK",
              help=f"One-off form: what the model does: {', '.join(Task.__args__)}.")
@click.option("--name", help="One-off form: the model's name (default: the --out directory's name, else the source's).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="One-off form: the compiled model directory to write (default: server.model_repository/NAME).")
@click.option("--batch-sizes", callback=_int_list, default="1,4,8", show_default=True,
              help="One-off form: batch buckets.")
@click.option("--seq-lens", callback=_int_list, default="128", show_default=True,
              help="One-off form: sequence-length buckets.")
@click.option("--target", type=click.Choice(["cpu", "cuda", "inf1", "inf2", "trn1", "trn2"]),
              help="One-off form: the hardware to compile for (default: this host's); e.g. inf2 from a build host.")
@click.option("--compiler-args", help="One-off form, Neuron: compiler arguments, replacing neuron.compiler_args.")
@fail_cleanly
def compile_cmd(config_path, backend, models, source, task, name, out, batch_sizes, seq_lens, target, compiler_args):
    """Trace models for this host's accelerator: one artifact per (batch size, sequence length).

    \b
    Compiles each [models.NAME] of the config (or only the MODELs named) into
    server.model_repository/NAME: b<batch>_s<seq>.pt per bucket, the tokenizer and
    manifest.json. Sources are local model directories; nothing is downloaded.
    A failed or interrupted compile leaves the previous artifact in place.

    \b
    Examples:
      neuronserve compile                      # every configured model, for this host
      neuronserve compile bert-qa              # just [models.bert-qa]
      neuronserve compile --backend cpu minilm # for the CPU backend even on an Inf2 host
    \b
    One-off, without a config:
      neuronserve compile --source ./all-MiniLM-L6-v2 --task feature-extraction \\
          --out ./models/minilm --backend cpu --batch-sizes 1,4 --seq-lens 128
      neuronserve compile --source ./bert-squad --task question-answering --backend neuron \\
          --target inf2 --out ./models/bert-qa      # on a build host without Neuron devices
    """
    import shlex

    from neuronserve.build import compile as compiler

    if source is None:
        if task or out or name or target or compiler_args:
            raise click.UsageError("--task, --name, --out, --target and --compiler-args go with --source")
        from neuronserve.context import discover

        cfg = load_config(config_path, backend)
        display, progress = compiler.console_progress(sys.stderr.isatty())
        with display:
            done = compiler.compile_config(cfg, discover(cfg), models, progress=progress)
        for model_name, m in done:
            click.echo(_compiled_line(cfg.server.model_repository / model_name, m))
        return
    if models:
        raise click.UsageError("name configured MODELs or give --source, not both")
    if not task:
        raise click.UsageError("--source needs --task")
    from neuronserve import config

    cfg = load_config(config_path, backend) if config_path else config.Config()
    if backend:
        cfg.server.backend = backend
    backend = cfg.server.backend
    if backend == "auto":
        from neuronserve.context import discover

        backend = discover(cfg).backend
    target = target or compiler.default_target(backend, cfg)
    name = name or (out.name if out else source.name)
    out = out or cfg.server.model_repository / name
    if compiler_args is not None:
        args = shlex.split(compiler_args)
    elif backend == "neuron":
        args = cfg.neuron.inf1_compiler_args if target == "inf1" else cfg.neuron.compiler_args
    else:
        args = []
    dtype = ("float16" if cfg.cuda.half else "float32") if backend == "cuda" else None
    display, progress = compiler.console_progress(sys.stderr.isatty())
    with display:
        m = compiler.compile_model(source, out, name=name, task=task, backend=backend, target=target,
                                   batch_sizes=batch_sizes, sequence_lengths=seq_lens, compiler_args=args,
                                   dtype=dtype, progress=progress(name))
    click.echo(_compiled_line(out, m))


def _compiled_line(out: Path, m) -> str:
    buckets = " ".join(f"{b.batch}x{b.seq}" for b in m.buckets)
    return f"{m.name}: {m.task} for {m.backend} ({m.target}, {m.dtype}), buckets {buckets} -> {out}"


@main.command("apply")
@config_option
@backend_option
@click.option("--dry-run", is_flag=True, help="Show the diffs and what would be started, rolled or removed; change nothing.")
@click.option("--restart", "restart_all", is_flag=True,
              help="Roll every running group even if its files did not change (e.g. after `neuronserve compile`).")
@click.option("--ready-timeout", type=click.FloatRange(0, min_open=True), default=300.0, show_default=True,
              metavar="SECONDS", help="How long a group may take to load and warm up before apply gives up.")
@fail_cleanly
def apply_cmd(config_path, backend, dry_run, restart_all, ready_timeout):
    """Render the units and the nginx front, then start or roll the groups. Run as root.

    \b
    1. writes each group's drop-in for neuronserve@<group>.service,
       /etc/neuronserve/gunicorn/*.conf.py and the nginx front (only files that changed)
    2. systemctl daemon-reload; enable neuronserve.target and the group instances
    3. groups not running: start, wait until ready (warm-up passed), then into nginx
    4. running groups whose files changed, one at a time: mark down in nginx and
       reload it, wait for in-flight requests, stop, start, wait ready, re-admit
    5. groups the config no longer has: out of nginx, stopped, disabled, deleted;
       groups running under an earlier version's neuronserve-<group>.service are
       rolled onto their instance the same way, and the old unit removed
    6. reload nginx

    A group is always stopped before it starts again (never a HUP reload): on Neuron the new
    worker could not reserve the cores the old one holds. With two or more groups per model,
    a config change under load loses no request.
    """
    from neuronserve.operate import apply
    from neuronserve.context import HostContext

    ctx = HostContext(load_config(config_path, backend))
    plan, layout = ctx.plan, ctx.layout
    if dry_run:
        p = apply.preview(plan, layout, restart_all=restart_all)
        for c in p.changes:
            click.echo(c.diff, nl=False)
        click.echo(f"would write {len(p.changes)} file(s); start: {', '.join(p.start) or 'none'}; "
                   f"roll: {', '.join(p.roll) or 'none'}; remove: {', '.join(p.remove) or 'none'}")
        return
    result = apply.apply(plan, layout, restart_all=restart_all, ready_timeout_s=ready_timeout,
                         log=lambda step: click.echo(str(step)))
    click.echo(f"applied: {len(result.changes)} file(s) changed; started {len(result.started)}, "
               f"rolled {len(result.rolled)}, removed {len(result.removed)} group(s)")


@main.command("status")
@config_option
@backend_option
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="Requests/s is measured over this interval (two /metrics scrapes).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@fail_cleanly
def status_cmd(config_path, backend, interval, as_json):
    """Per group: unit state, PID, restarts, cores, port, ready or not, requests/s; who holds the cores.

    On Neuron, lists every process holding a NeuronCore (neuron-ls) and marks the stale ones: a holder
    outside the active unit of the group owning those cores keeps them from that group.
    Exits 0 when every group is active and ready and no holder is stale, else 1.
    """
    from neuronserve.layout import Layout
    from neuronserve.operate import drain, status

    plan = load_plan(config_path, backend)
    st = status.collect(plan, interval_s=interval, drained=drain.drained(Layout(Path("/"), plan.config)))
    click.echo(status.as_json(st) if as_json else status.as_text(st))
    sys.exit(0 if status.healthy(st) else 1)


@main.command("cleanup")
@config_option
@click.option("--dry-run", is_flag=True, help="Only list what would be stopped and removed.")
@fail_cleanly
def cleanup_cmd(config_path, dry_run):
    """Stop, disable and remove neuronserve's own units and nginx front config. Run as root.

    Touches only the groups' drop-ins (neuronserve@<group>.service.d/10-neuronserve.conf),
    earlier versions' neuronserve-<group>.service, the gunicorn configs and the front config at
    nginx.conf_path, and each only if `neuronserve render` wrote it (its header line); the
    package's template unit and target, and a sysadmin's override.conf, stay.
    Other units, services and containers are never touched; the config, the model repository and
    the neuronserve user stay. Without a config file, the default paths are cleaned.
    """
    from neuronserve import config
    from neuronserve.operate import cleanup
    from neuronserve.context import HostContext

    path = config_path or config.DEFAULT_PATH
    ctx = HostContext(load_config(config_path) if path.exists() else config.Config())
    cleanup.cleanup(ctx.layout, dry_run=dry_run, log=lambda step: click.echo(str(step)))


@main.command("drain")
@config_option
@backend_option
@stack_root_option
@click.option("--quiet", "quiet_s", type=click.FloatRange(0), default=5.0, show_default=True, metavar="SECONDS",
              help="Drained once no request came for this long and none is in flight; set it above the load "
                   "balancer's health-check interval x its fall count.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True), default=120.0, show_default=True,
              metavar="SECONDS", help="Give up (exit 1, the host stays drained) if requests still arrive after this.")
@click.option("--no-wait", is_flag=True, help="Only turn the front unready; do not wait for the requests to stop.")
@fail_cleanly
def drain_cmd(config_path, backend, root, quiet_s, timeout_s, no_wait):
    """Take this host out of its fleet's load balancer: the front's readiness turns 503.

    \b
    The front's /v2/health/ready answers 503 from now on (the flag file
    /var/lib/neuronserve/drained; it survives a reboot), so a load balancer that
    health-checks it stops sending. Requests that still arrive are served. drain
    returns once no request came for --quiet seconds and none is in flight: the
    groups can then be stopped, upgraded or applied without a failed request.

    \b
    A rolling upgrade, one host at a time:
      neuronserve drain                    # out of the load balancer, in-flight answered
      apt install ./neuronserve_*.deb      # or: edit neuronserve.toml
      neuronserve apply --restart
      neuronserve undrain                  # back in after the balancer's next checks
    """
    from neuronserve.context import HostContext
    from neuronserve.operate import drain

    ctx = HostContext(load_config(config_path, backend), root.resolve())
    drain.drain(ctx.plan, ctx.layout, quiet_s=quiet_s, timeout_s=timeout_s, wait=not no_wait, progress=click.echo)


@main.command("undrain")
@config_option
@stack_root_option
@fail_cleanly
def undrain_cmd(config_path, root):
    """Put a drained host back: the front's /v2/health/ready answers from the groups again."""
    from neuronserve.layout import Layout
    from neuronserve.operate import drain

    if not drain.undrain(Layout(root.resolve(), load_config(config_path)), progress=click.echo):
        click.echo("not drained: nothing to do")


@main.command("render")
@config_option
@backend_option
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"), show_default=True,
              help="Write under this directory instead of / (to inspect or diff the files).")
@click.option("--dry-run", is_flag=True, help="Print the diffs only; write nothing.")
@click.option("--kubernetes", "kubernetes_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR",
              help="Instead of this host's files, write Kubernetes manifests into DIR: per model a Deployment "
                   "whose pods each serve one core group (`neuronserve pod` in kubernetes.image, asking for "
                   "cores_per_group aws.amazon.com/neuroncore, nvidia.com/gpu or CPUs), its Service, "
                   "PodDisruptionBudget and HorizontalPodAutoscaler (20-neuronserve-<model>.yaml), the config as a "
                   "ConfigMap (10-config.yaml) and the namespace; `kubectl apply -f DIR` applies them. Needs a "
                   "named backend (--backend or server.backend), the device plugin of the accelerator (Neuron's "
                   "or NVIDIA's), and for the autoscaler prometheus-adapter installed with "
                   "DIR/prometheus-adapter/values.yaml. DIR/prometheus/ holds ServiceMonitors (`kubectl apply -f "
                   "DIR/prometheus`, needs the Prometheus Operator), DIR/kserve/ a KServe ServingRuntime and "
                   "InferenceService per model, instead of the Deployment (needs KServe; only when "
                   "kubernetes.model_volume names a PersistentVolumeClaim). See [kubernetes] in the config.")
@click.option("--prometheus", "prometheus_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR",
              help="Instead of this host's files, write a Prometheus setup for the fleet into DIR: prometheus.yml, "
                   "neuronserve-targets.yml (every group of every [monitoring] host, scraped through that "
                   "host's nginx front at /_neuronserve/metrics/<group>) and neuronserve-rules.yml (recording "
                   "rules, and alerts at [monitoring]'s thresholds). The groups are this host's plan: run it on "
                   "a serving host, copy DIR to the Prometheus host and check it with `promtool check config "
                   "DIR/prometheus.yml`.")
@fail_cleanly
def render_cmd(config_path, backend, root, dry_run, kubernetes_dir, prometheus_dir):
    """Write the systemd units, gunicorn configs and nginx front for this host's plan; print the diffs.

    \b
    Files (under --root):
      /etc/systemd/system/neuronserve@<group>.service.d/10-neuronserve.conf
                                 what each group's instance of neuronserve@.service has of its own
      /etc/systemd/system/neuronserve@.service, neuronserve.target
                                 copies of the shipped units, only where no package installed them
      /etc/neuronserve/gunicorn/<group>.conf.py         bind 127.0.0.1:<port>, 1 worker
      nginx.conf_path (/etc/nginx/conf.d/neuronserve.conf)   upstreams + the front server

    Only files whose content changed are written, each atomically. Templates in
    /etc/neuronserve/templates/ override the packaged ones of the same name. Nothing is
    started or reloaded: `neuronserve apply` does that.
    """
    from neuronserve import render
    from neuronserve.context import HostContext

    ctx = HostContext(load_config(config_path, backend), root.resolve())
    if kubernetes_dir:
        from neuronserve import kubernetes

        # the cluster's nodes, not this host, have the cores: nothing here is discovered
        files, where = kubernetes.render_files(ctx.layout, kubernetes_dir), kubernetes_dir
        stale = [str(p) for p in kubernetes.stale_files(kubernetes_dir, files)]
        leftover = "no longer rendered (`kubectl delete -f` each, then remove it): "
    elif prometheus_dir:
        from neuronserve import monitoring

        files, where = monitoring.render_prometheus(ctx.plan, ctx.layout, prometheus_dir), prometheus_dir
        stale, leftover = [], ""
    else:
        files, where = render.render_files(ctx.plan, ctx.layout), root
        stale = list(render.stale_units(ctx.layout, ctx.plan))
        leftover = "no longer planned (`neuronserve apply` removes them): "
    changes = render.write_files(files, dry_run=dry_run)
    for c in changes:
        click.echo(c.diff, nl=False)
    verb = "would change" if dry_run else "changed"
    click.echo(f"{verb} {len(changes)} file(s)" + (f" under {where}" if where != Path("/") else ""))
    if stale:
        click.echo(leftover + ", ".join(stale))


@main.command("up")
@config_option
@backend_option
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch directory for the rendered files, logs and nginx state "
                   "[default: a new temporary directory, removed after a clean stop].")
@click.option("--ready-timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
              metavar="SECONDS", help="How long the groups may take to load and warm up.")
@fail_cleanly
def up_cmd(config_path, backend, root, ready_timeout):
    """Run every core group and the nginx front in the foreground, until Ctrl-C.

    Runs exactly what the systemd units would (the same gunicorn command, environment and
    configs, rendered under --root instead of /), without systemd and without root: for a
    demo, a container, or trying a config before `neuronserve apply`. Prints each group's
    address and log, and the front's URL once every group passed its warm-up.
    """
    import shutil
    import tempfile

    from neuronserve.operate import up
    from neuronserve.context import HostContext

    scratch = root or Path(tempfile.mkdtemp(prefix="neuronserve-up-"))
    ctx = HostContext(load_config(config_path, backend), scratch.resolve())
    keep = root is not None
    try:
        up.run(ctx.plan, ctx.layout, ready_timeout=ready_timeout, out=click.echo)
    except NeuronserveError:
        if not keep and any(scratch.rglob("*.log")):    # a group failed: its full log is worth keeping
            click.echo(f"logs kept in {scratch}", err=True)
            keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


@main.command("pod")
@config_option
@backend_option
@click.option("--model", required=True, help="The [models.<name>] this pod serves.")
@fail_cleanly
def pod_cmd(config_path, backend, model):
    """Serve one model as a container's main process: one core group, no nginx (Kubernetes).

    \b
    The cores are the ones the pod was given:
      Neuron  NEURON_RT_VISIBLE_CORES, as the Neuron device plugin sets it
              for resources aws.amazon.com/neuroncore
      CUDA    CUDA_VISIBLE_DEVICES when set, else every GPU the container sees
      CPU     the cgroup's cpuset, with as many threads as its CPU quota
              feeds (resources.limits.cpu)
    The group listens on every address at nginx.listen's port (HTTP, default
    8080) and nginx.grpc_listen's (gRPC, 8081; empty: none); probe it at
    /v2/health/live and /v2/health/ready. The model must be compiled for this
    backend under server.model_repository (mount it read-only).

    This process becomes the group's gunicorn, the same command and environment
    a systemd unit runs: as PID 1 it gets the container's SIGTERM and stops
    gracefully, answering the requests it holds within
    server.graceful_timeout_s (give terminationGracePeriodSeconds more).

    \b
    Example, the image from `make image`:
      podman run --network=host -v $PWD/neuronserve.toml:/etc/neuronserve/neuronserve.toml:ro \\
          -v $PWD/models:/var/lib/neuronserve/models:ro neuronserve:VERSION pod --model emb
    """
    from neuronserve.operate import pod

    pod.run(load_config(config_path, backend), model, out=lambda line: click.echo(line, err=True))


if __name__ == "__main__":
    main()
