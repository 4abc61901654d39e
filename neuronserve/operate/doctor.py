"""`neuronserve doctor`: is this host ready to serve the config? A list of findings, each ok, warn or fail.

Checks, in order: the config; the backend's devices; device nodes and their permissions for the service
user; the Python environment that has the framework, and its torch, transformers and tokenizers versions; nginx;
the plan; ports; processes holding cores; compiled artifacts. Every probe of the machine goes through `Probes` (a
filesystem root for /dev, /proc, /opt and a tool runner), so tests replay recorded tool outputs over a fake tree.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, NamedTuple

from neuronserve import config
from neuronserve.build import artifact
from neuronserve.config import Config, format_core_list
from neuronserve.context import discovery_options
from neuronserve.devices import BACKENDS, Host, discover_host, run_tool
from neuronserve.devices import neuron as neuron_devices
from neuronserve.errors import ArtifactError, ConfigError, DeviceError, PlanError
from neuronserve.plan import APP, Plan, group_of_unit, make_plan
from neuronserve.operate.status import unit_of

Status = Literal["ok", "warn", "fail"]
UDEV_RULE = 'SUBSYSTEM=="neuron*", KERNEL=="neuron*", GROUP="neuron", MODE="0660"'
# NeuronCore-v2 artifacts run on both (AWS: compile on Trn1, deploy on Inf2)
SAME_CORES = {"inf2": {"inf2", "trn1"}, "trn1": {"inf2", "trn1"}}
DEVICE_NODES = {"neuron": "neuron", "cuda": "nvidia"}   # /dev/<prefix><N>
TCP_LISTEN = "0A"
# The ML environment's packages and the versions neuronserve supports, [floor, ceiling): the floors of transformers
# and tokenizers are setup.cfg's (the `models` extra), torch's is the one recent transformers releases hold to (they
# disable torch before 2.6); the ceilings are the first releases not tested yet.
ML_VERSIONS = {"torch": ("2.6", "3"), "transformers": ("5.9", "6"), "tokenizers": ("0.22.1", "0.24")}
# prints the installed versions (None where missing) as JSON, from the metadata: importing transformers takes seconds
ML_PROBE = ("import importlib.metadata as md, json; print(json.dumps({p: next((d.version for d in "
            f"md.distributions(name=p)), None) for p in {tuple(ML_VERSIONS)!r}}}))")


@dataclass(frozen=True)
class Finding:
    status: Status
    what: str
    fix: str = ""


class Account(NamedTuple):
    name: str
    uid: int
    gids: frozenset[int]


def lookup_user(name: str) -> Account | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(name, pw.pw_uid, frozenset(os.getgrouplist(name, pw.pw_gid)))


@dataclass
class Probes:
    root: Path = Path("/")                                  # /dev, /proc, /opt, /sys are read under it
    run: Callable[..., subprocess.CompletedProcess] = run_tool
    discover: dict = field(default_factory=dict)            # extra discover() kwargs per backend
    user: Callable[[str], Account | None] = lookup_user

    def path(self, p: str | Path) -> Path:
        return self.root / Path(p).relative_to("/")

    def discover_kwargs(self, cfg: Config) -> dict:
        # what the config says (context.discovery_options, as every command) plus this probe's run and root
        from_config = discovery_options(cfg)
        base = {"neuron": {"run": self.run, "root": self.root, **from_config["neuron"]},
                "cuda": {"run": self.run}, "cpu": {}}
        return {name: {**base[name], **self.discover.get(name, {})} for name in BACKENDS}


# ---------------------------------------------------------------- the checks

def diagnose(config_path: Path | None = None, *, backend: str | None = None,
             probes: Probes | None = None) -> list[Finding]:
    """Run every check; a missing or broken config is itself a finding and the rest run on defaults."""
    probes = probes or Probes()
    try:
        cfg = config.load(config_path)
        findings = [Finding("ok", f"config {', '.join(str(s) for s in cfg.sources)} is valid")]
    except ConfigError as e:
        cfg = Config()
        findings = [Finding("fail", f"config: {e}", "write or fix it (`neuronserve config` re-checks it), or pass "
                                                   "--config; the checks below use the defaults")]
    if backend:
        cfg.server.backend = backend
    host, found = _discover(cfg, probes)
    findings += found
    findings += _user_and_nodes(cfg, host, probes)
    if host is None:
        return findings
    findings += _python(cfg, host, probes)
    findings += _nginx(cfg, probes)
    plan, found = _plan(cfg, host)
    findings += found
    findings += _ports(cfg, plan, probes)
    findings += _holders(host, plan, probes)
    findings += _artifacts(cfg, host)
    return findings


def _discover(cfg: Config, probes: Probes) -> tuple[Host | None, list[Finding]]:
    kwargs = probes.discover_kwargs(cfg)
    wanted = cfg.server.backend
    absent = []
    for name in BACKENDS if wanted == "auto" else (wanted,):
        try:
            host = discover_host(name, **kwargs)
        except DeviceError as e:
            absent.append(f"{name}: {e}")
            continue
        devices = len({c.device for c in host.cores})
        kind = f" ({host.kind})" if host.kind != host.backend else ""
        what = f"backend {host.backend}{kind}: {len(host.cores)} cores on {devices} device(s), found by {host.source}"
        if absent:
            what += "; not present: " + "; ".join(absent)
        return host, [Finding("ok", what)]
    fixes = {"neuron": "install the Neuron driver and tools (aws-neuronx-dkms, aws-neuronx-tools; a Neuron DLAMI "
                       "has them) and check `lsmod | grep neuron`",
             "cuda": "install the NVIDIA driver and check `nvidia-smi`"}
    return None, [Finding("fail", "; ".join(absent), fixes.get(wanted, "set server.backend to one this host has"))]


def _user_and_nodes(cfg: Config, host: Host | None, probes: Probes) -> list[Finding]:
    user = cfg.server.user
    account = probes.user(user)
    if account is None:
        out = [Finding("warn", f"service user {user!r} does not exist",
                       f"install the neuronserve package (it creates the user), or "
                       f"`useradd --system --no-create-home --shell /usr/sbin/nologin {user}`")]
    else:
        out = [Finding("ok", f"service user {user!r} exists (uid {account.uid})")]
    backend = host.backend if host else cfg.server.backend
    if backend not in DEVICE_NODES:
        return out
    prefix = DEVICE_NODES[backend]
    nodes = sorted((p for p in _listdir(probes.path("/dev")) if re.fullmatch(prefix + r"\d+", p.name)),
                   key=lambda p: int(p.name[len(prefix):]))
    if not nodes:
        fix = ("load the driver (`sudo modprobe neuron`; package aws-neuronx-dkms)" if backend == "neuron"
               else "load the NVIDIA driver (`nvidia-smi` creates the nodes)")
        return out + [Finding("fail", f"no /dev/{prefix}* device nodes", fix)]
    if host is not None and len(nodes) < len({c.device for c in host.cores}):
        out.append(Finding("warn", f"{len(nodes)} device node(s) in /dev for {len({c.device for c in host.cores})} "
                                   f"device(s): some are hidden (container?)"))
    if account is None:
        return out
    closed = [(n, n.stat()) for n in nodes if not _may_open(account, n.stat())]
    names = format_core_list([int(n.name[len(prefix):]) for n in nodes])
    if not closed:
        return out + [Finding("ok", f"/dev/{prefix}* ({names}): read/write for {user!r}")]
    shown = ", ".join(f"/dev/{n.name} ({_owner(st)} {stat.S_IMODE(st.st_mode):04o})" for n, st in closed[:3])
    more = f" and {len(closed) - 3} more" if len(closed) > 3 else ""
    fix = (f"add the udev rule `{UDEV_RULE}` (/etc/udev/rules.d/90-neuron.rules), `sudo udevadm trigger`, "
           f"and `sudo usermod -aG neuron {user}`" if backend == "neuron"
           else f"add {user!r} to the group that owns the nodes (`sudo usermod -aG <group> {user}`)")
    return out + [Finding("fail", f"{user!r} cannot open {shown}{more}", fix)]


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _may_open(account: Account, st: os.stat_result) -> bool:
    """Read and write permission for the account, as the kernel decides it (owner, then group, then other)."""
    if account.uid == 0:
        return True
    if st.st_uid == account.uid:
        bits = stat.S_IRUSR | stat.S_IWUSR
    elif st.st_gid in account.gids:
        bits = stat.S_IRGRP | stat.S_IWGRP
    else:
        bits = stat.S_IROTH | stat.S_IWOTH
    return st.st_mode & bits == bits


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def _python(cfg: Config, host: Host, probes: Probes) -> list[Finding]:
    if host.backend == "neuron":
        module = neuron_devices.framework_module(host.kind)
        if cfg.server.python == "auto":
            python = neuron_devices.find_python(
                cfg, host.kind, root=probes.root,
                importable=lambda py, mod: neuron_devices.can_import(py, mod, probes.run))
            if python is None:
                return [Finding("fail", f"no DLAMI venv (/opt/{_venv_glob(host.kind)}) imports {module}",
                                f"use a Neuron DLAMI, or pip install {module.replace('_', '-')} into a venv and set "
                                "server.python to its python")]
            # find_python's probe only imports: the versions take one more
            return _ml_versions(host, python, module, probes.run([python, "-c", ML_PROBE], timeout=60))
        code = f"import {module}"
    else:
        module = "torch"
        code = ("import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" if host.backend == "cuda"
                else "import torch")
    python = sys.executable if cfg.server.python == "auto" else cfg.server.python
    # the versions first: sys.exit in the CUDA check ends the probe
    done = probes.run([python, "-c", f"{ML_PROBE}\n{code}"], timeout=120)
    if done.returncode == 0:
        return _ml_versions(host, python, module, done)
    why = "torch sees no GPU" if done.returncode == 3 else _last_line(done.stderr or done.stdout)
    return [Finding("fail", f"python {python} cannot use {module}: {why}",
                    "set server.python to an interpreter that has it" if cfg.server.python == "auto"
                    else f"install {module.replace('_', '-')} into that environment, or change server.python")]


def _ml_versions(host: Host, python: str, module: str, done: subprocess.CompletedProcess) -> list[Finding]:
    """The import's finding, with the ML packages' versions from ML_PROBE's output checked against ML_VERSIONS."""
    try:
        found = json.loads(_last_line(done.stdout) if done.returncode == 0 else "")
    except ValueError:
        return [Finding("ok", f"python {python} imports {module}"),
                Finding("warn", f"python {python}: no versions of {', '.join(ML_VERSIONS)} from it: "
                                f"{_last_line(done.stderr or done.stdout)}")]
    versions = ", ".join(f"{p} {v}" for p, v in found.items() if v)
    out = [Finding("ok", f"python {python} imports {module}" + (f" ({versions})" if versions else ""))]
    for package, (floor, ceiling) in ML_VERSIONS.items():
        version = found.get(package)
        wanted = f"{package}>={floor},<{ceiling}"
        fix = f"{python} -m pip install '{wanted}'"
        if package == "torch" and host.backend == "neuron":
            fix += " (on Neuron, torch comes with torch-neuronx: use a DLAMI venv whose torch is in that range)"
        if version is None:
            out.append(Finding("fail", f"python {python} has no {package}; neuronserve supports {wanted}", fix))
        elif _release(version) < _release(floor):
            out.append(Finding("fail", f"python {python} has {package} {version}, older than neuronserve "
                                       f"supports ({wanted})", fix))
        elif _release(version) >= _release(ceiling):
            out.append(Finding("warn", f"python {python} has {package} {version}, newer than neuronserve is "
                                       f"tested with ({wanted})", fix))
    return out


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0): the release numbers alone (no pre-release or local part), for ordering."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def _venv_glob(kind: str) -> str:
    return neuron_devices.INF1_VENVS + "inf1" if kind == "inf1" else neuron_devices.NEURONX_VENVS


def _last_line(text: str) -> str:
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def _nginx(cfg: Config, probes: Probes) -> list[Finding]:
    if not cfg.nginx.enabled:
        return [Finding("ok", "nginx disabled (nginx.enabled = false): clients talk to the groups directly")]
    # nginx lives in /usr/sbin, which is not on every user's PATH
    binary = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    done = probes.run([binary or "nginx", "-v"])
    if done.returncode != 0:
        return [Finding("fail", f"nginx is not usable: {_last_line(done.stderr or done.stdout)}",
                        "install it (`apt-get install nginx` or `dnf install nginx`), or set nginx.enabled = false")]
    return [Finding("ok", _last_line(done.stderr or done.stdout))]


def _plan(cfg: Config, host: Host) -> tuple[Plan | None, list[Finding]]:
    if not cfg.models:
        return None, [Finding("warn", "no models configured: nothing would be served",
                              "add a [models.<name>] table (see `neuronserve config --reference`)")]
    try:
        plan = make_plan(cfg, host, python=sys.executable)
    except PlanError as e:
        return None, [Finding("fail", f"plan: {e}")]
    return plan, [Finding("ok", f"plan: {len(plan.groups)} group(s): "
                                + ", ".join(f"{g.name} (cores {g.core_list})" for g in plan.groups))]


# ---------------------------------------------------------------- ports and processes, from /proc

def _ports(cfg: Config, plan: Plan | None, probes: Probes) -> list[Finding]:
    wanted: list[tuple[str, int]] = [(f"group {g.name}", g.port) for g in plan.groups] if plan else []
    wanted += [(f"group {g.name} gRPC", g.grpc_port) for g in plan.groups if g.grpc_port] if plan else []
    for key in ("listen", "grpc_listen"):
        front = getattr(cfg.nginx, key).rsplit(":", 1)[-1]
        if cfg.nginx.enabled and front.isdigit():
            wanted.append((f"nginx.{key}", int(front)))
    listening = _listening(probes)
    out, free = [], []
    for who, port in wanted:
        if port not in listening:
            free.append(port)
            continue
        owners = _socket_owners(listening[port], probes)
        if who.startswith("nginx."):
            ours = [o for o in owners if _is_nginx(o[1])] and probes.path(cfg.nginx.conf_path).exists()
        else:
            ours = owners and all(_is_neuronserve(pid, cmd, probes) for pid, cmd in owners)
        held = ", ".join(f"PID {pid} ({cmd[:60]})" for pid, cmd in owners) or "a process this user cannot see"
        if ours:
            out.append(Finding("ok", f"port {port} ({who}) is held by neuronserve: {held}"))
        else:
            out.append(Finding("fail", f"port {port} ({who}) is already in use by {held}",
                               "stop that process (`ss -ltnp 'sport = :%d'` shows it) or move "
                               "server.base_port, server.grpc_base_port, nginx.listen or nginx.grpc_listen" % port))
    if free:
        out.insert(0, Finding("ok", f"port(s) {', '.join(map(str, free))} free"))
    return out


def _listening(probes: Probes) -> dict[int, set[str]]:
    """port -> socket inodes listening on it (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    out: dict[int, set[str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = probes.path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == TCP_LISTEN:
                out.setdefault(int(parts[1].rsplit(":", 1)[1], 16), set()).add(parts[9])
    return out


def _socket_owners(inodes: set[str], probes: Probes) -> list[tuple[int, str]]:
    links = {f"socket:[{i}]" for i in inodes}
    owners = []
    for pid_dir in _listdir(probes.path("/proc")):
        if not pid_dir.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in links for fd in (pid_dir / "fd").iterdir()):
                owners.append((int(pid_dir.name), _cmdline(pid_dir)))
        except OSError:   # exited meanwhile, or another user's (not root)
            continue
    return owners


def _cmdline(pid_dir: Path) -> str:
    try:
        return pid_dir.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _unit_of(pid: int, probes: Probes) -> str | None:
    """The group unit (neuronserve@<group>.service, or an earlier version's neuronserve-<group>.service) the
    process runs in, or None."""
    unit = unit_of(pid, probes.path("/proc"))
    return unit if unit is not None and group_of_unit(unit) is not None else None


def _is_neuronserve(pid: int, cmdline: str, probes: Probes) -> bool:
    """A group's process: in a group unit's cgroup, or running the app (`neuronserve up`)."""
    return _unit_of(pid, probes) is not None or APP in cmdline


def _is_nginx(cmdline: str) -> bool:
    return cmdline.startswith("nginx") or "/nginx" in cmdline.split(" ")[0]


def _holders(host: Host, plan: Plan | None, probes: Probes) -> list[Finding]:
    """Processes holding cores. On Neuron a core serves one process: a foreign holder of a planned core is fatal."""
    by_pid: dict[int, tuple[str, set[int], set[int]]] = {}
    for h in host.holders:
        command, devices, cores = by_pid.setdefault(h.pid, (h.command, set(), set()))
        devices.add(h.device)
        cores.update(h.cores)
    out = []
    for pid, (command, devices, cores) in sorted(by_pid.items()):
        where = f"{host.backend} device(s) {format_core_list(sorted(devices))}"
        if host.backend == "neuron":
            where += f" (cores {format_core_list(sorted(cores))})"
        proc = probes.path(f"/proc/{pid}")
        if not proc.exists():
            out.append(Finding("warn", f"PID {pid} ({command[:60]}) is listed on {where} but has exited",
                               "the driver frees its cores when it notices; if groups then fail with "
                               "'NeuronCore(s) not available', reload the driver "
                               "(`sudo rmmod neuron && sudo modprobe neuron`)"))
            continue
        cmdline = _cmdline(proc)
        if _is_neuronserve(pid, cmdline, probes):
            unit = _unit_of(pid, probes) or "neuronserve up"
            out.append(Finding("ok", f"PID {pid} ({unit}) holds {where}"))
            continue
        blocked = [g.name for g in plan.groups if cores & set(g.cores)] if plan else []
        if host.backend == "neuron" and blocked:
            out.append(Finding("fail", f"PID {pid} ({cmdline[:60] or command[:60]}) holds {where}: group(s) "
                                       f"{', '.join(blocked)} will fail with 'NeuronCore(s) not available'",
                               f"stop it (`kill {pid}`), or keep the models off those cores (models.<name>.cores)"))
        else:
            out.append(Finding("warn", f"PID {pid} ({cmdline[:60] or command[:60]}) uses {where}"))
    return out


# ---------------------------------------------------------------- artifacts

def _artifacts(cfg: Config, host: Host) -> list[Finding]:
    out = []
    for name, model in cfg.models.items():
        directory = Path(cfg.server.model_repository) / name
        fix = f"run `neuronserve compile {name}`"
        try:
            manifest = artifact.read_manifest(directory, backend=host.backend, verify=False)
        except ArtifactError as e:
            out.append(Finding("fail", f"model {name}: {e}", fix))
            continue
        if host.backend == "neuron" and manifest.target not in SAME_CORES.get(host.kind, {host.kind}):
            out.append(Finding("fail", f"model {name}: compiled for {manifest.target}, this host is {host.kind}", fix))
            continue
        missing = [b.file for b in manifest.buckets if not (directory / b.file).is_file()]
        if missing:
            out.append(Finding("fail", f"model {name}: artifact file(s) missing in {directory}: {', '.join(missing)}",
                               fix))
            continue
        compiled = {(b.batch, b.seq) for b in manifest.buckets}
        wanted = {(b, s) for b in model.batch_sizes for s in model.sequence_lengths}
        if wanted - compiled:
            lacking = ", ".join(f"b{b}_s{s}" for b, s in sorted(wanted - compiled))
            out.append(Finding("warn", f"model {name}: the config asks for bucket(s) not compiled: {lacking}",
                               f"{fix} again"))
            continue
        out.append(Finding("ok", f"model {name}: {len(manifest.buckets)} bucket(s) compiled for "
                                 f"{manifest.backend} ({manifest.target}) in {directory}"))
    return out


# ---------------------------------------------------------------- output

def failed(findings: list[Finding]) -> bool:
    return any(f.status == "fail" for f in findings)


def as_dict(findings: list[Finding]) -> dict:
    return {"ok": not failed(findings), "findings": [asdict(f) for f in findings]}


def as_text(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{f.status.upper():<5} {f.what}")
        if f.fix and f.status != "ok":
            lines.append(f"      fix: {f.fix}")
    counts = {s: sum(f.status == s for f in findings) for s in ("ok", "warn", "fail")}
    lines.append(f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)")
    return "\n".join(lines)
