"""Pod mode (`neuronserve pod`): the cores a container was given, and the one group it runs on them.

The CPU quota is read from fake cgroup trees (a /proc/self/{cgroup,mountinfo} and the cgroup files under a tmp
root) as Kubernetes and podman lay them out on cgroup v2, v1 and hybrid hosts; Neuron's cores come from a fake
sysfs tree and NEURON_RT_VISIBLE_CORES, CUDA's from a recorded nvidia-smi and CUDA_VISIBLE_DEVICES.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from test_devices import SMI, make_sysfs, smi

from neuronserve import config
from neuronserve.devices import cpu, cuda, given_cores, neuron
from neuronserve.errors import ConfigError, DeviceError
from neuronserve.operate import pod

POD_CGROUP = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
V2_MOUNT = "35 28 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cgroup_v2(root: Path, path: str, limits: dict[str, str], mount_root: str = "/") -> None:
    """A v2 hierarchy mounted at /sys/fs/cgroup showing `mount_root` down; cpu.max per cgroup in `limits`."""
    write(root, "/proc/self/cgroup", f"0::{path}\n")
    write(root, "/proc/self/mountinfo", V2_MOUNT.replace(" / /sys", f" {mount_root} /sys"))
    for cgroup, value in limits.items():
        write(root, f"/sys/fs/cgroup/{cgroup.removeprefix(mount_root).lstrip('/')}/cpu.max", value + "\n")


def test_v2_the_tightest_of_the_cgroup_and_its_parents(tmp_path):
    # the node's view (no cgroup namespace): the pod's slice limits, its container does not
    pod_slice = POD_CGROUP.rsplit("/", 1)[0]
    cgroup_v2(tmp_path, POD_CGROUP, {POD_CGROUP: "max 100000", pod_slice: "250000 100000",
                                     "/kubepods.slice": "max 100000"})
    assert cpu.cpu_quota(tmp_path) == 2.5
    host = cpu.discover(affinity=set(range(8)), root=tmp_path, quota=True)
    assert host.details["cpu_quota"] == 2.5 and host.source == "sched_getaffinity + cgroup CPU quota"
    assert len(host.cores) == 8                       # the cpuset decides the CPUs, the quota the threads


def test_a_host_ignores_the_clis_own_quota(tmp_path):
    # render/apply/up run in a shell's cgroup (a capped user slice, a systemd-run scope, a CI container), not in
    # the units': without quota=True discovery is the affinity alone, and every group gets its CPUs' threads
    cgroup_v2(tmp_path, "/user.slice/user-1000.slice/session-1.scope",
              {"/user.slice/user-1000.slice/session-1.scope": "max 100000",
               "/user.slice/user-1000.slice": "100000 100000"})
    assert cpu.cpu_quota(tmp_path) == 1.0
    host = cpu.discover(affinity=set(range(8)), root=tmp_path)
    assert "cpu_quota" not in host.details and host.source == "sched_getaffinity"
    assert cpu.pin_env(host, list(range(8)), 1, config.Config(), "emb-0")["NEURONSERVE_THREADS"] == "8"
    # the same tree in pod mode caps them
    capped = cpu.discover(affinity=set(range(8)), root=tmp_path, quota=True)
    assert cpu.pin_env(capped, list(range(8)), 1, config.Config(), "emb-0")["NEURONSERVE_THREADS"] == "1"


def test_a_pod_reads_its_quota_and_a_host_context_does_not(tmp_path, monkeypatch):
    from neuronserve import context

    cgroup_v2(tmp_path / "fs", "/", {"/": "200000 100000"})
    real = cpu.discover
    monkeypatch.setattr(cpu, "discover", lambda **kw: real(affinity=set(range(8)), root=tmp_path / "fs", **kw))
    cfg = load(tmp_path, 'backend = "cpu"\n')
    assert "cpu_quota" not in context.discover(cfg).details
    assert pod.pod_host(cfg, {}).details["cpu_quota"] == 2.0


def test_v2_inside_a_cgroup_namespace(tmp_path):
    # what a container sees: its own cgroup is the root of its /sys/fs/cgroup and of /proc/self/cgroup
    cgroup_v2(tmp_path, "/", {"/": "150000 100000"})
    assert cpu.cpu_quota(tmp_path) == 1.5


def test_v2_unlimited_and_missing_files(tmp_path):
    cgroup_v2(tmp_path, "/", {"/": "max 100000"})
    assert cpu.cpu_quota(tmp_path) is None
    assert cpu.cpu_quota(tmp_path / "nothing-here") is None
    host = cpu.discover(affinity={0, 1}, root=tmp_path, quota=True)
    assert "cpu_quota" not in host.details and host.source == "sched_getaffinity"


def v1_hybrid(root: Path, proc_path: str, mount_root: str, quota: int, period: int = 100000) -> None:
    """A hybrid host (Debian 11/12 with systemd's default before v2, this CI machine): cpu on a v1 hierarchy
    mounted as cpu,cpuacct, an empty v2 hierarchy beside it."""
    write(root, "/proc/self/cgroup",
          f"12:cpu,cpuacct:{proc_path}\n3:memory:{proc_path}\n1:name=systemd:{proc_path}\n0::{proc_path}\n")
    write(root, "/proc/self/mountinfo",
          f"40 31 0:35 {mount_root} /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
          f"41 31 0:36 {mount_root} /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n"
          f"42 31 0:37 {mount_root} /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n")
    write(root, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", f"{quota}\n")
    write(root, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", f"{period}\n")


def test_v1_a_containers_own_cgroup_mounted_as_the_root(tmp_path):
    # podman/runc on v1 without a cgroup namespace: /proc/self/cgroup names the host path, which is the mount's root
    v1_hybrid(tmp_path, "/libpod_parent/libpod-1f2e", "/libpod_parent/libpod-1f2e", quota=100000)
    assert cpu.cpu_quota(tmp_path) == 1.0
    v1_hybrid(tmp_path, "/libpod_parent/libpod-1f2e", "/libpod_parent/libpod-1f2e", quota=-1)
    assert cpu.cpu_quota(tmp_path) is None


def test_v1_host_view_walks_up_to_a_limited_parent(tmp_path):
    v1_hybrid(tmp_path, "/kubepods/burstable/pod1/abc", "/", quota=-1)
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/pod1/cpu.cfs_quota_us", "50000\n")
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/pod1/cpu.cfs_period_us", "100000\n")
    (tmp_path / "sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/pod1/abc").mkdir()
    assert cpu.cpu_quota(tmp_path) == 0.5


@pytest.mark.parametrize("quota, copies, threads", [(None, 1, 8), (2.5, 1, 2), (2.5, 2, 1), (0.5, 1, 1),
                                                    (6.0, 2, 3)])
def test_the_quota_caps_the_threads_not_the_cpus(quota, copies, threads):
    host = cpu.discover(affinity=set(range(8)))
    if quota is not None:
        host.details["cpu_quota"] = quota
    env = cpu.pin_env(host, list(range(8)), copies, config.Config(), "emb-0")
    assert env["NEURONSERVE_THREADS"] == env["OMP_NUM_THREADS"] == str(threads)
    assert env["NEURONSERVE_CPUS"] == "0-7"


# ---------------------------------------------------------------- the pod's one group

def load(tmp_path: Path, extra: str = "", model_keys: str = "") -> config.Config:
    path = tmp_path / "neuronserve.toml"
    path.write_text('[server]\nmodel_repository = "/models"\n' + extra +
                    '[models.emb]\ntask = "feature-extraction"\nsource = "/src/emb"\ncopies = 1\ngroups = 3\n'
                    + model_keys +
                    '[models.cls]\ntask = "text-classification"\nsource = "/src/cls"\n')
    return config.load(path, dropins=False)


def test_cpu_pod_one_group_on_every_address_at_the_fronts_ports(tmp_path):
    cgroup_v2(tmp_path / "fs", "/", {"/": "200000 100000"})
    host = cpu.discover(affinity=set(range(8)), root=tmp_path / "fs", quota=True)
    plan = pod.pod_plan(load(tmp_path), "emb", host)
    [g] = plan.groups
    assert (g.name, g.cores, g.port, g.grpc_port) == ("emb-0", list(range(8)), 8080, 8081)
    assert g.env["NEURONSERVE_LISTEN_HOST"] == "0.0.0.0" and g.env["NEURONSERVE_GRPC_PORT"] == "8081"
    assert g.env["NEURONSERVE_THREADS"] == g.env["OMP_NUM_THREADS"] == "2"     # 2 CPUs of quota, 1 copy
    assert g.env["NEURONSERVE_CPUS"] == "0-7" and g.env["NEURONSERVE_MODEL_DIR"] == "/models/emb"
    assert g.env["NEURONSERVE_LEND_DIR"] == "" and g.env["NEURONSERVE_GRPC_FRONT"] == ""

    argv, env = pod.command(plan, tmp_path / "scratch", {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "64"})
    conf = tmp_path / "scratch/etc/neuronserve/gunicorn/emb-0.conf.py"
    assert argv == [plan.python, "-m", "gunicorn", "--config", str(conf), "neuronserve.server.app:create_app()"]
    assert "bind = ['0.0.0.0:8080']" in conf.read_text() and "workers = 1" in conf.read_text()
    assert [p.name for p in (tmp_path / "scratch").rglob("*") if p.is_file()] == ["emb-0.conf.py"]
    # the container's environment reaches the group; the group's own settings win over it
    assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert {k: env[k] for k in g.env} == g.env


def test_listen_ports_come_from_the_front_and_grpc_can_be_off(tmp_path):
    cfg = load(tmp_path, '[nginx]\nlisten = "127.0.0.1:9000"\ngrpc_listen = ""\n')
    [g] = pod.pod_plan(cfg, "cls", cpu.discover(affinity={0, 1})).groups
    assert (g.name, g.port, g.grpc_port, g.env["NEURONSERVE_GRPC_PORT"]) == ("cls-0", 9000, 0, "0")
    assert g.env["NEURONSERVE_THREADS"] == "1"      # 2 CPUs shared by the default 2 copies


def test_an_unknown_model_names_the_configured_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[models.qa\] in .*neuronserve.toml; configured: emb, cls"):
        pod.pod_plan(load(tmp_path), "qa", cpu.discover(affinity={0}))


def failing_neuron_ls(argv, timeout=None):
    import subprocess
    return subprocess.CompletedProcess(argv, 127, "", "neuron-ls: not found")


def test_neuron_pod_uses_the_cores_the_device_plugin_gave(tmp_path):
    make_sysfs(tmp_path, 6, core_count=2, device_name="Inferentia2")
    host = neuron.discover(run=failing_neuron_ls, neuron_ls="/x/neuron-ls", root=tmp_path, cpus=list(range(96)))
    given = given_cores(host, {"NEURON_RT_VISIBLE_CORES": "4-5"})
    assert [(c.index, c.device) for c in given.cores] == [(4, 2), (5, 2)]
    assert given.source == "sysfs, NEURON_RT_VISIBLE_CORES" and len(host.cores) == 12
    [g] = pod.pod_plan(load(tmp_path), "emb", given).groups
    assert g.cores == [4, 5] and g.env["NEURON_RT_VISIBLE_CORES"] == "4-5" and "NEURON_RT_NUM_CORES" not in g.env
    assert g.env["NEURON_PROCESS_TAG"] == "emb-0" and g.env["NEURONSERVE_BACKEND"] == "neuron"
    # unset: every core discovery found; a core the host lacks, or none at all, is an error that says so
    assert given_cores(host, {}) is host
    with pytest.raises(DeviceError, match=r"NEURON_RT_VISIBLE_CORES='12-13' names 12-13, which this host does "
                                          r"not have \(neuron cores found by sysfs: 0-11\)"):
        given_cores(host, {"NEURON_RT_VISIBLE_CORES": "12-13"})
    with pytest.raises(DeviceError, match="NEURON_RT_VISIBLE_CORES='': '' is not a core list"):
        given_cores(host, {"NEURON_RT_VISIBLE_CORES": ""})


def test_cuda_pod_takes_gpus_by_index_or_uuid(tmp_path):
    host = cuda.discover(nvml=False, run=smi("p3.8xlarge"), nvidia_smi=SMI, cpus=list(range(32)))
    by_uuid = given_cores(host, {"CUDA_VISIBLE_DEVICES": "GPU-c2a95e73-1f8b-40d6-b37a-6e5d2c1f0a98,3"})
    assert [c.index for c in by_uuid.cores] == [2, 3]
    [g] = pod.pod_plan(load(tmp_path), "emb", by_uuid).groups
    assert g.env["CUDA_VISIBLE_DEVICES"] == "2,3" and g.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # the indices are PCI bus order (nvidia-smi's, NVML's): the container's own CUDA_DEVICE_ORDER (CUDA's default
    # is FASTEST_FIRST) and its device plugin's UUIDs give way to the group's
    _, env = pod.command(pod.pod_plan(load(tmp_path), "emb", by_uuid), tmp_path / "scratch",
                         {"CUDA_DEVICE_ORDER": "FASTEST_FIRST",
                          "CUDA_VISIBLE_DEVICES": "GPU-c2a95e73-1f8b-40d6-b37a-6e5d2c1f0a98,3"})
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(DeviceError, match="'GPU-nope' is neither a GPU index nor the UUID of one"):
        given_cores(host, {"CUDA_VISIBLE_DEVICES": "GPU-nope"})
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES='' names no core"):
        given_cores(host, {"CUDA_VISIBLE_DEVICES": ""})


def test_the_command_says_what_is_missing_before_it_execs(tmp_path):
    from click.testing import CliRunner

    from neuronserve.cli import main

    path = tmp_path / "neuronserve.toml"
    path.write_text(f'[server]\nbackend = "cpu"\nmodel_repository = "{tmp_path}/models"\n'
                    '[models.emb]\ntask = "feature-extraction"\nsource = "/src/emb"\n')
    unknown = CliRunner().invoke(main, ["pod", "--model", "qa", "--config", str(path)])
    assert unknown.exit_code == 2 and "no [models.qa]" in unknown.output and "configured: emb" in unknown.output
    uncompiled = CliRunner().invoke(main, ["pod", "--model", "emb", "--config", str(path)])
    assert uncompiled.exit_code == 1
    assert f"{tmp_path}/models/emb/manifest.json: no compiled model here" in uncompiled.output


def test_until_the_exec_sigterm_and_sigint_end_the_pod_at_once(tmp_path, monkeypatch):
    # PID 1 ignores signals it has no handler for: the pod sets one until it becomes gunicorn
    import signal

    seen = {}

    class Execed(Exception):
        pass

    def execve(path, argv, env):
        seen.update({sig: signal.getsignal(sig) for sig in pod.STOP_SIGNALS}, argv=argv)
        raise Execed

    cgroup_v2(tmp_path / "fs", "/", {"/": "max 100000"})
    real = cpu.discover
    monkeypatch.setattr(cpu, "discover", lambda **kw: real(affinity={0, 1}, root=tmp_path / "fs", **kw))
    monkeypatch.setattr(pod, "read_manifest", lambda *a, **kw: None)
    monkeypatch.setattr(pod.os, "execve", execve)
    cfg = load(tmp_path, 'backend = "cpu"\n')
    before = {sig: signal.getsignal(sig) for sig in pod.STOP_SIGNALS}
    with pytest.raises(Execed):
        pod.run(cfg, "cls", environ={}, out=lambda line: None)
    assert seen[signal.SIGTERM] is seen[signal.SIGINT] is pod.stop_now and "gunicorn" in seen["argv"]
    # what failed before the exec gives the caller its handlers back
    assert {sig: signal.getsignal(sig) for sig in pod.STOP_SIGNALS} == before

    codes = []
    monkeypatch.setattr(pod.os, "_exit", codes.append)
    pod.stop_now(signal.SIGTERM)
    pod.stop_now(signal.SIGINT)
    assert codes == [143, 130]
