"""Wire formats: KServe v2 (Open Inference Protocol) tensors, and the Hugging Face task JSON.

KServe v2 JSON per https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ plus Triton's
binary tensor extension (what tritonclient sends by default): when the request carries the header
`Inference-Header-Content-Length: N`, the first N bytes of the body are the JSON header and the raw tensors
follow in input order, each sized by its `parameters.binary_data_size`. Outputs are returned the same way when a
requested output says `binary_data: true` (or the request asks `binary_data_output: true` without naming outputs).
BYTES elements in binary form are each a 4-byte little-endian length followed by the bytes.
"""
from __future__ import annotations

import struct
from math import prod
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

HEADER_LENGTH = "inference-header-content-length"

# v2 datatype <-> numpy dtype
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_KINDS = {"BOOL": "b", "UINT": "iu", "INT": "iu", "FP": "iuf"}   # JSON number kinds each datatype accepts


class ProtocolError(ValueError):
    """The request does not follow the protocol; the message is for the client (HTTP 400)."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if dtype == array.dtype:
            return name
    raise TypeError(f"no v2 datatype for {array.dtype}")


class _Lenient(BaseModel):
    # keys from newer protocol revisions or other clients are ignored, not refused
    model_config = ConfigDict(extra="ignore")


class InferInput(_Lenient):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestedOutput(_Lenient):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_Lenient):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None

    def binary_outputs(self) -> set[str] | bool:
        """Names of outputs to send in binary, or True for all of them."""
        if self.outputs:
            return {o.name for o in self.outputs if (o.parameters or {}).get("binary_data") is True}
        return bool((self.parameters or {}).get("binary_data_output"))


class TaskRequest(BaseModel):
    """The Hugging Face inference API body: {"inputs": ..., "parameters": {...}, "options": {...}}."""

    model_config = ConfigDict(extra="forbid")
    inputs: Any = Field(description="str | list[str]; text-classification also {text, text_pair}; "
                        "question-answering {question, context}; feature-extraction also {source_sentence, "
                        "sentences} (sentence similarity); or a list of them")
    parameters: dict[str, Any] | None = Field(None, description="the task's parameters, as the transformers "
                                              "pipelines define them (GET /v2/models/{m} lists them)")
    options: dict[str, Any] | None = Field(None, description="the hosted API's (use_cache, wait_for_model): "
                                           "accepted, not used")


def _one_line(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors())


def parse_json(body: bytes, model: type[BaseModel]):
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ProtocolError(f"invalid request: {_one_line(e)}") from None


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its input tensors by name (BYTES as object arrays of str), shapes checked."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length: not a number: {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        body, binary = body[:n], body[n:]
    request = parse_json(body, InferRequest)
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for inp in request.inputs:
        if inp.name in tensors:
            raise ProtocolError(f"input {inp.name!r} given twice")
        size = (inp.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {inp.name!r}: binary_data_size {size!r} runs past the body")
            tensors[inp.name] = from_binary(inp, binary[offset:offset + size])
            offset += size
        else:
            tensors[inp.name] = _from_json(inp)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data that no input claims")
    return request, tensors


def _check_header(inp: InferInput) -> np.dtype:
    dtype = DATATYPES.get(inp.datatype)
    if dtype is None:
        raise ProtocolError(f"input {inp.name!r}: unknown datatype {inp.datatype!r}; one of {', '.join(DATATYPES)}")
    if any(d < 0 for d in inp.shape):
        raise ProtocolError(f"input {inp.name!r}: negative dimension in shape {inp.shape}")
    return dtype


def _from_json(inp: InferInput) -> np.ndarray:
    if inp.data is None:
        _check_header(inp)
        raise ProtocolError(f"input {inp.name!r}: no data")
    data = inp.data if isinstance(inp.data, list) else [inp.data]
    if inp.datatype == "BYTES":
        _check_header(inp)
        return from_values(inp, _flatten_strings(data, inp.name))
    try:
        array = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"input {inp.name!r}: ragged data (rows of different lengths)") from None
    return from_values(inp, array)


def from_values(inp: InferInput, values) -> np.ndarray:
    """The tensor `inp` describes from its values (JSON's, flattened or nested, or gRPC's typed contents): kinds
    and integer ranges checked against the datatype, BYTES given as str."""
    dtype = _check_header(inp)
    if inp.datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return _reshape(array, inp)
    array = np.asarray(values)
    kinds = next(v for k, v in _KINDS.items() if inp.datatype.startswith(k))
    if array.size and array.dtype.kind not in kinds:
        raise ProtocolError(f"input {inp.name!r}: {inp.datatype} data must be "
                            f"{'booleans' if kinds == 'b' else 'numbers'}, got {array.dtype.kind!r} values")
    if array.dtype.kind in "iu" and dtype.kind in "iu" and array.size and (
            array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise ProtocolError(f"input {inp.name!r}: values outside the {inp.datatype} range")
    return _reshape(array.astype(dtype, copy=False).ravel(), inp)


def _flatten_strings(data: list, name: str) -> list[str]:
    out: list[str] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            if not isinstance(value, str):
                raise ProtocolError(f"input {name!r}: BYTES data must be strings, got {type(value).__name__}")
            out.append(value)
        else:
            stack.pop()
    return out


def from_binary(inp: InferInput, raw: bytes) -> np.ndarray:
    """The tensor `inp` describes from its raw bytes (little-endian; BYTES elements length-prefixed)."""
    dtype = _check_header(inp)
    if inp.datatype == "BYTES":
        flat, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ProtocolError(f"input {inp.name!r}: truncated BYTES element length")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise ProtocolError(f"input {inp.name!r}: BYTES element runs past its data")
            try:
                flat.append(raw[pos:pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(f"input {inp.name!r}: BYTES element is not UTF-8 text") from None
            pos += n
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        if len(raw) % dtype.itemsize:
            raise ProtocolError(f"input {inp.name!r}: {len(raw)} bytes is not a whole number of {inp.datatype}")
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    return _reshape(array, inp)


def _reshape(array: np.ndarray, inp: InferInput) -> np.ndarray:
    if array.size != prod(inp.shape):
        raise ProtocolError(f"input {inp.name!r}: shape {inp.shape} needs {prod(inp.shape)} elements, "
                            f"data has {array.size}")
    return array.reshape(inp.shape)


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor's raw form: little-endian, BYTES elements each a 4-byte length and the bytes."""
    if array.dtype != object:
        return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    parts = []
    for v in array.ravel():
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def encode_response(model: str, version: str, request_id: str | None, outputs: dict[str, np.ndarray],
                    binary: set[str] | bool) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers; outputs named in `binary` (or all, if True) go as raw bytes."""
    items, tail = [], []
    for name, array in outputs.items():
        out: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary is True or (binary and name in binary):
            raw = raw_bytes(array)
            out["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        elif array.dtype == object:
            out["data"] = array.ravel().tolist()
        else:
            out["data"] = np.ascontiguousarray(array).ravel()
        items.append(out)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if request_id is not None:
        head["id"] = request_id
    body = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tail:
        return body, {}
    return body + b"".join(tail), {"Inference-Header-Content-Length": str(len(body))}
