"""Schemathesis against a running group's own OpenAPI: every operation, bounded examples, no 5xx, no dead worker.

The routes read their bodies raw (orjson, and Triton's binary extension); the app documents the body each parses
(KServe v2 InferRequest with its Inference-Header-Content-Length header, the task JSON, OpenAI's embeddings
request, TEI's requests), so schemathesis generates bodies for every dialect. Each operation runs with its {name} free and pinned to the served model (a free name only
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
from neuronserve.server.protocol import DATATYPES

EXAMPLES_PER_RUN = 25


def with_hints(schema: dict, input_names: list[str]) -> dict:
    """The app's OpenAPI, whose every POST must document the body its handler parses (each dialect's pydantic
    model), plus hints for KServe v2: an input's name and datatype are any string, but often one the model
    takes (random strings alone stop at "unknown input")."""
    schema = copy.deepcopy(schema)
    posts = {path: item["post"] for path, item in schema["paths"].items() if "post" in item}
    assert all("requestBody" in post for post in posts.values()), [p for p, x in posts.items() if "requestBody" not in x]
    tensor = schema["components"]["schemas"]["InferInput"]["properties"]
    for key, known in (("name", input_names), ("datatype", list(DATATYPES))):
        tensor[key] = {"anyOf": [{"enum": known}, {"type": "string"}]}
    return schema


def test_every_operation_gives_no_server_error(stack, tmp_path_factory):
    group = "emb-0"
    url = stack.group_urls[group]
    pid = worker_pid(stack, group)
    raw = httpx.get(url + "/openapi.json", timeout=10).json()
    model = stack.plan.groups[0].model
    inputs = [i["name"] for i in httpx.get(f"{url}/v2/models/{model}", timeout=10).json()["inputs"]]
    schema = schemathesis.openapi.from_dict(with_hints(raw, inputs))
    cases: dict[str, int] = {}
    statuses: dict[str, int] = {}
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    # KServe v2, the task JSON, OpenAI's embeddings and models, TEI's routes, health, metadata and metrics
    assert len(operations) >= 25, [op.label for op in operations]
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
