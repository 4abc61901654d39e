"""A fleet of three hosts behind a load balancer, for real: a rolling upgrade loses no request, a killed host
costs no more than the balancer's health-check window.

Each host is a throw-away systemd container (conftest.py) in a network namespace the test makes, reached over a
veth pair at 10.231.<i>.2, running the neuronserve stack (`apply`: its group unit and the nginx front on
0.0.0.0:8080) on the CPU. HAProxy from Debian, on the test's host, balances a closed-loop load over the three
fronts and health-checks each front's /v2/health/ready every INTER_MS. Then, under that load:
- host after host: `neuronserve drain` (the front turns unready, HAProxy takes the host out, drain waits until
  it is quiet), a config change and `neuronserve apply`, `neuronserve undrain`, HAProxy re-admits it;
- a real Prometheus, from `neuronserve render --prometheus`, scrapes every group of every host through its front;
- one host killed outright (SIGKILL to its PID 1: every process of the host dies at once): the requests that
  fail are counted, and must all fall between the kill and HAProxy marking the host DOWN.
Figures go to <pytest basetemp>/fleet-figures.json and are printed.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from server_kit import free_port
from systemd_kit import Load, wait_until

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

HOSTS = 3
CONFIG = "/etc/neuronserve/neuronserve.toml"
REPO = "/var/lib/neuronserve/models"
SUBNET = "10.231"
FRONT_PORT = 8080
# HAProxy's active health check of each host: every INTER_MS, FALL failures to take a host out, RISE to re-admit
INTER_MS, FALL, RISE = 1000, 2, 2
CONNECT_TIMEOUT_S = 1
# drain waits this long without a request: above INTER_MS x FALL, the time HAProxy takes to notice
QUIET_S = 3
CONCURRENCY = 4
BODY = json.dumps({"inputs": "a short sentence to classify"})
FIGURES: dict = {}


def config_text(delay_ms: float) -> str:
    return f"""
[server]
backend = "cpu"
model_repository = "{REPO}"
graceful_timeout_s = 10
[nginx]
listen = "0.0.0.0:{FRONT_PORT}"
[models.tiny]
task = "text-classification"
source = "/nonexistent: compiled on the test's host before boot"
copies = 1
groups = 1
cores_per_group = 2
batch_sizes = [1, 4]
sequence_lengths = [32]
max_batch_delay_ms = {delay_ms}
"""


def haproxy_config(port: int, sock: Path) -> str:
    servers = "".join(f"    server h{i} {SUBNET}.{i}.2:{FRONT_PORT} check\n" for i in range(1, HOSTS + 1))
    return f"""global
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect {CONNECT_TIMEOUT_S}s
    timeout client 60s
    timeout server 60s
    # a refused or timed-out connection is tried again on another host
    retries 3
    option redispatch 1
frontend fleet
    bind 127.0.0.1:{port}
    default_backend hosts
backend hosts
    balance leastconn
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter {INTER_MS}ms fall {FALL} rise {RISE}
{servers}"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


class Balancer:
    """HAProxy in the foreground, and what its stats socket says of each host."""

    def __init__(self, state: Path):
        self.port, self.sock = free_port(), state / "haproxy.sock"
        conf = state / "haproxy.cfg"
        conf.write_text(haproxy_config(self.port, self.sock))
        sh("haproxy", "-c", "-f", str(conf))
        self.log = (state / "haproxy.log").open("w")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(self.sock.exists, 20, "HAProxy's stats socket")
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}/models/tiny"

    def stats(self) -> dict[str, dict]:
        """host name -> its row of `show stat` (status UP/DOWN/..., stot: sessions sent to it so far)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "hosts" and r["svname"].startswith("h")}

    def status(self, host: str) -> str:
        return self.stats()[host]["status"]

    def sent_to(self, host: str) -> int:
        return int(self.stats()[host]["stot"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def fleet(containers, tiny_model_dir, tmp_path_factory):
    from neuronserve.build.compile import compile_model

    for tool in ("ip", "haproxy"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (`make sysdeps` installs iproute2 and haproxy)")
    if f" {SUBNET}." in subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout:
        pytest.skip(f"{SUBNET}.0.0/16 is in use on this machine; the fleet's hosts need addresses of their own")
    state = tmp_path_factory.mktemp("fleet")
    model = state / "model"
    compile_model(tiny_model_dir("text-classification"), model, name="tiny", task="text-classification",
                  backend="cpu", target="cpu", batch_sizes=[1, 4], sequence_lengths=[32])
    tag = uuid.uuid4().hex[:4]
    namespaces = [f"nsfleet-{tag}-{i}" for i in range(1, HOSTS + 1)]
    balancer = None
    try:
        boxes = []
        for i, ns in enumerate(namespaces, 1):
            outside, inside = f"nf{tag}{i}o", f"nf{tag}{i}i"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
            sh("ip", "addr", "add", f"{SUBNET}.{i}.1/24", "dev", outside)
            sh("ip", "link", "set", outside, "up")
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}.2/24", "dev", inside)
            sh("ip", "-n", ns, "link", "set", inside, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            box = containers()
            shutil.copytree(model, box.seed / REPO.lstrip("/") / "tiny")
            (box.seed / "etc/neuronserve").mkdir(parents=True)
            (box.seed / CONFIG.lstrip("/")).write_text(config_text(1.0))
            box.boot(f"--network-namespace-path=/run/netns/{ns}", f"--machine=fleet-h{i}")
            # what the package's postinst does
            box.run(["useradd", "--system", "--home-dir", "/var/lib/neuronserve", "--shell", "/usr/sbin/nologin",
                     "neuronserve"])
            boxes.append(box)
        t0 = time.monotonic()
        for box in boxes:
            neuronserve(box, "apply")
        FIGURES["apply_three_hosts_s"] = round(time.monotonic() - t0, 1)
        balancer = Balancer(state)
        wait_until(lambda: all(balancer.status(f"h{i}") == "UP" for i in range(1, HOSTS + 1)), 30,
                   "HAProxy to see every host UP")
        yield boxes, balancer, state
    finally:
        try:
            if balancer:
                balancer.stop()
        finally:
            for ns in namespaces:   # the veth pairs go with their namespace; a container still in one keeps it
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            out = tmp_path_factory.getbasetemp() / "fleet-figures.json"
            out.write_text(json.dumps(FIGURES, indent=2))
            print(f"\nfleet figures ({out}):\n{json.dumps(FIGURES, indent=2)}")


def neuronserve(box, *args, timeout=400):
    return box.run([box.python, "-m", "neuronserve", *args, "--config", CONFIG], timeout=timeout)


def test_the_balancer_spreads_requests_over_every_host(fleet):
    boxes, balancer, state = fleet
    before = {f"h{i}": balancer.sent_to(f"h{i}") for i in range(1, HOSTS + 1)}
    load = Load(None, CONCURRENCY, url=balancer.url, body=BODY, state=state)
    time.sleep(4)
    result = load.finish()
    assert result["sent"] > 20 and result["failed"] == 0, result
    spread = {h: balancer.sent_to(h) - n for h, n in before.items()}
    assert all(n > 0 for n in spread.values()), spread
    FIGURES["spread"] = {"sent": result["sent"], "per_host": spread}


def test_prometheus_scrapes_every_group_of_every_host(fleet, tmp_path):
    """`render --prometheus` for the three fronts, a real Prometheus scraping them, and each exposition clean by
    `promtool check metrics`."""
    from neuronserve import config, monitoring, render
    from neuronserve.devices import cpu
    from neuronserve.layout import Layout
    from neuronserve.plan import make_plan

    for tool in ("prometheus", "promtool"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (`make sysdeps` installs Debian's prometheus)")
    hosts = [f"{SUBNET}.{i}.2:{FRONT_PORT}" for i in range(1, HOSTS + 1)]
    path = tmp_path / "neuronserve.toml"
    path.write_text(config_text(1.0) + f"[monitoring]\nhosts = {json.dumps(hosts)}\nscrape_interval_s = 1\n")
    cfg = config.load(path)
    plan = make_plan(cfg, cpu.discover(affinity={0, 1}), python=sys.executable)
    out = tmp_path / "prometheus"
    render.write_files(monitoring.render_prometheus(plan, Layout(tmp_path / "root", cfg), out))
    sh("promtool", "check", "config", str(out / monitoring.CONFIG_FILE))
    for host in hosts:
        text = httpx.get(f"http://{host}/_neuronserve/metrics/tiny-0", timeout=10, trust_env=False).text
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (host, r.stdout, r.stderr)
    api = f"http://127.0.0.1:{free_port()}"
    with (tmp_path / "prometheus.log").open("w") as log:
        prom = subprocess.Popen(["prometheus", f"--config.file={out / monitoring.CONFIG_FILE}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={api[7:]}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            def targets_up():
                try:
                    r = httpx.get(api + "/api/v1/targets", timeout=5, trust_env=False)
                    active = r.json()["data"]["activeTargets"]
                except (httpx.HTTPError, ValueError):
                    return None
                return len(active) == HOSTS and all(t["health"] == "up" for t in active) and active

            active = wait_until(targets_up, 60, "Prometheus to scrape every group of every host")
            query = {"query": "neuronserve_ready"}
            series = wait_until(lambda: httpx.get(api + "/api/v1/query", params=query, timeout=5,
                                                  trust_env=False).json()["data"]["result"], 30, "neuronserve_ready")
        finally:
            prom.terminate()
            prom.wait(30)
    assert sorted(t["labels"]["host"] for t in active) == hosts
    assert {t["scrapeUrl"] for t in active} == {f"http://{h}/_neuronserve/metrics/tiny-0" for h in hosts}
    assert sorted((s["metric"]["host"], s["metric"]["group"], s["value"][1]) for s in series) == [
        (h, "tiny-0", "1") for h in hosts]
    FIGURES["prometheus"] = {"targets_up": len(active), "ready_series": len(series)}


def test_a_rolling_upgrade_host_by_host_fails_no_request(fleet):
    boxes, balancer, state = fleet
    load = Load(None, CONCURRENCY, max_s=400, url=balancer.url, body=BODY, state=state)
    phases = []
    try:
        time.sleep(2)
        for i, box in enumerate(boxes, 1):
            host = f"h{i}"
            t0 = time.monotonic()
            r = neuronserve(box, "drain", "--quiet", str(QUIET_S), "--timeout", "60")
            drained = time.monotonic()
            assert "drained: no request for" in r.stdout, r.stdout
            assert balancer.status(host).startswith("DOWN"), balancer.stats()[host]
            quiet_count = balancer.sent_to(host)
            box.write(CONFIG, config_text(2.0 + i))
            r = neuronserve(box, "apply")
            assert "rolled 1" in r.stdout, r.stdout
            applied = time.monotonic()
            # still drained after apply re-rendered the front: nothing reached it meanwhile
            assert balancer.sent_to(host) == quiet_count
            neuronserve(box, "undrain")
            wait_until(lambda: balancer.status(host) == "UP", 30, f"HAProxy to re-admit {host}")
            wait_until(lambda: balancer.sent_to(host) > quiet_count, 30, f"requests to reach {host} again")
            phases.append({"host": host, "t0": t0, "end": time.monotonic(), "drain_s": round(drained - t0, 1),
                           "apply_s": round(applied - drained, 1), "readmit_s": round(time.monotonic() - applied, 1)})
        time.sleep(2)
    finally:
        result = load.finish()
    failures = [result["t0"] + started for started, _, _ in result["failures"]]
    for p in phases:
        p["failed"] = sum(p["t0"] <= f < p["end"] for f in failures)
        del p["t0"], p["end"]
    FIGURES["rolling_upgrade"] = {"sent": result["sent"], "failed": result["failed"], "seconds": result["seconds"],
                                  "hosts": phases}
    assert result["failed"] == 0, result
    assert result["sent"] > 100, result


def test_a_killed_host_costs_at_most_the_health_check_window(fleet):
    boxes, balancer, state = fleet
    victim, host = boxes[-1], f"h{HOSTS}"
    load = Load(None, CONCURRENCY, max_s=120, url=balancer.url, body=BODY, state=state)
    try:
        time.sleep(3)
        killed = time.monotonic()
        os.kill(victim.leader, signal.SIGKILL)      # a PID namespace's init: the kernel kills all of the host
        wait_until(lambda: balancer.status(host).startswith("DOWN"), 30, f"HAProxy to mark {host} DOWN")
        down = time.monotonic()
        time.sleep(3)
    finally:
        result = load.finish()
    # when each failure was seen by its client
    failures = [result["t0"] + started + took for started, _, took in result["failures"]]
    FIGURES["host_killed"] = {"sent": result["sent"], "failed": result["failed"], "errors": result["errors"],
                              "kill_to_down_s": round(down - killed, 2),
                              "last_failure_seen_after_kill_s": round(max(failures) - killed, 2) if failures else None,
                              "health_check_window_s": INTER_MS * FALL / 1000 + CONNECT_TIMEOUT_S}
    # every failure is a request the dead host held or took before HAProxy's checks failed; none after
    window = INTER_MS * FALL / 1000 + CONNECT_TIMEOUT_S
    assert all(killed <= f <= killed + window + 1.0 for f in failures), FIGURES["host_killed"]
    assert down - killed <= window + 1.0, FIGURES["host_killed"]
    assert result["sent"] - result["failed"] > 50, result
