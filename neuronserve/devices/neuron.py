"""AWS Neuron (Inf1, Inf2, Trn): cores from `neuron-ls` JSON, else from the driver's sysfs tree.

Global core ids follow the runtime's numbering: device d holds cores d*nc_count .. d*nc_count+nc_count-1,
unless neuron-ls lists `neuroncore_ids` itself. Every probe is a parameter (`run`, `root`, `neuron_ls`) so
that tests feed recorded outputs and fake trees; on a host without Neuron, discovery fails at once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from neuronserve.config import format_core_list, parse_core_list
from neuronserve.devices import Core, Holder, Host, host_env, nearby_cpus, run_tool
from neuronserve.errors import DeviceError

DEFAULT_TOOLS = Path("/opt/aws/neuron/bin")
SYSFS = Path("/sys/devices/virtual/neuron_device")
DMI_PRODUCT = Path("/sys/devices/virtual/dmi/id/product_name")   # the instance type on EC2 Nitro hosts
# new flag first (Neuron 2.34+), then the one older tools know
JSON_FLAGS = (["--output-format", "json"], ["--json-output"])
KINDS = ("inf1", "inf2", "trn1", "trn2")
# device_name / arch_type values in sysfs -> kind
SYSFS_NAMES = {"inferentia": "inf1", "inferentia2": "inf2", "trainium": "trn1", "trainium1": "trn1",
               "trainium2": "trn2", "ncv1": "inf1", "ncv3": "trn2"}
# Host-side work in a Neuron worker is tokenizing and padding; the model runs on the cores. More intra-op
# threads would only contend with the other groups pinned to the same NUMA node.
HOST_THREADS = 1
INF1_VENVS = "aws_neuron_venv_pytorch_*"
NEURONX_VENVS = "aws_neuronx_venv_pytorch_*"

Runner = Callable[..., subprocess.CompletedProcess]


def _under(root: Path, path: Path) -> Path:
    return Path(root) / Path(path).relative_to("/")


def find_neuron_ls(tools_dir: Path = DEFAULT_TOOLS, root: Path = Path("/")) -> str | None:
    """The neuron-ls to run: tools_dir first (it is not on PATH by default), then PATH."""
    candidate = _under(root, Path(tools_dir) / "neuron-ls")
    if candidate.exists():
        return str(candidate)
    return shutil.which("neuron-ls") if Path(root) == Path("/") else None


def discover(*, run: Runner = run_tool, tools_dir: Path | str = DEFAULT_TOOLS, root: Path | str = "/",
             neuron_ls: str | None = None, cpus: list[int] | None = None) -> Host:
    """Neuron devices and cores of this host. Raises DeviceError, quickly, when there are none.

    run: runs a tool (argv -> CompletedProcess); root: where /sys lives (tests point it at a fake tree);
    neuron_ls: the tool's path, default found in tools_dir or PATH; cpus: the host's CPUs (default: ours).
    """
    root = Path(root)
    tool = neuron_ls or find_neuron_ls(Path(tools_dir), root)
    reasons = []
    host = None
    if tool is None:
        reasons.append(f"neuron-ls is not in {tools_dir} nor on PATH (package aws-neuronx-tools)")
    else:
        host, why = _from_neuron_ls(run, tool)
        if host is None:
            reasons.append(why)
    if host is None:
        host, why = _from_sysfs(root)
        if host is None:
            reasons.append(why)
            raise DeviceError("no Neuron devices: " + "; ".join(reasons))
    instance = _instance_type(root)
    if instance:
        host.details["instance_type"] = instance
    host.kind = _kind_from_instance(instance) or host.kind
    host.details["cpus"] = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    return host


# ---------------------------------------------------------------- neuron-ls

def _from_neuron_ls(run: Runner, tool: str) -> tuple[Host | None, str]:
    why = ""
    for flags in JSON_FLAGS:
        argv = [tool, *flags]
        done = run(argv)
        if done.returncode != 0:
            why = f"`{' '.join(argv)}` failed (rc {done.returncode}): {_first_line(done.stderr or done.stdout)}"
            continue
        try:
            devices = parse_neuron_ls(done.stdout)
        except ValueError as e:
            why = f"`{' '.join(argv)}` printed no device list: {e}"
            continue
        if not devices:
            return None, f"`{' '.join(argv)}` lists no devices"
        return _host_from_devices(devices, source=" ".join(["neuron-ls", *flags])), ""
    return None, why


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def parse_neuron_ls(text: str) -> list[dict]:
    """The device array of `neuron-ls` JSON output. Raises ValueError when there is none.

    Tolerates a banner before the JSON (some releases print the instance type first).
    """
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in the output")
    data, _ = json.JSONDecoder().raw_decode(text[start:])
    if isinstance(data, dict):
        data = data.get("neuron_devices", data.get("devices"))
    if not isinstance(data, list) or not all(isinstance(d, dict) and "neuron_device" in d for d in data):
        raise ValueError("expected a JSON array of objects with 'neuron_device'")
    return data


def _host_from_devices(devices: list[dict], source: str) -> Host:
    cores: list[Core] = []
    holders: list[Holder] = []
    info = []
    for dev in sorted(devices, key=lambda d: int(d["neuron_device"])):
        d = int(dev["neuron_device"])
        nc = int(dev.get("nc_count") or len(dev.get("neuroncore_ids") or []))
        ids = [int(i) for i in dev.get("neuroncore_ids") or range(d * nc, d * nc + nc)]
        affinity = tuple(parse_core_list(dev["cpu_affinity"])) if dev.get("cpu_affinity") else ()
        cores += [Core(index=i, device=d, cpus=affinity) for i in ids]
        # neuron-ls names the device a process uses, not which of its cores: count them all as held
        holders += [Holder(pid=int(p["pid"]), command=str(p.get("command", "")), device=d, cores=tuple(ids))
                    for p in dev.get("neuron_processes") or []]
        info.append({"device": d, "bdf": dev.get("bdf"), "nc_count": nc, "memory_size": dev.get("memory_size"),
                     "numa_node": dev.get("numa_node"), "cpu_affinity": dev.get("cpu_affinity"),
                     "logical_neuroncore_config": dev.get("logical_neuroncore_config")})
    return Host(backend="neuron", kind=_kind_from_device(devices[0]), cores=cores, holders=holders,
                source=source, details={"devices": info})


def _kind_from_device(dev: dict) -> str:
    """Best guess from one device when the instance type is unknown. Inf2 and Trn1 look alike (2 cores, 32 GiB)."""
    memory = int(dev.get("memory_size") or 0)
    if dev.get("logical_neuroncore_config") is not None or memory >= 64 << 30:
        return "trn2"
    if int(dev.get("nc_count") or 0) == 4 and memory <= 8 << 30:
        return "inf1"
    return "inf2"


def _kind_from_instance(instance: str) -> str | None:
    m = re.match(r"^(inf|trn)(\d)", instance or "")
    return f"{m.group(1)}{m.group(2)}" if m and f"{m.group(1)}{m.group(2)}" in KINDS else None


def _instance_type(root: Path) -> str:
    try:
        return _under(root, DMI_PRODUCT).read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- sysfs

def _from_sysfs(root: Path) -> tuple[Host | None, str]:
    base = _under(root, SYSFS)
    if not base.is_dir():
        return None, f"{SYSFS} does not exist (is the aws-neuronx-dkms driver loaded?)"
    dirs = sorted((p for p in base.iterdir() if re.fullmatch(r"neuron\d+", p.name)), key=lambda p: int(p.name[6:]))
    if not dirs:
        return None, f"{SYSFS} has no neuron<N> device"
    cores: list[Core] = []
    info = []
    kind = None
    for path in dirs:
        d = int(path.name[6:])
        nc = _read_int(path / "core_count")
        if nc is None:
            nc = sum(1 for p in path.iterdir() if re.fullmatch(r"neuron_core\d+", p.name))
        cores += [Core(index=i, device=d) for i in range(d * nc, d * nc + nc)]
        info.append({"device": d, "nc_count": nc})
        kind = kind or _sysfs_kind(path)
    return Host(backend="neuron", kind=kind or "inf2", cores=cores, source="sysfs", details={"devices": info}), ""


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _sysfs_kind(device_dir: Path) -> str | None:
    # the driver has moved these nodes between releases: look in the known places
    for name in ("instance_type", "device_name", "arch_type"):
        for path in (device_dir / "info" / "architecture" / name, device_dir / "architecture" / name):
            try:
                value = path.read_text().strip().lower()
            except OSError:
                continue
            kind = _kind_from_instance(value) or SYSFS_NAMES.get(value)
            if kind:
                return kind
    return None


# ---------------------------------------------------------------- pinning

# the Neuron device plugin names the cores it gave a pod here, by their global ids; the runtime reads it too
VISIBLE_ENV = "NEURON_RT_VISIBLE_CORES"


def visible_cores(spec: str, host: Host) -> list[int]:
    try:
        return parse_core_list(spec)
    except ValueError as e:
        raise DeviceError(f"{VISIBLE_ENV}={spec!r}: {e}") from None


# CPUs near the group's devices (affinity from the probe), else all the host's
group_cpus = nearby_cpus


def pin_env(host: Host, cores: list[int], copies: int, cfg, name: str) -> dict[str, str]:
    """The runtime environment of the ONE process that owns `cores`; its `copies` share them.

    NEURON_RT_VISIBLE_CORES names the exact cores; NEURON_RT_NUM_CORES is never set beside it (it would
    reserve any free cores instead).
    """
    env = {
        "NEURON_RT_VISIBLE_CORES": format_core_list(cores),
        "NEURON_PROCESS_TAG": name,
        "NEURON_RT_EXEC_TIMEOUT": str(cfg.neuron.exec_timeout_s),
        "NEURON_RT_LOG_LEVEL": cfg.neuron.log_level,
    }
    if host.kind != "inf1":   # async execution is a NeuronCore-v2 runtime feature (2.15+)
        env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] = str(cfg.neuron.async_inflight)
    return {**env, **host_env(group_cpus(host, cores), HOST_THREADS)}


# ---------------------------------------------------------------- the Python that has torch-neuron(x)

def framework_module(kind: str | None) -> str:
    return "torch_neuron" if kind == "inf1" else "torch_neuronx"


def can_import(python: str, module: str, run: Runner = run_tool) -> bool:
    # importing torch_neuronx takes seconds (it loads torch and libnrt): allow for a slow first start
    return run([python, "-c", f"import {module}"], timeout=120).returncode == 0


def _venv_key(path: Path) -> tuple:
    """Newest PyTorch first; among equal versions the plain venv before variants (`_nxd_inference`)."""
    name = path.parent.parent.name
    m = re.search(r"pytorch_(\d+(?:_\d+)*)(.*)$", name)
    version = tuple(int(x) for x in m.group(1).split("_")) if m else ()
    return (version, not (m and m.group(2)), name)


def venv_candidates(kind: str | None = None, root: Path | str = "/") -> list[Path]:
    """DLAMI interpreters that may carry the framework for `kind`, best first."""
    pattern = INF1_VENVS + "inf1" if kind == "inf1" else NEURONX_VENVS
    found = [p for p in _under(Path(root), Path("/opt")).glob(f"{pattern}/bin/python") if p.exists()]
    return sorted(found, key=_venv_key, reverse=True)


def find_python(cfg, kind: str | None = None, *, root: Path | str = "/",
                importable: Callable[[str, str], bool] = can_import) -> str | None:
    """The newest DLAMI venv python that imports torch_neuronx (torch_neuron for inf1), or None.

    With kind None both are tried, Inf2/Trn venvs first. cfg.server.python, when not "auto", is the
    admin's choice and is used as it is by the planner; this is only the "auto" search.
    """
    kinds = [kind] if kind else ["inf2", "inf1"]
    for k in kinds:
        module = framework_module(k)
        for python in venv_candidates(k, root):
            if importable(str(python), module):
                return str(python)
    return None
