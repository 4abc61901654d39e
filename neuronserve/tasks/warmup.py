"""The known-answer warm-up: compile records the eager model's outputs for fixed items, and every copy of a
served model must reproduce them (within the precision's tolerance) before its group reports ready."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from neuronserve.tasks.base import Encoded, Task, item_from_json
from neuronserve.tasks.encoding import encode
from neuronserve.tasks.padding import pad


def warmup_batches(spec: Task, tokenizer, manifest, items: Sequence | None = None) -> list[tuple[list, list]]:
    """The padded batches a warm-up runs: [(arrays, encoded_items), ...] for `items` (model items as the manifest
    stores them; default the manifest's).

    Items go into the smallest sequence bucket, batched by the smallest batch size that holds them all, or in
    chunks of the largest batch size. Compile (eager model, expected values) and the server (every copy) both
    use this, so they run exactly the same inputs.
    """
    items = manifest.warmup.texts if items is None else items
    seq = min(manifest.sequence_lengths)
    encoded = encode(spec, tokenizer, [item_from_json(it) for it in items], seq, truncation=True)
    sizes = manifest.batch_sizes
    batch = next((b for b in sizes if b >= len(encoded)), sizes[-1])
    return [(pad(encoded[i:i + batch], batch, seq, manifest.input_names), encoded[i:i + batch])
            for i in range(0, len(encoded), batch)]


def warmup_outputs(batches_outputs: Sequence[tuple[Sequence, Sequence]], output_names: Sequence[str]) -> dict:
    """Stack per-batch outputs [(outputs tuple, items)] into {output name: nested list}, real rows only."""
    rows: dict[str, list] = {n: [] for n in output_names}
    for outputs, items in batches_outputs:
        for name, out in zip(output_names, outputs):
            rows[name].extend(np.asarray(out, dtype=np.float32)[:len(items)].tolist())
    return rows


def warmup_mismatch(spec: Task, manifest, got: dict, items: Sequence[Encoded]) -> str | None:
    """None when `got` (as warmup_outputs returns it) matches manifest.warmup.expected, else what differs.

    Per-token outputs are compared only over each item's real tokens."""
    atol = manifest.warmup.atol
    for name, expected in manifest.warmup.expected.items():
        if spec.checked_outputs is not None and name not in spec.checked_outputs:
            continue
        exp, act = np.asarray(expected, dtype=np.float32), np.asarray(got.get(name, []), dtype=np.float32)
        if exp.shape != act.shape:
            return f"{name}: shape {act.shape}, expected {exp.shape}"
        for row, item in enumerate(items):
            e, a = (exp[row], act[row])
            if spec.per_token:
                e, a = e[:item.length], a[:item.length]
            if not np.allclose(a, e, atol=atol, rtol=0):
                worst = float(np.max(np.abs(a - e)))
                return f"{name}[{row}]: differs from the expected warm-up output by {worst:.3g} (atol {atol})"
    return None


def warmup_atol(backend: str, dtype: str | None) -> float:
    """float32 anywhere agrees with the eager CPU answer to 1e-3; bf16 (Neuron auto-cast) and fp16 (CUDA half)
    to 5e-2."""
    return 1e-3 if dtype in (None, "float32") else 5e-2
