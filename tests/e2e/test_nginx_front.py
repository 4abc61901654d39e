"""The nginx front for real: per-model routing, bearer-token auth (401), per-client rate limit (429), a token
that never reaches a log, failover when a group dies, and a drained host."""
from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from neuronserve.operate import drain
from neuronserve.render import auth_map_path, front_access_log

TOKEN = "e2e-Token_0123456789abcdef"
# slow enough that even a loaded machine sends faster: 1 request per 2 s once a burst of 20 is spent (the
# module's other tests spend a handful of it)
RATE_PER_MIN, BURST = 30, 20


@pytest.fixture(scope="module")
def guarded(stack_builder, tmp_path_factory):
    """Two models, one group each, behind a front that wants a bearer token and limits each client."""
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    s = stack_builder({"emb": {"groups": 1}, "cls": {"groups": 1}},
                      nginx={"auth_token_file": str(token_file), "rate_limit": f"{RATE_PER_MIN}r/m",
                             "rate_limit_burst": BURST})
    try:
        yield s
    finally:
        s.stop()


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("headers", [{}, auth("wrong-token"), {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"}])
def test_no_or_wrong_token_gets_401(guarded, headers):
    for method, path in [("POST", "/models/emb"), ("POST", "/v2/models/cls/infer"), ("GET", "/v2"),
                         ("GET", "/nowhere")]:
        r = httpx.request(method, guarded.front_url + path, json={"inputs": "hi"}, headers=headers, timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="neuronserve"'
        assert "bearer token" in r.json()["error"]


def test_right_token_is_served_and_health_stays_open(guarded):
    r = httpx.post(guarded.front_url + "/models/emb", json={"inputs": "hi"}, headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    assert "WWW-Authenticate" not in r.headers
    # load balancers probe readiness without credentials
    assert httpx.get(guarded.front_url + "/v2/health/ready", timeout=10).status_code == 200


def test_each_model_goes_to_its_own_group(guarded):
    emb = httpx.post(guarded.front_url + "/models/emb", json={"inputs": ["a", "b"]}, headers=auth(), timeout=30)
    cls = httpx.post(guarded.front_url + "/models/cls", json={"inputs": ["a", "b"]}, headers=auth(), timeout=30)
    assert emb.status_code == cls.status_code == 200, (emb.text, cls.text)
    assert all(isinstance(x, float) for x in emb.json()[0])                 # an embedding
    assert {d["label"] for d in cls.json()[0]} == {"NEGATIVE", "POSITIVE"}  # class scores
    for model in ("emb", "cls"):
        meta = httpx.get(f"{guarded.front_url}/v2/models/{model}", headers=auth(), timeout=10)
        assert meta.status_code == 200 and meta.json()["name"] == model
    log = front_access_log(guarded.layout).read_text()
    ports = {g.model: g.port for g in guarded.plan.groups}
    assert '"POST /models/emb HTTP/1.1" 200' in log and f"upstream=127.0.0.1:{ports['emb']}" in log
    assert f"upstream=127.0.0.1:{ports['cls']}" in log


def test_token_never_reaches_a_log(guarded):
    httpx.post(guarded.front_url + "/models/emb", json={"inputs": "hi"}, headers=auth(), timeout=30)
    httpx.post(guarded.front_url + "/models/emb", json={"inputs": "hi"}, headers=auth(TOKEN + "x"), timeout=30)
    logs = [front_access_log(guarded.layout), *sorted(guarded.layout.state_dir.rglob("*.log"))]
    assert len(logs) >= 4       # front access log, nginx's own logs, each group's log
    for path in logs:
        assert TOKEN not in path.read_text(errors="replace"), path
    # nor the world-readable front config: only the root-only map file holds it
    assert TOKEN not in guarded.layout.nginx_conf.read_text()
    assert TOKEN in auth_map_path(guarded.layout).read_text()
    assert auth_map_path(guarded.layout).stat().st_mode & 0o077 == 0


def test_rate_limit_answers_429(guarded):
    started = time.monotonic()
    codes = [httpx.get(f"{guarded.front_url}/v2/models/emb", headers=auth(), timeout=10).status_code
             for _ in range(2 * BURST)]
    elapsed = time.monotonic() - started
    assert set(codes) == {200, 429}, codes
    assert codes[0] == 200
    # no more got through than the burst plus what the rate refilled meanwhile
    assert codes.count(200) <= BURST + elapsed * RATE_PER_MIN / 60 + 1, (codes, elapsed)
    # unauthenticated requests are refused before they count against the client's rate
    assert httpx.get(f"{guarded.front_url}/v2/models/emb", timeout=10).status_code == 401


def test_a_dead_group_is_routed_around(stack_factory):
    s = stack_factory({"emb": {"groups": 2}})
    victim = next(p for p in s.procs if p.name == "emb-1")
    os.killpg(victim.popen.pid, signal.SIGKILL)         # the whole group: gunicorn master and worker
    victim.popen.wait(10)
    codes = [httpx.post(s.front_url + "/models/emb", json={"inputs": f"after {i}"}, timeout=30).status_code
             for i in range(10)]
    assert codes == [200] * 10
    # nginx saw the dead group refuse and sent the request on (at most once per fail_timeout)
    assert "connect() failed" in (s.layout.state_dir / "nginx-error.log").read_text()


def test_drain_turns_the_front_unready_and_still_serves(stack):
    """The fleet's view of one host: drained, the front's readiness is 503 (live stays 200) while requests that
    still come are answered; each group's /metrics is reachable through the front for another host's Prometheus."""
    front = stack.front_url
    assert httpx.get(front + "/v2/health/ready", timeout=10).status_code == 200
    lines: list[str] = []
    try:
        waited = drain.drain(stack.plan, stack.layout, quiet_s=1.0, timeout_s=30.0, progress=lines.append)
        assert waited >= 1.0 and "drained: no request for 1 s" in lines[-1]
        r = httpx.get(front + "/v2/health/ready", timeout=10)
        assert r.status_code == 503 and "neuronserve undrain" in r.json()["error"]
        assert httpx.get(front + "/health", timeout=10).status_code == 503       # TEI's readiness, a one-model host
        assert httpx.get(front + "/v2/health/live", timeout=10).status_code == 200
        r = httpx.post(front + "/models/emb", json={"inputs": "still served while drained"}, timeout=30)
        assert r.status_code == 200
    finally:
        assert drain.undrain(stack.layout)
    assert httpx.get(front + "/v2/health/ready", timeout=10).status_code == 200
    assert httpx.get(front + "/health", timeout=10).status_code == 200
    assert not drain.undrain(stack.layout)          # already back: nothing to remove
    for g in stack.plan.groups:
        text = httpx.get(f"{front}/_neuronserve/metrics/{g.name}", timeout=10).text
        ready = [line for line in text.splitlines() if line.startswith("neuronserve_ready{")]
        assert ready == [f'neuronserve_ready{{group="{g.name}",model="emb"}} 1.0'], text[:500]
