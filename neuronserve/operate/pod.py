"""`neuronserve pod --model NAME`: one core group of one model as a container's main process (Kubernetes).

The pod runs nothing else: no nginx, no systemd. Its group is planned as a host's are (plan.make_plan: the same
gunicorn config, command and environment a unit gets), from the config with only NAME in it, over every core
the pod was given:

- Neuron: NEURON_RT_VISIBLE_CORES, set by the Neuron device plugin for the cores it allocated, used as it is;
- CUDA: CUDA_VISIBLE_DEVICES when set (indices or UUIDs), else every GPU the container sees;
- CPU: the CPUs of the cgroup's cpuset (the affinity), with as many threads as its CPU quota feeds (read only
  here: the pod's cgroup is its one group's, as a host CLI's cgroup is none of its units').

It listens on every address at the front's ports, nginx.listen's for HTTP and nginx.grpc_listen's for gRPC
(empty: none), so that a Service and the probes reach a pod where clients reach a host's front.

This process then becomes gunicorn (exec): as the container's PID 1 it gets the SIGTERM Kubernetes sends on
stop, and gunicorn stops gracefully: the worker stops accepting, answers what it holds within
server.graceful_timeout_s, and the master exits 0. Until the exec, SIGTERM and SIGINT end this process at once
(status 143 and 130): PID 1 ignores a signal it has no handler for, so a stop during discovery would otherwise
wait out the whole grace period for its SIGKILL.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Callable, NoReturn

from neuronserve.build.artifact import read_manifest
from neuronserve.config import Config
from neuronserve.context import discovery_options
from neuronserve.devices import Host, discover_host, given_cores
from neuronserve.errors import ConfigError
from neuronserve.layout import Layout
from neuronserve.plan import Plan, listen_port, make_plan
from neuronserve.render import render_files, write_files

# a pod is reached through its own IP (Service, probes), never through a front on its loopback
LISTEN_HOST = "0.0.0.0"
# what ends the pod before it becomes gunicorn (which then handles them itself)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_now(signum: int, frame=None) -> NoReturn:
    """Until the exec: end at once with the shell's status for the signal (143 for SIGTERM, 130 for SIGINT)."""
    os.write(2, f"neuronserve pod: {signal.Signals(signum).name} before the server started\n".encode())
    os._exit(128 + signum)


def pod_host(cfg: Config, environ: Mapping[str, str]) -> Host:
    """The cores this pod was given (given_cores), a CPU pod's threads capped by its cgroup's CPU quota."""
    options = {**discovery_options(cfg), "cpu": {"quota": True}}
    return given_cores(discover_host(cfg.server.backend, **options), environ)


def pod_plan(cfg: Config, model: str, host: Host) -> Plan:
    """The plan of a pod: one group of `model` over every core of `host`, on every address at the front's ports."""
    if model not in cfg.models:
        where = ", ".join(str(s) for s in cfg.sources) or "the config"
        raise ConfigError(f"no [models.{model}] in {where}; configured: {', '.join(cfg.models) or 'none'}")
    cfg = cfg.model_copy(deep=True)
    section = cfg.models[model]
    section.groups, section.cores_per_group, section.cores = 1, len(host.cores), None
    cfg.models = {model: section}
    # the pod's one group has no neighbour to lend idle CPUs to or borrow them from, and no front
    cfg.cpu.lend_idle_cpus = False
    cfg.nginx.enabled = False
    plan = make_plan(cfg, host)
    [group] = plan.groups
    grpc_port = listen_port(cfg.nginx.grpc_listen) if group.grpc_port else 0
    settings = group.settings.model_copy(update={"listen_host": LISTEN_HOST, "grpc_port": grpc_port})
    plan.groups = [replace(group, port=listen_port(cfg.nginx.listen), grpc_port=grpc_port, settings=settings,
                           env={**group.env, **settings.to_env()})]
    return plan


def command(plan: Plan, scratch: Path, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the pod's group: its unit's command, its gunicorn config written under `scratch`, and its
    unit's environment over the container's own (a container is configured through its environment)."""
    [group] = plan.groups
    layout = Layout(scratch, plan.config)
    conf = layout.gunicorn_conf(group.name)
    write_files({conf: render_files(plan, layout)[conf]})
    return plan.argv(group, layout), {**environ, **plan.env(group, layout)}


def run(cfg: Config, model: str, *, environ: Mapping[str, str] = os.environ,
        out: Callable[[str], None] = print) -> NoReturn:
    """Plan the pod's group, check its model is compiled for this backend, and become its gunicorn."""
    previous = {sig: signal.signal(sig, stop_now) for sig in STOP_SIGNALS}
    try:
        plan = pod_plan(cfg, model, pod_host(cfg, environ))
        [group] = plan.groups
        read_manifest(group.settings.model_dir, backend=plan.host.backend, verify=False)
        argv, env = command(plan, Path(tempfile.mkdtemp(prefix="neuronserve-pod-")), environ)
        grpc = f", gRPC :{group.grpc_port}" if group.grpc_port else ""
        out(f"neuronserve pod: {model} on {plan.host.backend} cores {group.core_list} ({plan.host.source}), "
            f"{group.settings.copies} copies x {group.settings.threads} threads, HTTP :{group.port}{grpc}")
        sys.stdout.flush()
        sys.stderr.flush()
        # the exec resets handled signals to their defaults; gunicorn's master sets its own
        os.execve(argv[0], argv, env)
    except BaseException:
        # not a pod after all (a bad config, a missing model, a failed exec): the caller's handlers again
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
