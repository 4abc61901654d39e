"""The pieces of `make bench` (bench/), checked for correctness, never for speed.

- the baseline server answers like the original design (argmax span of the batch-1 traced model), over real
  hypercorn, and refuses an unknown model copy;
- wrk, driven by the generated Lua script, loads it with no errors (the script's escaping included), and counts
  the measured window exactly as a server answering in bursts on a known schedule saw it;
- the ratio table's math: interpolation of the in-process cost, the model-CPU estimate, the ratios, targets;
- CPU accounting of process trees.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from bench import cpu, report, wrk
from bench.baseline_server import Baseline, request_path
from bench.systems import CONTEXT, QUESTION
from neuronserve.operate.up import free_port_block


# ---------------------------------------------------------------- the baseline server, for real

@pytest.fixture(scope="module")
def compiled_tiny(tiny_model_dir, tmp_path_factory):
    from neuronserve.build.compile import compile_model

    source = tiny_model_dir("question-answering")
    out = tmp_path_factory.mktemp("bench-tiny") / "tiny"
    compile_model(source, out, name="tiny", task="question-answering", backend="cpu", target="cpu",
                  batch_sizes=[1], sequence_lengths=[128])
    return out


def expected_answer(model_dir, question: str, context: str) -> str:
    """What the original's post-processing gives for this model, computed here without HTTP."""
    import torch
    import transformers

    from neuronserve.build.artifact import read_manifest

    manifest = read_manifest(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir / manifest.tokenizer))
    enc = tok(question, context, return_tensors="pt", max_length=128, padding="max_length", truncation=True)
    model = torch.jit.load(str(model_dir / manifest.bucket(1, 128).file))
    with torch.inference_mode():
        start_logits, end_logits = model(*(enc[n] for n in manifest.input_names))
    start, end = int(start_logits.argmax()), int(end_logits.argmax()) + 1
    ids = enc["input_ids"][0]
    return tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids[start:end] if end > start else ids[start:]))


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_baseline_answers_like_the_original_and_wrk_loads_it(compiled_tiny, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[:1]
    with Baseline(compiled_tiny, cpus, free_port_block(1), log_dir=tmp_path) as server:
        server.wait_ready(120)
        url = server.urls[0]
        assert get(url + "/") == (200, {"Status": "Healthy"})

        question, context = "Where does Wolfgang live?", "My name is Wolfgang and I live in Berlin, near the river."
        want = expected_answer(compiled_tiny, question, context)
        for copy in (0, 1):
            assert get(url + request_path(0, copy, question, context)) == (200, {"detail": want})
        status, body = get(url + request_path(0, 2, question, context))
        assert status == 404 and "model_2" in body["detail"]

        # the process is pinned where it was asked to be (hypercorn's worker inherits it)
        pids = cpu.tree_pids(server.pids)
        assert len(pids) >= 2
        assert all(os.sched_getaffinity(p) == set(cpus) for p in pids)

        if shutil.which("wrk") is None:
            pytest.skip("wrk is not installed (make bench installs it)")
        target = wrk.Target(url, tuple(wrk.Request("GET", request_path(0, c, QUESTION, CONTEXT)) for c in (0, 1)))
        before = cpu.cpu_seconds(server.pids)
        result = wrk.run([target], 2, 2, timeout_s=30)
        assert result.completed > 0 and result.errors == {}
        assert result.ok == result.completed and result.throughput > 0
        assert 0 < result.p50 <= result.p99 <= result.max
        assert cpu.cpu_seconds(server.pids) > before


def test_wrk_lua_script_escapes_what_it_carries():
    body = "Où est-il? 'quoted' \\ back\nline \"x\""
    script = wrk.lua_script([wrk.Target("http://127.0.0.1:8080", (wrk.Request("POST", "/m", body, "a/b"),))])
    # no raw quote, backslash or newline from the payload reaches the Lua source unescaped
    literal = next(line for line in script.splitlines() if "port=" in line)
    assert "\\039quoted\\039" in literal and "\\010" in literal and "\\092" in literal
    # decimal escapes of the UTF-8 bytes of "ù"
    assert "\\195\\185" in literal
    luac = shutil.which("luac") or shutil.which("luac5.1") or shutil.which("luajit")
    if luac:
        path = f"/tmp/bench-test-{os.getpid()}.lua"
        with open(path, "w") as f:
            f.write(script)
        try:
            flag = ["-bl"] if "luajit" in luac else ["-p"]
            assert subprocess.run([luac, *flag, path], capture_output=True).returncode == 0
        finally:
            os.unlink(path)


def _wrk_line(window: str) -> str:
    return ("Running 1s test\nWRK-RESULT {\"duration_us\": 2000000, \"requests\": 100, \"errors\": {\"connect\": 0, "
            "\"read\": 0, \"write\": 0, \"status\": 4, \"timeout\": 1}, \"p50_us\": 1000, \"p90_us\": 2000, "
            "\"p99_us\": 5000, \"max_us\": 9000, \"mean_us\": 1200.5, \"window\": " + window + "}\n")


def test_wrk_output_parsing():
    out = _wrk_line('{"started": 123.5, "from_s": 0.5, "to_s": 2.0, "requests": 80, "status": 2, "rate": 51.5, '
                    '"first_s": 0.61, "last_s": 1.98}')
    r = wrk.parse_output(out, 8)
    assert r.errors == {"status": 4, "timeout": 1}
    assert r.ok == 96 and r.throughput_whole == pytest.approx(48.0)
    # the window: 78 answered requests in 1.5 s, and their slope
    assert (r.started, r.ramp_s, r.window_s, r.window_completed) == (123.5, 0.5, 1.5, 80)
    assert r.throughput == 51.5
    assert (r.first_s, r.last_s) == (0.61, 1.98)
    assert (r.p50, r.p99, r.max) == (0.001, 0.005, 0.009)
    empty = wrk.parse_output(_wrk_line('{"started": 1.0, "from_s": 1.0, "to_s": 2.0, "requests": 0, "status": 0, '
                                       '"rate": 0.0, "first_s": null, "last_s": null}'), 8)
    assert empty.throughput == 0.0 and empty.first_s is None and empty.last_s is None
    with pytest.raises(RuntimeError, match="no result"):
        wrk.parse_output("wrk: connection refused", 1)
    with pytest.raises(ValueError, match="window"):
        wrk.lua_script([wrk.Target("http://127.0.0.1:8080", (wrk.Request("GET", "/"),))], 2.0, 2.0)


class BurstServer:
    """An HTTP/1.1 keep-alive server that answers like a saturated batching server: every pending request at
    once, `period` seconds apart from the first request on; /bad gets a 500. It logs each answer's
    (time.monotonic(), status): what the server saw, to hold wrk's window against."""

    def __init__(self, period: float):
        self.period = period
        self.sent: list[tuple[float, int]] = []
        self.loop = asyncio.new_event_loop()
        self.pending: list[asyncio.Future] = []
        self.first = asyncio.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _serve(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ticker = self.loop.create_task(self._ticks())
        ready.set()
        self.loop.run_forever()

    async def _ticks(self):
        await self.first.wait()
        start = self.loop.time()                    # asyncio's clock is time.monotonic()
        for k in range(1, 1000):
            await asyncio.sleep(start + k * self.period - self.loop.time())
            batch, self.pending = self.pending, []
            for f in batch:
                f.set_result(None)

    async def _client(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                answered = self.loop.create_future()
                self.pending.append(answered)
                self.first.set()
                await answered
                status = 500 if head.split(b" ", 2)[1] == b"/bad" else 200
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
                self.sent.append((time.monotonic(), status))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                                    # wrk went away
        finally:
            writer.close()

    async def _shutdown(self):
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self):
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_wrk_counts_the_window_as_the_server_saw_it():
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (make bench installs it)")
    # bursts every 0.4 s from the level's start: 0.4, 0.8, 1.2, ..., 2.8, 3.2 s; the window [1, 3] s holds the five
    # from 1.2 to 2.8, 0.2 s clear of either edge. 4 connections on 2 threads, every other request a /bad one.
    server = BurstServer(0.4)
    try:
        target = wrk.Target(f"http://127.0.0.1:{server.port}", (wrk.Request("GET", "/ok"), wrk.Request("GET", "/bad")))
        r = wrk.run([target], 4, 3, ramp_s=1.0, threads=2, timeout_s=10)
    finally:
        server.close()
    seen = [(t - r.started, status) for t, status in server.sent if r.started + 1.0 <= t <= r.started + 3.0]
    assert (r.ramp_s, r.window_s) == (1.0, 2.0)
    assert r.window_completed == len(seen) == 5 * 4                   # both threads' counts, added up
    assert r.window_status_errors == sum(status == 500 for _, status in seen) == 5 * 2
    # the slope: each answered request weighed by where it fell in the window (6 (W^2/4 - d^2) / W^3, d from its
    # middle); the bursts' 5 ok answers a second, all five bursts being well inside
    weights = [6 * (2.0 ** 2 / 4 - (t - 2.0) ** 2) / 2.0 ** 3 for t, status in seen if status == 200]
    assert r.throughput == pytest.approx(sum(weights), rel=0.01)
    assert r.throughput == pytest.approx(10 / 2.0, rel=0.05)
    assert r.first_s == pytest.approx(seen[0][0], abs=0.05) and r.last_s == pytest.approx(seen[-1][0], abs=0.05)
    assert r.completed > r.window_completed and r.errors.get("status", 0) > r.window_status_errors


# ---------------------------------------------------------------- the ratio table's math

def _ceiling():
    return {"throughput": [{"batch": 1, "items_per_s": 20.0, "per_call_s": 0.1, "per_call_cpu_s": 0.1},
                           {"batch": 2, "items_per_s": 25.0, "per_call_s": 0.16, "per_call_cpu_s": 0.16},
                           {"batch": 4, "items_per_s": 24.0, "per_call_s": 0.33, "per_call_cpu_s": 0.32}],
            "latency_group": {"median_s": 0.1, "p99_s": 0.11},
            "latency_all": {"median_s": 0.06, "p99_s": 0.07}}


def _level(c, tp, p99, cpu_s=None, model=None, errors=None, duration=10.0, foreign=0.0):
    completed = int(tp * duration) + (errors or {}).get("status", 0)
    return {"concurrency": c, "throughput": tp, "p50": p99 / 2, "p90": p99 * 0.9, "p99": p99, "max": p99 * 1.2,
            "completed": completed, "errors": errors or {}, "duration_s": duration, "cpu_s": cpu_s,
            "model_cpu_s": model, "foreign_cpu_s": foreign}


def test_in_process_cost_interpolates_between_batch_sizes():
    c = _ceiling()
    assert report.per_call_at(c, 1) == 0.1
    assert report.per_call_at(c, 1.5) == pytest.approx(0.13)
    assert report.per_call_at(c, 3) == pytest.approx(0.24)
    assert report.per_call_at(c, 8) == pytest.approx(0.64)        # past the largest: proportional
    assert report.per_call_at(c, 2, key="per_call_s") == 0.16
    # 10 batches of 2 items in batch-2 buckets (fill 1.0 each): 10 x 0.16 s
    assert report.model_cpu_seconds(c, 10, 10.0, 20) == pytest.approx(1.6)
    # 10 batches of 1 item in batch-2 buckets (fill 0.5 each): still batch-2 calls
    assert report.model_cpu_seconds(c, 10, 5.0, 10) == pytest.approx(1.6)
    assert report.model_cpu_seconds(c, 0, 0, 0) == 0.0


def test_ratio_rows_summary_and_targets():
    result = {"name": "tiny", "ceiling": _ceiling(),
              "neuronserve": [_level(1, 9.0, 0.104, cpu_s=1.0, model=0.9), _level(4, 24.5, 0.3),
                              _level(64, 24.4, 3.0, cpu_s=10.0, model=8.0, foreign=5.0)],
              "baseline": [_level(1, 8.0, 0.2), _level(4, 8.1, 0.6, cpu_s=9.0, model=8.1),
                           _level(64, 8.0, 9.0, errors={"status": 3})]}
    rows = {r["concurrency"]: r for r in report.ratio_rows(result)}
    assert rows[4]["ceiling"] == 25.0                         # best batch size's items/s
    assert rows[4]["neuronserve_over_ceiling"] == pytest.approx(0.98)
    assert rows[64]["neuronserve_over_baseline"] == pytest.approx(24.4 / 8.0)
    assert rows[64]["other_load"] == pytest.approx(0.5)
    # 244 requests on 10 CPU-s, against the ceiling's best 2 / 0.16 = 12.5 items per CPU-s
    assert rows[64]["neuronserve_cpu_efficiency"] == pytest.approx(24.4 / 12.5)

    s = report.summary(result)
    assert s["p99_c1_over_b1_group"] == pytest.approx(1.04)
    assert s["p99_c1_over_b1_best"] == pytest.approx(0.104 / 0.06)
    assert s["c64_over_c4"] == pytest.approx(24.4 / 24.5)
    assert s["min_over_ceiling_c4_up"] == pytest.approx(24.4 / 25.0)
    assert s["max_neuronserve_over_max_baseline"] == pytest.approx(24.5 / 8.1)
    # busiest level: neuronserve c=4 has no CPU numbers -> no capacity; baseline c=4: 81 req on 0.9 CPU-s
    assert s["neuronserve_capacity_per_core"] is None
    assert s["baseline_serving_cpu_ms"] == pytest.approx(900 / 81)

    met = {text.split(" >=")[0].split(" <=")[0]: ok for text, _, ok in report.targets("tiny", result)}
    assert met["neuronserve / ceiling"] is True
    assert met["no fall at 64 against 4 (throughput 64 / 4"] is True
    assert met["p99 at concurrency 1 / in-process batch-1 latency (one core group)"] is True
    assert met["p99 at concurrency 1 / in-process batch-1 latency (best of one group, all CPUs)"] is False
    assert met["max req/s neuronserve / baseline"] is True
    assert met["serving capacity"] is None

    md = report.markdown({"tiny": result}, {"when": "now", "cpus": 2, "cpu_model": "test"})
    assert "| 64 | 25.0 | 24.4 | 8.0 | 0.976 | 3.05 |" in md
    assert "| NO |" in md and "baseline c=64: {'status': 3}" in md


def test_each_level_is_held_against_the_ceiling_measured_beside_it():
    """The host's speed drifts: a level measured while the ceiling ran at 20 items/s (CPU per call 0.2 s, 1.25x
    the sweep's 0.16 s) is compared with 20, and its CPU efficiency with the slower ceiling too."""
    slow = {"batch": 2, "items_per_s": 20.0, "per_call_s": 0.2, "per_call_cpu_s": 0.2, "before": 21.0, "after": 19.0}
    ns = {**_level(4, 19.6, 0.3, cpu_s=10.0, model=8.0), "ceiling": slow}
    base = _level(4, 10.0, 0.6)     # no ceiling of its own: the sweep's best (25) stands in
    result = {"name": "bert-base", "ceiling": _ceiling(), "neuronserve": [ns], "baseline": [base]}
    row = report.ratio_rows(result)[0]
    assert row["ceiling"] == 20.0
    assert row["neuronserve_over_ceiling"] == pytest.approx(0.98)
    assert row["baseline_over_ceiling"] == pytest.approx(10.0 / 25.0)
    assert report.drift(ns, result["ceiling"]) == pytest.approx(1.25)
    # 196 requests on 10 CPU-s against the ceiling's 2 / 0.16 items per CPU-s, made 1.25x dearer
    assert row["neuronserve_cpu_efficiency"] == pytest.approx(19.6 / (12.5 / 1.25))
    assert report.summary(result)["min_over_ceiling_c4_up"] == pytest.approx(0.98)


def test_concurrency_1_is_held_against_the_lone_caller_measured_beside_it():
    """The sweep's all-CPU batch-1 latency (60 ms) was taken minutes before; beside the level it was 80 ms."""
    beside = {"median_s": 0.08, "p99_s": 0.09, "calls": 40, "before_median_s": 0.078, "after_median_s": 0.082}
    ns = {**_level(1, 11.0, 0.088), "p50": 0.082, "latency_all": beside}
    result = {"name": "bert-base", "ceiling": _ceiling(), "neuronserve": [ns], "baseline": []}
    s = report.summary(result)
    assert s["inprocess_b1_all_s"] == 0.06 and s["inprocess_b1_all_beside_s"] == 0.08
    assert s["p99_c1_over_b1_best"] == pytest.approx(0.088 / 0.08)
    assert s["p50_c1_over_b1_all_p50"] == pytest.approx(0.082 / 0.08)
    assert s["p99_c1_over_b1_all_p99"] == pytest.approx(0.088 / 0.09)
    met = {text: ok for text, _, ok in report.targets("bert-base", result)}
    assert met["p99 at concurrency 1 / in-process batch-1 latency (best of one group, all CPUs) <= 1.05"] is False
    md = report.markdown({"bert-base": result}, {"when": "now"})
    assert "60.0 ms on all CPUs (80.0 ms, p99 90.0 ms, beside the concurrency-1 level" in md
    assert "p50 / its median 1.025, p99 / its p99 0.978." in md


@pytest.mark.slow
def test_the_ceiling_reference_stays_loaded_and_measures_again(compiled_tiny):
    from bench.ceiling import Reference
    from bench.systems import PAYLOAD

    cpus = sorted(os.sched_getaffinity(0))
    with Reference(compiled_tiny, PAYLOAD, 1, [[c] for c in cpus]) as ref:
        pids = [p.pid for p in ref._procs]
        first, second = ref.measure(0.2), ref.measure(0.2)
        assert [p.pid for p in ref._procs] == pids and all(p.is_alive() for p in ref._procs)
    for t in (first, second):
        assert t.batch == 1 and t.items_per_s > 0 and 0 < t.per_call_s < 0.2
        # >= 3 calls per group in 0.2 s at least: the rate is what the calls took, summed over the groups
        assert t.items_per_s == pytest.approx(len(cpus) / t.per_call_s, rel=0.5)
    assert not any(p.is_alive() for p in ref._procs)
    # one group: a lone caller on every CPU, its calls' times (the latency beside a concurrency-1 level)
    with Reference(compiled_tiny, PAYLOAD, 1, [cpus]) as lone:
        times = lone.call_times(0.2)
        # calls until 0.2 s are spent, and at least 3 (a busy machine may need more time for those)
        assert len(times) >= 3 and 0 < min(times)
        assert len(times) == 3 or sum(times) <= 0.2 + max(times), times
        if len(cpus) > 1:
            with pytest.raises(ValueError, match="one group"):
                ref.call_times(0.1)


@pytest.mark.slow
def test_a_ceiling_reference_that_fails_to_start_leaves_no_process(compiled_tiny, monkeypatch):
    import multiprocessing.context

    from bench.ceiling import Reference
    from bench.systems import PAYLOAD

    started = []
    start = multiprocessing.context.SpawnProcess.start

    def second_fails(process):
        if started:
            raise OSError("cannot start another process")
        start(process)
        started.append(process)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", second_fails)
    cpu = min(os.sched_getaffinity(0))
    with pytest.raises(OSError, match="another process"):
        Reference(compiled_tiny, PAYLOAD, 1, [[cpu], [cpu]])
    assert len(started) == 1 and not started[0].is_alive()


def test_serving_cpu_per_request_excludes_the_model():
    assert report.serving_cpu_per_request(_level(4, 100.0, 0.1, cpu_s=3.0, model=2.0)) == pytest.approx(0.001)
    assert report.serving_cpu_per_request(_level(4, 100.0, 0.1, cpu_s=1.0, model=2.0)) == 0.0
    assert report.serving_cpu_per_request(_level(4, 0.0, 0.1, cpu_s=1.0, model=0.5)) is None


# ---------------------------------------------------------------- CPU accounting

def test_cpu_seconds_cover_the_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while cpu.cpu_seconds([child.pid]) < 0.25:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert child.pid in cpu.tree_pids([os.getpid()])
        assert cpu.cpu_seconds([os.getpid()]) >= cpu.cpu_seconds([child.pid])
    finally:
        child.kill()
        child.wait()
    assert cpu.host_busy_seconds() > 0
