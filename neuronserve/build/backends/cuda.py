"""CUDA: TorchScript traced on the GPU, in float16 when `cuda.half` is set.

A group's process sees only the GPUs in its CUDA_VISIBLE_DEVICES, renumbered from 0, so everything goes to
DEVICE. The traced wrappers cast their outputs to float32; the runner returns them on the CPU.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from neuronserve.build.backends import Backend, Runner, runner
from neuronserve.errors import ArtifactError

DEVICE = "cuda:0"


class CudaBackend(Backend):
    name = "cuda"
    shape_generic = True

    def unavailable(self) -> str | None:
        try:
            import torch
        except ImportError:
            return f"torch is not importable in {sys.executable}"
        if torch.version.cuda is None:
            return (f"torch {torch.__version__} in {sys.executable} is a CPU-only build; install a CUDA build of "
                    "torch there, or set server.python to an interpreter that has one")
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
                    f"(CUDA_VISIBLE_DEVICES={visible}); check the driver with nvidia-smi")
        return None

    def versions(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__, "cuda": str(torch.version.cuda),
                "gpu": torch.cuda.get_device_name(0)}

    def dtype(self, requested: str | None, compiler_args: Sequence[str], target: str) -> str:
        if requested not in (None, "float32", "float16"):
            raise ArtifactError(f"the cuda backend traces in float32 or float16, not {requested}")
        return requested or "float32"

    def trace(self, module, example: Sequence, *, target: str, workdir: Path, compiler_args: list[str],
              dtype: str = "float32"):
        import torch

        # .to() moves the parameters in place: compile computes the eager warm-up answer before tracing
        module = module.to(DEVICE)
        if dtype == "float16":
            module = module.half()
        inputs = tuple(t.to(DEVICE) for t in example)   # int64 ids stay int64: only the weights are halved
        with torch.no_grad():
            traced = torch.jit.trace(module.eval(), inputs, strict=False)
        return torch.jit.freeze(traced.eval())

    def load(self, path: Path, *, copy_index: int, threads: int) -> Runner:
        import torch

        torch.set_num_threads(threads)
        model = torch.jit.load(str(path), map_location=DEVICE).eval()
        return runner(model, place=_to_device)

    def run(self, traced, example: Sequence) -> tuple:
        return runner(traced, place=_to_device)(*example)


def _to_device(tensor):
    return tensor.to(DEVICE)


BACKEND = CudaBackend()
