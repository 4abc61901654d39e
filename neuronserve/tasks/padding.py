"""Tokenized items -> the fixed-shape int64 arrays a compiled bucket takes."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from neuronserve.tasks.base import Encoded


def pad(items: Sequence[Encoded], batch: int, seq: int, input_names: Sequence[str],
        out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Pack items into zero-padded int64 arrays [batch, seq], one per input name (rows past the items are 0).

    `out`: arrays of that shape to fill instead of allocating (a copy reuses one set per bucket)."""
    if len(items) > batch:
        raise ValueError(f"{len(items)} items do not fit a batch of {batch}")
    if out is None:
        arrays = [np.zeros((batch, seq), dtype=np.int64) for _ in input_names]
    else:
        arrays = out
        for arr in arrays:
            arr.fill(0)
    for row, item in enumerate(items):
        length = item.length
        if length > seq:
            raise ValueError(f"item of {length} tokens does not fit sequence length {seq}")
        ids = item.ids
        for arr, name in zip(arrays, input_names):
            if name in ids:
                arr[row, :length] = ids[name]
            elif name == "attention_mask":
                arr[row, :length] = 1
            # a name the tokenizer did not produce (token_type_ids for some models) stays 0
    return arrays
