"""The torch module compile traces: a loaded transformers model and its task's head, as positional int64 inputs
[B, S] in the manifest's input_names order -> a tuple of float32 tensors in the task's output_names order."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class TaskModule(torch.nn.Module):
    def __init__(self, model, input_names: Sequence[str], head: Callable, layers: Sequence[torch.nn.Module] = ()):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.head = head                                # (model output, inputs, layers) -> tensors
        self.layers = torch.nn.ModuleList(layers)       # registered, so tracing freezes their weights too

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return tuple(t.float() for t in self.head(out, inputs, self.layers))
