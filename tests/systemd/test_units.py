"""`neuronserve apply`, `status` and `cleanup` under a real systemd, with nginx in front and load running.

One throw-away container for the module (see conftest.py); the tests run in order on the same stack:
apply from nothing -> requests through nginx -> kill -9 of a worker and of a unit's main process ->
apply of a config edit under load -> cleanup. Figures (requests sent/failed during the apply, seconds until a
killed group is back) are printed and written to <pytest basetemp>/systemd-figures.json.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from neuronserve import render
from systemd_kit import Load, nginx_says, prop, ready, wait_until, worker_pid

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

CONFIG = "/etc/neuronserve/neuronserve.toml"
REPO = "/var/lib/neuronserve/models"
UNITS = ["neuronserve@tiny-0.service", "neuronserve@tiny-1.service"]
PORTS = [8100, 8101]
GRPC_PORTS = [9100, 9101]
# tritonclient.grpc, unchanged, in the container against the front's gRPC listener (nginx.grpc_listen's default)
TRITON_GRPC = """
import json, numpy as np, tritonclient.grpc as triton
client = triton.InferenceServerClient("127.0.0.1:8081")
text = triton.InferInput("text", [1], "BYTES")
text.set_data_from_numpy(np.array([b"a short sentence to classify"], dtype=object))
result = client.infer("tiny", [text])
print(json.dumps({"ready": client.is_model_ready("tiny"), "answer": json.loads(result.as_numpy("answer")[0])}))
"""
# a warm-up answer the model will not give: the manifest's expected numbers shifted
WRONG_WARMUP = """
import sys, numpy as np
from pathlib import Path
from neuronserve.build.artifact import read_manifest, write_manifest
d = Path(sys.argv[1]); m = read_manifest(d)
m.warmup.expected = {k: (np.asarray(v) + 0.5).tolist() for k, v in m.warmup.expected.items()}
write_manifest(d, m)
"""
FIGURES: dict = {}
WATCHDOG_S = 10


def config_text(delay_ms: float) -> str:
    return f"""
[server]
backend = "cpu"
model_repository = "{REPO}"
graceful_timeout_s = 10
# short, so that the hung-loop test is quick; the worker pings every third of it
watchdog_s = {WATCHDOG_S}
[nginx]
listen = "127.0.0.1:8080"
[models.tiny]
task = "text-classification"
source = "/nonexistent: compiled on the host before boot"
copies = 1
groups = 2
batch_sizes = [1, 4]
sequence_lengths = [32]
max_batch_delay_ms = {delay_ms}
"""


@pytest.fixture(scope="module")
def box(container, tiny_model_dir, tmp_path_factory):
    from neuronserve.build.compile import compile_model

    seed = container.seed
    compile_model(tiny_model_dir("text-classification"), seed / REPO.lstrip("/") / "tiny", name="tiny",
                  task="text-classification", backend="cpu", target="cpu", batch_sizes=[1, 4],
                  sequence_lengths=[32])
    (seed / "etc/neuronserve").mkdir(parents=True)
    (seed / CONFIG.lstrip("/")).write_text(config_text(1.0))
    # an unrelated service, which cleanup must leave running
    (seed / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    (seed / "etc/systemd/system/bystander.service").write_text(
        "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n")
    (seed / "etc/systemd/system/multi-user.target.wants/bystander.service").symlink_to(
        "/etc/systemd/system/bystander.service")
    container.boot()
    # what the package's postinst does
    container.run(["useradd", "--system", "--home-dir", "/var/lib/neuronserve", "--shell", "/usr/sbin/nologin",
                   "neuronserve"])
    yield container
    out = tmp_path_factory.getbasetemp() / "systemd-figures.json"
    out.write_text(json.dumps(FIGURES, indent=2))
    print(f"\nsystemd figures ({out}):\n{json.dumps(FIGURES, indent=2)}")


def neuronserve(box, *args, timeout=400, check=True):
    return box.run([box.python, "-m", "neuronserve", *args, "--config", CONFIG], timeout=timeout, check=check)


def test_apply_starts_the_target_and_groups_as_the_neuronserve_user(box):
    t0 = time.monotonic()
    r = neuronserve(box, "apply")
    FIGURES["first_apply_s"] = round(time.monotonic() - t0, 1)
    # two instance drop-ins, two gunicorn configs, the template unit and the target (no package installed them
    # here), the front, and its njs script where njs is installed
    files = 7 + (render.njs_module() is not None)
    assert f"applied: {files} file(s) changed; started 2" in r.stdout, r.stdout
    assert box.run(["systemctl", "is-enabled", "neuronserve.target"]).stdout.strip() == "enabled"
    assert box.run(["systemctl", "is-active", "neuronserve.target", *UNITS]).stdout.split() == ["active"] * 3
    uid = box.run(["id", "-u", "neuronserve"]).stdout.strip()
    for unit in UNITS:
        main, worker = prop(box, unit, "MainPID"), worker_pid(box, unit)
        assert worker, f"{unit}: no single worker under {main}"
        owners = box.run(["ps", "-o", "uid=,user=", "-p", f"{main},{worker}"]).stdout.split()
        assert owners == [uid, "neuronserve"] * 2, f"{unit} runs as {owners}"
        assert prop(box, unit, "Restart") == "on-failure"
        # journald has the group's own log, with the readiness line of the warm-up
        journal = box.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout
        assert "passed the known-answer warm-up" in journal, journal[-2000:]
    # only nginx listens beyond the loopback (HTTP and gRPC)... and the groups only on 127.0.0.1, both
    listening = box.run(["ss", "-Hltn"]).stdout
    for port in PORTS + GRPC_PORTS:     # gRPC's socket is dual-stack: 127.0.0.1 shows as [::ffff:127.0.0.1]
        assert re.search(rf"(^|\s|\[::ffff:)127\.0\.0\.1\]?:{port}\s", listening), listening
        assert f"0.0.0.0:{port} " not in listening and f"*:{port} " not in listening
    assert "0.0.0.0:8081 " in listening


def test_group_units_rate_2_or_better_in_systemd_analyze_security(box):
    for unit in UNITS:
        r = box.run(["systemd-analyze", "security", unit], check=False)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
        assert m, r.stdout[-2000:] + r.stderr[-2000:]
        FIGURES[f"exposure {unit}"] = float(m.group(1))
        assert float(m.group(1)) <= 2.0, r.stdout


def test_requests_through_nginx_reach_both_groups_and_status_reports_them(box):
    before = {p: requests_served(box, p) for p in PORTS}
    load = Load(box, concurrency=2)
    time.sleep(5)
    result = load.finish()
    assert result["sent"] > 10 and result["failed"] == 0, result
    served = {p: requests_served(box, p) - before[p] for p in PORTS}
    assert all(n > 0 for n in served.values()), f"least_conn should use both groups: {served}"
    r = neuronserve(box, "status")
    for name, port in (("tiny-0", 8100), ("tiny-1", 8101)):
        line = next(line for line in r.stdout.splitlines() if line.startswith(name))
        assert "active (running)" in line and f" {port} " in line and " yes " in line, r.stdout
    assert "neuronserve.target: active" in r.stdout


def test_the_dialects_through_the_hosts_nginx(box):
    """Under systemd, with the host's own nginx (njs from modules-enabled): the model listing, TEI's root routes of a
    one-model host, OpenAI's model list, KServe v2 over gRPC."""
    def post(path: str, body: dict) -> dict:
        r = box.run(["curl", "-s", "--max-time", "10", "-H", "content-type: application/json", "-d", json.dumps(body),
                     f"http://127.0.0.1:8080{path}"])
        return json.loads(r.stdout)

    if render.njs_module():
        assert post("/v2/repository/index", {}) == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
    answer = post("/predict", {"inputs": "a short sentence to classify"})      # TEI: every label, best first
    assert sorted(a["label"] for a in answer) == ["NEGATIVE", "POSITIVE"]
    assert answer[0]["score"] >= answer[1]["score"] and abs(sum(a["score"] for a in answer) - 1) < 1e-5
    listing = json.loads(box.run(["curl", "-s", "--max-time", "10", "http://127.0.0.1:8080/v1/models"]).stdout)
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    # KServe v2 over gRPC through nginx: the same answer as the task JSON's
    grpc = json.loads(box.run([box.python, "-c", TRITON_GRPC]).stdout.strip().splitlines()[-1])
    assert grpc["ready"] is True
    assert [grpc["answer"]] == post("/models/tiny", {"inputs": ["a short sentence to classify"],
                                                     "parameters": {"top_k": None}})


def test_starting_the_target_returns_once_every_group_serves(box):
    """Type=notify: `systemctl start` waits for READY=1, which the worker sends after the warm-up."""
    box.run(["systemctl", "stop", "neuronserve.target", *UNITS])    # the target's stop does not wait for them
    assert box.run(["systemctl", "is-active", *UNITS], check=False).stdout.split() == ["inactive"] * 2
    ports = " ".join(map(str, PORTS))
    script = f"""
t0=$(date +%s.%N)
( until curl -sf -o /dev/null --max-time 1 http://127.0.0.1:{PORTS[0]}/v2/health/ready; do sleep 0.05; done
  date +%s.%N > /run/first-ready ) &
systemctl start neuronserve.target
t1=$(date +%s.%N)
codes=$(for p in {ports}; do curl -s -o /dev/null -w '%{{http_code}} ' http://127.0.0.1:$p/v2/health/ready; done)
wait
echo "$t0 $t1 $(cat /run/first-ready) $codes"
"""
    t0, returned, first, *codes = box.sh(script, timeout=300).stdout.split()
    # the moment start returns, every group answers ready
    assert codes == ["200", "200"], codes
    FIGURES["target_start"] = {"start_to_return_s": round(float(returned) - float(t0), 2),
                               "start_to_first_group_ready_s": round(float(first) - float(t0), 2)}
    for unit in UNITS:
        assert prop(box, unit, "StatusText").startswith("ready: 1 of 1 copies warm, "), prop(box, unit, "StatusText")
        assert prop(box, unit, "Type") == "notify" and prop(box, unit, "WatchdogUSec") == f"{WATCHDOG_S}s"


def test_a_hung_event_loop_is_restarted_by_the_watchdog(box):
    main, restarts = prop(box, UNITS[0], "MainPID"), int(prop(box, UNITS[0], "NRestarts"))
    worker = worker_pid(box, UNITS[0])
    assert worker
    t0 = time.monotonic()
    box.run(["kill", "-STOP", str(worker)])     # the worker's event loop stops turning (its threads too)
    wait_until(lambda: int(prop(box, UNITS[0], "NRestarts")) == restarts + 1, WATCHDOG_S + 60,
               "systemd's watchdog to restart tiny-0")
    wait_until(lambda: ready(box, PORTS[0]), 120, "tiny-0 ready again")
    FIGURES["watchdog"] = {"watchdog_s": WATCHDOG_S, "stopped_to_ready_again_s": round(time.monotonic() - t0, 1)}
    assert prop(box, UNITS[0], "MainPID") != main
    journal = box.run(["journalctl", "-u", UNITS[0], "--no-pager", "-o", "cat", "-n", "200"]).stdout
    assert "Watchdog timeout" in journal, journal[-3000:]


def test_a_wrong_warm_up_answer_fails_the_start_with_its_reason(box):
    manifest = f"{REPO}/tiny/manifest.json"
    box.run(["cp", "-p", manifest, "/root/manifest.json.good"])
    box.run([box.python, "-c", WRONG_WARMUP, f"{REPO}/tiny"])
    try:
        r = box.run(["systemctl", "restart", UNITS[0]], check=False, timeout=300)
        assert r.returncode != 0 and UNITS[0] in r.stderr, r.stderr
        status = box.run(["systemctl", "status", UNITS[0], "--no-pager", "-l", "-n", "30"], check=False).stdout
        assert "copy 0: warm-up gave a wrong answer" in status, status
        assert prop(box, UNITS[0], "ActiveState") == "failed" and prop(box, UNITS[0], "ExecMainStatus") == "3"
    finally:
        box.run(["cp", "-p", "/root/manifest.json.good", manifest])
    box.run(["systemctl", "reset-failed", UNITS[0]])
    box.run(["systemctl", "start", UNITS[0]], timeout=300)
    assert ready(box, PORTS[0])


def test_an_edit_of_the_template_unit_reaches_every_group_and_survives_apply(box):
    override = "/etc/systemd/system/neuronserve@.service.d/override.conf"
    box.run(["mkdir", "-p", override.rsplit("/", 1)[0]])
    box.write(override, "[Service]\nEnvironment=SITE_MARK=every-group\n")     # what `systemctl edit` writes
    box.run(["systemctl", "daemon-reload"])
    try:
        r = neuronserve(box, "apply")
        assert "applied: 0 file(s) changed; started 0, rolled 0, removed 0" in r.stdout, r.stdout
        assert box.run(["cat", override]).stdout == "[Service]\nEnvironment=SITE_MARK=every-group\n"
        for unit in UNITS:
            assert "SITE_MARK=every-group" in prop(box, unit, "Environment")
            # the group's own drop-in still applies beneath it
            assert f"NEURONSERVE_GROUP={unit[12:-8]}" in prop(box, unit, "Environment")
    finally:
        box.run(["rm", "-r", override.rsplit("/", 1)[0]])
        box.run(["systemctl", "daemon-reload"])


def requests_served(box, port: int) -> float:
    text = box.run(["curl", "-s", "--max-time", "2", f"http://127.0.0.1:{port}/metrics"]).stdout
    return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines()
               if line.startswith("neuronserve_requests_total{"))


def test_kill_9_is_restarted_while_nginx_routes_around_it(box):
    load = Load(box, concurrency=2)
    time.sleep(1)
    # a worker: gunicorn's master starts a new one
    old = worker_pid(box, UNITS[0])
    assert old
    t0 = time.monotonic()
    box.run(["kill", "-9", str(old)])
    wait_until(lambda: not ready(box, PORTS[0]) or worker_pid(box, UNITS[0]) != old, 30, "the worker to go")
    wait_until(lambda: ready(box, PORTS[0]), 120, "tiny-0 ready again")
    FIGURES["worker_kill9_back_s"] = round(time.monotonic() - t0, 1)
    assert worker_pid(box, UNITS[0]) != old
    # one fault at a time: nginx counts the new worker's 503s (warming up) against tiny-0 for fail_timeout_s
    # (2 s); a second group failing within that window leaves nginx "no live upstreams" (see the report)
    time.sleep(3)
    # the unit's main process (gunicorn master): systemd restarts the unit (Restart=on-failure)
    main, restarts = prop(box, UNITS[1], "MainPID"), int(prop(box, UNITS[1], "NRestarts"))
    t0 = time.monotonic()
    box.run(["kill", "-9", main])
    wait_until(lambda: int(prop(box, UNITS[1], "NRestarts")) == restarts + 1, 60, "systemd to restart tiny-1")
    wait_until(lambda: ready(box, PORTS[1]), 120, "tiny-1 ready again")
    FIGURES["main_kill9_back_s"] = round(time.monotonic() - t0, 1)
    assert prop(box, UNITS[1], "MainPID") != main
    result = load.finish()
    FIGURES["kill9_load"] = {k: result[k] for k in ("sent", "ok", "failed", "errors", "max_latency_s", "seconds")}
    # nginx retried the requests the dead processes dropped on the other group (proxy_next_upstream)
    assert result["sent"] > 0 and result["failed"] == 0, f"{result}\n{nginx_says(box)}"


def test_apply_after_a_config_edit_under_load_loses_no_request(box):
    mains = {u: prop(box, u, "MainPID") for u in UNITS}
    box.write(CONFIG, config_text(2.0))
    load = Load(box, concurrency=4)
    time.sleep(1)
    t0 = time.monotonic()
    r = neuronserve(box, "apply")
    apply_s = time.monotonic() - t0
    time.sleep(1)
    result = load.finish()
    FIGURES["apply_under_load"] = {"apply_s": round(apply_s, 1), "requests_sent": result["sent"],
                                   "failed": result["failed"], "errors": result["errors"],
                                   "max_latency_s": result["max_latency_s"]}
    steps = [line.split()[:2] for line in r.stdout.splitlines()]
    # one group at a time: tiny-0 is back in nginx before tiny-1 is drained
    assert steps.index(["stop", UNITS[0]]) < steps.index(["ready", UNITS[0]]) < steps.index(["stop", UNITS[1]])
    assert "rolled 2" in r.stdout, r.stdout
    assert all(prop(box, u, "MainPID") != mains[u] for u in UNITS)
    assert 'NEURONSERVE_MAX_BATCH_DELAY_MS=2.0' in box.run(["systemctl", "show", UNITS[1], "-p", "Environment"]).stdout
    assert result["sent"] > 20 and result["failed"] == 0, f"{result}\n{nginx_says(box)}"


def test_an_artifact_the_service_user_cannot_read_fails_the_start_with_one_line(box):
    """Permission denied is a missing artifact's boot error: one line naming the file, exit 3, no restart loop
    (RestartPreventExitStatus=3); readable again, the group starts."""
    bucket = f"{REPO}/tiny/model.pt"     # the trace every bucket shares
    box.run(["chmod", "600", bucket])              # root's own: the neuronserve user may not read it
    try:
        box.run(["systemctl", "restart", UNITS[0]], check=False)
        wait_until(lambda: prop(box, UNITS[0], "ActiveState") == "failed", 60, "tiny-0 to fail")
        assert prop(box, UNITS[0], "ExecMainStatus") == "3"
        journal = box.run(["journalctl", "-u", UNITS[0], "--no-pager", "-o", "cat", "-n", "40"]).stdout
        [line] = [x for x in journal.splitlines() if "cannot start tiny-0" in x]
        assert f"{bucket}: cannot read artifact: Permission denied" in line, journal
        assert "Traceback" not in journal.split("cannot start tiny-0")[-1]
    finally:
        box.run(["chmod", "644", bucket])
    box.run(["systemctl", "reset-failed", UNITS[0]])
    box.run(["systemctl", "start", UNITS[0]])
    wait_until(lambda: ready(box, PORTS[0]), 120, "tiny-0 ready again")


def test_cleanup_leaves_nothing_behind(box):
    r = neuronserve(box, "cleanup")
    assert "stop" in r.stdout, r.stdout
    loaded = box.run(["systemctl", "list-units", "--all", "--no-legend", "--plain", "neuronserve*"]).stdout
    # list-unit-files exits 1 when nothing matches
    files = box.run(["systemctl", "list-unit-files", "--no-legend", "--plain", "neuronserve*"], check=False).stdout
    assert loaded.strip() == "" and files.strip() == "", loaded + files
    left = box.sh("ls -d /etc/systemd/system/neuronserve* /etc/systemd/system/*.wants/neuronserve* "
                  "/etc/nginx/conf.d/neuronserve.conf /etc/neuronserve/gunicorn/* 2>/dev/null", check=False).stdout
    assert left.strip() == "", left
    assert box.run(["pgrep", "-u", "neuronserve"], check=False).returncode == 1
    listening = box.run(["ss", "-Hltn"]).stdout
    assert not any(f"127.0.0.1:{p} " in listening for p in PORTS) and "127.0.0.1:8080 " not in listening
    # what is not neuronserve's is untouched: nginx, another service, the config and the models
    assert box.run(["systemctl", "is-active", "nginx.service", "bystander.service"]).stdout.split() == ["active"] * 2
    box.run(["test", "-f", CONFIG])
    box.run(["test", "-f", f"{REPO}/tiny/manifest.json"])
    assert "nothing" in neuronserve(box, "cleanup").stdout      # a second cleanup finds nothing to do
