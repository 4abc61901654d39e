"""`neuronserve doctor`: Neuron findings from recorded neuron-ls output over a fake /dev, /proc and /opt tree;
the CPU case for real on this machine (real /proc, real nginx -v, the real interpreter importing torch)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from neuronserve.build import artifact
from neuronserve.operate import doctor
from neuronserve.cli import main
from neuronserve.plan import APP

DATA = Path(__file__).resolve().parent.parent / "data"
BASE_PORT = 18100
FRONT_PORT = 18080


class Machine:
    """A fake host under tmp: what /dev, /proc, /opt and the tools look like on an inf2.48xlarge."""

    def __init__(self, tmp: Path, sample: str = "inf2.48xlarge.output-format.json"):
        self.root = tmp / "root"
        self.root.mkdir()
        self.calls: list[list[str]] = []
        self.neuron_ls = (DATA / "neuron-ls" / sample).read_text()
        self.imports = {"torch_neuronx"}
        # what doctor.ML_PROBE prints in the venv (None: not installed)
        self.versions = {"torch": "2.8.0", "transformers": "5.25.0", "tokenizers": "0.23.3"}
        tool = self.path("/opt/aws/neuron/bin/neuron-ls")
        tool.parent.mkdir(parents=True)
        tool.touch()
        self.path("/proc/net").mkdir(parents=True)
        self.path("/proc/net/tcp").write_text(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n")

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def dev_nodes(self, count: int, mode: int) -> None:
        self.path("/dev").mkdir(exist_ok=True)
        for d in range(count):
            node = self.path(f"/dev/neuron{d}")
            node.touch()
            node.chmod(mode)

    def venv(self, name: str) -> str:
        python = self.path(f"/opt/{name}/bin/python")
        python.parent.mkdir(parents=True)
        python.touch()
        return str(python)

    def process(self, pid: int, cmdline: str, cgroup: str = "0::/user.slice/user-1000.slice/session-3.scope",
                listen_port: int | None = None) -> None:
        proc = self.path(f"/proc/{pid}")
        (proc / "fd").mkdir(parents=True)
        proc.joinpath("cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
        proc.joinpath("cgroup").write_text(cgroup + "\n")
        if listen_port is not None:
            inode = 90000 + pid % 1000
            with self.path("/proc/net/tcp").open("a") as f:
                f.write(f"   0: 0100007F:{listen_port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 "
                        f"00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n")
            os.symlink(f"socket:[{inode}]", proc / "fd" / "7")

    def run(self, argv, timeout=None):
        self.calls.append(list(argv))
        if argv[1:] == ["--output-format", "json"] and argv[0] == str(self.path("/opt/aws/neuron/bin/neuron-ls")):
            return subprocess.CompletedProcess(argv, 0, self.neuron_ls, "")
        if argv[1] == "-c":
            # the versions probe, an import, or the two in one (the probe's line first)
            lines = argv[2].splitlines()
            printed = json.dumps(self.versions) + "\n" if lines[0] == doctor.ML_PROBE else ""
            missing = [x.removeprefix("import ") for x in lines if x != doctor.ML_PROBE
                       and x.removeprefix("import ") not in self.imports]
            error = f"ModuleNotFoundError: No module named {missing[0]!r}" if missing else ""
            return subprocess.CompletedProcess(argv, 1 if missing else 0, printed, error)
        if argv[1:] == ["-v"] and argv[0].endswith("nginx"):
            return subprocess.CompletedProcess(argv, 0, "", "nginx version: nginx/1.24.0\n")
        raise AssertionError(f"unexpected command {argv}")

    def probes(self, user_gids=None) -> doctor.Probes:
        gid = os.stat(self.root).st_gid
        gids = frozenset({gid} if user_gids is None else user_gids)
        return doctor.Probes(root=self.root, run=self.run,
                             user=lambda name: doctor.Account(name, 4321, gids) if name == "neuronserve" else None)


def write_config(tmp: Path, backend: str = "neuron", models: str | None = None, base_port: int = BASE_PORT,
                 front_port: int = FRONT_PORT, grpc: bool = True) -> Path:
    """gRPC: the groups on base_port + 1000 + i, the front on front_port + 1."""
    if models is None:
        models = ('[models.bert]\ntask = "text-classification"\nsource = "/srv/bert"\ncores_per_group = 2\n'
                  "batch_sizes = [1, 4]\nsequence_lengths = [128]\n")
    path = tmp / "neuronserve.toml"
    path.write_text(f'[server]\nbackend = "{backend}"\nbase_port = {base_port}\nmodel_repository = "{tmp}/models"\n'
                    f'[nginx]\nlisten = "127.0.0.1:{front_port}"\nconf_path = "/etc/nginx/conf.d/neuronserve.conf"\n'
                    f'grpc_listen = "{f"127.0.0.1:{front_port + 1}" if grpc else ""}"\n' + models)
    return path


def compiled(tmp: Path, name: str = "bert", backend: str = "neuron", target: str = "inf2",
             buckets=((1, 128), (4, 128))) -> Path:
    directory = tmp / "models" / name
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for b, s in buckets:
        f = directory / artifact.bucket_file(b, s)
        f.write_bytes(f"traced {b}x{s}".encode())
        entries.append(artifact.Bucket(batch=b, seq=s, file=f.name, sha256=artifact.sha256_file(f)))
    artifact.write_manifest(directory, artifact.Manifest(
        name=name, task="text-classification", backend=backend, target=target, source="/srv/bert",
        created=datetime.now(timezone.utc).isoformat(), versions={"torch": "2.9.0"},
        input_names=["input_ids", "attention_mask"], output_names=["logits"], buckets=entries))
    return directory


def by_status(findings, status):
    return [f for f in findings if f.status == status]


def one(findings, text):
    hits = [f for f in findings if text in f.what]
    assert len(hits) == 1, f"{text!r} in {[f.what for f in findings]}"
    return hits[0]


@pytest.fixture
def machine(tmp_path):
    m = Machine(tmp_path)
    m.dev_nodes(12, 0o660)
    m.venv("aws_neuronx_venv_pytorch_2_8")
    return m


# ---------------------------------------------------------------- Neuron, from recorded samples

def test_healthy_inf2_host(tmp_path, machine):
    compiled(tmp_path)
    # a quiet host: same devices, nobody holding cores
    devices = json.loads(machine.neuron_ls)
    for d in devices:
        d["neuron_processes"] = []
    machine.neuron_ls = json.dumps(devices)
    findings = doctor.diagnose(write_config(tmp_path), probes=machine.probes())
    assert by_status(findings, "fail") == [] and by_status(findings, "warn") == []
    assert one(findings, "backend neuron (inf2)").what.startswith("backend neuron (inf2): 24 cores on 12 device(s)")
    one(findings, "/dev/neuron* (0-11): read/write for 'neuronserve'")
    one(findings, "aws_neuronx_venv_pytorch_2_8/bin/python imports torch_neuronx (torch 2.8.0, transformers 5.25.0, "
                  "tokenizers 0.23.3)")
    one(findings, "nginx version: nginx/1.24.0")
    assert one(findings, "plan: 12 group(s)").what.endswith("bert-11 (cores 22-23)")
    ports = [*range(BASE_PORT, BASE_PORT + 12), *range(BASE_PORT + 1000, BASE_PORT + 1012), FRONT_PORT, FRONT_PORT + 1]
    one(findings, f"port(s) {', '.join(map(str, ports))} free")
    one(findings, "model bert: 2 bucket(s) compiled for neuron (inf2)")
    # exactly the probes NEURON.md describes, nothing else
    assert machine.calls[0] == [str(machine.path("/opt/aws/neuron/bin/neuron-ls")), "--output-format", "json"]
    assert [c[1:] for c in machine.calls[1:]] == [["-c", "import torch_neuronx"], ["-c", doctor.ML_PROBE], ["-v"]]


def test_stale_and_foreign_core_holders(tmp_path, machine):
    compiled(tmp_path)
    # PID 41877 (neuron2+3) lives and also sits on the first group's port; PID 52210 (neuron7) has exited
    machine.process(41877, "python3 /home/ubuntu/old-bench/serve.py --cores 4-7", listen_port=BASE_PORT)
    findings = doctor.diagnose(write_config(tmp_path), probes=machine.probes())
    holder = one(findings, "PID 41877 (python3 /home/ubuntu/old-bench/serve.py --cores 4-7) holds")
    assert holder.status == "fail" and "holds neuron device(s) 2-3 (cores 4-7): group(s) bert-2, bert-3 will " \
        "fail with 'NeuronCore(s) not available'" in holder.what
    assert "kill 41877" in holder.fix
    stale = one(findings, "PID 52210")
    assert stale.status == "warn" and "has exited" in stale.what and "modprobe neuron" in stale.fix
    port = one(findings, f"port {BASE_PORT} (group bert-0)")
    assert port.status == "fail" and "PID 41877" in port.what and f":{BASE_PORT}" in port.fix
    assert doctor.failed(findings)


def test_holders_that_are_neuronserve_units_are_fine(tmp_path, machine):
    compiled(tmp_path)
    machine.process(41877, f"/usr/bin/python3 -m gunicorn --config /etc/neuronserve/gunicorn/bert-2.conf.py {APP}",
                    cgroup="0::/system.slice/system-neuronserve.slice/neuronserve@bert-2.service",
                    listen_port=BASE_PORT + 2)
    machine.process(1234, "nginx: master process /usr/sbin/nginx", listen_port=FRONT_PORT)
    machine.path("/etc/nginx/conf.d").mkdir(parents=True)
    machine.path("/etc/nginx/conf.d/neuronserve.conf").write_text("# rendered\n")
    findings = doctor.diagnose(write_config(tmp_path), probes=machine.probes())
    assert by_status(findings, "fail") == []
    assert one(findings, "PID 41877 (neuronserve@bert-2.service) holds").status == "ok"
    assert one(findings, "PID 52210").status == "warn"   # the exited one
    assert one(findings, f"port {BASE_PORT + 2} (group bert-2) is held by neuronserve").status == "ok"
    assert one(findings, f"port {FRONT_PORT} (nginx.listen) is held by neuronserve").status == "ok"


def test_device_permissions_for_the_service_user(tmp_path, machine):
    compiled(tmp_path)
    for d in range(12):
        machine.path(f"/dev/neuron{d}").chmod(0o600)
    findings = doctor.diagnose(write_config(tmp_path), probes=machine.probes())
    closed = one(findings, "'neuronserve' cannot open /dev/neuron0")
    assert closed.status == "fail" and "and 9 more" in closed.what and "0600" in closed.what
    assert 'GROUP="neuron", MODE="0660"' in closed.fix and "usermod -aG neuron neuronserve" in closed.fix
    # 0660 but the user is not in the owning group: still closed
    for d in range(12):
        machine.path(f"/dev/neuron{d}").chmod(0o660)
    findings = doctor.diagnose(write_config(tmp_path), probes=machine.probes(user_gids=set()))
    assert one(findings, "cannot open /dev/neuron0").status == "fail"


def test_missing_user_nodes_and_driver(tmp_path):
    m = Machine(tmp_path)
    m.venv("aws_neuronx_venv_pytorch_2_8")
    probes = m.probes()
    probes.user = lambda name: None
    findings = doctor.diagnose(write_config(tmp_path), probes=probes)
    assert one(findings, "service user 'neuronserve' does not exist").status == "warn"
    nodes = one(findings, "no /dev/neuron* device nodes")
    assert nodes.status == "fail" and "modprobe neuron" in nodes.fix
    # no tool, no sysfs: the backend itself is missing and the checks that need it are skipped
    m.path("/opt/aws/neuron/bin/neuron-ls").unlink()
    findings = doctor.diagnose(write_config(tmp_path), probes=m.probes())
    missing = one(findings, "neuron: no Neuron devices")
    assert missing.status == "fail" and "aws-neuronx-dkms" in missing.fix
    assert not [f for f in findings if f.what.startswith(("plan", "python", "model"))]


def test_no_venv_with_torch_neuronx(tmp_path, machine):
    compiled(tmp_path)
    machine.imports = set()   # the 2.32 DLAMIs stop shipping torch-neuronx in that venv
    f = one(doctor.diagnose(write_config(tmp_path), probes=machine.probes()), "imports torch_neuronx")
    assert f.status == "fail" and f.what.startswith("no DLAMI venv (/opt/aws_neuronx_venv_pytorch_*)")
    assert "server.python" in f.fix


def test_explicit_server_python_is_checked_as_named(tmp_path, machine):
    compiled(tmp_path)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("[server]\n", '[server]\npython = "/srv/ml/bin/python"\n'))
    machine.imports = set()
    f = one(doctor.diagnose(path, probes=machine.probes()), "/srv/ml/bin/python")
    assert f.status == "fail" and "cannot use torch_neuronx: ModuleNotFoundError" in f.what
    # the versions are asked in the same probe as the import
    assert ["/srv/ml/bin/python", "-c", f"{doctor.ML_PROBE}\nimport torch_neuronx"] in machine.calls
    assert "install torch-neuronx into that environment" in f.fix


@pytest.mark.parametrize("python", ["auto", "/srv/ml/bin/python"])
@pytest.mark.parametrize("package, version, status, text", [
    ("transformers", "4.57.1", "fail", "has transformers 4.57.1, older than neuronserve supports"),
    ("tokenizers", None, "fail", "has no tokenizers; neuronserve supports"),
    ("torch", "3.1.0+cpu", "warn", "has torch 3.1.0+cpu, newer than neuronserve is tested with"),
])
def test_ml_environment_versions_outside_the_supported_range(tmp_path, machine, python, package, version, status,
                                                            text):
    compiled(tmp_path)
    path = write_config(tmp_path)
    if python == "auto":
        python = str(machine.path("/opt/aws_neuronx_venv_pytorch_2_8/bin/python"))
    else:
        path.write_text(path.read_text().replace("[server]\n", f'[server]\npython = "{python}"\n'))
    machine.versions[package] = version
    findings = doctor.diagnose(path, probes=machine.probes())
    floor, ceiling = doctor.ML_VERSIONS[package]
    f = one(findings, text)
    assert f.status == status and f.what.startswith(f"python {python} has ")
    assert f.what.endswith(f"{package}>={floor},<{ceiling}" + (")" if version else ""))
    assert f.fix.startswith(f"{python} -m pip install '{package}>={floor},<{ceiling}'")
    # the import itself is fine, and the other two packages are in range
    assert one(findings, f"python {python} imports torch_neuronx").status == "ok"
    assert [x for x in findings if x.what.startswith(f"python {python} has ")] == [f]


def test_supported_ml_versions_start_at_the_declared_floors():
    import min_deps

    pins = dict(r.split("==") for r in min_deps.requirements() if "==" in r)
    assert {p: doctor.ML_VERSIONS[p][0] for p in ("transformers", "tokenizers")} == \
        {p: pins[p] for p in ("transformers", "tokenizers")}


@pytest.mark.parametrize("backend, target, status, text", [
    ("neuron", "trn1", "ok", "compiled for neuron (trn1)"),
    ("neuron", "inf1", "fail", "compiled for inf1, this host is inf2"),
    ("cpu", "cpu", "fail", "compiled for cpu (cpu), but this group serves on neuron"),
])
def test_artifacts_must_match_the_host(tmp_path, machine, backend, target, status, text):
    compiled(tmp_path, backend=backend, target=target)
    f = one(doctor.diagnose(write_config(tmp_path), probes=machine.probes()), "model bert")
    assert f.status == status and text in f.what
    if status == "fail":
        assert f.fix == "run `neuronserve compile bert`"


def test_artifacts_missing_or_incomplete(tmp_path, machine):
    f = one(doctor.diagnose(write_config(tmp_path), probes=machine.probes()), "model bert")
    assert f.status == "fail" and "no compiled model here" in f.what
    directory = compiled(tmp_path, buckets=((1, 128),))
    f = one(doctor.diagnose(write_config(tmp_path), probes=machine.probes()), "model bert")
    assert f.status == "warn" and "not compiled: b4_s128" in f.what
    (directory / "b1_s128.pt").unlink()
    f = one(doctor.diagnose(write_config(tmp_path), probes=machine.probes()), "model bert")
    assert f.status == "fail" and "missing" in f.what and "b1_s128.pt" in f.what


def test_impossible_plan_and_broken_config(tmp_path, machine):
    models = '[models.bert]\ntask = "text-classification"\nsource = "/s"\ngroups = 13\ncores_per_group = 2\n'
    f = one(doctor.diagnose(write_config(tmp_path, models=models), probes=machine.probes()), "plan:")
    assert f.status == "fail" and "26 cores, but only 24 are free" in f.what
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nbackend = "neuron"\nbase_prot = 8100\n')
    findings = doctor.diagnose(bad, probes=machine.probes())
    assert findings[0].status == "fail" and "bad.toml:3: server.base_prot" in findings[0].what
    # the rest still ran, on the defaults
    one(findings, "backend neuron (inf2)")


def test_text_and_json_output():
    findings = [doctor.Finding("ok", "a"), doctor.Finding("warn", "b", "do b"), doctor.Finding("fail", "c", "do c")]
    assert doctor.as_text(findings).splitlines() == [
        "OK    a", "WARN  b", "      fix: do b", "FAIL  c", "      fix: do c", "1 ok, 1 warning(s), 1 failure(s)"]
    assert doctor.as_dict(findings)["ok"] is False and doctor.as_dict(findings[:2])["ok"] is True


# ---------------------------------------------------------------- CPU, for real on this machine

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_doctor_end_to_end(tmp_path):
    base, front = free_port(), free_port()
    models = ('[models.emb]\ntask = "text-classification"\nsource = "/srv/bert"\ngroups = 1\n'
              "batch_sizes = [1, 4]\nsequence_lengths = [128]\n")
    path = write_config(tmp_path, backend="cpu", models=models, base_port=base, front_port=front, grpc=False)
    compiled(tmp_path, name="emb", backend="cpu", target="cpu")
    result = CliRunner().invoke(main, ["doctor", "--config", str(path), "--json"])
    report = json.loads(result.output)
    findings = [doctor.Finding(**f) for f in report["findings"]]
    assert result.exit_code == (1 if by_status(findings, "fail") else 0) and report["ok"] is (result.exit_code == 0)
    assert one(findings, "backend cpu:").status == "ok"
    assert one(findings, f"python {sys.executable} imports torch").status == "ok"
    assert one(findings, "model emb: 2 bucket(s) compiled for cpu").status == "ok"
    assert one(findings, f"{base}, {front} free").status == "ok"
    nginx = one(findings, "nginx")
    assert nginx.status == ("ok" if doctor.shutil.which("nginx", path=os.environ["PATH"] + ":/usr/sbin") else "fail")

    # something else listening on the group's port: named by PID, exit code 1
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", base))
        s.listen()
        result = CliRunner().invoke(main, ["doctor", "--config", str(path)])
    assert result.exit_code == 1
    assert f"FAIL  port {base} (group emb-0) is already in use by PID {os.getpid()}" in result.output


def test_cpu_port_held_by_a_neuronserve_group_is_ok(tmp_path):
    base, front = free_port(), free_port()
    models = '[models.emb]\ntask = "feature-extraction"\nsource = "/srv/x"\ngroups = 1\n'
    path = write_config(tmp_path, backend="cpu", models=models, base_port=base, front_port=front, grpc=False)
    # a process whose command line is a group's (the app spec) listening on the group's port
    code = ("import socket, sys, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {base})); s.listen(); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, APP], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        findings = doctor.diagnose(path)
    finally:
        proc.kill()
        proc.wait()
    f = one(findings, f"port {base} (group emb-0)")
    assert f.status == "ok" and f"PID {proc.pid}" in f.what


def test_cli_prints_no_traceback_on_a_broken_config(tmp_path):
    bad = tmp_path / "neuronserve.toml"
    bad.write_text("[server\nbackend = 'cpu'\n")
    done = subprocess.run([sys.executable, "-m", "neuronserve", "doctor", "--config", str(bad), "--backend", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.startswith(f"FAIL  config: {bad}:1:")
    assert "OK    backend cpu:" in done.stdout
    # it ran to the end: the summary line is there
    assert done.stdout.rstrip().splitlines()[-1].endswith("failure(s)")
