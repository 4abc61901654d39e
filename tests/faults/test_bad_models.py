"""Models that load but misbehave, served behind nginx next to each other:

- "cls" gives a wrong answer to its known-answer warm-up (its manifest expects other numbers): its group stays
  up but never ready, so nginx never hands it a request to answer wrongly;
- "emb" hangs in a model call: its traced module is wrapped (TorchScript) in one that spins for ~3 x timeout_s
  when the input holds a poison token id, the way a wedged device call never returns. The request gets 504 at
  server.timeout_s, the copy watchdog gives up on the stuck copy and loads a fresh one, and the same worker
  (same PID) serves again.
"""
from __future__ import annotations

import json
import shutil
import time

import httpx
import numpy as np
import orjson
import pytest
import torch

from faultkit import ready, record, start_stack, wait_until, worker_pid
from neuronserve.build.artifact import read_manifest, sha256_file, write_manifest

TIMEOUT_S = 2.0              # server.timeout_s of this stack; neuron.exec_timeout_s must stay below it
HANG_S = 3 * TIMEOUT_S       # how long a poisoned model call spins (calibrated on this machine)
POISON = 30521               # the last id of the vocabulary: no warm-up text or test sentence contains it
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


class Hang(torch.nn.Module):
    """The traced model, unless input_ids hold `poison`: then first `spins` rounds of busy work."""

    def __init__(self, inner, poison: int, spins: int):
        super().__init__()
        self.inner = inner
        self.poison = poison
        self.spins = spins

    def forward(self, input_ids, attention_mask, token_type_ids):
        if bool((input_ids == self.poison).any()):
            x = torch.full((128, 128), 0.5)
            for _ in range(self.spins):
                x = torch.tanh(x @ x)
        return self.inner(input_ids, attention_mask, token_type_ids)


def spins_for(seconds: float, module) -> int:
    """Rounds of busy work that take `seconds` on one thread here (the worker runs its copy on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = torch.jit.script(Hang(module, POISON, 500))
        ids = torch.full((1, 8), POISON)
        t0 = time.perf_counter()
        probe(ids, torch.ones_like(ids), torch.zeros_like(ids))
        took = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return max(500, int(500 * seconds / took))


def hanging_copy(src, dst) -> int:
    """Copy the artifact, every trace wrapped in Hang once (buckets may share one; checksums updated); returns the
    spins it uses."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    assert manifest.input_names == INPUTS, manifest.input_names
    spins = None
    for file in {b.file for b in manifest.buckets}:
        inner = torch.jit.load(str(dst / file))
        spins = spins or spins_for(HANG_S, inner)
        torch.jit.save(torch.jit.script(Hang(inner, POISON, spins)), str(dst / file))
    for b in manifest.buckets:
        b.sha256 = sha256_file(dst / b.file)
    write_manifest(dst, manifest)
    return spins


def wrong_answer_copy(src, dst) -> None:
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    manifest.warmup.expected = {k: (np.asarray(v) + 0.5).tolist() for k, v in manifest.warmup.expected.items()}
    write_manifest(dst, manifest)


@pytest.fixture(scope="module")
def bad(model_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("bad-models")
    spins = hanging_copy(model_repo / "emb", repo / "emb")
    wrong_answer_copy(model_repo / "cls", repo / "cls")
    s = start_stack(tmp_path_factory.mktemp("bad-stack"), {"emb": {"groups": 1}, "cls": {"groups": 1}}, repo=repo,
                    server={"timeout_s": TIMEOUT_S}, dropins={"neuron.toml": "[neuron]\nexec_timeout_s = 1\n"})
    try:
        wait_until(lambda: ready(s.group_urls["emb-0"]) or s.exited(), 240, "emb-0 ready")
        assert s.exited() == [], s.exited()
        s.spins = spins
        yield s
    finally:
        s.stop()


def log_of(s, group: str) -> str:
    return s.log_path(group).read_text(errors="replace")


def test_wrong_warmup_answer_never_becomes_ready(bad, basetemp):
    wait_until(lambda: "warm-up gave a wrong answer" in log_of(bad, "cls-0"), 120, "cls-0 refusing its warm-up")
    pid = worker_pid(bad, "cls-0")
    sent = failed = 0
    for i in range(10):                 # for a while: it stays refused, nothing restarts or flips it to ready
        r = httpx.get(bad.group_urls["cls-0"] + "/v2/health/ready", timeout=10)
        assert r.status_code == 503 and "warm-up gave a wrong answer" in r.json()["reason"], r.text
        # through nginx: the model's only group refuses (503), never a wrong answer
        front = httpx.post(bad.front_url + "/models/cls", json={"inputs": f"text {i}"}, timeout=30)
        assert front.status_code == 503, front.text
        # the model beside it serves
        emb = httpx.post(bad.front_url + "/models/emb", json={"inputs": f"text {i}"}, timeout=30)
        sent += 1
        failed += emb.status_code != 200
        time.sleep(0.3)
    log = log_of(bad, "cls-0")
    record(basetemp, "wrong_warmup_answer", {"refused_requests_to_it": 10, "other_model_sent": sent,
                                             "other_model_failed": failed})
    assert failed == 0
    assert worker_pid(bad, "cls-0") == pid and "Traceback" not in log, log
    metrics = httpx.get(bad.group_urls["cls-0"] + "/metrics", timeout=10).text
    assert next(line for line in metrics.splitlines() if line.startswith("neuronserve_ready{")).endswith(" 0.0")


def test_hung_model_call_gets_504_and_the_worker_recovers(bad, basetemp):
    url = bad.front_url + "/v2/models/emb/infer"
    pid = worker_pid(bad, "emb-0")
    ids = [[101, 2023, POISON, 102]]
    poison = {"inputs": [{"name": name, "datatype": "INT64", "shape": [1, 4], "data": data}
                         for name, data in zip(INPUTS, (ids, [[1] * 4], [[0] * 4]))]}
    t0 = time.monotonic()
    r = httpx.post(url, content=orjson.dumps(poison), timeout=60)
    took = time.monotonic() - t0
    # the group's own 504 (JSON, naming the setting), passed on by nginx: not nginx's proxy timeout
    assert r.status_code == 504 and "timeout_s" in r.json()["error"], r.text
    assert took >= TIMEOUT_S - 0.1, took           # it waited for the model, then gave up
    wait_until(lambda: "stuck in one batch" in log_of(bad, "emb-0"), 30, "the watchdog giving up on the copy")
    # back: the fresh copy answers while the stuck one may still spin
    during = []

    def answered() -> bool:
        code = httpx.post(bad.front_url + "/models/emb", json={"inputs": "are you back?"}, timeout=30).status_code
        during.append(code)
        return code == 200

    recovery_s = wait_until(answered, 60, "emb answering again after the hang", poll=0.2)
    after = [httpx.post(bad.front_url + "/models/emb", json={"inputs": f"after {i}"}, timeout=30).status_code
             for i in range(20)]
    record(basetemp, "hung_model_call", {
        "poisoned_request_status": r.status_code, "answered_after_s": round(took, 2), "timeout_s": TIMEOUT_S,
        "spin_s_calibrated": HANG_S, "requests_while_recovering": len(during),
        "statuses_while_recovering": {str(c): during.count(c) for c in sorted(set(during))},
        "recovered_after_s": round(recovery_s, 1), "requests_after": len(after),
        "failed_after": sum(c != 200 for c in after)})
    assert after == [200] * len(after)
    assert worker_pid(bad, "emb-0") == pid           # the same worker process: no restart was needed
    assert ready(bad.group_urls["emb-0"])
    assert "Traceback" not in log_of(bad, "emb-0")
    assert json.loads(httpx.get(bad.front_url + "/v2/health/ready", timeout=10).text)["ready"] is True
