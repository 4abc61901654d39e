"""Plain CPUs: the cores are the CPUs this process may run on (os.sched_getaffinity)."""
from __future__ import annotations

import os

from neuronserve.devices import Core, Host, host_env


def discover(affinity: set[int] | None = None) -> Host:
    cpus = sorted(affinity if affinity is not None else os.sched_getaffinity(0))
    return Host(backend="cpu", kind="cpu", cores=[Core(index=c, device=0, cpus=(c,)) for c in cpus],
                source="sched_getaffinity")


def group_cpus(host: Host, cores: list[int]) -> list[int]:
    return sorted(cores)


def threads_per_copy(cores: list[int], copies: int, configured) -> int:
    """Intra-op threads per copy so that copies x threads never exceeds the group's CPUs."""
    if configured != "auto":
        return int(configured)
    return max(1, len(cores) // copies)


def pin_env(host: Host, cores: list[int], copies: int, cfg, name: str) -> dict[str, str]:
    return host_env(cores, threads_per_copy(cores, copies, cfg.cpu.threads_per_copy))
