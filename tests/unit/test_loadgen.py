"""The load client and `neuronserve bench` against small local HTTP/1.1 servers that stand in for groups.

The stand-ins are real servers (http.server, keep-alive) that count what they serve and export it as
neuronserve_requests_total on /metrics, so the per-group share and the exact request counts can be checked.
"""
from __future__ import annotations

import csv
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from neuronserve.measure import bench, loadgen
from neuronserve.cli import main


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        # http.server writes the head and the body separately: without this, Nagle + delayed ACKs add 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, body: bytes, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.bodies.append((self.path, body))
        if srv.delay:
            time.sleep(srv.delay)
        status = srv.status
        with srv.lock:
            srv.served[status] = srv.served.get(status, 0) + 1
        if self.path == "/close":
            self._send(200, b'{"ok": true}', {"Connection": "close"})
            self.close_connection = True
        else:
            self._send(status, b'{"answer": "Berlin"}')

    def do_GET(self):
        srv = self.server
        if self.path == "/metrics":
            with srv.lock:
                lines = [f'neuronserve_requests_total{{model="m",group="{srv.name}",code="{c}"}} {n}'
                         for c, n in srv.served.items()]
            text = "# TYPE neuronserve_requests_total counter\n" + "\n".join(lines) + \
                f'\n# TYPE neuronserve_ready gauge\nneuronserve_ready{{model="m",group="{srv.name}"}} 1\n'
            self._send(200, text.encode(), {"Content-Type": "text/plain; version=0.0.4"})
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, b"{}")


def start_server(name: str, port: int = 0, status: int = 200, delay: float = 0.0) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    srv.name, srv.status, srv.delay = name, status, delay
    srv.lock, srv.served, srv.bodies = threading.Lock(), {}, []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture
def servers():
    made = []

    def make(*args, **kwargs):
        made.append(start_server(*args, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.shutdown()
        s.server_close()


def url(srv, path="") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_loop_count_measures_exactly_that_many(servers):
    srv = servers("g0")
    target = loadgen.make_target(url(srv, "/models/m"), "POST", b'{"inputs": "x"}')
    m = loadgen.run(loadgen.run_closed([target], 3, count=30, ramp_s=0.2, timeout_s=5))
    assert len(m.latencies) == 30 and m.errors == []
    assert srv.served[200] == m.sent >= 30          # the ramp's requests were sent, not measured
    assert all(p == "/models/m" and b == b'{"inputs": "x"}' for p, b in srv.bodies)
    assert m.window_s > 0 and m.cpu_s >= 0


def test_open_loop_poisson_rate_is_bounded_and_counts_from_the_schedule(servers):
    srv = servers("g0", delay=0.002)
    target = loadgen.make_target(url(srv, "/models/m"), "POST", b"{}")
    t0 = time.monotonic()
    m = loadgen.run(loadgen.run_open([target], 200.0, duration_s=0.5, ramp_s=0.2, timeout_s=5, seed=1))
    assert time.monotonic() - t0 < 10
    assert 50 < len(m.latencies) < 150 and m.errors == []     # 100 expected; Poisson spread is about 10
    assert min(m.latencies) >= 0.002


def test_errors_are_counted_by_kind(servers):
    busy = servers("g0", status=503)
    m = loadgen.run(loadgen.run_closed([loadgen.make_target(url(busy, "/x"), "POST", b"{}")], 2, count=6,
                                       ramp_s=0))
    assert m.errors == ["http 503"] * 6 and m.latencies == []

    slow = servers("g1", delay=0.5)
    m = loadgen.run(loadgen.run_closed([loadgen.make_target(url(slow, "/x"), "POST", b"{}")], 1, count=2,
                                       ramp_s=0, timeout_s=0.1))
    assert m.errors == ["timeout", "timeout"]

    nobody = loadgen.make_target(f"http://127.0.0.1:{free_port()}/x", "POST", b"{}")
    m = loadgen.run(loadgen.run_closed([nobody], 1, count=3, ramp_s=0))
    assert m.errors == ["connection refused"] * 3


def test_chunked_and_connection_close_responses(servers):
    srv = servers("g0")

    async def both():
        status, body = await loadgen.fetch(url(srv, "/chunked"))
        assert (status, body) == (200, b"hello world")
        return await loadgen.run_closed([loadgen.make_target(url(srv, "/close"), "POST", b"{}")], 1, count=5,
                                        ramp_s=0)

    m = loadgen.run(both())
    assert len(m.latencies) == 5 and m.errors == []


def test_measure_reports_share_per_group_from_metrics(servers):
    g0, g1 = servers("m-0"), servers("m-1")
    targets = bench.targets_for([url(g0), url(g1)], "/models/m", b'{"inputs": "x"}')
    metrics = {"m-0": url(g0, "/metrics"), "m-1": url(g1, "/metrics")}
    row = bench.measure(targets, bench.Load("closed", 4), bench.Options(duration_s=None, count=200, ramp_s=0.2),
                        metrics)
    assert row.ok == 200 and row.errors == 0 and row.throughput_rps > 0
    assert set(row.share) == {"m-0", "m-1"} and sum(row.share.values()) == pytest.approx(1.0)
    assert min(row.share.values()) > 0.2
    assert row.p50_ms <= row.p90_ms <= row.p99_ms <= row.max_ms
    assert row.client_cpu_s > 0 and row.client_us_per_request > 0


def test_loads_and_shapes_are_validated():
    assert bench.loads_from([1, 4], []) == [bench.Load("closed", 1), bench.Load("closed", 4)]
    assert bench.loads_from([], [50.5]) == [bench.Load("open", 50.5)]
    assert bench.loads_from([], []) == [bench.Load("closed", 8)]
    assert bench.parse_shapes("1x1, 2x3") == [(1, 1), (2, 3)]
    for bad in ("2", "0x1", "ax1", "1x"):
        with pytest.raises(bench.BenchError, match="GROUPSxCOPIES"):
            bench.parse_shapes(bad)
    with pytest.raises(bench.BenchError, match="not both"):
        bench.loads_from([1], [1])
    with pytest.raises(bench.BenchError, match="whole numbers"):
        bench.loads_from([1.5], [])


def two_consecutive_free_ports() -> int:
    for _ in range(50):
        p = free_port()
        if p < 65000:
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", p))
                    b.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def test_bench_command_direct_writes_json_csv_png(servers, tmp_path):
    base = two_consecutive_free_ports()
    g0, g1 = servers("m-0", port=base), servers("m-1", port=base + 1)
    cfg = tmp_path / "neuronserve.toml"
    cfg.write_text(f'[server]\nbackend = "cpu"\nbase_port = {base}\nmodel_repository = "{tmp_path}/models"\n'
                   f'[models.m]\ntask = "text-classification"\nsource = "/nonexistent"\ngroups = 2\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["bench", "--config", str(cfg), "--direct", "--concurrency", "1,4",
                                    "--requests", "40", "--ramp", "0.2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "closed 1:" in res.output and "closed 4:" in res.output and "client CPU" in res.output
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["model"] == "m" and [r["level"] for r in data["rows"]] == [1, 4]
    assert all(r["ok"] == 40 and set(r["share"]) == {"m-0", "m-1"} for r in data["rows"])
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [r["level"] for r in rows] == ["1", "4"] and all(r["ok"] == "40" for r in rows)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the built-in HF-style body for the model's task went to POST /models/m on both groups
    for srv in (g0, g1):
        path, body = srv.bodies[0]
        assert path == "/models/m" and isinstance(json.loads(body)["inputs"], str)


def test_bench_command_errors_are_readable(tmp_path):
    cfg = tmp_path / "neuronserve.toml"
    cfg.write_text('[server]\nbackend = "cpu"\n[models.m]\ntask = "text-classification"\nsource = "/x"\n')
    res = CliRunner().invoke(main, ["bench", "--config", str(cfg), "--model", "nope"])
    assert res.exit_code == 1 and "no [models.nope]" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["bench", "--config", str(cfg), "--concurrency", "1", "--rate", "5"])
    assert res.exit_code == 1 and "not both" in res.output
