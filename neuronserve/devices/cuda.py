"""NVIDIA GPUs: one core per GPU, from NVML (pynvml) when it is installed, else from `nvidia-smi` CSV.

Indices are in PCI bus order (NVML's and nvidia-smi's order), so pin_env sets CUDA_DEVICE_ORDER=PCI_BUS_ID
for CUDA_VISIBLE_DEVICES to mean the same GPUs. Probes are parameters so that tests feed recorded outputs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Callable

from neuronserve.devices import Core, Holder, Host, host_env, nearby_cpus, run_tool
from neuronserve.errors import DeviceError

QUERY_GPU = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"]
QUERY_APPS = ["--query-compute-apps=pid,gpu_uuid,process_name", "--format=csv,noheader"]
# the model runs on the GPU; host threads only tokenize and pad
HOST_THREADS = 1

Runner = Callable[..., subprocess.CompletedProcess]


def _import_nvml():
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def discover(*, nvml: Any = None, run: Runner = run_tool, nvidia_smi: str | None = None,
             cpus: list[int] | None = None) -> Host:
    """GPUs of this host. Raises DeviceError, quickly, when there are none.

    nvml: the pynvml module (None: import it if installed; False: do not use NVML); run and nvidia_smi:
    how nvidia-smi is run and where it is; cpus: the host's CPUs (default: ours).
    """
    reasons = []
    host = None
    module = _import_nvml() if nvml is None else nvml
    if module:
        try:
            host = _from_nvml(module)
        except Exception as e:   # NVMLError subclasses carry the reason (no driver, no device, ...)
            reasons.append(f"NVML: {e}")
    if host is None:
        host, why = _from_nvidia_smi(run, nvidia_smi or shutil.which("nvidia-smi"))
        if host is None:
            raise DeviceError("no CUDA GPUs: " + "; ".join(reasons + [why]))
    host.details["cpus"] = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    return host


def _from_nvml(nvml) -> Host:
    nvml.nvmlInit()
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise DeviceError("NVML sees no GPU")
        words = ((os.cpu_count() or 1) + 63) // 64
        cores, holders, info = [], [], []
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mask = nvml.nvmlDeviceGetCpuAffinity(handle, words)
            cpus = tuple(w * 64 + b for w, word in enumerate(mask) for b in range(64) if word >> b & 1)
            cores.append(Core(index=i, device=i, cpus=cpus))
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                holders.append(Holder(pid=proc.pid, command=_text(nvml.nvmlSystemGetProcessName(proc.pid)),
                                      device=i, cores=(i,)))
            info.append({"device": i, "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                         "name": _text(nvml.nvmlDeviceGetName(handle)),
                         "memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total)})
    finally:
        nvml.nvmlShutdown()
    return Host(backend="cuda", kind="cuda", cores=cores, holders=holders, source="nvml", details={"devices": info})


def _text(value) -> str:
    # older pynvml returns bytes
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_nvidia_smi(run: Runner, tool: str | None) -> tuple[Host | None, str]:
    if tool is None:
        return None, "nvidia-smi is not on PATH (NVIDIA driver utilities)"
    done = run([tool, *QUERY_GPU])
    if done.returncode != 0:
        lines = [x.strip() for x in (done.stderr + done.stdout).splitlines() if x.strip()]
        return None, f"nvidia-smi failed (rc {done.returncode}): {lines[0] if lines else 'no output'}"
    cores, info, by_uuid = [], [], {}
    for line in done.stdout.splitlines():
        if not line.strip():
            continue
        try:
            index, uuid, name, memory = (x.strip() for x in line.split(",", 3))
            i = int(index)
            mib = int(memory.split()[0])
        except ValueError:
            return None, f"nvidia-smi printed an unexpected line: {line!r}"
        by_uuid[uuid] = i
        cores.append(Core(index=i, device=i))
        info.append({"device": i, "uuid": uuid, "name": name, "memory_bytes": mib << 20})
    if not cores:
        return None, "nvidia-smi lists no GPU"
    return Host(backend="cuda", kind="cuda", cores=cores, holders=_smi_holders(run, tool, by_uuid),
                source="nvidia-smi", details={"devices": info}), ""


def _smi_holders(run: Runner, tool: str, by_uuid: dict[str, int]) -> list[Holder]:
    done = run([tool, *QUERY_APPS])
    if done.returncode != 0:   # the GPUs are known; who uses them is a nicety
        return []
    holders = []
    for line in done.stdout.splitlines():
        parts = [x.strip() for x in line.split(",", 2)]
        if len(parts) == 3 and parts[0].isdigit() and parts[1] in by_uuid:
            device = by_uuid[parts[1]]
            holders.append(Holder(pid=int(parts[0]), command=parts[2], device=device, cores=(device,)))
    return holders


# CPUs near the group's devices (affinity from the probe), else all the host's
group_cpus = nearby_cpus

# where a pod's GPUs may be named, by index or UUID (CUDA's own meaning of the variable)
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def visible_cores(spec: str, host: Host) -> list[int]:
    by_uuid = {d.get("uuid"): d["device"] for d in host.details.get("devices") or []}
    out = []
    for token in filter(None, (t.strip() for t in spec.split(","))):
        if token.isdigit():
            out.append(int(token))
        elif token in by_uuid:
            out.append(by_uuid[token])
        else:
            raise DeviceError(f"{VISIBLE_ENV}={spec!r}: {token!r} is neither a GPU index nor the UUID of one "
                              f"({', '.join(filter(None, by_uuid)) or 'no UUIDs known'})")
    return out


def pin_env(host: Host, cores: list[int], copies: int, cfg, name: str) -> dict[str, str]:
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(c) for c in sorted(cores)),
        **host_env(group_cpus(host, cores), HOST_THREADS),
    }


def find_python(cfg, kind: str | None = None) -> str | None:
    """No well-known CUDA venv: the planner uses server.python, or this interpreter."""
    return None
