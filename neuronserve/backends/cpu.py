"""CPU: TorchScript traced in float32, executed with a fixed number of intra-op threads."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from neuronserve.backends import Backend, Runner, runner


class CpuBackend(Backend):
    name = "cpu"

    def unavailable(self) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not importable: pip install torch"
        return None

    def versions(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__}

    def trace(self, module, example: Sequence, *, target: str, workdir: Path, compiler_args: list[str],
              dtype: str = "float32"):
        import torch

        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(module.eval(), tuple(example), strict=False)
        return torch.jit.freeze(traced.eval())

    def load(self, path: Path, *, copy_index: int, threads: int) -> Runner:
        import torch

        torch.set_num_threads(threads)
        return runner(torch.jit.load(str(path), map_location="cpu").eval())


BACKEND = CpuBackend()
