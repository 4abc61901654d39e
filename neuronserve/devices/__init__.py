"""What accelerator cores this host has, who holds them, and the environment that pins a group to some.

One module per backend (neuron, cuda, cpu), each exposing::

    discover(**probes) -> Host             # raises DeviceError when the backend is absent
    pin_env(host, cores, copies, cfg, name) -> dict[str, str]   # env for group `name` owning `cores`
    find_python(cfg) -> str | None         # optional: an interpreter with the backend's framework
    group_cpus(host, cores) -> list[int]   # host CPUs the group's processes are pinned to
    VISIBLE_ENV, visible_cores(spec, host) # optional: the variable a Kubernetes device plugin names the
                                           # pod's cores in, and the core indices its value means

`discover_host(backend)` resolves "auto" as neuron, then cuda, then cpu; `given_cores` narrows a host to the
cores a container was given.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import import_module

from neuronserve.config import format_core_list
from neuronserve.errors import DeviceError

BACKENDS = ("neuron", "cuda", "cpu")


@dataclass(frozen=True)
class Core:
    index: int                  # global index: NeuronCore id, GPU index, or CPU id
    device: int                 # /dev/neuron<device>, GPU index, or NUMA node
    cpus: tuple[int, ...] = ()  # host CPUs close to it (neuron-ls cpu_affinity); empty: any


@dataclass(frozen=True)
class Holder:
    """A process that holds cores (neuron-ls neuron_processes, nvidia-smi compute apps)."""

    pid: int
    command: str
    device: int
    cores: tuple[int, ...] = ()


@dataclass
class Host:
    backend: str                # neuron | cuda | cpu
    kind: str                   # inf1 | inf2 | trn1 | trn2 | cuda | cpu: decides the compile target
    cores: list[Core]
    holders: list[Holder] = field(default_factory=list)
    source: str = ""            # how it was discovered ("neuron-ls --output-format json", "sysfs", ...)
    details: dict = field(default_factory=dict)

    def core(self, index: int) -> Core:
        for c in self.cores:
            if c.index == index:
                return c
        raise KeyError(index)


def nearby_cpus(host: Host, cores: list[int]) -> list[int]:
    """CPUs close to these cores (their Core.cpus); every CPU of the host (details["cpus"]) when unknown."""
    near = sorted({cpu for c in cores for cpu in host.core(c).cpus})
    return near or list(host.details.get("cpus") or sorted(os.sched_getaffinity(0)))


def host_env(cpus: list[int], threads: int) -> dict[str, str]:
    """The host-side part of every backend's pin_env: CPU affinity and thread pools."""
    env = {
        "NEURONSERVE_CPUS": format_core_list(cpus),
        "NEURONSERVE_THREADS": str(threads),
        # the BLAS/OpenMP pools read these at import, before torch.set_num_threads can act
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads == 1:
        # A one-thread group's only OpenMP threads are those of a batch lent CPUs by idle groups (lending.py).
        # libgomp's default spin after a parallel region (300,000 turns, about 10 ms of CPU here) kept such a
        # thread busy on the lender's CPU just when the lender's next batch wanted it: back-to-back lone BERT-base
        # requests took 13 ms longer than spaced ones. 10,000 turns is about 2 ms, and the lent batch runs as
        # fast (407 ms against 411). Groups of several threads keep the default: theirs spin between their own
        # batches, and a tiny BERT's 2-thread group served 7 % fewer requests at concurrency 64 with 10,000.
        env["GOMP_SPINCOUNT"] = "10000"
    return env


def run_tool(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run a probe (neuron-ls, nvidia-smi, nginx -v, ...); a missing or hung tool becomes rc 127 / 124.

    Every backend takes a `run` callable of this shape so that tests feed recorded outputs.
    """
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: {e.strerror}")
    except PermissionError as e:
        return subprocess.CompletedProcess(argv, 126, "", f"{argv[0]}: {e.strerror}")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]}: no answer within {timeout:g} s")


def backend_module(name: str):
    if name not in BACKENDS:
        raise DeviceError(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")
    return import_module(f"neuronserve.devices.{name}")


def discover_host(backend: str = "auto", **probes) -> Host:
    """Discover the host for one backend, or the first one present for "auto"."""
    if backend != "auto":
        return backend_module(backend).discover(**probes.get(backend, {}))
    reasons = []
    for name in BACKENDS:
        try:
            return backend_module(name).discover(**probes.get(name, {}))
        except DeviceError as e:
            reasons.append(f"{name}: {e}")
    raise DeviceError("no backend found: " + "; ".join(reasons))


def given_cores(host: Host, environ: Mapping[str, str]) -> Host:
    """The host as a container sees it: only the cores its environment names in the backend's VISIBLE_ENV (what
    a Kubernetes device plugin sets for the cores it gave the pod), or every discovered core when it is unset.

    DeviceError when the variable names no core, or one that discovery did not find.
    """
    module = backend_module(host.backend)
    var = getattr(module, "VISIBLE_ENV", None)
    if var is None or var not in environ:
        return host
    wanted = module.visible_cores(environ[var].strip(), host)
    known = {c.index for c in host.cores}
    unknown = [c for c in wanted if c not in known]
    if not wanted or unknown:
        raise DeviceError(f"{var}={environ[var]!r} names {'no core' if not wanted else format_core_list(unknown)}"
                          f"{'' if not wanted else ', which this host does not have'} ({host.backend} cores found by "
                          f"{host.source}: {format_core_list(sorted(known)) or 'none'})")
    return replace(host, cores=[c for c in host.cores if c.index in set(wanted)], source=f"{host.source}, {var}")
