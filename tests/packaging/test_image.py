"""The container image from the .deb (packaging/image.py, `make image`), run for real with podman in pod mode.

The image is built from this checkout's .deb; a small BERT compiled here for the CPU is mounted read-only where
the config's model repository is, the config where Kubernetes mounts it, and `neuronserve pod --model cls` runs
with --network=host on free ports and one CPU's worth of quota (--cpus 1), as the Kubernetes manifests run it
(templates/kubernetes/_pod.yaml.j2): a read-only root (readOnlyRootFilesystem; without podman's own tmpfs on
/run, /tmp and /var/tmp), a scratch /tmp and /var/tmp (the emptyDir) and HOME=/tmp. Its answers are held against
the eager transformers model; its processes must run as the image's `neuronserve` user with gunicorn as the
container's PID 1 (exec'd, so it gets the SIGTERM), and `podman stop` with requests in flight must answer every
one of them and end the container by itself, status 0, within the grace period.

podman runs with runc and a CONTAINERS_CONF without default ulimits (reference/TESTING.md: crun refuses hybrid
cgroups, and the sandbox forbids raising RLIMIT_NPROC/NOFILE); its cgroupfs manager's leftovers under
/sys/fs/cgroup/*/libpod_parent are removed afterwards, and PID 1's cgroups must be as they were.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import neuronserve
from neuronserve.build.compile import compile_model
from neuronserve.operate.up import free_port_block

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("neuronserve_image", REPO / "packaging" / "image.py")
image_py = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(image_py)

TAG = f"localhost/neuronserve-test:{neuronserve.__version__}"
NAME = "neuronserve-test-pod"
# what the manifests give the container besides its mounts (_pod.yaml.j2): the root read-only, an emptyDir at
# /tmp and /var/tmp (a tmpfs here; an emptyDir is a plain directory, so not noexec), HOME on it
READ_ONLY_AS_KUBERNETES = ("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,exec,nosuid,nodev",
                           "--tmpfs", "/var/tmp:rw,exec,nosuid,nodev", "--env", "HOME=/tmp")
GRACE_S = 20            # server.graceful_timeout_s; podman stop waits a little longer before its SIGKILL
STOP_WAIT_S = GRACE_S + 10
TEXTS = ["The quick brown fox jumps over the lazy dog.", "a pod serves one core group", "short"]
# big enough that a request of LONG_ITEMS long texts takes seconds on one CPU: in flight when stopped
MODEL = dict(layers=4, hidden=256, heads=4)
LONG_TEXT = " ".join(["neuronserve answers every request it accepted before it stops"] * 12)
LONG_ITEMS = 128
IN_FLIGHT = 4


def podman(*args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*image_py.PODMAN, *args], env=image_py.podman_env(), capture_output=True, text=True,
                          check=check, timeout=timeout)


def remove_libpod_cgroups() -> None:
    subprocess.run("find /sys/fs/cgroup/*/libpod_parent -depth -type d -exec rmdir {} \\;", shell=True,
                   stderr=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def podman_ok(need_root_and_tools):
    missing = [t for t in ("podman", "runc") if not shutil.which(t) and not Path("/usr/sbin", t).exists()]
    assert not missing, f"missing {', '.join(missing)}: run `make sysdeps`"


@pytest.fixture(scope="module")
def image(builds, podman_ok):
    start = time.monotonic()
    subprocess.run([sys.executable, str(REPO / "packaging" / "image.py"), "--deb", str(builds[0].deb), "--tag", TAG],
                   check=True, timeout=1200)
    print(f"\nimage built in {time.monotonic() - start:.0f} s", file=sys.stderr)
    try:
        yield TAG
    finally:
        podman("rmi", "-f", TAG, check=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(the model repository holding `cls`, the model's source directory)."""
    source = tiny_model_dir("text-classification", **MODEL)
    repo = tmp_path_factory.mktemp("models")
    compile_model(source, repo / "cls", name="cls", task="text-classification", backend="cpu", target="cpu",
                  batch_sizes=[1, 8], sequence_lengths=[128])
    # the container's unprivileged user reads it through the mount
    subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)
    return repo, source


def config_text(http: int, grpc: int) -> str:
    return f"""\
[server]
backend = "cpu"
graceful_timeout_s = {GRACE_S}
log_level = "info"

[nginx]
listen = "0.0.0.0:{http}"
grpc_listen = "0.0.0.0:{grpc}"

[models.cls]
task = "text-classification"
source = "/unused"
copies = 1
batch_sizes = [1, 8]
sequence_lengths = [128]
max_queue = 1024
"""


def state(name: str) -> dict:
    return json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)


def wait_ready(url: str, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not state(name)["Running"]:
            raise AssertionError(f"the container exited:\n{podman('logs', name, check=False).stderr}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready in {timeout} s:\n{podman('logs', name, check=False).stderr}")


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def environ(pid: int) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)


def cleanup(cgroup_before: str) -> list[str]:
    """Remove the container and podman's cgroup leftovers; what went wrong, as text (never raises)."""
    problems = []
    try:
        done = podman("rm", "-f", NAME, check=False)
        if done.returncode != 0:
            problems.append(f"podman rm -f {NAME}: rc {done.returncode}: {done.stderr.strip()[-500:]}")
        remove_libpod_cgroups()
        if Path("/proc/1/cgroup").read_text() != cgroup_before:
            problems.append(f"PID 1's cgroups changed:\n{cgroup_before}->\n{Path('/proc/1/cgroup').read_text()}")
    except Exception as e:      # reported, beside the test's own failure if it has one
        problems.append(f"{type(e).__name__}: {e}")
    return problems


def test_the_image_serves_a_pod_as_its_user_and_stops_gracefully(image, compiled, tmp_path):
    cgroup_before = Path("/proc/1/cgroup").read_text()
    podman("rm", "-f", NAME, check=False)
    try:
        serve_and_stop(image, compiled, tmp_path)
    except BaseException as e:
        # the test's own failure stays the one reported; the cleanup's problems are added to it
        for problem in cleanup(cgroup_before):
            e.add_note(f"cleanup: {problem}")
        raise
    problems = cleanup(cgroup_before)
    assert not problems, "\n".join(problems)


def serve_and_stop(image: str, compiled: tuple[Path, Path], tmp_path: Path) -> None:
    import transformers

    repo, source = compiled
    http = free_port_block(2)
    conf = tmp_path / "neuronserve.toml"
    conf.write_text(config_text(http, http + 1))
    conf.chmod(0o644)
    url = f"http://127.0.0.1:{http}"
    started = time.monotonic()
    podman("run", "-d", "--name", NAME, "--network=host", "--cpus=1", *READ_ONLY_AS_KUBERNETES,
           "-v", f"{conf}:/etc/neuronserve/neuronserve.toml:ro",
           "-v", f"{repo}:/var/lib/neuronserve/models:ro", image, "pod", "--model", "cls")
    wait_ready(url, NAME)
    print(f"container ready in {time.monotonic() - started:.1f} s", file=sys.stderr)

    # the eager model's answers, over HTTP and through gRPC on the second port
    pipe = transformers.pipeline("text-classification", model=str(source), top_k=None, device="cpu")
    got = httpx.post(url + "/models/cls", json={"inputs": TEXTS}, timeout=60)
    assert got.status_code == 200, got.text
    for text, expected, answer in zip(TEXTS, pipe(TEXTS), got.json()):
        assert {a["label"]: a["score"] for a in answer} == pytest.approx(
            {e["label"]: e["score"] for e in expected}, abs=1e-5), text
    import tritonclient.grpc as triton
    assert triton.InferenceServerClient(f"127.0.0.1:{http + 1}").is_model_ready("cls")

    # PID 1 is gunicorn itself (pod exec'd it) and every process is the image's unprivileged user
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    uid, gid = (int(x) for x in user.split(":"))
    pid1 = state(NAME)["Pid"]
    [worker] = children(pid1)
    assert b"gunicorn" in Path(f"/proc/{pid1}/cmdline").read_bytes()
    for pid in (pid1, worker):
        assert proc_status(pid)["Uid"].split()[0] == str(uid) != "0"
        assert proc_status(pid)["Gid"].split()[0] == str(gid)
    assert podman("exec", NAME, "id", "-un").stdout.strip() == "neuronserve"
    # the root is read-only, even where the image's user owns a directory; the scratch is writable
    denied = podman("exec", NAME, "touch", "/var/lib/neuronserve/probe", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied
    podman("exec", NAME, "touch", "/tmp/probe", "/var/tmp/probe")
    # --cpus 1 on this 2-CPU machine: the quota, not the cpuset, decides the threads
    env = environ(worker)
    assert env["NEURONSERVE_THREADS"] == env["OMP_NUM_THREADS"] == "1", env
    assert env["NEURONSERVE_LISTEN_HOST"] == "0.0.0.0" and env["HF_HUB_OFFLINE"] == "1"
    assert env["HOME"] == "/tmp"

    # requests in flight (seconds of work each on one CPU, queued behind one another) when stopped
    def slow(i: int) -> tuple[int, int | str]:
        r = httpx.post(url + "/models/cls", json={"inputs": [f"{i} {LONG_TEXT}"] * LONG_ITEMS}, timeout=120)
        return r.status_code, len(r.json()) if r.status_code == 200 else r.text

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(slow, i) for i in range(IN_FLIGHT)]
        time.sleep(1.0)
        in_flight = sum(not f.done() for f in futures)
        stopping = time.monotonic()
        stop = podman("stop", "-t", str(STOP_WAIT_S), NAME, timeout=STOP_WAIT_S + 30)
        stopped_in = time.monotonic() - stopping
        answers = [f.result() for f in futures]
    print(f"stopped in {stopped_in:.1f} s with {in_flight} requests in flight", file=sys.stderr)
    assert in_flight >= IN_FLIGHT - 1, f"only {in_flight} of {IN_FLIGHT} requests were in flight at the stop"
    assert answers == [(200, LONG_ITEMS)] * IN_FLIGHT, answers
    final = state(NAME)
    logs = podman("logs", NAME, check=False).stderr
    assert final["ExitCode"] == 0 and stopped_in < GRACE_S, (stop, final, logs[-3000:])
    assert "Handling signal: term" in logs and "Shutting down: Master" in logs, logs[-3000:]


def test_a_failed_stage_unmounts_its_root_and_never_removes_what_was_mounted(tmp_path, monkeypatch):
    """A stage that fails with mounts in its root (a chroot's /proc, a bind mount of a host directory, what a
    killed debootstrap leaves): the work directory goes, what was mounted there stays untouched."""
    if image_py.os.geteuid() != 0:
        pytest.skip("mounting needs root")
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "precious").write_text("kept\n")
    monkeypatch.setattr(image_py, "CACHE", tmp_path / "cache")
    image_py.CACHE.mkdir()
    seen = {}

    def make(root: Path) -> None:
        for rel in ("proc", "host", "deep"):
            (root / rel).mkdir()
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        subprocess.run(["mount", "--bind", str(host_dir), str(root / "host")], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "deep")], check=True)
        (root / "deep" / "inner").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "deep" / "inner")], check=True)
        seen["mounts"] = image_py.mounts_under(root)
        raise RuntimeError("the stage failed")

    with pytest.raises(RuntimeError, match="the stage failed"):
        image_py.cached("selftest", make)
    # the deepest first, then the last mounted
    assert [Path(p).name for p in seen["mounts"]] == ["inner", "deep", "host", "proc"]
    assert image_py.mounts_under(tmp_path) == []
    assert list(image_py.CACHE.iterdir()) == []
    assert (host_dir / "precious").read_text() == "kept\n"
