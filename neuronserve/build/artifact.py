"""A compiled model on disk: the contract between `neuronserve compile` and the server.

    <model_repository>/<name>/
        manifest.json            this schema
        model.pt                 CPU and CUDA: one trace that runs every bucket it was checked at (one set of
                                 weights for all of them)
        b<batch>_s<seq>.pt       a trace of one (batch, sequence length) bucket: every bucket on Neuron, whose
                                 compiled graphs have fixed shapes; on CPU and CUDA only a bucket whose outputs
                                 from model.pt differ from its own trace's (the bucket's `own_trace` says why)
        weights.pt               Inf2/Trn: the weights, kept apart from every bucket's compiled graph
                                 (inline_weights_to_neff=False) and loaded once per copy for all its buckets
        tokenizer/               the tokenizer, saved with save_pretrained

The server refuses an artifact whose backend is not its own, whose files fail their checksum, or whose
manifest format it does not know, with a message saying what to run instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neuronserve.errors import ArtifactError

FORMAT = 2       # 2: the task registry's tasks, warm-up items as model items (texts or [a, b] pairs)
MANIFEST = "manifest.json"


class Bucket(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch: int = Field(ge=1)
    seq: int = Field(ge=1)
    file: str
    sha256: str
    own_trace: str = Field("", description="why this bucket has a trace of its own rather than the shared one "
                                           "(empty: shared, or a backend with fixed shapes)")


class Warmup(BaseModel):
    """A known-answer check: the server runs `inputs` through every copy and compares with `expected`."""

    model_config = ConfigDict(extra="forbid")
    texts: list = Field(description="the model items to run: texts, or [a, b] text pairs")
    expected: dict[str, list] = Field(description="output name -> nested list (the model's raw outputs)")
    atol: float = Field(description="absolute tolerance: 1e-3 for fp32 CPU, 5e-2 for bf16/fp16")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT
    name: str
    task: str = Field(description="one of neuronserve.tasks.TASKS")
    backend: Literal["cpu", "cuda", "neuron"]
    target: str = Field(description="cpu | cuda | inf1 | inf2 | trn1 | trn2: what the artifacts run on")
    source: str
    created: str
    versions: dict[str, str]
    input_names: list[str]
    output_names: list[str]
    architecture: str = Field("", description="the source config's model_type (bert, mpnet, deberta-v2, ...)")
    attn_implementation: str = Field("eager", description="the attention kernel the model was traced with")
    labels: dict[str, str] = Field(default_factory=dict, description="class id -> label (classification heads)")
    problem_type: Literal["single_label_classification", "multi_label_classification", "regression"] = Field(
        "single_label_classification", description="classification: softmax, independent sigmoids, or raw values")
    pooling: Literal["none", "mean", "cls", "max", "lasttoken"] = "none"
    normalize: bool = False
    dense: list[dict] = Field(default_factory=list, description="feature-extraction: the sentence-transformers "
                              "Dense layers traced after pooling ({in_features, out_features, activation})")
    special: dict[str, int] = Field(default_factory=dict, description="token ids the decoders need: mask "
                                    "(fill-mask), and the special tokens' ids")
    entailment: int | None = Field(None, description="zero-shot-classification: the entailment label's index")
    dtype: str = "float32"
    compiler_args: list[str] = Field(default_factory=list)
    buckets: list[Bucket]
    tokenizer: str = "tokenizer"
    weights: str = Field("", description="the weights file every bucket's trace takes its weights from (Inf2/Trn: "
                                         "one set per copy, whatever the buckets); empty: each trace holds its own")
    weights_sha256: str = ""
    warmup: Warmup | None = None

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({b.batch for b in self.buckets})

    @property
    def sequence_lengths(self) -> list[int]:
        return sorted({b.seq for b in self.buckets})

    def bucket(self, batch: int, seq: int) -> Bucket:
        for b in self.buckets:
            if b.batch == batch and b.seq == seq:
                return b
        raise KeyError((batch, seq))


SHARED_FILE = "model.pt"
WEIGHTS_FILE = "weights.pt"


def bucket_file(batch: int, seq: int) -> str:
    return f"b{batch}_s{seq}.pt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write atomically: a reader never sees half a manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest.")
    with os.fdopen(fd, "w") as f:
        f.write(manifest.model_dump_json(indent=2) + "\n")
    os.chmod(tmp, 0o644)   # mkstemp makes it 0600; the server runs as another user than compile
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: Path, *, backend: str | None = None, verify: bool = True) -> Manifest:
    """Read and check a compiled model directory. Raises ArtifactError with what to do about it."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no compiled model here; run `neuronserve compile` for it") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest: {e}") from None
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: manifest format {data.get('format')!r}, this neuronserve reads {FORMAT}; "
                            "recompile with this version")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise ArtifactError(f"{path}: invalid manifest: {e}") from None
    if backend is not None and manifest.backend != backend:
        raise ArtifactError(f"{directory}: compiled for {manifest.backend} ({manifest.target}), but this group "
                            f"serves on {backend}; run `neuronserve compile --backend {backend}` for it")
    if verify:
        digests: dict[str, str] = {}    # buckets share files: each is read once
        files = [(b.file, b.sha256) for b in manifest.buckets]
        if manifest.weights:
            files.append((manifest.weights, manifest.weights_sha256))
        for name, sha256 in files:
            f = Path(directory) / name
            try:
                digest = digests.get(name) or digests.setdefault(name, sha256_file(f))
            except OSError as e:
                raise ArtifactError(f"{f}: cannot read artifact: {e.strerror or e}") from None
            if digest != sha256:
                raise ArtifactError(f"{f}: checksum mismatch (damaged or replaced); recompile")
    return manifest
