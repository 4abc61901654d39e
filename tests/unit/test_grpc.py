"""KServe v2 over gRPC (neuronserve.server.grpc_service), served by the real app in-process on a loopback port and
called with a plain grpc channel and the service's own messages.

The messages must be the wire of the clients people use: their field names, numbers and types are compared with
kserve's and tritonclient's generated descriptors, each read in a subprocess (the two register the same names in
protobuf's default pool and cannot be imported into one process). Answers equal the REST route's for the same
text; errors carry REST's message under the mapped code; a fuzz of malformed requests gets only client-error
codes and leaves the worker serving.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from dev import random_models
from neuronserve.server import grpc_messages as pb
from neuronserve.server.app import create_app
from server_kit import GatedLoader, compiled, free_port, in_process, settings_for, wait_ready

TEXTS = ["gRPC speaks KServe v2", "a second, longer sentence to pad the first one out a little"]
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}

DUMP = """
import json, sys, importlib
module = importlib.import_module(sys.argv[1])
def fields(d):
    out = {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None]
           for f in d.fields}
    for n in d.nested_types:
        if not n.GetOptions().map_entry:
            out.update({n.name + "." + k: v for k, v in fields(n).items()})
    return out
fd = module.DESCRIPTOR
print(json.dumps({"messages": {n: fields(d) for n, d in fd.message_types_by_name.items()},
                  "methods": {m.name: [m.input_type.full_name, m.output_type.full_name]
                              for s in fd.services_by_name.values() for m in s.methods}}))
"""


def _dump(module: str) -> dict:
    out = subprocess.run([sys.executable, "-c", DUMP, module], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", ["kserve.protocol.grpc.grpc_predict_v2_pb2", "tritonclient.grpc.service_pb2"])
def test_the_messages_are_the_clients_wire(module):
    theirs = _dump(module)
    ours = json.loads(subprocess.run([sys.executable, "-c", DUMP, "neuronserve.server.grpc_messages"],
                                     capture_output=True, text=True, check=True).stdout)
    for method, types in ours["methods"].items():
        assert theirs["methods"][method] == types
    for name, fields in ours["messages"].items():
        for field, shape in fields.items():
            if name == "InferParameter" and field in ("double_param", "uint64_param") and "kserve" in module:
                continue    # Triton's additions, which KServe's proto lacks
            assert theirs["messages"][name][field] == shape, (name, field)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc")
    source = random_models.build_model(root / "src", "bert", "text-classification", labels=("neg", "pos"))
    return compiled(root / "out", source, "text-classification", name="cls", batch_sizes=(1, 4),
                    sequence_lengths=(32,))


@pytest.fixture(scope="module")
def served(artifact):
    port = free_port()
    with in_process() as start:
        client = start(artifact, grpc_port=port)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        yield client, channel
        channel.close()


def call(channel, method: str, request=None, **kw):
    req_type, resp_type = pb.METHODS[method]
    stub = channel.unary_unary(f"/{pb.SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=pb.message(resp_type).FromString)
    return stub(request if request is not None else pb.message(req_type)(), timeout=30, **kw)


def text_request(texts, *, raw: bool, **fields):
    request = pb.message("ModelInferRequest")(model_name="cls", **fields)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    encoded = [t.encode() for t in texts]
    if raw:
        request.raw_input_contents.append(b"".join(len(e).to_bytes(4, "little") + e for e in encoded))
    else:
        tensor.contents.bytes_contents.extend(encoded)
    return request


def outputs(response) -> dict:
    """name -> numpy array (FP32) or list of str (BYTES), decoded here from the raw contents."""
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.datatype == "BYTES":
            values, pos = [], 0
            while pos < len(raw):
                n = int.from_bytes(raw[pos:pos + 4], "little")
                values.append(raw[pos + 4:pos + 4 + n].decode())
                pos += 4 + n
            out[tensor.name] = values
        else:
            assert tensor.datatype == "FP32"
            out[tensor.name] = np.frombuffer(raw, "<f4").reshape(list(tensor.shape))
    return out


def test_health_and_metadata(served):
    client, channel = served
    assert call(channel, "ServerLive").live and call(channel, "ServerReady").ready
    assert call(channel, "ModelReady", pb.message("ModelReadyRequest")(name="cls")).ready
    meta = call(channel, "ServerMetadata")
    assert meta.name == "neuronserve" and meta.version
    model = call(channel, "ModelMetadata", pb.message("ModelMetadataRequest")(name="cls", version="1"))
    rest = client.get("/v2/models/cls").json()
    assert model.name == "cls" and list(model.versions) == ["1"] and model.platform == rest["platform"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == \
        [(t["name"], t["datatype"], t["shape"]) for t in rest["outputs"]]
    assert [t.name for t in model.inputs] == [t["name"] for t in rest["inputs"]]


@pytest.mark.parametrize("raw", [True, False])
def test_text_infer_equals_rest(served, raw):
    client, channel = served
    response = call(channel, "ModelInfer", text_request(TEXTS, raw=raw, id="abc"))
    assert response.id == "abc" and response.model_name == "cls" and response.model_version == "1"
    got = outputs(response)
    rest = client.post("/v2/models/cls/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS}]}).json()
    by_name = {o["name"]: o for o in rest["outputs"]}
    np.testing.assert_allclose(got["logits"].ravel(), by_name["logits"]["data"], rtol=1e-6)
    assert [json.loads(a) for a in got["answer"]] == [json.loads(a) for a in by_name["answer"]["data"]]
    assert got["answer"] and [json.loads(a) for a in got["answer"]] == \
        [a for a in client.post("/models/cls", json={"inputs": TEXTS, "parameters": {"top_k": None}}).json()]


def test_token_tensors_typed_and_raw_and_task_parameters(served):
    client, channel = served
    ids = np.array([[101, 2000, 2001, 102], [101, 2002, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    typed = pb.message("ModelInferRequest")(model_name="cls")
    raw = pb.message("ModelInferRequest")(model_name="cls")
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        typed.inputs.add(name=name, datatype="INT64", shape=array.shape).contents.int64_contents.extend(
            array.ravel().tolist())
        raw.inputs.add(name=name, datatype="INT64", shape=array.shape)
        raw.raw_input_contents.append(array.astype("<i8").tobytes())
    raw.outputs.add(name="logits")
    a, b = (outputs(call(channel, "ModelInfer", r)) for r in (typed, raw))
    np.testing.assert_array_equal(a["logits"], b["logits"])
    assert list(b) == ["logits"] and a["logits"].shape == (2, 2)
    # a task parameter rides in the request's parameters, as on REST
    request = text_request(TEXTS[:1], raw=False)
    request.parameters["top_k"].int64_param = 1
    answer = json.loads(outputs(call(channel, "ModelInfer", request))["answer"][0])
    assert answer == client.post("/models/cls", json={"inputs": TEXTS[:1], "parameters": {"top_k": 1}}).json()[0]


@pytest.mark.parametrize("change, code, words", [
    (lambda r: setattr(r, "model_name", "other"), grpc.StatusCode.NOT_FOUND, "unknown model 'other'"),
    (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "unknown version '7'"),
    (lambda r: r.raw_input_contents.extend([b"x", b"y"]), grpc.StatusCode.INVALID_ARGUMENT,
     "raw_input_contents has 2 entries for 1 inputs"),
    (lambda r: r.outputs.add(name="nope"), grpc.StatusCode.INVALID_ARGUMENT, "unknown output(s) nope"),
    (lambda r: setattr(r.parameters["top_k"], "string_param", "many"), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (lambda r: r.inputs[0].contents.bytes_contents.__setitem__(0, b""), grpc.StatusCode.INVALID_ARGUMENT,
     "empty"),
    (lambda r: r.inputs[0].__setattr__("datatype", "FP16"), grpc.StatusCode.INVALID_ARGUMENT,
     "FP16 goes in raw_input_contents"),
])
def test_errors_map_to_codes_with_rests_messages(served, change, code, words):
    _, channel = served
    request = text_request(TEXTS[:1], raw=False)
    change(request)
    with pytest.raises(grpc.RpcError) as info:
        call(channel, "ModelInfer", request)
    assert info.value.code() == code and words in info.value.details(), info.value.details()


def test_listens_once_warm_and_a_late_answer_is_deadline_exceeded(artifact):
    port = free_port()
    loader = GatedLoader(gated={0}, hold_loading=True)     # the copy's one trace, for every bucket
    settings = settings_for(artifact, copies=1, grpc_port=port, timeout_s=0.5)
    with TestClient(create_app(settings, load=loader)) as client:
        with socket.socket() as s:      # refused while loading: nginx moves on to another group
            assert s.connect_ex(("127.0.0.1", port)) != 0
        loader.loading.set()
        wait_ready(client)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            loader.armed.set()      # the copy now holds every batch until released
            with pytest.raises(grpc.RpcError) as info:
                call(channel, "ModelInfer", text_request(TEXTS, raw=False))
            loader.release()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no answer within 0.5 s (timeout_s)" in info.value.details()


_tensor = st.fixed_dictionaries({
    "name": st.sampled_from(["text", "input_ids", "attention_mask", "token_type_ids", "question", "x", ""]),
    "datatype": st.sampled_from(["BYTES", "INT64", "INT32", "INT8", "UINT8", "FP32", "FP16", "BOOL", "COMPLEX", ""]),
    "shape": st.lists(st.integers(-2, 40), max_size=3),
    "ints": st.lists(st.integers(-2**63, 2**63 - 1), max_size=8),
    "strings": st.lists(st.binary(max_size=20), max_size=4),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.lists(_tensor, max_size=3), raw=st.lists(st.binary(max_size=64), max_size=3),
       outputs=st.lists(st.sampled_from(["logits", "answer", "x"]), max_size=2),
       junk=st.one_of(st.none(), st.binary(max_size=200)))
def test_fuzz_malformed_requests_get_client_errors(served, tensors, raw, outputs, junk):
    _, channel = served
    if junk is not None:    # bytes that may not even parse as the message
        stub = channel.unary_unary(f"/{pb.SERVICE}/ModelInfer", request_serializer=None,
                                   response_deserializer=None)
        try:
            stub(junk, timeout=30)
        except grpc.RpcError as e:
            assert e.code() in CLIENT_ERRORS, (e.code(), e.details())
        return
    request = pb.message("ModelInferRequest")(model_name="cls")
    for t in tensors:
        tensor = request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        if t["datatype"] == "BYTES":
            tensor.contents.bytes_contents.extend(t["strings"])
        else:
            tensor.contents.int64_contents.extend(t["ints"])
    request.raw_input_contents.extend(raw)
    for name in outputs:
        request.outputs.add(name=name)
    try:
        call(channel, "ModelInfer", request)
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details())
    assert call(channel, "ServerReady").ready
