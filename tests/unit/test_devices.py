"""Device discovery, pinning and planning on Neuron and CUDA hosts, from recorded tool outputs.

The samples in tests/data/{neuron-ls,nvidia-smi} follow the formats in NEURON.md; a fake `run` replays them
and records the exact commands discovery ran.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from neuronserve import config
from neuronserve.devices import cpu as cpu_devices, cuda, discover_host, neuron
from neuronserve.errors import DeviceError, PlanError
from neuronserve.plan import make_plan

DATA = Path(__file__).resolve().parent.parent / "data"
NEURON_LS = "/opt/aws/neuron/bin/neuron-ls"
NEW = [NEURON_LS, "--output-format", "json"]
OLD = [NEURON_LS, "--json-output"]
SMI = "/usr/bin/nvidia-smi"


class FakeRun:
    """Answers the commands it was given, records every call, and fails the test on any other command."""

    def __init__(self, answers: dict[tuple, tuple[int, str, str]]):
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv, timeout=None):
        self.calls.append(list(argv))
        key = tuple(argv)
        assert key in self.answers, f"unexpected command {argv}"
        rc, out, err = self.answers[key]
        return subprocess.CompletedProcess(argv, rc, out, err)


def neuron_ls(sample: str) -> FakeRun:
    """neuron-ls as the sample's tool version behaves: a new tool answers the new flag, an old one rejects it."""
    text = (DATA / "neuron-ls" / sample).read_text()
    if ".output-format." in sample:
        return FakeRun({tuple(NEW): (0, text, "")})
    unknown = (DATA / "neuron-ls" / "unknown-flag.stderr").read_text()
    return FakeRun({tuple(NEW): (2, "", unknown), tuple(OLD): (0, text, "")})


def discover_sample(sample: str, tmp_path: Path, cpus=range(8)) -> tuple:
    run = neuron_ls(sample)
    host = neuron.discover(run=run, neuron_ls=NEURON_LS, root=tmp_path, cpus=list(cpus))
    return host, run


def cfg_from(tmp_path: Path, models: str, backend: str = "neuron", extra: str = "") -> config.Config:
    p = tmp_path / "neuronserve.toml"
    p.write_text(f'[server]\nbackend = "{backend}"\nbase_port = 9100\nmodel_repository = "/srv/models"\n{extra}'
                 + models)
    return config.load(p, dropins=False)


def model(name: str, **keys) -> str:
    body = {"task": '"text-classification"', "source": '"/srv/src"', **{k: repr(v) if isinstance(v, str) else v
                                                                            for k, v in keys.items()}}
    return f"[models.{name}]\n" + "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n"
                                          for k, v in body.items())


# ---------------------------------------------------------------- neuron-ls samples

@pytest.mark.parametrize("sample, kind, devices, cores, flags", [
    ("inf1.6xlarge.json-output.json", "inf1", 4, 16, [NEW, OLD]),
    ("inf2.xlarge.output-format.json", "inf2", 1, 2, [NEW]),
    ("inf2.xlarge.json-output.json", "inf2", 1, 2, [NEW, OLD]),
    ("inf2.48xlarge.output-format.json", "inf2", 12, 24, [NEW]),
    ("inf2.48xlarge.json-output.json", "inf2", 12, 24, [NEW, OLD]),
    ("trn2.48xlarge.output-format.json", "trn2", 16, 64, [NEW]),
])
def test_neuron_ls_samples(tmp_path, sample, kind, devices, cores, flags):
    host, run = discover_sample(sample, tmp_path)
    assert run.calls == flags                       # new flag first, the old one only when it is refused
    assert host.backend == "neuron" and host.kind == kind
    assert host.source == "neuron-ls " + " ".join(flags[-1][1:])
    assert len({c.device for c in host.cores}) == devices
    assert [c.index for c in host.cores] == list(range(cores))
    per_device = cores // devices
    # device d holds cores d*nc .. d*nc+nc-1, whether neuron-ls lists neuroncore_ids or not
    assert all(c.device == c.index // per_device for c in host.cores)
    assert [d["nc_count"] for d in host.details["devices"]] == [per_device] * devices


def test_core_5_is_on_neuron2_on_inf2_but_neuron1_on_inf1(tmp_path):
    inf2, _ = discover_sample("inf2.48xlarge.json-output.json", tmp_path)
    inf1, _ = discover_sample("inf1.6xlarge.json-output.json", tmp_path)
    assert inf2.core(5).device == 2 and inf1.core(5).device == 1


def test_cpu_affinity_becomes_core_cpus(tmp_path):
    host, _ = discover_sample("inf2.48xlarge.output-format.json", tmp_path)
    node0 = tuple(list(range(0, 48)) + list(range(96, 144)))
    node1 = tuple(list(range(48, 96)) + list(range(144, 192)))
    assert host.core(0).cpus == node0 and host.core(11).cpus == node0
    assert host.core(12).cpus == node1 and host.core(23).cpus == node1
    assert host.details["devices"][7]["numa_node"] == "1"
    old, _ = discover_sample("inf2.48xlarge.json-output.json", tmp_path)
    assert all(c.cpus == () for c in old.cores)      # older tools do not say


def test_neuron_processes_become_holders(tmp_path):
    host, _ = discover_sample("inf2.48xlarge.output-format.json", tmp_path)
    held = sorted((h.pid, h.device, h.cores) for h in host.holders)
    assert held == [(41877, 2, (4, 5)), (41877, 3, (6, 7)), (52210, 7, (14, 15))]
    assert "old-bench/serve.py" in next(h.command for h in host.holders if h.pid == 41877)
    idle, _ = discover_sample("inf2.xlarge.output-format.json", tmp_path)
    assert idle.holders == []


def test_instance_type_from_dmi_tells_trn1_from_inf2(tmp_path):
    dmi = tmp_path / "sys/devices/virtual/dmi/id/product_name"
    dmi.parent.mkdir(parents=True)
    dmi.write_text("trn1.2xlarge\n")
    host, _ = discover_sample("inf2.xlarge.output-format.json", tmp_path)
    assert host.kind == "trn1" and host.details["instance_type"] == "trn1.2xlarge"


def test_banner_before_json_is_tolerated():
    text = (DATA / "neuron-ls" / "inf2.xlarge.output-format.json").read_text()
    devices = neuron.parse_neuron_ls("instance-type: inf2.xlarge\ninstance-id: i-0abc\n" + text)
    assert [d["neuron_device"] for d in devices] == [0]
    with pytest.raises(ValueError):
        neuron.parse_neuron_ls("Error: no device\n")
    with pytest.raises(ValueError):
        neuron.parse_neuron_ls('[{"bdf": "00:1f.0"}]')


def make_sysfs(root: Path, devices: int, *, core_count: int | None, core_dirs: int = 0, **arch: str) -> None:
    for d in range(devices):
        dev = root / "sys/devices/virtual/neuron_device" / f"neuron{d}"
        dev.mkdir(parents=True)
        if core_count is not None:
            (dev / "core_count").write_text(f"{core_count}\n")
        for c in range(core_dirs):
            (dev / f"neuron_core{c}" / "stats").mkdir(parents=True)
        for name, value in arch.items():
            (dev / "info/architecture").mkdir(parents=True, exist_ok=True)
            (dev / "info/architecture" / name).write_text(value + "\n")


def test_sysfs_when_neuron_ls_fails(tmp_path):
    make_sysfs(tmp_path, 6, core_count=2, device_name="Inferentia2", arch_type="NCv2")
    missing = (DATA / "neuron-ls" / "driver-missing.stderr").read_text()
    run = FakeRun({tuple(NEW): (1, "", missing), tuple(OLD): (1, "", missing)})
    host = neuron.discover(run=run, neuron_ls=NEURON_LS, root=tmp_path, cpus=[0, 1])
    assert run.calls == [NEW, OLD]
    assert host.source == "sysfs" and host.kind == "inf2"
    assert [(c.index, c.device) for c in host.cores][-3:] == [(9, 4), (10, 5), (11, 5)]
    assert neuron.group_cpus(host, [10, 11]) == [0, 1]      # no affinity in sysfs: all host CPUs


def test_sysfs_without_core_count_counts_core_dirs(tmp_path):
    make_sysfs(tmp_path, 4, core_count=None, core_dirs=4, arch_type="NCv1")
    # neuron-ls absent: nothing is run at all
    host = neuron.discover(run=FakeRun({}), root=tmp_path, cpus=[0])
    assert host.kind == "inf1" and len(host.cores) == 16 and host.core(5).device == 1


def test_tool_found_in_tools_dir_under_root(tmp_path):
    tool = tmp_path / "opt/aws/neuron/bin/neuron-ls"
    tool.parent.mkdir(parents=True)
    tool.touch()
    text = (DATA / "neuron-ls" / "inf2.xlarge.output-format.json").read_text()
    run = FakeRun({(str(tool), "--output-format", "json"): (0, text, "")})
    host = neuron.discover(run=run, root=tmp_path, cpus=[0])
    assert run.calls == [[str(tool), "--output-format", "json"]] and len(host.cores) == 2


def test_no_devices_anywhere_is_a_device_error(tmp_path):
    empty = (DATA / "neuron-ls" / "no-devices.output-format.json").read_text()
    run = FakeRun({tuple(NEW): (0, empty, "")})
    with pytest.raises(DeviceError) as e:
        neuron.discover(run=run, neuron_ls=NEURON_LS, root=tmp_path)
    assert "lists no devices" in str(e.value) and "neuron_device does not exist" in str(e.value)
    with pytest.raises(DeviceError, match="neuron-ls is not in .* nor on PATH"):
        neuron.discover(run=FakeRun({}), root=tmp_path)


def test_auto_on_this_machine_is_cpu():
    if Path("/dev/neuron0").exists() or shutil.which("nvidia-smi"):
        pytest.skip("this machine has an accelerator")
    with pytest.raises(DeviceError, match="no Neuron devices"):
        discover_host("neuron")
    with pytest.raises(DeviceError, match="no CUDA GPUs"):
        discover_host("cuda")
    host = discover_host("auto")
    assert host.backend == "cpu" and len(host.cores) == len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- Neuron pinning

def test_pin_env_contiguous_range_and_host_side_settings(tmp_path):
    host, _ = discover_sample("inf2.48xlarge.output-format.json", tmp_path, cpus=range(192))
    cfg = cfg_from(tmp_path, model("bert"), extra="timeout_s = 20\n[neuron]\nexec_timeout_s = 7\nlog_level = "
                                                  '"INFO"\nasync_inflight = 4\n')
    env = neuron.pin_env(host, [4, 5, 6, 7], 3, cfg, "bert-2")
    assert env["NEURON_RT_VISIBLE_CORES"] == "4-7"
    assert "NEURON_RT_NUM_CORES" not in env
    assert env["NEURON_PROCESS_TAG"] == "bert-2"
    assert env["NEURON_RT_EXEC_TIMEOUT"] == "7" and env["NEURON_RT_LOG_LEVEL"] == "INFO"
    assert env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "4"
    assert env["NEURONSERVE_CPUS"] == "0-47,96-143"          # devices 2 and 3 sit on NUMA node 0
    assert env["NEURONSERVE_THREADS"] == env["OMP_NUM_THREADS"] == "1"
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["GOMP_SPINCOUNT"] == "10000"


def test_pin_env_lists_and_spans(tmp_path):
    host, _ = discover_sample("inf2.48xlarge.output-format.json", tmp_path, cpus=range(192))
    cfg = cfg_from(tmp_path, model("bert"))
    env = neuron.pin_env(host, [0, 2, 5], 1, cfg, "bert-0")
    assert env["NEURON_RT_VISIBLE_CORES"] == "0,2,5"
    assert neuron.pin_env(host, [0, 1, 5, 6, 7], 1, cfg, "x")["NEURON_RT_VISIBLE_CORES"] == "0-1,5-7"
    # cores 10-13 are on devices 5 (node 0) and 6 (node 1): pinned to both nodes
    assert neuron.pin_env(host, [10, 11, 12, 13], 1, cfg, "x")["NEURONSERVE_CPUS"] == "0-191"


def test_pin_env_inf1_without_affinity_uses_all_cpus_and_no_async(tmp_path):
    host, _ = discover_sample("inf1.6xlarge.json-output.json", tmp_path, cpus=range(24))
    env = neuron.pin_env(host, [4, 5, 6, 7], 2, cfg_from(tmp_path, model("bert")), "bert-1")
    assert env["NEURON_RT_VISIBLE_CORES"] == "4-7" and env["NEURONSERVE_CPUS"] == "0-23"
    assert "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS" not in env


# ---------------------------------------------------------------- plans over Neuron hosts

def test_plan_inf2_48xlarge_twelve_groups_of_two(tmp_path):
    host, _ = discover_sample("inf2.48xlarge.output-format.json", tmp_path, cpus=range(192))
    plan = make_plan(cfg_from(tmp_path, model("bert", cores_per_group=2, copies=2)), host, python="py")
    assert len(plan.groups) == 12
    cores = [c for g in plan.groups for c in g.cores]
    assert sorted(cores) == list(range(24)) and len(set(cores)) == 24
    # a pair never straddles two devices
    assert all(len({host.core(c).device for c in g.cores}) == 1 for g in plan.groups)
    assert [g.env["NEURON_RT_VISIBLE_CORES"] for g in plan.groups][:3] == ["0-1", "2-3", "4-5"]
    assert [g.env["NEURON_PROCESS_TAG"] for g in plan.groups][-1] == "bert-11"
    assert [g.port for g in plan.groups] == list(range(9100, 9112))
    g = plan.groups[7]
    assert g.cpus == list(range(48, 96)) + list(range(144, 192)) and g.settings.copies == 2
    assert g.env["NEURONSERVE_CPUS"] == g.settings.cpus == "48-95,144-191"
    assert all("NEURON_RT_NUM_CORES" not in g.env for g in plan.groups)


def test_plan_inf1_6xlarge(tmp_path):
    host, _ = discover_sample("inf1.6xlarge.json-output.json", tmp_path, cpus=range(24))
    per_device = make_plan(cfg_from(tmp_path, model("bert", cores_per_group=4)), host, python="py")
    assert [g.env["NEURON_RT_VISIBLE_CORES"] for g in per_device.groups] == ["0-3", "4-7", "8-11", "12-15"]
    per_core = make_plan(cfg_from(tmp_path, model("bert", cores_per_group=1)), host, python="py")
    assert len(per_core.groups) == 16 and per_core.groups[13].env["NEURON_RT_VISIBLE_CORES"] == "13"


def test_plan_two_models_share_inf2_xlarge(tmp_path):
    host, _ = discover_sample("inf2.xlarge.output-format.json", tmp_path, cpus=range(4))
    plan = make_plan(cfg_from(tmp_path, model("qa", groups=1) + model("cls", groups=1)), host, python="py")
    assert [(g.name, g.env["NEURON_RT_VISIBLE_CORES"]) for g in plan.groups] == [("qa-0", "0"), ("cls-0", "1")]


@pytest.mark.parametrize("keys, message", [
    ({"groups": 13, "cores_per_group": 2}, r"13 group\(s\) x 2 core\(s\) = 26 cores, but only 24 are free"),
    ({"cores": "20-27"}, r"names 24-27, which this host does not have \(neuron cores: 0-23\)"),
    ({"cores_per_group": 32}, r"gets no group: 24 free core\(s\) and cores_per_group = 32"),
])
def test_impossible_plans_say_why(tmp_path, keys, message):
    host, _ = discover_sample("inf2.48xlarge.output-format.json", tmp_path)
    with pytest.raises(PlanError, match=message):
        make_plan(cfg_from(tmp_path, model("bert", **keys)), host, python="py")


# ---------------------------------------------------------------- find_python

def make_venvs(root: Path, *names: str) -> None:
    for name in names:
        python = root / "opt" / name / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.touch()


def test_find_python_newest_venv_that_imports(tmp_path):
    make_venvs(tmp_path, "aws_neuronx_venv_pytorch_2_7", "aws_neuronx_venv_pytorch_2_8",
               "aws_neuronx_venv_pytorch_2_9", "aws_neuronx_venv_pytorch_2_9_nxd_inference",
               "aws_neuron_venv_pytorch_1_13_inf1")
    tried = []
    works = {"aws_neuronx_venv_pytorch_2_8", "aws_neuronx_venv_pytorch_2_9_nxd_inference",
             "aws_neuron_venv_pytorch_1_13_inf1"}

    def importable(python, module):
        tried.append((Path(python).parent.parent.name, module))
        return Path(python).parent.parent.name in works

    cfg = config.Config()
    found = neuron.find_python(cfg, "inf2", root=tmp_path, importable=importable)
    assert found == str(tmp_path / "opt/aws_neuronx_venv_pytorch_2_9_nxd_inference/bin/python")
    # the plain 2.9 venv (no torch_neuronx any more) was tried first, then its variant
    assert tried == [("aws_neuronx_venv_pytorch_2_9", "torch_neuronx"),
                     ("aws_neuronx_venv_pytorch_2_9_nxd_inference", "torch_neuronx")]
    tried.clear()
    assert neuron.find_python(cfg, "inf1", root=tmp_path, importable=importable) == \
        str(tmp_path / "opt/aws_neuron_venv_pytorch_1_13_inf1/bin/python")
    assert tried == [("aws_neuron_venv_pytorch_1_13_inf1", "torch_neuron")]


def test_find_python_unknown_kind_falls_back_to_inf1_and_none_without_venvs(tmp_path):
    make_venvs(tmp_path, "aws_neuron_venv_pytorch_1_13_inf1")
    assert neuron.find_python(config.Config(), root=tmp_path, importable=lambda p, m: m == "torch_neuron") \
        .endswith("aws_neuron_venv_pytorch_1_13_inf1/bin/python")
    assert neuron.find_python(config.Config(), root=tmp_path / "empty", importable=lambda p, m: True) is None


def test_can_import_runs_the_interpreter(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = "-c" ] && [ "$2" = "import torch_neuronx" ]\n')
    fake.chmod(0o755)
    assert neuron.can_import(str(fake), "torch_neuronx")
    assert not neuron.can_import(str(fake), "torch_neuron")
    assert not neuron.can_import(str(tmp_path / "missing"), "torch_neuronx")


# ---------------------------------------------------------------- CUDA

def smi(host: str) -> FakeRun:
    d = DATA / "nvidia-smi"
    return FakeRun({(SMI, *cuda.QUERY_GPU): (0, (d / f"{host}.query-gpu.csv").read_text(), ""),
                    (SMI, *cuda.QUERY_APPS): (0, (d / f"{host}.query-compute-apps.csv").read_text(), "")})


def test_nvidia_smi_four_gpus_with_holders():
    run = smi("p3.8xlarge")
    host = cuda.discover(nvml=False, run=run, nvidia_smi=SMI, cpus=list(range(32)))
    assert run.calls == [[SMI, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"],
                         [SMI, "--query-compute-apps=pid,gpu_uuid,process_name", "--format=csv,noheader"]]
    assert host.backend == host.kind == "cuda" and host.source == "nvidia-smi"
    assert [(c.index, c.device) for c in host.cores] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert host.details["devices"][2]["name"] == "Tesla V100-SXM2-16GB"
    assert host.details["devices"][2]["memory_bytes"] == 16 << 30
    assert [(h.pid, h.device, h.command) for h in host.holders] == [
        (30412, 1, "/usr/bin/python3"), (30988, 3, "/opt/tritonserver/bin/tritonserver")]


def test_nvidia_smi_one_idle_gpu():
    host = cuda.discover(nvml=False, run=smi("g5.xlarge"), nvidia_smi=SMI, cpus=[0, 1, 2, 3])
    assert [c.index for c in host.cores] == [0] and host.holders == []
    assert host.details["devices"][0]["name"] == "NVIDIA A10G"


def test_nvidia_smi_without_driver_or_binary(tmp_path, monkeypatch):
    out = (DATA / "nvidia-smi" / "driver-missing.stdout").read_text()
    run = FakeRun({(SMI, *cuda.QUERY_GPU): (9, out, "")})
    with pytest.raises(DeviceError, match="rc 9.*couldn't communicate with the NVIDIA driver"):
        cuda.discover(nvml=False, run=run, nvidia_smi=SMI)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceError, match="nvidia-smi is not on PATH"):
        cuda.discover(nvml=False, run=FakeRun({}))


class FakeNVML:
    """The pynvml calls discovery makes, for 2 GPUs; records them."""

    class Error(Exception):
        pass

    def __init__(self, fail_init: bool = False):
        self.fail_init = fail_init
        self.calls: list[str] = []

    def __getattr__(self, name):
        answers = {
            "nvmlInit": lambda: self._init(),
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: 2,
            "nvmlDeviceGetHandleByIndex": lambda i: f"h{i}",
            # GPU 0 near CPUs 0-1, GPU 1 near CPUs 64-65 (second 64-bit word)
            "nvmlDeviceGetCpuAffinity": lambda h, n: [0b11, 0] if h == "h0" else [0, 0b11],
            "nvmlDeviceGetComputeRunningProcesses": lambda h: [type("P", (), {"pid": 777})()] if h == "h1" else [],
            "nvmlSystemGetProcessName": lambda pid: b"/usr/bin/python3",
            "nvmlDeviceGetUUID": lambda h: f"GPU-{h}",
            "nvmlDeviceGetName": lambda h: b"NVIDIA L4",
            "nvmlDeviceGetMemoryInfo": lambda h: type("M", (), {"total": 24 << 30})(),
        }
        if name not in answers:
            raise AttributeError(name)

        def call(*args):
            self.calls.append(name)
            return answers[name](*args)
        return call

    def _init(self):
        if self.fail_init:
            raise self.Error("Driver Not Loaded")


def test_nvml_discovery():
    nvml = FakeNVML()
    host = cuda.discover(nvml=nvml, run=FakeRun({}), cpus=list(range(128)))
    assert host.source == "nvml" and [c.cpus for c in host.cores] == [(0, 1), (64, 65)]
    assert [(h.pid, h.device, h.command) for h in host.holders] == [(777, 1, "/usr/bin/python3")]
    assert host.details["devices"][1] == {"device": 1, "uuid": "GPU-h1", "name": "NVIDIA L4",
                                          "memory_bytes": 24 << 30}
    assert nvml.calls[0] == "nvmlInit" and nvml.calls[-1] == "nvmlShutdown"
    assert cuda.pin_env(host, [1], 2, config.Config(), "emb-1")["NEURONSERVE_CPUS"] == "64-65"


def test_nvml_failure_falls_back_to_nvidia_smi():
    nvml = FakeNVML(fail_init=True)
    host = cuda.discover(nvml=nvml, run=smi("g5.xlarge"), nvidia_smi=SMI, cpus=[0])
    assert host.source == "nvidia-smi" and nvml.calls == ["nvmlInit"]
    with pytest.raises(DeviceError, match="NVML: Driver Not Loaded.*rc 9"):
        cuda.discover(nvml=FakeNVML(fail_init=True), nvidia_smi=SMI,
                      run=FakeRun({(SMI, *cuda.QUERY_GPU): (9, "NVIDIA-SMI has failed", "")}))


def test_cuda_pin_env_and_plan(tmp_path):
    host = cuda.discover(nvml=False, run=smi("p3.8xlarge"), nvidia_smi=SMI, cpus=list(range(32)))
    env = cuda.pin_env(host, [1, 3], 2, config.Config(), "emb-0")
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["NEURONSERVE_CPUS"] == "0-31" and env["OMP_NUM_THREADS"] == "1"
    plan = make_plan(cfg_from(tmp_path, model("emb", cores_per_group=2), backend="cuda"), host, python="py")
    assert [g.env["CUDA_VISIBLE_DEVICES"] for g in plan.groups] == ["0,1", "2,3"]
    assert cuda.find_python(config.Config()) is None


# ---------------------------------------------------------------- expected memory per group (footprint.py)

GIB = 1 << 30


def fake_artifact(repo: Path, name: str, backend: str, target: str, files: dict[str, int], buckets: dict,
                  weights: str = "") -> None:
    """A compiled model directory whose files have the given sizes (sparse), as `neuronserve compile` lays out."""
    from neuronserve.build.artifact import Bucket, Manifest, write_manifest

    directory = repo / name
    directory.mkdir(parents=True)
    for file, size in files.items():
        with open(directory / file, "wb") as f:
            f.truncate(size)
    write_manifest(directory, Manifest(
        name=name, task="text-classification", backend=backend, target=target, source="/srv/src", created="now",
        versions={}, input_names=["input_ids"], output_names=["logits"], weights=weights,
        buckets=[Bucket(batch=b, seq=s, file=file, sha256="0") for (b, s), file in buckets.items()]))


def plan_with(tmp_path, host, backend: str, **keys):
    cfg = cfg_from(tmp_path, model("bert", **keys), backend=backend)
    cfg.server.model_repository = tmp_path / "repo"
    return make_plan(cfg, host, python="py")


INF2_BUCKETS = {(1, 128): "b1_s128.pt", (4, 128): "b4_s128.pt", (8, 128): "b8_s128.pt"}


def test_inf2_counts_the_weights_once_per_copy_and_refuses_what_a_core_cannot_hold(tmp_path):
    host, _ = discover_sample("inf2.xlarge.output-format.json", tmp_path, cpus=range(4))
    # BERT-large-like: 1.25 GiB of weights; each bucket's file carries them beside a 0.25 GiB graph
    files = {"weights.pt": 5 * GIB // 4, **{f: 3 * GIB // 2 for f in INF2_BUCKETS.values()}}
    fake_artifact(tmp_path / "repo", "bert", "neuron", "inf2", files, INF2_BUCKETS, weights="weights.pt")
    plan = plan_with(tmp_path, host, "neuron", copies=2, cores_per_group=1)
    f = plan.footprints["bert-0"]
    # a copy: the weights once (1.25) and three graphs (0.75): 2 GiB; two copies on the group's one core
    assert f.device_bytes_per_core == 4 * GIB and f.device_capacity == 16 * GIB and f.host_bytes == 0
    assert f.why == "1.25 GiB of weights once + 0.75 GiB of bucket graphs per copy x 2 copies per core"
    with pytest.raises(PlanError, match=r"group bert-0 needs 18.00 GiB of device memory per core \(.* x 9 copies "
                                        r"per core\), more than a core's 16.00 GiB: lower copies"):
        plan_with(tmp_path, host, "neuron", copies=9, cores_per_group=1)
    # two cores per group: the copies spread round-robin
    assert plan_with(tmp_path, host, "neuron", copies=9, cores_per_group=2).footprints["bert-0"] \
        .device_bytes_per_core == 5 * 2 * GIB


def test_inf1_keeps_every_bucket_with_its_weights_and_cpu_copies_share_one(tmp_path):
    host, _ = discover_sample("inf1.6xlarge.json-output.json", tmp_path, cpus=range(24))
    files = {"b1_s128.pt": 600 << 20, "b4_s128.pt": 700 << 20}
    fake_artifact(tmp_path / "repo", "bert", "neuron", "inf1", files, {(1, 128): "b1_s128.pt", (4, 128): "b4_s128.pt"})
    f = plan_with(tmp_path, host, "neuron", copies=1, cores_per_group=1).footprints["bert-0"]
    # an Inf1 chip's 8 GiB over its 4 cores
    assert (f.device_bytes_per_core, f.device_capacity) == (1300 << 20, 2 * GIB)
    with pytest.raises(PlanError, match=r"needs 2.54 GiB .* more than a core's 2.00 GiB"):
        plan_with(tmp_path, host, "neuron", copies=2, cores_per_group=1)


def test_cuda_loads_each_distinct_file_per_copy_and_the_cpu_once_per_group(tmp_path):
    host = cuda.discover(nvml=False, run=smi("g5.xlarge"), nvidia_smi=SMI, cpus=[0, 1, 2, 3])
    shared = {(b, 128): "model.pt" for b in (1, 4, 8)}
    fake_artifact(tmp_path / "gpu" / "repo", "bert", "cuda", "cuda", {"model.pt": 2 * GIB}, shared)
    f = plan_with(tmp_path / "gpu", host, "cuda", copies=3).footprints["bert-0"]
    assert f.device_bytes_per_core == 6 * GIB and f.device_capacity == host.details["devices"][0]["memory_bytes"]
    cpu_host = cpu_devices.discover(affinity={0, 1})
    fake_artifact(tmp_path / "cpu" / "repo", "bert", "cpu", "cpu", {"model.pt": GIB // 2}, shared)
    f = plan_with(tmp_path / "cpu", cpu_host, "cpu", copies=4).footprints["bert-0"]
    assert (f.host_bytes, f.device_bytes_per_core, f.device_capacity) == (GIB // 2, 0, None)
    assert f.why == "0.50 GiB of traces, shared by 4 copies"
