"""Bad input through the real front (nginx -> gunicorn/uvicorn group): a 4xx that says what is wrong, never a 5xx,
and the workers that received it live on (same PIDs, still ready).

The app's own checks are unit-tested case by case in tests/unit/test_app.py (in-process); here the same kinds
go over HTTP through nginx, plus what only the wire or the front can do: bodies over client_max_body_size,
invalid UTF-8 and lone surrogates, nesting, absurd shapes, binary tensors whose lengths lie. truncation=false
(over-long text -> 422) is in test_app.py; the shared stack here runs the default, truncation=true.
"""
from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

from faults.faultkit import record, worker_pid

MODEL = "emb"
INFER = f"/v2/models/{MODEL}/infer"
TASK = f"/models/{MODEL}"
SENT: list[int] = []


def tensor(name: str, datatype: str, shape: list, data) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def body(*inputs: dict) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def binary_request(header: dict, raw: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(declared if declared is not None else len(head))}


IDS = [[101, 2023, 102]]
BYTES_NOT_UTF8 = struct.pack("<I", 2) + b"\xff\xfe"

CASES = [
    # what nginx refuses: over client_max_body_size (1m)
    ("body over 1m", TASK, b'{"inputs": "' + b"a" * (2 << 20) + b'"}', {}, 413, None),
    # more items than a group queues (max_queue 256): the app's 413
    ("too many items", TASK, json.dumps({"inputs": ["a"] * 300}).encode(), {}, 413, "split the request"),
    # tensors of the wrong kind or shape
    ("float token ids", INFER, body(tensor("input_ids", "FP32", [1, 3], [1.0, 2.0, 3.0])), {}, 400, "INT64"),
    ("shape vs data", INFER, body(tensor("input_ids", "INT64", [1, 4], IDS)), {}, 400, "elements"),
    ("one-dimensional", INFER, body(tensor("input_ids", "INT64", [3], IDS[0])), {}, 400, "[batch, sequence]"),
    ("mask shape differs", INFER, body(tensor("input_ids", "INT64", [1, 3], IDS),
                                      tensor("attention_mask", "INT64", [1, 2], [1, 1])), {}, 400, "same shape"),
    ("absurd shape", INFER, body(tensor("input_ids", "INT64", [10 ** 9, 10 ** 9], IDS)), {}, 400, "elements"),
    ("negative dimension", INFER, body(tensor("input_ids", "INT64", [-1, 3], IDS)), {}, 400, "negative"),
    ("nothing in it", INFER, body(tensor("input_ids", "INT64", [0, 0], [])), {}, 422, "nothing to infer"),
    ("longer than any bucket", INFER, body(tensor("input_ids", "INT64", [1, 33], [[101] * 33])), {}, 422,
     "longer than the largest"),
    ("id past the vocabulary", INFER, body(tensor("input_ids", "INT64", [1, 3], [[101, 10 ** 6, 102]])), {}, 422,
     "values must lie"),
    ("int64 overflow", INFER, body(tensor("input_ids", "INT64", [1, 1], [[2 ** 70]])), {}, 400, None),
    ("unknown datatype", INFER, body(tensor("input_ids", "INT128", [1, 3], IDS)), {}, 400, "unknown datatype"),
    ("bytes that are numbers", INFER, body(tensor("text", "BYTES", [2], [1, 2])), {}, 400, "strings"),
    ("text and tokens mixed", INFER, body(tensor("text", "BYTES", [1], ["hi"]), tensor("input_ids", "INT64", [1, 3],
                                                                                      IDS)), {}, 400, "not both"),
    # binary tensors whose lengths do not add up
    ("header length past the body", INFER, *binary_request({"inputs": []}, b"", declared=10 ** 6), 400,
     "does not fit"),
    ("binary size past the body", INFER, *binary_request(
        {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3],
                     "parameters": {"binary_data_size": 24}}]}, b"\x00" * 8), 400, "runs past"),
    ("binary not whole int64s", INFER, *binary_request(
        {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3],
                     "parameters": {"binary_data_size": 7}}]}, b"\x00" * 7), 400, "whole number"),
    # text that is not text
    ("invalid UTF-8 in JSON", TASK, b'{"inputs": "caf\xe9 \xff\xfe"}', {}, 400, "malformed JSON"),
    ("lone surrogate", TASK, b'{"inputs": "\\ud800 alone"}', {}, 400, "malformed JSON"),
    ("invalid UTF-8 in binary BYTES", INFER, *binary_request(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                     "parameters": {"binary_data_size": len(BYTES_NOT_UTF8)}}]}, BYTES_NOT_UTF8), 400, "UTF-8"),
    ("empty text", TASK, b'{"inputs": ""}', {}, 422, "empty text"),
    ("blank text", INFER, body(tensor("text", "BYTES", [1], ["  \n\t "])), {}, 422, "empty text"),
    ("empty list", TASK, b'{"inputs": []}', {}, 422, "empty list"),
    ("deeply nested", TASK, b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400, "malformed JSON"),
    ("nested lists of text", INFER, body(tensor("text", "BYTES", [1], [[[["x"]]]])), {}, 200, None),
    ("wrong inputs type", TASK, b'{"inputs": {"question": "not for this task"}}', {}, 422, None),
    ("unknown key", TASK, b'{"inputs": "x", "stream": true}', {}, 400, "stream"),
    # names that do not exist
    ("unknown model (front)", "/v2/models/nope/infer", body(tensor("text", "BYTES", [1], ["x"])), {}, 404, "emb"),
    ("unknown model (task API)", "/models/nope", b'{"inputs": "x"}', {}, 404, "emb"),
    ("unknown version", f"/v2/models/{MODEL}/versions/7/infer", body(tensor("text", "BYTES", [1], ["x"])), {}, 404,
     "version"),
]


@pytest.fixture(scope="module")
def pids(stack):
    before = {g: worker_pid(stack, g) for g in stack.group_urls}
    yield before
    after = {g: worker_pid(stack, g) for g in stack.group_urls}
    assert after == before, "a worker was replaced while taking bad input"


@pytest.mark.parametrize("path, content, headers, status, message",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(stack, pids, path, content, headers, status, message):
    r = httpx.post(stack.front_url + path, content=content,
                   headers={"Content-Type": "application/json", **headers}, timeout=30)
    SENT.append(r.status_code)
    assert r.status_code == status, r.text[:500]
    if message is not None:
        assert message in r.json()["error"], r.text[:500]


def test_unknown_model_at_a_group_is_its_own_404(stack, pids):
    url = next(iter(stack.group_urls.values()))
    r = httpx.post(url + "/models/nope", json={"inputs": "x"}, timeout=30)
    assert r.status_code == 404 and "serves 'emb'" in r.json()["error"]


def test_over_long_text_is_truncated_to_the_largest_bucket(stack, pids):
    """truncation = true (the default): the answer is the one for the text's first 32 tokens."""
    head = "word " * 30            # [CLS] + 30 words + [SEP] = 32 tokens, the largest bucket
    answers = httpx.post(stack.front_url + TASK, json={"inputs": [head + "more " * 5000, head]}, timeout=30)
    assert answers.status_code == 200, answers.text
    long, short = answers.json()
    np.testing.assert_allclose(long, short, atol=1e-5)


def test_workers_are_alive_and_ready_after_it_all(stack, pids, tmp_path_factory):
    for url in stack.group_urls.values():
        assert httpx.get(url + "/v2/health/ready", timeout=10).status_code == 200
        assert httpx.post(url + TASK, json={"inputs": "still fine"}, timeout=30).status_code == 200
    for group in stack.group_urls:
        assert "Traceback" not in stack.log_path(group).read_text(errors="replace")
    record(tmp_path_factory.getbasetemp(), "bad_input", {
        "requests": len(SENT), "server_errors": sum(c >= 500 for c in SENT),
        "statuses": {str(c): SENT.count(c) for c in sorted(set(SENT))}})
    assert not any(c >= 500 for c in SENT)
