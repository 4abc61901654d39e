"""KServe v2 (Open Inference Protocol) semantics, shared by its REST routes (app.py) and its gRPC service
(grpc_service.py): which model and version a request names, the model's metadata, and inference on decoded
tensors. The wire formats stay with each transport (protocol.py for REST's JSON and binary extension,
grpc_messages.py for protobuf).

Inputs are either token tensors (INT64 input_ids [n, s], optional attention_mask and token_type_ids of the same
shape) or text: one BYTES input of n strings (or two BYTES inputs named as the task's pair, question and context,
text and text_pair). Outputs: the model's raw FP32 tensors named as manifest.output_names and, for text, a BYTES
"answer" holding each item's decoded answer as a JSON string.
"""
from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np
import orjson

from neuronserve import tasks
from neuronserve.server.batcher import ServeError
from neuronserve.server.model import ServedModel
from neuronserve.server.protocol import ProtocolError

VERSION = "1"       # a group serves one compiled version of its model
ANSWER = "answer"   # the BYTES output carrying decoded answers for text inputs
# KServe v2 / Triton request parameters that are the protocol's, not the task's
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority",
                                 "timeout", "headers"})


class KServeV2:
    def __init__(self, model: ServedModel):
        self.model = model
        self.spec = tasks.get(model.task)
        manifest, settings, spec = model.manifest, model.settings, self.spec
        self.metadata = {
            "name": model.name, "versions": [VERSION], "platform": f"neuronserve_{settings.backend}",
            "inputs": [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in manifest.input_names]
            + [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in ["text", *(spec.pair_names or ())]],
            "outputs": [{"name": n, "datatype": "FP32", "shape": _output_shape(manifest, n, spec.per_token)}
                        for n in manifest.output_names] + [{"name": ANSWER, "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"task": model.task, "group": settings.group, "copies": settings.copies,
                           "buckets": [[b.batch, b.seq] for b in manifest.buckets], "labels": manifest.labels,
                           "architecture": manifest.architecture, "task_parameters": list(spec.parameters)},
        }

    def lookup(self, name: str, version: str | None = None) -> ServedModel:
        """The model `name` (and `version`, None or "" for the latest) names, or a ServeError 404."""
        model = self.model
        if name != model.name:
            raise ServeError(404, f"unknown model {name!r}; this server serves {model.name!r}")
        if version not in (None, "", VERSION):
            raise ServeError(404, f"unknown version {version!r} of {name!r}; it has version {VERSION}")
        return model

    async def infer(self, tensors: dict[str, np.ndarray], wanted: list[str] | None, parameters: dict | None,
                    deadline: float, disconnected: Callable[[], Awaitable] | None = None) -> dict[str, np.ndarray]:
        """The `wanted` outputs (None: all) by name, for decoded input tensors (BYTES as object arrays of str)."""
        model, spec = self.model, self.spec
        text = {n: t for n, t in tensors.items() if t.dtype == object}
        if text and len(text) != len(tensors):
            raise ProtocolError("send either text (BYTES) or token tensors (INT64), not both")
        available = list(model.manifest.output_names) + ([ANSWER] if text else [])
        wanted = wanted or available
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ProtocolError(f"unknown output(s) {', '.join(unknown)}; this request can have "
                                f"{', '.join(available)}")
        request = None
        if text:
            options = {k: v for k, v in (parameters or {}).items() if k not in PROTOCOL_PARAMETERS}
            request = tasks.parse(model.task, _texts(text, spec.pair_names), options, model.manifest)
            work = await model.infer(request.items, tokenize=True, options=request.options, deadline=deadline,
                                     disconnected=disconnected)
        else:
            work = await model.infer(model.tensor_items(tensors), tokenize=False, options=None, deadline=deadline,
                                     disconnected=disconnected)
        outputs = model.outputs(work)
        if request is not None:
            finished = request.finish(work.answers)     # one answer per input
            answers = np.empty(len(finished), dtype=object)
            answers[:] = [orjson.dumps(a).decode() for a in finished]
            outputs[ANSWER] = answers
        return {n: outputs[n] for n in wanted}


def _texts(text: dict[str, np.ndarray], pair_names: tuple[str, str] | None) -> list:
    """BYTES inputs -> the `inputs` tasks.parse takes: one input's strings, or two inputs named as the task's pair
    (question and context, text and text_pair) zipped into pairs."""
    if pair_names and set(text) == set(pair_names):
        a, b = (text[n].ravel() for n in pair_names)
        if a.size != b.size:
            raise ProtocolError(f"{pair_names[0]} has {a.size} elements, {pair_names[1]} {b.size}: they pair up "
                                "one to one")
        return [dict(zip(pair_names, p)) for p in zip(a.tolist(), b.tolist())]
    if len(text) != 1:
        also = f" (or two named {' and '.join(pair_names)})" if pair_names else ""
        raise ProtocolError(f"text goes in one BYTES input{also}; got {', '.join(sorted(text))}")
    return next(iter(text.values())).ravel().tolist()


def _output_shape(manifest, name: str, per_token: bool) -> list[int]:
    """[-1 (items), -1 (tokens) if per token, then the fixed sizes], from the warm-up's expected rows."""
    rows = manifest.warmup.expected.get(name) if manifest.warmup else None
    if not rows:
        return [-1, -1]
    shape = list(np.asarray(rows[0]).shape)
    return [-1, -1, *shape[1:]] if per_token else [-1, *shape]
