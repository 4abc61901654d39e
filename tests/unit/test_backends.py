"""The Neuron and CUDA backends, driven end to end on the CPU through stand-ins that record the exact calls.

- Neuron: importable fake `torch_neuronx` / `torch_neuron` packages (written to a tmp dir on sys.path) whose
  trace() records its arguments and returns a real torch.jit trace, so compile, save, checksum, manifest and
  load all run for real.
- CUDA: torch itself is patched at the boundary: Tensor.to / Module.to / Module.half / torch.jit.load record
  every move to "cuda:0" and keep the tensors on the CPU; torch.cuda reports one GPU.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForQuestionAnswering

from neuronserve import tasks
from neuronserve.build import compile as compiler
from neuronserve.build.artifact import read_manifest
from neuronserve.build.backends import get, neuron as neuron_backend
from neuronserve.errors import ArtifactError, DeviceError
from neuronserve.tasks.modules import TaskModule

NAMES = ["input_ids", "attention_mask", "token_type_ids"]

FAKE_FRAMEWORK = '''
"""Stand-in for {module}: records calls, traces with torch.jit on the CPU."""
import torch

__version__ = "{version}"
CALLS = []
EVENTS.append("import {module}")


def trace({signature}):
    CALLS.append(dict(module=func, example=[(tuple(t.shape), t.dtype) for t in example_inputs], **kwargs))
    if kwargs.get("compiler_workdir"):
        with open(kwargs["compiler_workdir"] + "/log-neuron-cc.txt", "w") as f:
            f.write("compiler log\\n")
    if "{module}" in FAILING:
        raise RuntimeError("ERROR 70001: compiler failed on the graph")
    with torch.no_grad():
        return torch.jit.trace(func, example_inputs, strict=False)


def replace_weights(neuron_model, weights):
    EVENTS.append(("replace_weights", id(neuron_model), id(weights), sorted(weights)[:1]))
'''
SIGNATURES = {
    # torch_neuronx.trace(func, example_inputs, *_, compiler_workdir=None, compiler_args=None, ..., cpu_backend=False)
    "torch_neuronx": "func, example_inputs, *_, **kwargs",
    # torch_neuron.trace(model, example_inputs, **kwargs)
    "torch_neuron": "func, example_inputs, **kwargs",
}


class Fakes:
    """Writes importable fake Neuron packages; `events` records imports and torch.jit.load calls in order."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.events: list[str] = []
        self.failing: set[str] = set()
        shared = type(sys)("neuronserve_test_events")   # what the fake packages report into
        shared.EVENTS, shared.FAILING = self.events, self.failing
        monkeypatch.setitem(sys.modules, "neuronserve_test_events", shared)
        monkeypatch.syspath_prepend(str(root))

    def install(self, module: str, version: str = "2.9.0.1", compiler: str | None = None, fail: bool = False):
        (self.root / module).mkdir(parents=True)
        (self.root / module / "__init__.py").write_text(
            "from neuronserve_test_events import EVENTS, FAILING\n"
            + FAKE_FRAMEWORK.format(module=module, version=version, signature=SIGNATURES[module]))
        if compiler:
            (self.root / compiler).mkdir()
            (self.root / compiler / "__init__.py").write_text('__version__ = "2.21.33363"\n')
        if fail:
            self.failing.add(module)
        importlib.invalidate_caches()

    def module(self, name: str):
        return sys.modules[name]


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    for name in ("torch_neuronx", "torch_neuron", "neuronxcc", "neuroncc"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield Fakes(tmp_path / "site", monkeypatch)
    for name in ("torch_neuronx", "torch_neuron", "neuronxcc", "neuroncc"):
        sys.modules.pop(name, None)


@pytest.fixture
def no_neuron_devices(tmp_path, monkeypatch):
    dev = tmp_path / "dev"
    dev.mkdir()
    monkeypatch.setattr(neuron_backend, "DEV", dev)
    return dev


def compile_for(tiny_model_dir, tmp_path, task, **kw):
    args = dict(name="m", task=task, batch_sizes=[1, 2], sequence_lengths=[16, 32])
    return compiler.compile_model(tiny_model_dir(task), tmp_path / "repo" / "m", **{**args, **kw})


def eager(tiny_model_dir, task, arrays):
    import transformers

    model = getattr(transformers, tasks.TASKS[task].auto_class).from_pretrained(tiny_model_dir(task)).eval()
    with torch.no_grad():
        return tasks.build_module(task, model, NAMES)(*arrays)


# ---------------------------------------------------------------- Neuron, Inf2/Trn: torch_neuronx

INF2_ARGS = ["--auto-cast", "matmult", "--auto-cast-type", "bf16"]


def test_inf2_compile_calls_torch_neuronx_trace_per_bucket(fakes, no_neuron_devices, tiny_model_dir, tmp_path):
    fakes.install("torch_neuronx", compiler="neuronxcc")
    manifest = compile_for(tiny_model_dir, tmp_path, "question-answering", backend="neuron", target="inf2",
                           compiler_args=INF2_ARGS)
    calls = fakes.module("torch_neuronx").CALLS
    assert [c["example"] for c in calls] == [[((b, s), torch.int64)] * 3 for b in (1, 2) for s in (16, 32)]
    for c, bucket in zip(calls, manifest.buckets):
        assert isinstance(c["module"], TaskModule) and isinstance(c["module"].model, BertForQuestionAnswering)
        assert c["module"].model.config._attn_implementation == "eager"
        assert c["compiler_args"] == INF2_ARGS + ["--target", "inf2"]
        # a per-bucket work directory beside the output, removed after a successful compile
        workdir = Path(c["compiler_workdir"])
        assert workdir.name == f"b{bucket.batch}_s{bucket.seq}" and workdir.parent.parent == tmp_path / "repo"
        assert not workdir.exists()
        # no /dev/neuron*: compile on this build host with the CPU backend of neuronx-cc
        assert c["cpu_backend"] is True
        # the weights stay out of each bucket's NEFF: a copy gives all its buckets one set at load
        assert c["inline_weights_to_neff"] is False
        assert set(c) == {"module", "example", "compiler_args", "compiler_workdir", "cpu_backend",
                          "inline_weights_to_neff"}
    # every bucket a trace of its own (fixed shapes), the weights saved once beside them
    assert [b.file for b in manifest.buckets] == ["b1_s16.pt", "b1_s32.pt", "b2_s16.pt", "b2_s32.pt"]
    assert manifest.weights == "weights.pt"
    saved = torch.load(tmp_path / "repo" / "m" / "weights.pt")
    assert saved.keys() == calls[0]["module"].state_dict().keys()
    assert (manifest.backend, manifest.target, manifest.dtype) == ("neuron", "inf2", "bfloat16")
    assert manifest.compiler_args == INF2_ARGS
    assert manifest.versions["torch_neuronx"] == "2.9.0.1" and manifest.versions["neuronxcc"] == "2.21.33363"
    assert manifest.warmup.atol == 5e-2
    assert read_manifest(tmp_path / "repo" / "m", backend="neuron") == manifest
    with pytest.raises(ArtifactError, match=r"compiled for neuron \(inf2\), but this group serves on cpu"):
        read_manifest(tmp_path / "repo" / "m", backend="cpu")


def test_inf2_on_a_neuron_host_traces_on_the_device(fakes, no_neuron_devices, tiny_model_dir, tmp_path):
    (no_neuron_devices / "neuron0").touch()
    fakes.install("torch_neuronx")
    compile_for(tiny_model_dir, tmp_path, "text-classification", backend="neuron", target="trn1",
                compiler_args=["--target", "trn1", "--auto-cast", "none"], batch_sizes=[1], sequence_lengths=[16])
    [call] = fakes.module("torch_neuronx").CALLS
    assert "cpu_backend" not in call
    assert call["compiler_args"] == ["--target", "trn1", "--auto-cast", "none"]   # --target not added twice


def test_neuron_load_imports_the_framework_first_and_runs_float32(fakes, no_neuron_devices, tiny_model_dir,
                                                                 tmp_path, monkeypatch):
    fakes.install("torch_neuronx")
    manifest = compile_for(tiny_model_dir, tmp_path, "text-classification", backend="neuron", target="inf2",
                           compiler_args=INF2_ARGS, batch_sizes=[1, 2], sequence_lengths=[16])
    # a fresh process: nothing imported yet
    monkeypatch.delitem(sys.modules, "torch_neuronx")
    fakes.events.clear()
    real_load, real_torch_load = torch.jit.load, torch.load
    monkeypatch.setattr(torch.jit, "load", lambda path, *a, **kw: fakes.events.append(f"jit.load {Path(path).name}")
                        or real_load(path, *a, **kw))
    monkeypatch.setattr(torch, "load", lambda path, *a, **kw: fakes.events.append(f"torch.load {Path(path).name}")
                        or real_torch_load(path, *a, **kw))
    loaded = {(i, b.batch): get("neuron").load(tmp_path / "repo" / "m" / b.file, copy_index=i, threads=1)
              for i in range(2) for b in manifest.buckets}
    copies = [loaded[(0, 2)], loaded[(1, 2)]]
    # one torch.jit.load per copy and bucket (the runtime places each copy on the visible cores round-robin);
    # the weights read once per copy, and that one set given to each of its buckets' traces
    names = [e for e in fakes.events if isinstance(e, str)]
    assert names == ["import torch_neuronx", "jit.load b1_s16.pt", "torch.load weights.pt", "jit.load b2_s16.pt",
                     "jit.load b1_s16.pt", "torch.load weights.pt", "jit.load b2_s16.pt"]
    replaced = [e for e in fakes.events if not isinstance(e, str)]
    assert [r[0] for r in replaced] == ["replace_weights"] * 4
    models = {id(run.module) for run in loaded.values()}
    assert {r[1] for r in replaced} == models and len(models) == 4
    sets = [r[2] for r in replaced]
    assert sets[0] == sets[1] != sets[2] == sets[3]     # one weight set per copy, for all its buckets
    arrays = compiler._example("text-classification", _tok(tiny_model_dir), 2, 16, NAMES)
    expected = eager(tiny_model_dir, "text-classification", arrays)
    for run in copies:
        [logits] = run(*arrays)
        assert logits.dtype == torch.float32 and logits.device.type == "cpu"
        assert torch.allclose(logits, expected[0], atol=1e-4)


def test_neuron_compiler_failure_keeps_its_files(fakes, no_neuron_devices, tiny_model_dir, tmp_path):
    fakes.install("torch_neuronx", fail=True)
    with pytest.raises(ArtifactError) as e:
        compile_for(tiny_model_dir, tmp_path, "feature-extraction", backend="neuron", target="inf2",
                    compiler_args=INF2_ARGS, batch_sizes=[1], sequence_lengths=[16])
    message = str(e.value)
    assert "tracing m bucket batch 1 x seq 16 for inf2 failed: RuntimeError: ERROR 70001" in message
    kept = Path(message.split("compiler files kept in ")[1])
    assert (kept / "b1_s16" / "log-neuron-cc.txt").read_text() == "compiler log\n"
    assert not (tmp_path / "repo" / "m").exists()
    assert [p for p in (tmp_path / "repo").iterdir()] == [kept]     # no staging directory left


# ---------------------------------------------------------------- Neuron, Inf1: torch_neuron

def test_inf1_compile_calls_torch_neuron_trace(fakes, tiny_model_dir, tmp_path):
    fakes.install("torch_neuron", version="1.13.1.2.9.6.0", compiler="neuroncc")
    manifest = compile_for(tiny_model_dir, tmp_path, "feature-extraction", backend="neuron", target="inf1",
                           compiler_args=["--neuroncore-pipeline-cores", "1"], batch_sizes=[1], sequence_lengths=[32])
    [call] = fakes.module("torch_neuron").CALLS
    assert isinstance(call["module"], TaskModule) and call["module"].head.pooling == "mean"
    assert call["example"] == [((1, 32), torch.int64)] * 3
    assert call["compiler_args"] == ["--neuroncore-pipeline-cores", "1"]     # neuron-cc takes no --target
    assert set(call) == {"module", "example", "compiler_args", "compiler_workdir"}
    assert (manifest.target, manifest.dtype) == ("inf1", "bfloat16")      # neuron-cc casts to bf16 by default
    assert manifest.weights == ""     # torch-neuron has no weight replacement: each trace keeps its own
    assert manifest.versions["torch_neuron"] == "1.13.1.2.9.6.0"
    # torch_neuron alone is enough to load (an Inf1 venv has no torch_neuronx)
    run = get("neuron").load(tmp_path / "repo" / "m" / "b1_s32.pt", copy_index=0, threads=1)
    assert run(*(torch.ones(1, 32, dtype=torch.long),) * 3)[0].shape == (1, 64)


def test_inf1_without_torch_neuron_says_where_it_lives(fakes, tiny_model_dir, tmp_path):
    fakes.install("torch_neuronx")     # an Inf2 venv
    with pytest.raises(DeviceError, match=r"torch-neuron not importable in .*python.*; run in the DLAMI venv "
                                          r"/opt/aws_neuron_venv_pytorch_\*_inf1"):
        compile_for(tiny_model_dir, tmp_path, "feature-extraction", backend="neuron", target="inf1",
                    batch_sizes=[1], sequence_lengths=[16])


# ---------------------------------------------------------------- Neuron: availability and precision

def test_neuron_unavailable_names_the_venv(fakes, tiny_model_dir, tmp_path):
    reason = get("neuron").unavailable()
    assert reason == (f"torch-neuronx not importable in {sys.executable}; run in the DLAMI venv "
                      "/opt/aws_neuronx_venv_pytorch_* or set server.python to its interpreter")
    with pytest.raises(DeviceError, match=r"cannot compile m for neuron: torch-neuronx not importable"):
        compile_for(tiny_model_dir, tmp_path, "feature-extraction", backend="neuron", target="inf2")
    with pytest.raises(DeviceError, match="torch-neuronx not importable"):
        get("neuron").load(tmp_path / "x.pt", copy_index=0, threads=1)
    fakes.install("torch_neuronx")
    assert get("neuron").unavailable() is None


@pytest.mark.parametrize("args, target, dtype", [
    (INF2_ARGS, "inf2", "bfloat16"),
    (["--auto-cast=all", "--auto-cast-type=fp16"], "inf2", "float16"),
    (["--auto-cast", "matmult"], "trn1", "bfloat16"),       # the type defaults to bf16
    ([], "inf2", "float32"),                                # neuronx-cc's --auto-cast default is none
    (["--auto-cast", "none", "--auto-cast-type", "bf16"], "inf2", "float32"),
    ([], "inf1", "bfloat16"),
    (["--fast-math", "none"], "inf1", "float32"),
])
def test_neuron_precision_follows_the_compiler_args(args, target, dtype):
    assert get("neuron").dtype(None, args, target) == dtype
    assert get("neuron").dtype(dtype, args, target) == dtype


def test_neuron_precision_cannot_be_asked_for_separately():
    with pytest.raises(ArtifactError, match="follows the compiler arguments .bfloat16 here., not --dtype float32"):
        get("neuron").dtype("float32", INF2_ARGS, "inf2")


# ---------------------------------------------------------------- CUDA

class CudaStandIn:
    """torch with one fake GPU: records each move to cuda and performs it on the CPU instead."""

    def __init__(self, monkeypatch):
        self.moves: list[tuple] = []
        real_tensor_to, real_module_to, real_half = torch.Tensor.to, torch.nn.Module.to, torch.nn.Module.half
        real_load = torch.jit.load
        moves = self.moves

        def is_cuda(x):
            return isinstance(x, (str, torch.device)) and str(x).startswith("cuda")

        def tensor_to(t, *args, **kwargs):
            if args and is_cuda(args[0]):
                moves.append(("tensor.to", str(args[0]), tuple(t.shape), t.dtype))
                args = ("cpu",) + args[1:]
            return real_tensor_to(t, *args, **kwargs)

        def module_to(m, *args, **kwargs):
            if args and is_cuda(args[0]):
                moves.append(("module.to", str(args[0]), type(m).__name__))
                args = ("cpu",) + args[1:]
            return real_module_to(m, *args, **kwargs)

        def module_half(m):
            moves.append(("module.half", type(m).__name__))
            return real_half(m)

        def jit_load(path, map_location=None, **kwargs):
            moves.append(("jit.load", Path(path).name, str(map_location)))
            return real_load(path, map_location="cpu" if is_cuda(map_location) else map_location, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", tensor_to)
        monkeypatch.setattr(torch.nn.Module, "to", module_to)
        monkeypatch.setattr(torch.nn.Module, "half", module_half)
        monkeypatch.setattr(torch.jit, "load", jit_load)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
        monkeypatch.setattr(torch.version, "cuda", "12.4")


@pytest.mark.parametrize("half", [True, False])
def test_cuda_compile_moves_module_and_inputs_to_the_gpu(tiny_model_dir, tmp_path, monkeypatch, half):
    gpu = CudaStandIn(monkeypatch)
    assert get("cuda").unavailable() is None
    manifest = compile_for(tiny_model_dir, tmp_path, "text-classification", backend="cuda", target="cuda",
                           dtype="float16" if half else "float32", batch_sizes=[1, 2], sequence_lengths=[16])
    per_trace = [("module.to", "cuda:0", "TaskModule")] + ([("module.half", "TaskModule")] if half else [])

    def inputs(batch):
        return [("tensor.to", "cuda:0", (batch, 16), torch.int64)] * 3

    # the shared trace at the largest bucket; then bucket 1 x 16's own trace, and both run on its inputs on the
    # GPU, to check that the shared trace answers as the bucket's own does
    assert gpu.moves == per_trace + inputs(2) + per_trace + inputs(1) + inputs(1) + inputs(1)
    assert {b.file for b in manifest.buckets} == {"model.pt"}
    assert (manifest.backend, manifest.target, manifest.dtype) == ("cuda", "cuda", "float16" if half else "float32")
    assert manifest.warmup.atol == (5e-2 if half else 1e-3)
    assert manifest.versions["cuda"] == "12.4" and manifest.versions["gpu"] == "NVIDIA H100 80GB HBM3"

    gpu.moves.clear()
    run = get("cuda").load(tmp_path / "repo" / "m" / "model.pt", copy_index=0, threads=1)
    arrays = compiler._example("text-classification", _tok(tiny_model_dir), 2, 16, NAMES)
    [logits] = run(*arrays)
    assert gpu.moves == [("jit.load", "model.pt", "cuda:0")] + inputs(2)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert torch.allclose(logits, eager(tiny_model_dir, "text-classification", arrays)[0],
                          atol=manifest.warmup.atol)


def test_cuda_unavailable_here_says_why():
    # this machine's torch is the CPU build
    assert get("cuda").unavailable() == (f"torch {torch.__version__} in {sys.executable} is a CPU-only build; "
                                         "install a CUDA build of torch there, or set server.python to an "
                                         "interpreter that has one")


def test_cuda_without_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "sees no GPU (CUDA_VISIBLE_DEVICES=); check the driver with nvidia-smi" in get("cuda").unavailable()


def test_cuda_precision():
    assert get("cuda").dtype(None, (), "cuda") == "float32"
    assert get("cuda").dtype("float16", (), "cuda") == "float16"
    with pytest.raises(ArtifactError, match="float32 or float16, not bfloat16"):
        get("cuda").dtype("bfloat16", (), "cuda")


def _tok(tiny_model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir("text-classification"))

