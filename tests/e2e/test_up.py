"""`neuronserve up` / Stack: the planned commands run for real behind nginx, answer, share the load, and stop."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.errors import ServiceError
from neuronserve.operate.up import _port_in_use

TEXTS = ["The quick brown fox jumps over the lazy dog.", "neuronserve puts a model on every core", "short"]


def requests_answered(url: str) -> float:
    """Sum of neuronserve_requests_total over status codes, from one group's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "neuronserve_requests"
               for s in fam.samples if s.name == "neuronserve_requests_total")


def session_pids(leader: int) -> list[int]:
    """Every live (non-zombie) process whose session is the one `leader` started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == leader and fields[0] != "Z":    # fields: state ppid pgrp session ...
                pids.append(int(entry.name))
    return pids


def stop_cli(proc: subprocess.Popen) -> None:
    """After a failed test: Ctrl-C first (it stops its children), then SIGKILL the children's groups and it."""
    if proc.poll() is not None:
        return
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        for pid in [*children, proc.pid]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def test_groups_and_front_are_ready(stack):
    assert len(stack.group_urls) == 2
    for url in [*stack.group_urls.values(), stack.front_url]:
        r = httpx.get(url + "/v2/health/ready", timeout=10)
        assert r.status_code == 200 and r.json()["ready"] is True


def test_processes_run_the_planned_commands(stack):
    """Each group runs exactly its unit's ExecStart with exactly its unit's environment (plus PATH & co)."""
    procs = {p.name: p.popen for p in stack.procs}
    for g in stack.plan.groups:
        pid = procs[g.name].pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert [a.decode() for a in cmdline] == stack.plan.argv(g, stack.layout)
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        env = stack.plan.env(g, stack.layout)
        assert {k: environ.get(k) for k in env} == env
        assert set(environ) - set(env) <= {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"}


def test_answers_through_nginx_equal_the_groups_own(stack):
    front = httpx.post(stack.front_url + "/models/emb", json={"inputs": TEXTS}, timeout=30)
    assert front.status_code == 200, front.text
    got = np.array(front.json())
    assert got.shape[0] == len(TEXTS) and got.ndim == 2
    for url in stack.group_urls.values():
        direct = httpx.post(url + "/models/emb", json={"inputs": TEXTS}, timeout=30)
        assert direct.status_code == 200
        np.testing.assert_allclose(np.array(direct.json()), got, atol=1e-4)
    # the same through KServe v2, text as a BYTES tensor
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    v2 = httpx.post(stack.front_url + "/v2/models/emb/infer", json=body, timeout=30)
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["embeddings"]["shape"] == list(got.shape)
    np.testing.assert_allclose(np.array(outputs["embeddings"]["data"]).reshape(got.shape), got, atol=1e-4)


def test_both_groups_get_traffic(stack):
    before = {name: requests_answered(url) for name, url in stack.group_urls.items()}
    n = 24

    def one(i: int) -> int:
        return httpx.post(stack.front_url + "/models/emb", json={"inputs": f"request {i}"}, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(n)))
    assert codes == [200] * n
    served = {name: requests_answered(url) - before[name] for name, url in stack.group_urls.items()}
    assert sum(served.values()) == n
    assert all(count > 0 for count in served.values()), served


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def test_a_lone_request_borrows_the_idle_groups_cpu(stack_factory):
    """Requests one at a time to one group: the other group idles, so its CPU is lent to them (2 threads on both
    CPUs) and the answers stay those of the unlent path. A fresh stack: lending stops for a bucket where it is
    measured no faster, which for this tiny model an earlier test may already have found."""
    # the tiny model's batches take milliseconds: lent here only because the threshold is lowered
    stack = stack_factory({"emb": {"groups": 2}}, cpu={"lend_min_batch_ms": 0})
    (name, url), (other_name, other_url) = stack.group_urls.items()
    lend_dir = stack.layout.under(stack.plan.group(name).settings.lend_dir)
    assert sorted(p.name for p in lend_dir.iterdir()) == sorted(f"cpu{c}{suffix}" for g in stack.plan.groups
                                                                for c in g.cpus for suffix in ("", ".owner"))
    reference = np.array(httpx.post(other_url + "/models/emb", json={"inputs": TEXTS}, timeout=30).json())
    before = metric(url, "neuronserve_borrowed_batches_total")
    answers = []
    for _ in range(6):
        r = httpx.post(url + "/models/emb", json={"inputs": TEXTS}, timeout=30)
        assert r.status_code == 200, r.text
        answers.append(np.array(r.json()))
    assert metric(url, "neuronserve_borrowed_batches_total") > before
    for got in answers:
        np.testing.assert_allclose(got, reference, atol=1e-4)


def test_front_answers_unknown_paths_itself(stack):
    r = httpx.post(stack.front_url + "/v2/models/nope/infer", json={}, timeout=10)
    assert r.status_code == 404 and "emb" in r.json()["error"]
    # per-group metrics are scraped from each group's port, never through the front
    assert httpx.get(stack.front_url + "/metrics", timeout=10).status_code == 404
    assert httpx.get(stack.front_url + "/v2", timeout=10).json()["name"] == "neuronserve"


def test_stop_leaves_no_process(stack_factory):
    s = stack_factory({"emb": {"groups": 1}})
    leaders = [p.popen.pid for p in s.procs]
    pids = [pid for leader in leaders for pid in session_pids(leader)]
    assert len(pids) >= 4          # gunicorn master + worker, nginx master + worker(s)
    s.stop()
    assert [pid for leader in leaders for pid in session_pids(leader)] == []
    assert not _port_in_use("127.0.0.1", s.plan.groups[0].port)


def test_a_group_that_cannot_start_is_named_with_its_log(stack_factory, tmp_path):
    s = stack_factory({"emb": {"groups": 1}}, server={"model_repository": str(tmp_path / "empty")}, start=False)
    s.start()
    with pytest.raises(ServiceError) as e:
        s.wait_ready(120)
    message = str(e.value)
    assert "emb-0 exited with code" in message and "before it was ready" in message
    assert "neuronserve compile" in message          # the group's own error, from its log tail


def test_busy_port_is_refused_before_anything_starts(stack_factory):
    s = stack_factory({"emb": {"groups": 1}}, start=False)
    port = s.plan.groups[0].port
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        with pytest.raises(ServiceError, match=f"127.0.0.1:{port} \\(emb-0\\)"):
            s.start()
    assert s.procs == []


def test_cli_up_serves_until_interrupted(stack_factory, tmp_path):
    """`neuronserve up`: prints the groups and the front, serves, and stops everything on Ctrl-C (SIGINT)."""
    s = stack_factory({"emb": {"groups": 1}}, start=False)
    config_path = s.plan.config.sources[0]
    root = tmp_path / "up-root"
    proc = subprocess.Popen([sys.executable, "-m", "neuronserve", "up", "--config", str(config_path), "--backend",
                             "cpu", "--root", str(root), "--ready-timeout", "240"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    serving = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving"):
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(300), "".join(lines)
        output = "".join(lines)
        assert f"front: {s.front_url}" in output and "emb-0" in output
        r = httpx.post(s.front_url + "/models/emb", json={"inputs": "hello"}, timeout=30)
        assert r.status_code == 200
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 2       # the group's gunicorn master and nginx
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines)
        reader.join(10)
        assert "stopped" in "".join(lines)
        for child in children:
            assert session_pids(child) == []
        assert not _port_in_use("127.0.0.1", s.plan.groups[0].port)
    finally:
        stop_cli(proc)
    # the up root kept the rendered files it ran from
    assert (root / "etc/systemd/system/neuronserve@emb-0.service.d/10-neuronserve.conf").is_file()
