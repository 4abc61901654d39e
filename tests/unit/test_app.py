"""The app in-process (Starlette's TestClient runs the real ASGI app and its lifespan): routes, status codes,
error bodies, readiness, the queue limit, metrics. The same app under gunicorn: tests/e2e/test_server.py."""
from __future__ import annotations

import gc
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tritonclient.http import InferResult

from neuronserve import tasks
from neuronserve.errors import ArtifactError
from neuronserve.server.app import create_app
from server_kit import GatedLoader, compiled, settings_for, wait_ready

QA, CLS = "question-answering", "text-classification"
PAIR = {"question": "Where does Ann live?", "context": "Ann lives in Oslo with her cat."}
LONG = "word " * 200


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.getbasetemp() / "server-artifacts"
    return {task: compiled(root, tiny_model_dir(task), task) for task in (QA, CLS)}


@pytest.fixture(scope="module")
def cls(artifacts):
    with TestClient(create_app(settings_for(artifacts[CLS], truncation=False))) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def qa(artifacts):
    with TestClient(create_app(settings_for(artifacts[QA]))) as client:
        wait_ready(client)
        yield client


def v2(name, data, datatype="BYTES", shape=None):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def test_health_and_metadata(cls):
    assert cls.get("/v2/health/live").status_code == 200
    assert cls.get("/v2/health/ready").json() == {"ready": True}
    server = cls.get("/v2").json()
    assert server["name"] == "neuronserve" and "binary_tensor_data" in server["extensions"]
    meta = cls.get(f"/v2/models/{CLS}").json()
    assert meta["name"] == CLS and meta["versions"] == ["1"]
    assert {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]} in meta["inputs"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 2]} in meta["outputs"]
    assert meta["parameters"]["buckets"] == [[1, 32], [1, 128], [4, 32], [4, 128]]
    assert cls.get(f"/v2/models/{CLS}/versions/1").json() == meta
    assert cls.get(f"/v2/models/{CLS}/ready").status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{CLS}/versions/2"])
def test_unknown_model_or_version_is_404(cls, path):
    r = cls.get(path)
    assert r.status_code == 404 and "unknown" in r.json()["error"]


def test_task_json_single_and_list(cls):
    [one] = cls.post(f"/models/{CLS}", json={"inputs": "I love it"}).json()     # nested, as the Inference API
    assert {a["label"] for a in one} == {"NEGATIVE", "POSITIVE"} and abs(sum(a["score"] for a in one) - 1) < 1e-6
    many = cls.post("/", json={"inputs": ["I love it", "I hate it", "meh"]}).json()
    assert len(many) == 3
    assert [a["label"] for a in many[0]] == [a["label"] for a in one]
    assert [a["score"] for a in many[0]] == pytest.approx([a["score"] for a in one], abs=1e-5)


def test_v2_tensors_and_text_agree(cls):
    ids = cls.app.state.model.tokenizer("hello there")["input_ids"]
    tensors = cls.post(f"/v2/models/{CLS}/infer", json={"id": "r1", "inputs": [
        v2("input_ids", ids, "INT64", [1, len(ids)])]}).json()
    text = cls.post(f"/v2/models/{CLS}/infer", json={"inputs": [v2("text", ["hello there"])]}).json()
    assert tensors["id"] == "r1" and tensors["model_name"] == CLS
    (logits,) = tensors["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [1, 2]
    by_name = {o["name"]: o for o in text["outputs"]}
    np.testing.assert_allclose(by_name["logits"]["data"], logits["data"], atol=1e-5)
    answer = json.loads(by_name["answer"]["data"][0])
    assert answer[0]["label"] == ("NEGATIVE", "POSITIVE")[int(np.argmax(logits["data"]))]


def test_v2_binary_outputs_read_by_tritonclient(qa):
    body = {"inputs": [v2("question", [PAIR["question"]] * 2), v2("context", [PAIR["context"], "Bob is in Rome."])],
            "outputs": [{"name": "answer", "parameters": {"binary_data": True}},
                        {"name": "start_logits", "parameters": {"binary_data": True}}]}
    r = qa.post(f"/v2/models/{QA}/infer", json=body)
    assert r.status_code == 200, r.text
    result = InferResult.from_response_body(r.content, header_length=int(r.headers["inference-header-content-length"]))
    answers = [json.loads(a) for a in result.as_numpy("answer")]
    assert answers[0]["answer"] in PAIR["context"] and answers[1]["answer"] in "Bob is in Rome."
    assert result.as_numpy("start_logits").shape[0] == 2 and result.as_numpy("end_logits") is None


def test_qa_text_forms_agree(qa):
    hf = qa.post(f"/models/{QA}", json={"inputs": PAIR}).json()
    single = qa.post(f"/v2/models/{QA}/infer", json={"inputs": [v2("text", [json.dumps(PAIR)])]}).json()
    answer = next(o for o in single["outputs"] if o["name"] == "answer")
    assert json.loads(answer["data"][0]) == hf
    assert PAIR["context"][hf["start"]:hf["end"]] == hf["answer"]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"inputs": []}', 400, "inputs"),
    (b'{"inputs": [{"name": "input_ids", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2]}]}', 400, "INT64"),
    (b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2]}]}', 400, "elements"),
    (b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}]}', 400, "[batch, seq"),
    (b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 99999999]}]}', 422, "0.."),
    (b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}, '
     b'{"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]}]}', 400, "same shape"),
    (b'{"inputs": [{"name": "pixels", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}', 400, "unknown input"),
    (b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 200], "data": '
     + json.dumps([1] * 200).encode() + b"}]}", 422, "longer than the largest"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [""]}]}', 422, "empty text"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}]}', 400, "strings"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}', 422, "empty"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["%s"]}]}' % LONG.encode(), 422,
     "longer than the largest"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "outputs": [{"name": "x"}]}',
     400, "unknown output"),
])
def test_bad_v2_requests_get_4xx_with_a_message(cls, body, status, message):
    r = cls.post(f"/v2/models/{CLS}/infer", content=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize("body, status, message", [
    (b"[1, 2", 400, "malformed JSON"),
    (b'{"input": "typo"}', 400, "inputs"),
    (b'{"inputs": 5}', 422, "expected a string"),
    (b'{"inputs": "   "}', 422, "empty text"),
    (b'{"inputs": []}', 422, "empty list"),
    (('{"inputs": "%s"}' % LONG).encode(), 422, "truncation"),
])
def test_bad_task_requests_get_4xx_with_a_message(cls, body, status, message):
    r = cls.post(f"/models/{CLS}", content=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_unknown_model_inference_is_404(cls):
    assert cls.post("/models/nope", json={"inputs": "x"}).status_code == 404
    assert cls.post("/v2/models/nope/infer", json={"inputs": [v2("text", ["x"])]}).status_code == 404


def test_truncation_on_cuts_long_text(qa):
    r = qa.post(f"/models/{QA}", json={"inputs": {"question": "What?", "context": LONG}})
    assert r.status_code == 200 and r.json()["answer"].strip() in LONG


def test_answered_requests_leave_nothing_to_the_cycle_collector(qa):
    """A request's work is freed when its answer is sent (reference counting), not by the cycle collector: at
    thousands of requests a second, cyclic garbage costs a sizeable share of the worker's CPU."""
    from neuronserve import wordpiece
    from neuronserve.server.batcher import Work

    kinds = (Work, tasks.Encoded, wordpiece.Encoding, wordpiece._Text)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            assert qa.post(f"/models/{QA}", json={"inputs": [PAIR, PAIR]}).status_code == 200
            assert qa.post(f"/v2/models/{QA}/infer", json={"inputs": [
                v2("question", [PAIR["question"]]), v2("context", [PAIR["context"]])]}).status_code == 200
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_metrics_count_requests_batches_and_readiness(cls):
    cls.post(f"/models/{CLS}", json={"inputs": ["a", "b"]})
    cls.post(f"/models/{CLS}", content=b"{")
    text = cls.get("/metrics").text
    labels = f'group="{CLS}-0",model="{CLS}"'
    for line in (f'neuronserve_ready{{{labels}}} 1.0', 'neuronserve_requests_total{code="200",',
                 'neuronserve_requests_total{code="400",', "neuronserve_request_duration_seconds_bucket{",
                 f"neuronserve_queue_depth{{{labels}}} 0.0", "neuronserve_batch_size_bucket{",
                 "neuronserve_batch_fill_bucket{", 'neuronserve_busy_seconds_total{copy="0",',
                 'neuronserve_busy_seconds_total{copy="1",', "neuronserve_inferences_total{"):
        assert line in text, line
    def value(name: str) -> float:
        return next(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name))

    assert value("neuronserve_inferences_total") >= 2
    # padding waste: the real tokens of "a" and "b" ([CLS] x [SEP]: 3 each) against the bucket's slots
    assert value("neuronserve_tokens_total") >= 6 and value("neuronserve_token_slots_total") >= 32
    assert value("neuronserve_tokens_total") <= value("neuronserve_token_slots_total")
    assert value("neuronserve_queue_seconds_count") >= 2 and value("neuronserve_queue_seconds_sum") >= 0
    calls = [x for x in text.splitlines() if x.startswith("neuronserve_bucket_calls_total{")]
    assert calls and all('bucket="' in x for x in calls)
    assert sum(float(x.split()[-1]) for x in calls) == value("neuronserve_batch_size_count")


def test_not_ready_while_loading(artifacts):
    loader = GatedLoader(hold_loading=True)
    with TestClient(create_app(settings_for(artifacts[CLS]), load=loader)) as client:
        r = client.get("/v2/health/ready")
        assert r.status_code == 503 and "loading" in r.json()["reason"]
        assert client.get(f"/v2/models/{CLS}/ready").status_code == 503
        r = client.post(f"/models/{CLS}", json={"inputs": "x"})
        assert r.status_code == 503 and "not ready" in r.json()["error"] and r.headers["retry-after"]
        assert client.get("/v2/health/live").status_code == 200
        loader.loading.set()
        wait_ready(client)
        assert client.post(f"/models/{CLS}", json={"inputs": "x"}).status_code == 200


def test_full_queue_is_503_with_retry_after(artifacts):
    loader = GatedLoader(gated={0})     # the copy's one trace, for every bucket
    with TestClient(create_app(settings_for(artifacts[CLS], copies=1, max_queue=2), load=loader)) as client:
        wait_ready(client)
        loader.armed.set()
        with ThreadPoolExecutor(4) as pool:
            held = pool.submit(client.post, f"/models/{CLS}", json={"inputs": "runs first, held by the gate"})
            assert loader.entered.wait(30)
            queued = pool.submit(client.post, f"/models/{CLS}", json={"inputs": ["fills", "the queue"]})
            deadline = time.monotonic() + 30
            while client.app.state.model.batcher.depth < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = client.post(f"/models/{CLS}", json={"inputs": "one too many"})
            loader.release()
            assert held.result().status_code == 200 and queued.result().status_code == 200
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "max_queue" in r.json()["error"]


def test_bad_artifact_is_refused_with_settings_given(tmp_path):
    with pytest.raises(ArtifactError, match="no compiled model"):
        create_app(settings_for(tmp_path / "missing"))


def test_middleware_sees_the_inference_routes(artifacts):
    """Middleware added to the app (auth, tracing, CORS) wraps every dialect's inference routes too."""
    app = create_app(settings_for(artifacts[CLS], copies=1))
    seen = []

    class Trace:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                seen.append((scope["method"], scope["path"]))
            await self.inner(scope, receive, send)

    app.add_middleware(Trace)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.post(f"/models/{CLS}", json={"inputs": "hi"}).status_code == 200
        assert client.post(f"/v2/models/{CLS}/infer", json={"inputs": [v2("text", ["hi"])]}).status_code == 200
        assert client.post("/", json={"inputs": "hi"}).status_code == 200
        assert client.get(f"/models/{CLS}").status_code == 405
    assert seen[-4:] == [("POST", f"/models/{CLS}"), ("POST", f"/v2/models/{CLS}/infer"), ("POST", "/"),
                         ("GET", f"/models/{CLS}")]
