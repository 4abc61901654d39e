"""The server as production runs it: gunicorn + one UvicornWorker per group, settings from NEURONSERVE_*.

Answers over HTTP equal the eager (untraced) model's, computed in this process: the transformers
text-classification pipeline, the eager question-answering model's logits, and sentence-transformers' own
encode() for the real all-MiniLM-L6-v2. Bad inputs get 4xx and leave the worker alive; a wrong-backend or damaged
artifact stops gunicorn with one clear log line; an artifact whose warm-up answer is wrong never becomes ready.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from neuronserve import tasks
from neuronserve.build.artifact import read_manifest, write_manifest
from references import qa_answer
from server_kit import Gunicorn, compiled, settings_for, shared_server

pytestmark = pytest.mark.e2e

QA, CLS, FE = "question-answering", "text-classification", "feature-extraction"
TEXTS = ["I loved every minute of it.", "Terrible.", "The plot " + "went on and on " * 8 + "without end.",
         "A short one.", "Neuron cores serve BERT models behind nginx.", "ok", "Das ist gut.",
         "Two sentences here. And a second one, slightly longer than the first."]
PAIRS = [{"question": "Where does Ann live?", "context": "Ann lives in Oslo with her cat and two dogs."},
         {"question": "What colour is the car?", "context": "The car in the driveway is red, the bike is blue. "
                                                          + "It rained all day long. " * 6},
         {"question": "Who wrote it?", "context": "It was written by Mary in 1818."}]


@pytest.fixture(scope="module")
def sources(tiny_model_dir, minilm_dir):
    return {QA: tiny_model_dir(QA), CLS: tiny_model_dir(CLS), FE: minilm_dir}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, sources):
    root = tmp_path_factory.getbasetemp() / "server-artifacts"
    out = {QA: compiled(root, sources[QA], QA), CLS: compiled(root, sources[CLS], CLS),
           FE: compiled(root, sources[FE], FE, name="minilm")}
    return out


def variant(artifacts, tmp_path_factory, name: str, change) -> Path:
    """A copy of the classifier's artifact with its manifest (or files) changed by `change(dir, manifest)`."""
    out = tmp_path_factory.mktemp(name) / CLS
    shutil.copytree(artifacts[CLS], out)
    manifest = read_manifest(out)
    change(out, manifest)
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def servers(request, artifacts, tmp_path_factory):
    """The three good groups, plus the broken ones: all started at once (each imports torch), then awaited."""
    logs = tmp_path_factory.mktemp("server-logs")

    def wrong_backend(d, m):
        m.backend, m.target = "neuron", "inf2"

    def damaged(d, m):
        (d / m.buckets[0].file).write_bytes(b"not a model")

    def wrong_answer(d, m):
        m.warmup.expected = {k: (np.asarray(v) + 0.5).tolist() for k, v in m.warmup.expected.items()}

    started = {task: shared_server(request.config, settings_for(artifacts[task]), logs) for task in (QA, CLS, FE)}
    for name, change in (("wrong-backend", wrong_backend), ("damaged", damaged), ("wrong-answer", wrong_answer)):
        settings = settings_for(variant(artifacts, tmp_path_factory, name, change), group=name)
        started[name] = Gunicorn(settings, logs / f"{name}.log")
    started["drained"] = Gunicorn(settings_for(artifacts[FE], group="drained"), logs / "drained.log")
    try:
        for task in (QA, CLS, FE):
            started[task].wait_ready()
        yield started
    finally:
        for name in ("wrong-backend", "damaged", "wrong-answer", "drained"):
            started[name].stop()


def metric(server: Gunicorn, name: str) -> float:
    """The value of one series (summed over its other labels), 0 when absent."""
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def post(server: Gunicorn, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kw)


def concurrently(server: Gunicorn, path: str, bodies: list) -> list:
    """Send the bodies at the same time, so the batcher mixes them into shared batches."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, path, json=b), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


# ---------------------------------------------------------------- answers equal the eager model's

def test_classification_equals_the_transformers_pipeline(servers, sources):
    import transformers

    pipe = transformers.pipeline("text-classification", model=str(sources[CLS]), top_k=None, device="cpu")
    expected = pipe(TEXTS)
    # one text's answer is nested, as the Inference API nests it
    got = [one for [one] in concurrently(servers[CLS], f"/models/{CLS}", [{"inputs": t} for t in TEXTS])]
    got += [post(servers[CLS], f"/models/{CLS}", json={"inputs": TEXTS}).json()]    # one request, split in two
    for answers in (got[:len(TEXTS)], got[-1]):
        for text, exp, ans in zip(TEXTS, expected, answers):
            assert {a["label"]: a["score"] for a in ans} == pytest.approx(
                {e["label"]: e["score"] for e in exp}, abs=1e-5), text


def test_embeddings_equal_sentence_transformers(servers, sources):
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(sources[FE]), device="cpu").encode(TEXTS, normalize_embeddings=False)
    got = concurrently(servers[FE], "/models/minilm", [{"inputs": t} for t in TEXTS])
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)     # the model's Normalize module, inside the trace
    batch = post(servers[FE], "/", json={"inputs": TEXTS}).json()
    np.testing.assert_allclose(np.array(batch), expected, atol=1e-5)


def test_question_answering_equals_the_eager_model(servers, sources):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(sources[QA]))
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(str(sources[QA])).eval()
    items = tasks.encode(QA, tokenizer, tasks.parse(QA, PAIRS).items, 128, truncation=True)
    v2 = post(servers[QA], f"/v2/models/{QA}/infer", json={"inputs": [
        {"name": "question", "datatype": "BYTES", "shape": [3], "data": [p["question"] for p in PAIRS]},
        {"name": "context", "datatype": "BYTES", "shape": [3], "data": [p["context"] for p in PAIRS]}]}).json()
    outputs = {o["name"]: o for o in v2["outputs"]}
    width = outputs["start_logits"]["shape"][1]
    hf = concurrently(servers[QA], f"/models/{QA}", [{"inputs": p} for p in PAIRS])
    for row, (pair, item) in enumerate(zip(PAIRS, items)):
        enc = tokenizer(pair["question"], pair["context"], return_tensors="pt")
        with torch.no_grad():
            eager = model(**enc)
        start = np.asarray(outputs["start_logits"]["data"]).reshape(-1, width)[row, :item.length]
        end = np.asarray(outputs["end_logits"]["data"]).reshape(-1, width)[row, :item.length]
        np.testing.assert_allclose(start, eager.start_logits[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(end, eager.end_logits[0].numpy(), atol=1e-4)
        expected = qa_answer(model, tokenizer, pair["question"], pair["context"])
        assert hf[row]["answer"] == expected["answer"] and hf[row]["start"] == expected["start"]
        assert hf[row]["score"] == pytest.approx(expected["score"], abs=1e-4)
        # the v2 request runs as one batch, the task JSON ones as they come: shapes of other lengths, the same
        # answer, its score equal to float32's last digits
        v2_answer = json.loads(outputs["answer"]["data"][row])
        assert v2_answer == {**hf[row], "score": pytest.approx(hf[row]["score"], rel=1e-6)}


def test_a_client_that_leaves_is_dropped_before_its_turn(servers):
    server = servers[FE]
    long = "word " * 118                  # 120 tokens: the 4 x 128 bucket
    t0 = time.monotonic()
    post(server, "/models/minilm", json={"inputs": [long] * 4})
    per_batch = time.monotonic() - t0
    # enough real MiniLM work to keep both copies busy for about 3 s here; the leaving client queues behind it
    n = min(480, max(16, int(3.0 / per_batch) * 8))
    before = metric(server, "neuronserve_inferences_total")
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(post, server, "/models/minilm", json={"inputs": [long] * n})
        deadline = time.monotonic() + 30
        while metric(server, "neuronserve_queue_depth") == 0:
            assert time.monotonic() < deadline and not big.done(), "the big request never queued"
            time.sleep(0.01)
        body = b'{"inputs": "a client that leaves before its turn"}'
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /models/minilm HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.2)
            waiting = metric(server, "neuronserve_queue_depth")
        assert waiting > 1, "the big request finished before the client left: nothing to show"
        assert big.result().status_code == 200, big.result().text
    deadline = time.monotonic() + 30
    while metric(server, 'neuronserve_requests_total{code="499"') < 1:
        assert time.monotonic() < deadline, "the departure was never noticed"
        time.sleep(0.05)
    assert metric(server, "neuronserve_inferences_total") - before == n     # the departed item never ran


# ---------------------------------------------------------------- bad input, and the worker lives on

@pytest.mark.parametrize("path, body, status", [
    (f"/models/{CLS}", b"{oops", 400),
    (f"/models/{CLS}", b'{"inputs": ""}', 422),
    (f"/models/{CLS}", b'{"inputs": [1, 2]}', 422),
    ("/models/other", b'{"inputs": "x"}', 404),
    (f"/v2/models/{CLS}/infer", b'{"inputs": [{"name": "input_ids", "datatype": "FP32", "shape": [1], "data": [1]}]}',
     400),
    (f"/v2/models/{CLS}/infer", b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], '
                                b'"data": [1]}]}', 400),
    (f"/v2/models/{CLS}/infer", b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], '
                                b'"data": [1, -5]}]}', 422),
])
def test_bad_requests_are_4xx_and_the_worker_survives(servers, path, body, status):
    r = post(servers[CLS], path, content=body)
    assert r.status_code == status and r.json()["error"]
    assert httpx.get(servers[CLS].url + "/v2/health/ready").status_code == 200
    assert servers[CLS].log().count("Booting worker") == 1, servers[CLS].log()


def test_metrics_are_exported(servers):
    post(servers[CLS], f"/models/{CLS}", json={"inputs": ["metrics", "please"]})
    text = httpx.get(servers[CLS].url + "/metrics").text
    assert f'neuronserve_ready{{group="{CLS}-0",model="{CLS}"}} 1.0' in text
    assert 'neuronserve_requests_total{code="200"' in text and "neuronserve_inferences_total{" in text


# ---------------------------------------------------------------- artifacts the worker must refuse

@pytest.mark.parametrize("name, message", [
    ("wrong-backend", "compiled for neuron (inf2), but this group serves on cpu; "
                      "run `neuronserve compile --backend cpu`"),
    ("damaged", "checksum mismatch"),
])
def test_refused_artifact_stops_gunicorn_with_one_line(servers, name, message):
    server = servers[name]
    assert server.wait_exit() == 3                 # gunicorn's worker-boot error: the master halts, the unit fails
    log = server.log()
    lines = [line for line in log.splitlines() if message in line]
    assert len(lines) == 1 and "cannot start" in lines[0] and "[ERROR]" in lines[0], log
    assert "Traceback" not in log


def test_stopping_finishes_the_requests_in_flight(servers):
    server = servers["drained"]
    server.wait_ready()
    long = "word " * 118
    t0 = time.monotonic()
    post(server, "/models/minilm", json={"inputs": [long] * 4})
    # about 2 s of work for both copies: in flight when SIGTERM comes, well within the 30 s graceful timeout
    n = min(480, max(8, int(2.0 / (time.monotonic() - t0)) * 8))
    with ThreadPoolExecutor(1) as pool:
        flight = pool.submit(post, server, "/models/minilm", json={"inputs": [long] * n})
        deadline = time.monotonic() + 30
        while metric(server, "neuronserve_queue_depth") == 0:
            assert time.monotonic() < deadline and not flight.done()
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)      # what systemd sends on stop and restart
        assert server.wait_exit() == 0
        r = flight.result()
    assert r.status_code == 200 and len(r.json()) == n
    assert "Application shutdown complete" in server.log()


def test_wrong_warmup_answer_is_never_ready(servers):
    server = servers["wrong-answer"]
    server.wait_live()
    deadline = time.monotonic() + 120
    while server.log().count("warm-up gave a wrong answer") < 2:       # both copies checked and refused
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    r = httpx.get(server.url + "/v2/health/ready")
    assert r.status_code == 503 and "warm-up gave a wrong answer" in r.json()["reason"]
    r = post(server, f"/models/{CLS}", json={"inputs": "anything"})
    assert r.status_code == 503 and "not ready" in r.json()["error"]
    metrics = httpx.get(server.url + "/metrics").text.splitlines()
    assert next(line for line in metrics if line.startswith("neuronserve_ready{")).endswith(" 0.0")
