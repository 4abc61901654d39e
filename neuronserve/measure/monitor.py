"""Per-core utilization and device memory, one sampler per backend, for `neuronserve top`.

- neuron: `neuron-monitor -c <config>` streams one JSON document per period on stdout (keys per the Neuron
  docs: neuron_runtime_data[].report.neuroncore_counters / memory_used, neuron_hardware_info, system_data);
- cuda: `nvidia-smi --query-gpu=... --loop-ms=<period>` streams one CSV line per GPU per period (NVML underneath);
- cpu: /proc/stat, per-CPU busy time between two readings.

Every sampler has `sample() -> DeviceSample` and `close()`. The parsers are plain functions of the tools'
output, so tests feed them recorded documents; the streaming samplers take the command to run, so a test can
put a recording script in its place and check the exact arguments.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from neuronserve.errors import DeviceError

MIB = 1 << 20


@dataclass
class CoreSample:
    index: int
    util: float | None              # percent; None until there is something to compare with
    mem_used: int | None = None     # device memory, bytes (None on CPU)
    mem_total: int | None = None
    owner: str | None = None        # what the tool says holds it (neuron runtime tag = group name)


@dataclass
class DeviceSample:
    kind: str                       # neuron | cuda | cpu: picks the core label ("nc", "gpu", "cpu")
    cores: list[CoreSample] = field(default_factory=list)
    host_mem_used: int | None = None
    host_mem_total: int | None = None
    source: str = ""
    error: str | None = None        # the tool failed or has said nothing yet

    @property
    def label(self) -> str:
        return {"neuron": "nc", "cuda": "gpu"}.get(self.kind, "cpu")


# ---------------------------------------------------------------- neuron-monitor

def neuron_monitor_config(period_s: float) -> dict:
    """The config NEURON.md documents: per-runtime core counters, memory, vCPU, execution stats; system data."""
    return {
        "period": f"{max(period_s, 0.1):g}s",
        "neuron_runtimes": [{"tag_filter": ".*", "metrics": [
            {"type": "neuroncore_counters"}, {"type": "memory_used"},
            {"type": "neuron_runtime_vcpu_usage"}, {"type": "execution_stats"}]}],
        "system_metrics": [{"type": "vcpu_usage"}, {"type": "memory_info"}],
    }


def parse_neuron_monitor(doc: dict) -> DeviceSample:
    """One neuron-monitor report -> per-core utilization and device memory, summed over runtimes.

    Every runtime lists the cores it sees (often all of them, at 0 for the ones it does not use), so a core's
    utilization and memory are sums over runtimes; the owner is the tag of the runtime holding memory on it.
    Cores come from neuron_hardware_info (so idle cores show) or else from the keys seen.
    """
    hw = doc.get("neuron_hardware_info") or {}
    per_device = hw.get("neuroncore_per_device_count") or 0
    n_cores = (hw.get("neuron_device_count") or 0) * per_device
    core_mem = hw.get("neuron_device_memory_size") // per_device if hw.get("neuron_device_memory_size") and \
        per_device else None
    cores = {i: CoreSample(i, 0.0, 0, core_mem) for i in range(n_cores)}
    errors = []
    for rt in doc.get("neuron_runtime_data") or []:
        tag = rt.get("neuron_runtime_tag") or str(rt.get("pid", "?"))
        if rt.get("error"):
            errors.append(f"runtime {tag}: {rt['error']}")
            continue
        report = rt.get("report") or {}
        in_use = (report.get("neuroncore_counters") or {}).get("neuroncores_in_use") or {}
        for key, counters in in_use.items():
            core = cores.setdefault(int(key), CoreSample(int(key), 0.0, 0, core_mem))
            core.util = min(100.0, core.util + float((counters or {}).get("neuroncore_utilization") or 0.0))
        usage = ((report.get("memory_used") or {}).get("neuron_runtime_used_bytes") or {}) \
            .get("usage_breakdown", {}).get("neuroncore_memory_usage") or {}
        for key, parts in usage.items():
            used = sum(int(v) for v in (parts or {}).values() if isinstance(v, (int, float)))
            core = cores.setdefault(int(key), CoreSample(int(key), 0.0, 0, core_mem))
            core.mem_used += used
            if used:
                core.owner = tag if core.owner in (None, tag) else f"{core.owner},{tag}"
    mem = (doc.get("system_data") or {}).get("memory_info") or {}
    return DeviceSample("neuron", [cores[i] for i in sorted(cores)], mem.get("memory_used_bytes"),
                        mem.get("memory_total_bytes"), "neuron-monitor", "; ".join(errors) or None)


# ---------------------------------------------------------------- nvidia-smi

NVIDIA_QUERY = "index,utilization.gpu,memory.used,memory.total"


def parse_nvidia_smi_line(line: str) -> CoreSample | None:
    """`0, 37, 1234, 81559` (csv,noheader,nounits: %, MiB) -> CoreSample; None for anything else."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4 or not parts[0].isdigit():
        return None

    def num(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:          # "[N/A]", "[Not Supported]"
            return None

    util, used, total = (num(p) for p in parts[1:])
    return CoreSample(int(parts[0]), util, None if used is None else int(used * MIB),
                      None if total is None else int(total * MIB))


# ---------------------------------------------------------------- /proc/stat

def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """/proc/stat -> {cpu: (busy jiffies, total jiffies)}; idle and iowait count as not busy."""
    out = {}
    for line in text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]          # user nice system idle iowait irq softirq steal
            total = sum(v)
            out[int(name[3:])] = (total - v[3] - (v[4] if len(v) > 4 else 0), total)
    return out


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """/proc/meminfo -> (used, total) bytes, used = MemTotal - MemAvailable."""
    kb = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            kb[key] = int(rest.split()[0]) * 1024
    total = kb.get("MemTotal")
    return (total - kb["MemAvailable"] if total and "MemAvailable" in kb else None), total


class ProcStatSampler:
    """Per-CPU utilization between consecutive calls (the first call has nothing to compare: util None)."""

    def __init__(self, stat: Path = Path("/proc/stat"), meminfo: Path = Path("/proc/meminfo")):
        self.stat, self.meminfo = stat, meminfo
        self.prev: dict[int, tuple[int, int]] | None = None

    def sample(self) -> DeviceSample:
        now = parse_proc_stat(self.stat.read_text())
        used, total = parse_meminfo(self.meminfo.read_text())
        cores = []
        for cpu, (busy, tot) in sorted(now.items()):
            util = None
            if self.prev and cpu in self.prev:
                db, dt = busy - self.prev[cpu][0], tot - self.prev[cpu][1]
                util = 100.0 * db / dt if dt > 0 else 0.0
            cores.append(CoreSample(cpu, util))
        self.prev = now
        return DeviceSample("cpu", cores, used, total, "/proc/stat")

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- streaming tools

class _Stream:
    """Run a tool that prints one record per line forever; hand each line to `on_line` on a reader thread."""

    def __init__(self, argv: list[str], on_line):
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         bufsize=1)
        except OSError as e:
            raise DeviceError(f"cannot run {argv[0]}: {e.strerror or e}") from None
        self.argv = argv
        self.stderr_tail = ""
        self._thread = threading.Thread(target=self._read, args=(on_line,), daemon=True)
        self._thread.start()

    def _read(self, on_line) -> None:
        for line in self.proc.stdout:
            if line.strip():
                on_line(line)

    def failure(self) -> str | None:
        """Why the tool is gone, if it is."""
        rc = self.proc.poll()
        if rc is None:
            return None
        tail = self.proc.stderr.read().strip().splitlines()[-1:] if self.proc.stderr else []
        return f"{Path(self.argv[0]).name} exited with {rc}" + (f": {tail[0]}" if tail else "")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class NeuronMonitorSampler:
    """Spawns `neuron-monitor -c <config>` and keeps its latest document."""

    def __init__(self, tools_dir: Path, period_s: float = 1.0):
        self.dir = tempfile.TemporaryDirectory(prefix="neuronserve-top-")
        conf = Path(self.dir.name) / "monitor.json"
        conf.write_text(json.dumps(neuron_monitor_config(period_s)))
        self.latest: dict | None = None
        self.stream = _Stream([str(Path(tools_dir) / "neuron-monitor"), "-c", str(conf)], self._on_line)

    def _on_line(self, line: str) -> None:
        try:
            self.latest = json.loads(line)
        except ValueError:
            pass                    # a partial or banner line: the next document replaces it

    def sample(self) -> DeviceSample:
        if self.latest is None:
            return DeviceSample("neuron", source="neuron-monitor",
                                error=self.stream.failure() or "waiting for neuron-monitor's first report")
        return parse_neuron_monitor(self.latest)

    def close(self) -> None:
        self.stream.close()
        self.dir.cleanup()


class NvidiaSmiSampler:
    """Spawns `nvidia-smi --query-gpu=... --loop-ms=<period>` and keeps the latest line per GPU."""

    def __init__(self, nvidia_smi: str = "nvidia-smi", period_s: float = 1.0):
        self.latest: dict[int, CoreSample] = {}
        self.stream = _Stream([nvidia_smi, f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits",
                               f"--loop-ms={int(max(period_s, 0.1) * 1000)}"], self._on_line)

    def _on_line(self, line: str) -> None:
        core = parse_nvidia_smi_line(line)
        if core is not None:
            self.latest[core.index] = core

    def sample(self) -> DeviceSample:
        err = None if self.latest else (self.stream.failure() or "waiting for nvidia-smi's first report")
        return DeviceSample("cuda", [self.latest[i] for i in sorted(self.latest)], source="nvidia-smi", error=err)

    def close(self) -> None:
        self.stream.close()


def sampler_for(backend: str, *, tools_dir: Path = Path("/opt/aws/neuron/bin"), period_s: float = 1.0):
    """The sampler for a plan's backend."""
    if backend == "neuron":
        return NeuronMonitorSampler(tools_dir, period_s)
    if backend == "cuda":
        return NvidiaSmiSampler(period_s=period_s)
    return ProcStatSampler()
