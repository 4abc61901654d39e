"""CPU: TorchScript traced in float32, executed with a fixed number of intra-op threads.

The copies of a group share one loaded module per file: a frozen TorchScript module holds its weights as
constants and is safe to call from several threads at once, so N copies cost one set of weights, not N.
"""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

from neuronserve.build.backends import Backend, Runner, runner


class CpuBackend(Backend):
    name = "cpu"
    shape_generic = True

    def __init__(self):
        # (file, inode, mtime) -> the loaded module, while some copy of this process holds it
        self._modules: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

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
        stat = os.stat(path)
        key = (str(path), stat.st_ino, stat.st_mtime_ns)
        with self._lock:    # copies load at once, each on its thread: the first loads, the others wait for it
            module = self._modules.get(key)
            if module is None:
                module = torch.jit.load(str(path), map_location="cpu").eval()
                self._modules[key] = module
        return runner(module)


BACKEND = CpuBackend()
