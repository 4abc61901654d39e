"""CPU seconds spent by process trees (user + system, children that are still alive included), from /proc.

The serving path's cost per request is what its processes burned over a load level divided by the requests
answered; on a 2-core host that, not wall time, tells how far the path would scale on a faster accelerator.
"""
from __future__ import annotations

import os

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system seconds) of one process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()    # the command name may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def tree_pids(roots: list[int]) -> list[int]:
    """`roots` and every live descendant."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(roots: list[int]) -> float:
    """Total user+system CPU seconds of the live process trees under `roots`."""
    return sum(st[1] for pid in tree_pids(roots) if (st := _stat(pid)) is not None)


def host_busy_seconds() -> float:
    """CPU seconds every CPU of the host spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / TICKS


def children_seconds() -> float:
    """CPU seconds of this process' waited-for children (wrk)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
