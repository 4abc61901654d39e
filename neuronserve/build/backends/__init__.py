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
    # the attention kernel the model is loaded with before tracing: "eager" lowers everywhere
    attn_implementation: str = "sdpa"
    # TorchScript traces of these encoders run at any input shape: one trace (one set of weights) can serve every
    # bucket, checked per bucket at compile time. Neuron's compiled graphs have fixed shapes.
    shape_generic: bool = False

    def unavailable(self) -> str | None:
        """None when this backend's framework can be used here, else why not (and what to install)."""
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        """Framework versions recorded in the manifest."""
        raise NotImplementedError

    def dtype(self, requested: str | None, compiler_args: Sequence[str], target: str) -> str:
        """The precision the traced artifacts compute in (recorded in the manifest; sets the warm-up tolerance)."""
        if requested not in (None, "float32"):
            raise ArtifactError(f"the {self.name} backend traces in float32 only, not {requested}")
        return "float32"

    def trace(self, module, example: Sequence, *, target: str, workdir: Path, compiler_args: list[str],
              dtype: str = "float32"):
        """Trace `module` (float32, CPU, eval) for fixed-shape CPU `example` inputs; returns what `save` writes.

        `workdir` is an empty directory for the compiler's intermediate files.
        """
        raise NotImplementedError

    def separate_weights(self, target: str) -> bool:
        """Whether `trace` keeps the weights out of the compiled graphs, for `load` to give every bucket of a copy
        one set (compile then saves them once, artifact.WEIGHTS_FILE)."""
        return False

    def save(self, traced, path: Path) -> None:
        """Raises ArtifactError when the file cannot be written (disk full, read-only, ...)."""
        import io

        import torch

        # serialized in memory first: torch's own file writer aborts the whole process (C++ terminate) when a
        # write fails, e.g. on a full disk, so the compile could neither clean up nor say what went wrong
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        try:
            with open(path, "wb") as f:
                f.write(buffer.getbuffer())
        except OSError as e:
            raise ArtifactError(f"{path}: cannot write the artifact: {e.strerror or e}") from None

    def load(self, path: Path, *, copy_index: int, threads: int) -> Runner:
        """Load one copy of an artifact; the returned callable runs one padded batch."""
        raise NotImplementedError

    def run(self, traced, example: Sequence) -> tuple:
        """Run what `trace` returned on CPU `example` inputs (compile's check of a shared trace)."""
        return runner(traced)(*example)


def runner(model, place: Callable = lambda t: t) -> Runner:
    """Wrap a loaded module: inputs go through `place` (to the device), outputs come back float32 on the CPU.
    The runner's `module` is the module (tests compare the weights copies hold)."""
    import torch

    def run(*inputs):
        with torch.inference_mode():
            out = model(*(place(t) for t in inputs))
        return tuple(o.float().cpu() for o in (out if isinstance(out, tuple) else (out,)))

    run.module = model
    return run


def weight_bytes(runners) -> dict[str, int]:
    """{"host": bytes, "device": bytes} of the tensors the runners' modules hold (parameters, buffers and, once
    frozen, the graph's constants), each storage counted once however many runners share it. A runner without a
    module (a test's stand-in) counts nothing."""
    seen: dict[int, tuple[str, int]] = {}
    for run in runners:
        module = getattr(run, "module", None)
        if module is None:
            continue
        tensors = list(module.state_dict().values())
        graph = getattr(module, "graph", None)
        if graph is not None:
            tensors += [n.output().toIValue() for n in graph.findAllNodes("prim::Constant")
                        if n.output().type().kind() == "TensorType"]
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = ("host" if t.device.type == "cpu" else "device", storage.nbytes())
    out = {"host": 0, "device": 0}
    for memory, size in seen.values():
        out[memory] += size
    return out


def get(name: str) -> Backend:
    if name not in ("cpu", "cuda", "neuron"):
        raise ArtifactError(f"unknown backend {name!r}")
    return import_module(f"neuronserve.build.backends.{name}").BACKEND
