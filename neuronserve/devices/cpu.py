"""Plain CPUs: the cores are the CPUs this process may run on (os.sched_getaffinity, which a cgroup's cpuset
already narrows); in pod mode the threads they may keep busy are also capped by the cgroup's CPU quota.

A container limited to 2 CPUs of time (Kubernetes `limits.cpu: 2`, `podman --cpus 2`) still sees every CPU of
the node in its affinity: only cgroup v2's cpu.max or v1's cpu.cfs_quota_us / cpu.cfs_period_us say how much of
them it gets. More torch threads than that only get the process throttled, so the quota caps the thread count.

Only a pod asks for the quota (discover(quota=True), from `neuronserve pod`): there this process's cgroup is the
container's, which is the one group's. On a host the CLI's cgroup (a user slice, a `systemd-run -p CPUQuota`
scope, a CI container) says nothing of the units', which run in system.slice, and one quota for the whole
process would be no limit of each group; so render, apply and up see the affinity alone.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from neuronserve.devices import Core, Host, host_env


def discover(affinity: set[int] | None = None, root: Path | str = "/", quota: bool = False) -> Host:
    """quota: cap the threads by this process's cgroup CPU quota (pod mode only: the pod's cgroup is its group's);
    root: where /proc and /sys/fs/cgroup live (tests point it at a fake tree)."""
    cpus = sorted(affinity if affinity is not None else os.sched_getaffinity(0))
    host = Host(backend="cpu", kind="cpu", cores=[Core(index=c, device=0, cpus=(c,)) for c in cpus],
                source="sched_getaffinity")
    limit = cpu_quota(Path(root)) if quota else None
    if limit is not None:
        host.details["cpu_quota"] = limit
        host.source += " + cgroup CPU quota"
    return host


# ---------------------------------------------------------------- the cgroup's CPU quota

def cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time this process's cgroup may use: the tightest limit of its cgroup and every parent the
    mount shows (cgroup v2 cpu.max; v1 cpu.cfs_quota_us / cpu.cfs_period_us), None when there is none."""
    memberships = _memberships(root / "proc/self/cgroup")
    limits = []
    for fstype, mount_root, mount_point, options in _cgroup_mounts(root / "proc/self/mountinfo"):
        if fstype == "cgroup2":
            path, read = memberships.get(""), _v2_limit
        elif "cpu" in options:
            path = next((p for controllers, p in memberships.items() if "cpu" in controllers.split(",")), None)
            read = _v1_limit
        else:
            continue
        if path is None:
            continue
        top = root / mount_point.lstrip("/")
        # the mount shows the hierarchy from mount_root down: a container's own cgroup is often mounted as the
        # root of its /sys/fs/cgroup, while /proc/self/cgroup still names its path on the host
        rel = os.path.relpath(path, mount_root)
        here = top / rel if not rel.startswith("..") and (top / rel).is_dir() else top
        while True:
            limit = read(here)
            if limit is not None:
                limits.append(limit)
            if here == top:
                break
            here = here.parent
    return min(limits) if limits else None


def _memberships(path: Path) -> dict[str, str]:
    """controllers ("" for the v2 hierarchy) -> the cgroup path, from /proc/self/cgroup."""
    out = {}
    for line in _read(path).splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def _cgroup_mounts(path: Path) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root, mount point, super options) of every cgroup mount, from /proc/self/mountinfo."""
    out = []
    for line in _read(path).splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) > sep + 3 and fields[sep + 1] in ("cgroup", "cgroup2"):
            out.append((fields[sep + 1], fields[3], fields[4], set(fields[sep + 3].split(","))))
    return out


def _v2_limit(cgroup: Path) -> float | None:
    words = _read(cgroup / "cpu.max").split()      # "max 100000" or "150000 100000"
    if len(words) == 2 and words[0].isdigit() and words[1].isdigit() and int(words[1]) > 0:
        return int(words[0]) / int(words[1])
    return None


def _v1_limit(cgroup: Path) -> float | None:
    try:
        quota = int(_read(cgroup / "cpu.cfs_quota_us"))         # -1: unlimited
        period = int(_read(cgroup / "cpu.cfs_period_us"))
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- pinning

def group_cpus(host: Host, cores: list[int]) -> list[int]:
    return sorted(cores)


def usable_cpus(host: Host, cores: list[int]) -> int:
    """How many of the group's CPUs its threads may keep busy: all of them, or fewer under a CPU quota (rounded
    down: a thread the quota cannot feed stalls the others at every throttled period)."""
    quota = host.details.get("cpu_quota")
    return len(cores) if quota is None else max(1, min(len(cores), math.floor(quota)))


def threads_per_copy(usable: int, copies: int, configured) -> int:
    """Intra-op threads per copy so that copies x threads never exceeds the CPUs the group may use."""
    if configured != "auto":
        return int(configured)
    return max(1, usable // copies)


def pin_env(host: Host, cores: list[int], copies: int, cfg, name: str) -> dict[str, str]:
    return host_env(cores, threads_per_copy(usable_cpus(host, cores), copies, cfg.cpu.threads_per_copy))
