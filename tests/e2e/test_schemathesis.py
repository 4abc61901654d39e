"""Schemathesis against a running group's own OpenAPI: every operation, bounded examples, no 5xx, no dead worker.

The routes read their bodies raw (orjson, and Triton's binary extension), so FastAPI's /openapi.json has no
request bodies; the test adds the ones the handlers parse (the protocol's pydantic models: KServe v2
InferRequest, the task JSON TaskRequest, and the Inference-Header-Content-Length header) so that schemathesis
generates bodies too. Each operation runs with its {name} free and pinned to the served model (a free name only
ever reaches the 404 branch); those with a body also in negative mode (bodies that break the schema).
Derandomized: CI runs the same cases.
"""
from __future__ import annotations

import copy
import time

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from faults.faultkit import record, worker_pid
from neuronserve.server.protocol import DATATYPES, InferRequest, TaskRequest

EXAMPLES_PER_RUN = 25
REF = "#/components/schemas/{model}"


def with_bodies(schema: dict, input_names: list[str]) -> dict:
    """The app's OpenAPI plus the request bodies (and header) its inference routes parse. An input's name and
    datatype are any string, but often one the model takes: random strings alone stop at "unknown input"."""
    schema = copy.deepcopy(schema)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    bodies = {}
    for model in (InferRequest, TaskRequest):
        body = model.model_json_schema(ref_template=REF)
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        bodies[model] = {"required": True,
                         "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}
    tensor = components["InferInput"]["properties"]
    for key, known in (("name", input_names), ("datatype", list(DATATYPES))):
        tensor[key] = {"anyOf": [{"enum": known}, {"type": "string"}]}
    header = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
              "schema": {"type": "string"}}
    for path, item in schema["paths"].items():
        if "post" not in item:
            continue
        post = item["post"]
        if path.endswith("/infer"):
            post["requestBody"] = bodies[InferRequest]
            post.setdefault("parameters", []).append(header)
        else:
            post["requestBody"] = bodies[TaskRequest]
    return schema


def test_every_operation_gives_no_server_error(stack, tmp_path_factory):
    group = "emb-0"
    url = stack.group_urls[group]
    pid = worker_pid(stack, group)
    raw = httpx.get(url + "/openapi.json", timeout=10).json()
    model = stack.plan.groups[0].model
    inputs = [i["name"] for i in httpx.get(f"{url}/v2/models/{model}", timeout=10).json()["inputs"]]
    schema = schemathesis.openapi.from_dict(with_bodies(raw, inputs))
    cases: dict[str, int] = {}
    statuses: dict[str, int] = {}
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    for op in operations:
        pins = [None] + ([{"name": model}] if "{name}" in op.path else [])
        runs = [(GenerationMode.POSITIVE, pin) for pin in pins]
        if op.body:     # negative mode needs a schema to break: any string is a valid path parameter
            runs += [(GenerationMode.NEGATIVE, pin) for pin in pins]
        for mode, pin in runs:
            strategy = op.as_strategy(generation_mode=mode, path_parameters=pin)

            @settings(max_examples=EXAMPLES_PER_RUN, deadline=None, database=None,
                      derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case):
                response = case.call_and_validate(base_url=url, checks=[not_a_server_error], timeout=30)
                cases[op.label] = cases.get(op.label, 0) + 1
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1

            run()
    total = sum(cases.values())
    record(tmp_path_factory.getbasetemp(), "schemathesis", {
        "operations": len(operations), "cases": total, "per_operation": cases, "statuses": statuses,
        "seconds": round(time.monotonic() - started, 1)})
    assert not any(code.startswith("5") for code in statuses), statuses
    # the same worker, still ready, nothing logged as a bug
    assert worker_pid(stack, group) == pid
    assert httpx.get(url + "/v2/health/ready", timeout=10).status_code == 200
    assert "Traceback" not in stack.log_path(group).read_text(errors="replace")
    assert total >= 10 * len(operations)
