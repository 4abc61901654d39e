"""KServe v2 over gRPC through the nginx front (`nginx.grpc_listen`), with the clients people use, unchanged:
NVIDIA's `tritonclient.grpc` here, and the `kserve` SDK's InferenceGRPCClient and InferenceRESTClient in a
subprocess (kserve and tritonclient.grpc register the same protobuf names and cannot share a process).

The host serves two models, so calls reach a group of either model first: answers must equal the task JSON
route's for the same text whichever group took the call, and a call for a model the host does not serve names the
ones it does.
"""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

TEXTS = ["gRPC through nginx", "a second, longer sentence so the two rows pad differently"]
CALLS = 6       # enough that both groups, the one that serves the model and the other, take some


@pytest.fixture(scope="module")
def stack(two_models):
    return two_models


@pytest.fixture(scope="module")
def client(stack):
    client = triton.InferenceServerClient(url=stack.grpc_front)
    yield client
    client.close()


def text_input(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def task_json(stack, model: str, texts: list[str]):
    r = httpx.post(f"{stack.front_url}/models/{model}", json={"inputs": texts, "parameters": {"top_k": None}}
                   if model == "cls" else {"inputs": texts}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_metadata(stack, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cls") and client.is_model_ready("emb")
    with pytest.raises(InferenceServerException, match="unknown model 'missing'; this host serves emb, cls"):
        client.is_model_ready("missing")
    assert client.get_server_metadata().name == "neuronserve"
    for model in ("cls", "emb"):
        meta = client.get_model_metadata(model, as_json=True)
        rest = httpx.get(f"{stack.front_url}/v2/models/{model}", timeout=30).json()
        assert meta["name"] == model and meta["platform"] == rest["platform"]
        assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in rest["outputs"]]


@pytest.mark.parametrize("model", ["cls", "emb"])
def test_text_infer_equals_the_task_json_route_from_either_group(stack, client, model):
    expected = task_json(stack, model, TEXTS)
    for _ in range(CALLS):
        result = client.infer(model, [text_input(TEXTS)], request_id="r1")
        assert result.get_response().id == "r1" and result.get_response().model_name == model
        answers = [json.loads(a) for a in result.as_numpy("answer")]
        if model == "cls":
            assert answers == expected
        else:
            np.testing.assert_allclose(answers, expected, atol=1e-6)
    served = {g: n for g, n in _served_by_group(stack, model).items() if n}
    assert list(served) == [f"{model}-0"], served      # every call was answered by the model's own group


def _served_by_group(stack, model: str) -> dict[str, float]:
    """group -> gRPC + HTTP inference requests it answered for `model` (from its /metrics)."""
    out = {}
    for group, url in stack.group_urls.items():
        text = httpx.get(f"{url}/metrics", timeout=30).text
        out[group] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("neuronserve_requests_total{") and f'model="{model}"' in line)
    return out


def test_the_model_header_routes_at_the_front_and_errors_keep_their_codes(client):
    result = client.infer("cls", [text_input(TEXTS[:1])], headers={"x-neuronserve-model": "cls"})
    assert result.as_numpy("logits").shape == (1, 2)
    with pytest.raises(InferenceServerException) as info:
        client.infer("cls", [text_input(TEXTS[:1])], outputs=[triton.InferRequestedOutput("nope")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "unknown output(s) nope" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("missing", [text_input(TEXTS[:1])])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.infer("cls", [text_input([""])])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "empty" in info.value.message()


KSERVE_CLIENTS = """
import asyncio, json, sys
from kserve import InferRequest, InferInput
from kserve.inference_client import InferenceGRPCClient, InferenceRESTClient, RESTConfig

grpc_address, front, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def plain(output):
    # as_numpy decodes raw contents (what the server sends on gRPC) and JSON data alike
    return [v.decode() if isinstance(v, bytes) else v for v in output.as_numpy().ravel().tolist()]

def request():
    return InferRequest(model_name="cls", infer_inputs=[InferInput(name="text", shape=[len(texts)], datatype="BYTES",
                                                                   data=texts)])

async def main():
    out = {}
    grpc_client = InferenceGRPCClient(url=grpc_address, timeout=60)
    out["grpc_ready"] = [await grpc_client.is_server_ready(), await grpc_client.is_model_ready("cls")]
    response = await grpc_client.infer(request())
    out["grpc"] = {o.name: plain(o) for o in response.outputs}
    await grpc_client.close()
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    out["rest_ready"] = [await rest.is_server_ready(front), await rest.is_model_ready(front, "cls")]
    response = await rest.infer(front, request(), model_name="cls")
    out["rest"] = {o.name: plain(o) for o in response.outputs}
    await rest.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_the_kserve_sdk_over_grpc_and_rest(stack):
    run = subprocess.run([sys.executable, "-c", KSERVE_CLIENTS, stack.grpc_front, stack.front_url, json.dumps(TEXTS)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["grpc_ready"] == [True, True] and out["rest_ready"] == [True, True]
    expected = task_json(stack, "cls", TEXTS)
    for transport in ("grpc", "rest"):
        answers = [json.loads(a) for a in out[transport]["answer"]]
        assert answers == expected, transport
    np.testing.assert_allclose(np.asarray(out["grpc"]["logits"]).ravel(),
                               np.asarray(out["rest"]["logits"]).ravel(), atol=1e-6)


def test_tritonclient_http_through_the_front_answers_as_grpc(stack, client):
    import tritonclient.http as triton_http

    http = triton_http.InferenceServerClient(stack.front_url.removeprefix("http://"))
    text = triton_http.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    over_http = http.infer("cls", [text])
    over_grpc = client.infer("cls", [text_input(TEXTS)])
    np.testing.assert_allclose(over_http.as_numpy("logits"), over_grpc.as_numpy("logits"), atol=1e-6)
    assert [json.loads(a) for a in over_http.as_numpy("answer")] == task_json(stack, "cls", TEXTS)
    http.close()
