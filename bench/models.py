"""The two benchmark models, random-init (nothing is downloaded) and compiled for the CPU, kept between runs.

- bert-base: BERT-base for question answering (12 layers, hidden 768), the original sample's model shape;
- tiny: 2 layers, hidden 128: so little compute that the serving path's own cost shows;
- no-encoder: embeddings and the QA head only (0 layers, hidden 32; 0.16 ms a batch-1 call, 28 us an item at
  batch 16): the model's compute nearly off the host CPU, as where a NeuronCore or GPU runs it, so that the
  throughput of each server is that of its serving path.

Both take the real all-MiniLM-L6-v2 tokenizer (random_models) and are compiled with neuronserve's compile for
every (batch, 128) bucket, exactly what the server, the baseline and the ceiling then load.
"""
from __future__ import annotations

from pathlib import Path

from dev import random_models
from neuronserve.build.artifact import read_manifest
from neuronserve.build.compile import compile_model
from neuronserve.errors import ArtifactError

TASK = "question-answering"
SEQ = 128
BATCH_SIZES = {"bert-base": [1, 2, 4], "tiny": [1, 2, 4, 8, 16], "no-encoder": [1, 4, 16, 32]}


def prepare(name: str, root: Path, *, log=print, task: str = TASK, size: str | None = None) -> Path:
    """The compiled model directory of `name` under root/models (built and compiled unless already there): a
    `task` model of random_models.SIZES[size or name], compiled for BATCH_SIZES[size or name]."""
    out = root / "models" / name
    size = size or name
    wanted = BATCH_SIZES[size]
    try:
        manifest = read_manifest(out, backend="cpu", verify=False)
        if manifest.batch_sizes == wanted and manifest.sequence_lengths == [SEQ]:
            return out
    except ArtifactError:
        pass
    source = root / "sources" / name
    if not (source / "config.json").is_file():
        log(f"  building random-init {name} in {source}")
        random_models.build(source, task, **random_models.SIZES[size])
    log(f"  compiling {name} for batch {wanted} x seq {SEQ}")
    compile_model(source, out, name=name, task=task, backend="cpu", target="cpu", batch_sizes=wanted,
                  sequence_lengths=[SEQ])
    return out


def source_dir(name: str, root: Path) -> Path:
    return root / "sources" / name
