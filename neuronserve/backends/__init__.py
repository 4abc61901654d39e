"""How a model is traced, saved and loaded on each backend. One module per backend:

    cpu.py     torch.jit.trace, float32
    cuda.py    torch.jit.trace on the GPU (float16 when configured)
    neuron.py  torch_neuronx.trace (Inf2/Trn) or torch_neuron.trace (Inf1)

Each exposes a Backend subclass instance named BACKEND. `get(name)` returns it.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Callable, Sequence

from neuronserve.errors import ArtifactError

Runner = Callable[..., tuple]   # positional CPU tensors in manifest.input_names order -> tuple of CPU tensors


class Backend:
    name: str = ""

    def unavailable(self) -> str | None:
        """None when this backend's framework can be used here, else why not (and what to install)."""
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        """Framework versions recorded in the manifest."""
        raise NotImplementedError

    def trace(self, module, example: Sequence, *, target: str, workdir: Path, compiler_args: list[str]):
        """Trace `module` for fixed-shape `example` inputs; returns an object `save` can write."""
        raise NotImplementedError

    def save(self, traced, path: Path) -> None:
        import torch

        torch.jit.save(traced, str(path))

    def load(self, path: Path, *, copy_index: int, threads: int) -> Runner:
        """Load one copy of an artifact; the returned callable runs one padded batch."""
        raise NotImplementedError


def get(name: str) -> Backend:
    if name not in ("cpu", "cuda", "neuron"):
        raise ArtifactError(f"unknown backend {name!r}")
    return import_module(f"neuronserve.backends.{name}").BACKEND
