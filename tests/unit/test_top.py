"""`neuronserve top`: samplers fed recorded tool output, rendering in 80x24, `--once`, and the live screen in tmux."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from rich.console import Console

from neuronserve.measure import monitor, top
from neuronserve.cli import main
from neuronserve.operate.up import free_port_block

DATA = Path(__file__).resolve().parents[1] / "data" / "neuron-monitor"
GIB = 1 << 30
CORE_MEM = 134217728 + 25165824 + 8388608 + 1048576 + 4194304   # one loaded core in the recordings


def docs(name: str) -> list[dict]:
    text = (DATA / name).read_text()
    return [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else [json.loads(text)]


# ---------------------------------------------------------------- parsers

def test_neuron_monitor_inf2_xlarge_stream():
    first, second = (monitor.parse_neuron_monitor(d) for d in docs("inf2-xlarge.jsonl"))
    assert [(c.index, c.util, c.owner) for c in first.cores] == [(0, 62.5, "bert-0"), (1, 58.1, "bert-1")]
    assert [c.util for c in second.cores] == [71.25, 12.5]
    assert all(c.mem_used == CORE_MEM and c.mem_total == 16 * GIB for c in first.cores)
    assert (first.host_mem_used, first.host_mem_total) == (9663676416, 16467501056)
    assert first.error is None and first.label == "nc"


def test_neuron_monitor_inf2_24xlarge_lists_every_core_of_every_device():
    (d,) = (monitor.parse_neuron_monitor(x) for x in docs("inf2-24xlarge.json"))
    assert [c.index for c in d.cores] == list(range(12))
    assert [c.util for c in d.cores] == [97.5, 88.0, 45.25, 12.0] * 2 + [97.5, 88.0, 45.25, 0]
    assert [c.owner for c in d.cores] == [f"bert-{i}" for i in range(12)]


def test_neuron_monitor_runtime_error_and_older_tools():
    (d,) = (monitor.parse_neuron_monitor(x) for x in docs("inf1-xlarge-runtime-error.json"))
    assert [c.util for c in d.cores] == [33.0, 29.5, 0.0, 0.0]
    assert [c.mem_used for c in d.cores] == [CORE_MEM, CORE_MEM, 0, 0]
    assert all(c.mem_total is None for c in d.cores)          # no neuron_device_memory_size before
    assert "bert-1" in d.error and "connection refused" in d.error


def test_neuron_monitor_without_runtimes_shows_idle_cores():
    (d,) = (monitor.parse_neuron_monitor(x) for x in docs("inf2-xlarge-idle.json"))
    assert [(c.index, c.util, c.mem_used, c.owner) for c in d.cores] == [(0, 0.0, 0, None), (1, 0.0, 0, None)]


def test_proc_stat_utilization_between_two_readings(tmp_path):
    stat, meminfo = tmp_path / "stat", tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nMemFree:  1000000 kB\nMemAvailable:    6000000 kB\n")
    stat.write_text("cpu  200 0 100 1700 0 0 0 0 0 0\n"
                    "cpu0 100 0 50 850 0 0 0 0 0 0\ncpu1 100 0 50 850 0 0 0 0 0 0\nintr 1 2 3\n")
    s = monitor.ProcStatSampler(stat, meminfo)
    first = s.sample()
    assert [c.util for c in first.cores] == [None, None]
    # cpu0: 75 busy of 100 (iowait is idle); cpu1: idle throughout
    stat.write_text("cpu  275 0 100 1825 0 0 0 0 0 0\n"
                    "cpu0 160 0 65 860 15 0 0 0 0 0\ncpu1 100 0 50 950 0 0 0 0 0 0\n")
    second = s.sample()
    assert [c.util for c in second.cores] == [75.0, 0.0]
    assert (second.host_mem_used, second.host_mem_total) == (2000000 * 1024, 8000000 * 1024)


def test_nvidia_smi_lines():
    c = monitor.parse_nvidia_smi_line("0, 37, 1234, 81559\n")
    assert (c.index, c.util, c.mem_used, c.mem_total) == (0, 37.0, 1234 * (1 << 20), 81559 * (1 << 20))
    c = monitor.parse_nvidia_smi_line("3, [N/A], 10, 16384")
    assert c.util is None and c.mem_used == 10 << 20
    assert monitor.parse_nvidia_smi_line("index, utilization.gpu [%], memory.used, memory.total") is None


def test_neuron_monitor_sampler_runs_the_tool_with_its_config(tmp_path):
    # a stand-in neuron-monitor: records its arguments and config, then streams the recorded documents
    tools = tmp_path / "bin"
    tools.mkdir()
    script = tools / "neuron-monitor"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, shutil, sys, time
        json.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, "w"))
        shutil.copy(sys.argv[2], {str(tmp_path / 'config.json')!r})
        for line in open({str(DATA / 'inf2-xlarge.jsonl')!r}):
            print(line.strip(), flush=True)
        time.sleep(60)
        """))
    script.chmod(0o755)
    sampler = monitor.NeuronMonitorSampler(tools, period_s=2.0)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            snap = sampler.sample()
            if snap.cores and snap.cores[0].util == 71.25:       # the second document arrived
                break
            time.sleep(0.05)
        assert [c.util for c in snap.cores] == [71.25, 12.5]
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert argv[0] == "-c" and len(argv) == 2
        assert json.loads((tmp_path / "config.json").read_text()) == monitor.neuron_monitor_config(2.0)
        assert monitor.neuron_monitor_config(2.0)["period"] == "2s"
    finally:
        sampler.close()
    assert sampler.stream.proc.poll() is not None


def test_a_missing_tool_is_a_readable_error(tmp_path):
    with pytest.raises(monitor.DeviceError, match="cannot run .*neuron-monitor"):
        monitor.NeuronMonitorSampler(tmp_path)


# ---------------------------------------------------------------- snapshots and rendering

class Replay:
    """An injectable sampler that plays recorded neuron-monitor documents."""

    def __init__(self, documents):
        self.documents, self.i = documents, 0

    def sample(self):
        doc = self.documents[min(self.i, len(self.documents) - 1)]
        self.i += 1
        return monitor.parse_neuron_monitor(doc)

    def close(self):
        pass


class FakeGroups:
    """Each group's /metrics as a real prometheus_client registry that serves 100 requests per scrape."""

    def __init__(self, names):
        self.regs = {}
        for n in names:
            reg = CollectorRegistry()
            lab = dict(model="bert", group=n)
            m = (Counter("neuronserve_requests_total", "", list(lab) + ["code"], registry=reg),
                 Histogram("neuronserve_request_duration_seconds", "", list(lab), registry=reg,
                           buckets=(0.005, 0.01, 0.05)),
                 Gauge("neuronserve_queue_depth", "", list(lab), registry=reg),
                 Histogram("neuronserve_batch_fill", "", list(lab), registry=reg, buckets=(0.5, 1.0)),
                 Counter("neuronserve_busy_seconds_total", "", list(lab) + ["copy"], registry=reg),
                 Gauge("neuronserve_ready", "", list(lab), registry=reg),
                 Counter("neuronserve_tokens_total", "", list(lab), registry=reg),
                 Counter("neuronserve_token_slots_total", "", list(lab), registry=reg))
            m[5].labels(**lab).set(1)
            self.regs[n] = (reg, m, lab)

    def fetch(self, url: str) -> str:
        name = url.split("/")[2]
        reg, (req, dur, queue, fill, busy, ready, tokens, slots), lab = self.regs[name]
        req.labels(code="200", **lab).inc(100)
        for _ in range(100):
            dur.labels(**lab).observe(0.004)
        queue.labels(**lab).set(2)
        fill.labels(**lab).observe(0.75)
        busy.labels(copy="0", **lab).inc(0.5)
        tokens.labels(**lab).inc(300)        # of 400 token positions executed: a quarter was padding
        slots.labels(**lab).inc(400)
        return generate_latest(reg).decode()


def render_text(snap, width=80, height=24) -> list[str]:
    console = Console(width=width, height=height, record=True, force_terminal=False, file=open("/dev/null", "w"))
    console.print(top.render(snap, width, height))
    return console.export_text().rstrip("\n").split("\n")


def test_top_renders_every_core_and_group_of_an_inf2_24xlarge_in_80x24():
    names = [f"bert-{i}" for i in range(12)]
    fake = FakeGroups(names)
    now = [100.0]
    t = top.Top(Replay(docs("inf2-24xlarge.json")), [top.Watched(n, (i,), f"http://{n}/metrics")
                                                     for i, n in enumerate(names)],
                "neuron", fetch=fake.fetch, clock=lambda: now[0])
    first = t.snapshot()
    assert all(r.rates is None for r in first.groups)        # nothing to compare with yet
    now[0] += 1.0
    snap = t.snapshot()
    r = snap.groups[0].rates
    assert r.rps == 100.0 and r.queue_depth == 2 and r.batch_fill == 0.75 and r.busy == 0.5 and r.ready == 1
    assert r.padding == 0.25
    assert r.p99_s == pytest.approx(0.005 * 0.99)     # rank 99 of 100 inside the (0, 5 ms] bucket
    lines = render_text(snap)
    assert len(lines) <= 24 and max(map(len, lines)) <= 80
    text = "\n".join(lines)
    for i in range(12):
        assert f"nc{i} " in text and f"bert-{i} " in text
    assert "98%" in text and "16G" in text
    row = next(line for line in lines if line.startswith("bert-3 "))
    assert row.split()[2:] == ["100.0", f"{r.p99_s * 1000:.1f}", "2", "75%", "25%", "50%", "0.0", "ready"]


def test_top_marks_an_unreachable_group_down_and_shows_tool_errors():
    def fetch(url):
        raise ConnectionRefusedError(111, "Connection refused")

    t = top.Top(Replay(docs("inf1-xlarge-runtime-error.json")), [top.Watched("bert-0", (0, 1), "http://x/metrics")],
                "neuron", fetch=fetch)
    lines = render_text(t.snapshot())
    text = "\n".join(lines)
    assert "runtime bert-1: failed to query runtime" in text
    assert next(line for line in lines if line.startswith("bert-0")).split()[-1] == "down"
    assert all(f"nc{i}" in text for i in range(4))


def test_many_cpus_and_groups_still_fit_80x24():
    cores = [monitor.CoreSample(i, float(i % 100)) for i in range(96)]
    rows = [top.GroupRow(f"bert-{i}", str(i)) for i in range(30)]
    snap = top.Snapshot(0.0, "cpu", monitor.DeviceSample("cpu", cores, 1 << 33, 1 << 35), rows)
    lines = render_text(snap)
    assert len(lines) <= 24 and max(map(len, lines)) <= 80
    text = "\n".join(lines)
    assert all(f"{i:>2} " in text for i in range(96))           # the narrowest cells: every CPU still there
    assert "more groups" in text


# ---------------------------------------------------------------- the command, with real /metrics servers

class MetricsHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.server.groups.fetch(f"http://{self.server.group}/metrics").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)



@pytest.fixture
def cpu_stack(tmp_path):
    """A CPU config with one group per CPU, each group's port answered by a real /metrics server."""
    import os

    ncpu = len(os.sched_getaffinity(0))
    base = free_port_block(ncpu)
    names = [f"bert-{i}" for i in range(ncpu)]
    fake = FakeGroups(names)
    servers = []
    for i, n in enumerate(names):
        srv = ThreadingHTTPServer(("127.0.0.1", base + i), MetricsHandler)
        srv.daemon_threads, srv.groups, srv.group = True, fake, n
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
    cfg = tmp_path / "neuronserve.toml"
    cfg.write_text(f'[server]\nbackend = "cpu"\nbase_port = {base}\nmodel_repository = "{tmp_path}/models"\n'
                   f'[models.bert]\ntask = "question-answering"\nsource = "/nonexistent"\n')
    yield cfg, names
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_top_once_prints_one_snapshot(cpu_stack):
    cfg, names = cpu_stack
    res = CliRunner().invoke(main, ["top", "--config", str(cfg), "--once", "--interval", "0.2"])
    assert res.exit_code == 0, res.output
    lines = res.output.rstrip("\n").split("\n")
    assert lines[0].startswith("neuronserve top  cpu") and len(lines) <= 24
    for i, n in enumerate(names):
        assert f"cpu{i} " in res.output
        row = next(line for line in lines if line.startswith(n + " "))
        assert row.split()[-1] == "ready" and float(row.split()[2]) > 0

    res = CliRunner().invoke(main, ["top", "--config", str(cfg), "--once", "--json", "--interval", "0.2"])
    data = json.loads(res.output)
    assert [g["name"] for g in data["groups"]] == names and data["device"]["kind"] == "cpu"
    assert all(g["rates"]["ready"] == 1 for g in data["groups"])
    assert CliRunner().invoke(main, ["top", "--config", str(cfg), "--json"]).exit_code == 2


@pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed (make sysdeps installs it)")
def test_top_live_screen_fits_80x24_under_tmux(cpu_stack, tmp_path):
    cfg, names = cpu_stack
    session = f"neuronserve-top-{uuid.uuid4().hex[:8]}"
    exe = Path(sys.executable).parent / "neuronserve"
    cmd = f"{exe} top --config {cfg} --interval 0.3"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd], check=True)
    try:
        deadline = time.monotonic() + 30
        screen = ""
        while time.monotonic() < deadline:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            if all(f"{n} " in screen for n in names) and "ready" in screen:
                break
            time.sleep(0.2)
        lines = screen.rstrip("\n").split("\n")
        assert lines[0].startswith("neuronserve top  cpu"), screen
        assert len(lines) <= 24 and max(map(len, lines)) <= 80
        for i, n in enumerate(names):
            assert f"cpu{i} " in screen and f"{n} " in screen
        assert screen.count("ready") == len(names)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        gone = time.monotonic() + 10
        while time.monotonic() < gone:       # Ctrl-C ends top, and with it the session
            if subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("top did not exit on Ctrl-C")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
