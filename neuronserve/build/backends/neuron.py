"""AWS Neuron: torch_neuronx.trace (neuronx-cc) for Inf2/Trn, torch_neuron.trace (neuron-cc) for Inf1.

Loading: the framework is imported first (it registers the Neuron ops TorchScript needs), then each
`torch.jit.load` is one model copy, which the runtime places on the process's visible cores round-robin
(NEURON_RT_VISIBLE_CORES). So a group of N cores holding N copies runs one copy per core, and more copies
than cores overlap work on the same core: the supported way (NEURON.md). torch_neuronx.DataParallel is not
used: it splits one large batch over cores, while the batcher already picks a compiled batch size.

Weights (Inf2/Trn): a compiled graph has fixed shapes, so every bucket is a trace of its own; they are traced with
`inline_weights_to_neff=False`, which keeps the weights out of the NEFF, and compile saves the weights once
(weights.pt). A copy loads them once and gives the same set to every bucket's trace with
`torch_neuronx.replace_weights` (the Neuron documentation's weight-replacement API), so a copy's buckets hold
one set of weights, not one per bucket. Inf1's torch-neuron has no such API: a trace per bucket, each with its
weights.
"""
from __future__ import annotations

import sys
import threading
from importlib import import_module
from pathlib import Path
from typing import Sequence

from neuronserve.build.artifact import WEIGHTS_FILE
from neuronserve.build.backends import Backend, Runner, runner
from neuronserve.errors import ArtifactError, DeviceError

DEV = Path("/dev")   # where the driver's /dev/neuron<N> devices appear
# framework and compiler module per target generation
FRAMEWORKS = {"inf1": ("torch_neuron", "torch-neuron", "neuroncc")}
NEURONX = ("torch_neuronx", "torch-neuronx", "neuronxcc")
AUTOCAST_TYPES = {"bf16": "bfloat16", "fp16": "float16", "tf32": "tfloat32", "fp8_e4m3": "float8_e4m3"}


def _framework(target: str):
    module, package, _ = FRAMEWORKS.get(target, NEURONX)
    try:
        return import_module(module)
    except ImportError:
        raise DeviceError(_missing(package, target)) from None


def _missing(package: str, target: str) -> str:
    venv = "/opt/aws_neuron_venv_pytorch_*_inf1" if target == "inf1" else "/opt/aws_neuronx_venv_pytorch_*"
    return (f"{package} not importable in {sys.executable}; run in the DLAMI venv {venv} "
            "or set server.python to its interpreter")


def _option(args: Sequence[str], flag: str) -> str | None:
    """Value of `--flag value` or `--flag=value` in a compiler command line (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


class NeuronBackend(Backend):
    name = "neuron"
    # the attention neuronx-cc lowers well; sdpa's fused kernel is a CPU/GPU optimisation
    attn_implementation = "eager"

    def __init__(self):
        # (artifact directory, copy index) -> the weights that copy's buckets share
        self._weights: dict[tuple[str, int], dict] = {}
        self._lock = threading.Lock()

    def separate_weights(self, target: str) -> bool:
        return target != "inf1"

    def unavailable(self) -> str | None:
        for module, _, _ in (NEURONX, FRAMEWORKS["inf1"]):
            try:
                import_module(module)
                return None
            except ImportError:
                pass
        return _missing("torch-neuronx", "inf2")

    def versions(self) -> dict[str, str]:
        import torch

        out = {"torch": torch.__version__}
        for module, _, compiler in (NEURONX, FRAMEWORKS["inf1"]):
            for name in (module, compiler):
                try:
                    out[name] = str(getattr(import_module(name), "__version__", "unknown"))
                except ImportError:
                    pass
        return out

    def dtype(self, requested: str | None, compiler_args: Sequence[str], target: str) -> str:
        """Precision comes from the compiler arguments; neuron-cc (Inf1) casts fp32 to bf16 unless told not to."""
        if target == "inf1":
            found = "float32" if _option(compiler_args, "--fast-math") == "none" else "bfloat16"
        elif (_option(compiler_args, "--auto-cast") or "none") == "none":
            found = "float32"   # neuronx-cc's --auto-cast default is none
        else:
            cast = _option(compiler_args, "--auto-cast-type") or "bf16"
            found = AUTOCAST_TYPES.get(cast, cast)
        if requested not in (None, found):
            raise ArtifactError(f"neuron precision follows the compiler arguments ({found} here), not --dtype "
                                f"{requested}; change neuron.compiler_args (--auto-cast/--auto-cast-type) instead")
        return found

    def trace(self, module, example: Sequence, *, target: str, workdir: Path, compiler_args: list[str],
              dtype: str = "float32"):
        framework = _framework(target)
        args = list(compiler_args)
        if target == "inf1":
            return framework.trace(module, tuple(example), compiler_args=args, compiler_workdir=str(workdir))
        if _option(args, "--target") is None:
            args += ["--target", target]
        extra = {"inline_weights_to_neff": False}     # one weight set per copy for every bucket (load)
        if not any(DEV.glob("neuron[0-9]*")):
            # compiling on a build host without Neuron devices (torch-neuronx 2.x+)
            extra["cpu_backend"] = True
        return framework.trace(module, tuple(example), compiler_args=args, compiler_workdir=str(workdir), **extra)

    def load(self, path: Path, *, copy_index: int, threads: int) -> Runner:
        import torch

        reason = self.unavailable()   # imports torch_neuronx (or torch_neuron on Inf1): registers the ops
        if reason:
            raise DeviceError(reason)
        torch.set_num_threads(threads)
        model = torch.jit.load(str(path)).eval()
        weights_file = Path(path).parent / WEIGHTS_FILE
        if weights_file.is_file():
            key = (str(weights_file.parent), copy_index)
            with self._lock:
                weights = self._weights.get(key)
                if weights is None:
                    weights = self._weights[key] = torch.load(str(weights_file), map_location="cpu")
            import_module(NEURONX[0]).replace_weights(model, weights)
        return runner(model)


BACKEND = NeuronBackend()
