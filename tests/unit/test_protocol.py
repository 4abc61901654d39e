"""KServe v2 wire format: JSON and binary tensors in, JSON and binary tensors out (read back by tritonclient's own
response parser), and a clear ProtocolError for every malformed request."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st
from tritonclient.http import InferResult
from tritonclient.utils import serialize_byte_tensor

from neuronserve.server.protocol import (DATATYPES, ProtocolError, TaskRequest, datatype_of, encode_response,
                                         parse_infer_request, parse_json)


def body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def tensor(name, datatype, shape, data=None, **parameters):
    out = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        out["data"] = data
    if parameters:
        out["parameters"] = parameters
    return out


def test_json_int64_and_bytes():
    req, tensors = parse_infer_request(body(tensor("input_ids", "INT64", [2, 3], [1, 2, 3, 4, 5, 6]),
                                            tensor("text", "BYTES", [2], ["a", "é"])), None)
    assert tensors["input_ids"].dtype == np.int64 and tensors["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert tensors["text"].tolist() == ["a", "é"]
    assert req.binary_outputs() is False


def test_nested_json_data_is_accepted_row_major():
    _, tensors = parse_infer_request(body(tensor("input_ids", "INT64", [2, 2], [[1, 2], [3, 4]])), None)
    assert tensors["input_ids"].tolist() == [[1, 2], [3, 4]]


def test_binary_inputs_as_tritonclient_lays_them_out():
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    texts = np.array([b"first", "zweite \u00fc".encode()], dtype=object)
    raw_ids, raw_texts = ids.tobytes(), serialize_byte_tensor(texts).item()
    head = body(tensor("input_ids", "INT64", [2, 3], binary_data_size=len(raw_ids)),
                tensor("text", "BYTES", [2], binary_data_size=len(raw_texts)),
                parameters={"binary_data_output": True})
    req, tensors = parse_infer_request(head + raw_ids + raw_texts, str(len(head)))
    assert tensors["input_ids"].tolist() == ids.tolist()
    assert tensors["text"].tolist() == ["first", "zweite \u00fc"]
    assert req.binary_outputs() is True


@pytest.mark.parametrize("binary", [False, True])
def test_responses_read_back_by_tritonclient(binary):
    outputs = {"logits": np.array([[0.5, -1.25], [3.0, 1e-8]], dtype=np.float32),
               "answer": np.array(['{"label": "x"}', "ünï"], dtype=object)}
    payload, headers = encode_response("m", "1", "req-7", outputs, binary)
    header_length = int(headers["Inference-Header-Content-Length"]) if binary else None
    assert bool(headers) == binary
    result = InferResult.from_response_body(payload, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), outputs["logits"])
    answers = [a.decode() if isinstance(a, bytes) else a for a in result.as_numpy("answer")]
    assert answers == ['{"label": "x"}', "ünï"]
    assert result.get_response()["id"] == "req-7" and result.get_response()["model_version"] == "1"


def test_only_outputs_asked_for_in_binary_go_binary():
    req, _ = parse_infer_request(body(tensor("t", "BYTES", [1], ["x"]),
                                      outputs=[{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}]),
                                 None)
    assert req.binary_outputs() == {"a"}
    payload, headers = encode_response("m", "1", None, {"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)},
                                       req.binary_outputs())
    head = json.loads(payload[:int(headers["Inference-Header-Content-Length"])])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8} and head["outputs"][1]["data"] == [1.0, 1.0]


@pytest.mark.parametrize("payload, header, message", [
    (b"{", None, "malformed JSON"),
    (b"[]", None, "invalid request"),
    (body(), None, "inputs"),
    (body(tensor("x", "INT65", [1], [1])), None, "unknown datatype"),
    (body(tensor("x", "INT64", [-1], [1])), None, "negative dimension"),
    (body(tensor("x", "INT64", [2])), None, "no data"),
    (body(tensor("x", "INT64", [3], [1, 2])), None, "needs 3 elements"),
    (body(tensor("x", "INT64", [2, 2], [[1, 2], [3]])), None, "ragged"),
    (body(tensor("x", "INT64", [2], [1.5, 2])), None, "numbers"),
    (body(tensor("x", "INT64", [2], ["1", "2"])), None, "numbers"),
    (body(tensor("x", "INT64", [1], [True])), None, "numbers"),
    (body(tensor("x", "INT8", [1], [300])), None, "range"),
    (body(tensor("x", "BYTES", [1], [1])), None, "strings"),
    (body(tensor("x", "INT64", [1], [1]), tensor("x", "INT64", [1], [1])), None, "twice"),
    (body(tensor("x", "INT64", [1], [1])), "many", "not a number"),
    (body(tensor("x", "INT64", [1], [1])), "99999", "does not fit"),
    (body(tensor("x", "INT64", [1], binary_data_size=8)) + b"1234", "header", "runs past"),
    (body(tensor("x", "INT64", [1], binary_data_size=4)) + b"1234", "header", "whole number"),
    (body(tensor("x", "INT64", [1], [1])) + b"extra", "header", "no input claims"),
    (body(tensor("x", "BYTES", [1], binary_data_size=3)) + b"\x09\x00\x00", "header", "truncated"),
    (body(tensor("x", "BYTES", [1], binary_data_size=5)) + b"\x09\x00\x00\x00a", "header", "runs past"),
    (body(tensor("x", "BYTES", [1], binary_data_size=5)) + b"\x01\x00\x00\x00\xff", "header", "UTF-8"),
])
def test_malformed_requests_say_what_is_wrong(payload, header, message):
    if header == "header":
        header = str(payload.index(b"}]}") + 3)
    with pytest.raises(ProtocolError, match=message):
        parse_infer_request(payload, header)


def test_task_request_refuses_unknown_keys():
    assert parse_json(b'{"inputs": "x", "parameters": {"top_k": 2}}', TaskRequest).inputs == "x"
    with pytest.raises(ProtocolError, match="input"):
        parse_json(b'{"input": "x"}', TaskRequest)


def test_every_datatype_maps_both_ways():
    for name, dtype in DATATYPES.items():
        assert datatype_of(np.zeros(1, dtype=dtype)) == name


@given(st.lists(st.text(max_size=20), min_size=1, max_size=8))
def test_bytes_round_trip(texts):
    raw = serialize_byte_tensor(np.array([t.encode() for t in texts], dtype=object)).item()
    head = body(tensor("t", "BYTES", [len(texts)], binary_data_size=len(raw)))
    _, tensors = parse_infer_request(head + raw, str(len(head)))
    assert tensors["t"].tolist() == texts
    payload, headers = encode_response("m", "1", None, {"t": tensors["t"]}, True)
    n = int(headers["Inference-Header-Content-Length"])
    assert payload[n:] == b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
