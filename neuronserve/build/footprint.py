"""What each group of a plan is expected to hold in memory, from its compiled artifact, and whether that fits the
device: the weights (file sizes: a trace is its weights and graph), times the copies that hold their own, by the
artifact's policy:

- CPU: the group's copies share one module per file (backends/cpu.py): host memory = the distinct files, once;
- CUDA: each copy loads each distinct file on the GPU: device memory = distinct files x copies;
- Neuron Inf2/Trn with separate weights: per copy, the weights once and each bucket's graph (its file less the
  weights it still carries on disk); Inf1 and older artifacts: every bucket's file per copy. Copies are placed on
  the group's cores round-robin, so a core holds ceil(copies / cores) of them.

The device's memory per core comes from discovery: Neuron's memory_size / nc_count of its device (Inf1: 8 GiB
per 4-core chip; Inf2/Trn1: 32 GiB per 2-core device), CUDA's per GPU (NVML or nvidia-smi). A plan whose groups
need more than a core has is refused with the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from neuronserve.build.artifact import read_manifest
from neuronserve.errors import ArtifactError, PlanError

GIB = 1 << 30


@dataclass(frozen=True)
class Footprint:
    group: str
    host_bytes: int             # resident weights in the worker's own memory
    device_bytes_per_core: int  # on each of its accelerator cores (0 on the CPU)
    device_capacity: int | None  # what one core has (None: unknown or CPU)
    why: str                    # how it was counted, for the plan's listing


def group_footprint(plan, group) -> Footprint | None:
    """None when the group's model is not compiled yet (nothing to count)."""
    directory = Path(group.settings.model_dir)
    try:
        manifest = read_manifest(directory, backend=plan.host.backend, verify=False)
    except ArtifactError:
        return None
    size = {name: (directory / name).stat().st_size
            for name in {b.file for b in manifest.buckets} | ({manifest.weights} if manifest.weights else set())
            if (directory / name).is_file()}
    files = sum(size.get(name, 0) for name in {b.file for b in manifest.buckets})
    copies = group.settings.copies
    if plan.host.backend == "cpu":
        return Footprint(group.name, files, 0, None, f"{_gib(files)} of traces, shared by {copies} copies")
    per_core = math.ceil(copies / max(1, len(group.cores)))
    if plan.host.backend == "cuda":
        per_copy, how = files, f"{_gib(files)} of traces per copy"
    elif manifest.weights:
        weights = size.get(manifest.weights, 0)
        graphs = sum(max(0, size.get(b.file, 0) - weights) for b in manifest.buckets)
        per_copy, how = weights + graphs, f"{_gib(weights)} of weights once + {_gib(graphs)} of bucket graphs per copy"
    else:
        per_copy, how = files, f"{_gib(files)} of bucket traces (each with its weights) per copy"
    return Footprint(group.name, 0, per_copy * per_core, _capacity(plan.host, group.cores[0]),
                     f"{how} x {per_core} copies per core")


def _capacity(host, core_index: int) -> int | None:
    """Device memory of one core, from discovery."""
    core = host.core(core_index)
    for device in host.details.get("devices") or []:
        if device.get("device") != core.device:
            continue
        if host.backend == "cuda":
            return int(device.get("memory_bytes") or 0) or None
        memory, cores = int(device.get("memory_size") or 0), int(device.get("nc_count") or 0)
        return memory // cores if memory and cores else None
    return None


def check(plan) -> list[Footprint]:
    """Every compiled group's footprint; PlanError when one needs more device memory than a core has."""
    out = [f for f in (group_footprint(plan, g) for g in plan.groups) if f is not None]
    over = [f for f in out if f.device_capacity and f.device_bytes_per_core > f.device_capacity]
    if over:
        f = over[0]
        raise PlanError(f"group {f.group} needs {_gib(f.device_bytes_per_core)} of device memory per core "
                        f"({f.why}), more than a core's {_gib(f.device_capacity)}: lower copies, buckets or "
                        "batch sizes, or give the group more cores (cores_per_group)")
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.0f} MiB"
