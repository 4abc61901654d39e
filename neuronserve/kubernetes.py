"""Config -> Kubernetes manifests: per model, a Deployment whose pods each serve ONE core group ("pod mode").

A pod runs `neuronserve pod --model <name>` from the image built from the .deb: one gunicorn with one worker,
listening on the port of nginx.listen (gRPC on nginx.grpc_listen's), with the cores the device plugin gives it
(aws.amazon.com/neuroncore, nvidia.com/gpu) or the CPUs of its cgroup. There is no nginx in the pod: the
Service balances over the pods, the Deployment rolls them, the autoscaler adds pods on the queue depth.

The groups are planned as on a host, on a stand-in host with exactly one group's cores per model
(`cluster_plan`), so a model's pod asks for what one of its groups owns: its NeuronCores or GPUs with
kubernetes.cpu_per_core CPUs each, or its CPUs; and kubernetes.memory, or for a CPU model compiled here the memory
the plan counts for it. Every container's requests equal its limits, for cpu and memory too: the pods are of the
Guaranteed QoS class, the last a node under memory pressure evicts. Which accelerator the nodes have is the
cluster's to say, not this host's: the backend must be named (server.backend or --backend), and the pods' config
pins it.

Files (under the output directory; `kubectl apply -f DIR` takes the top level only):
  00-namespace.yaml              the namespace, unless it is "default"
  10-config.yaml                 ConfigMap neuronserve-config: the config files as they are, + the pinned backend
  20-neuronserve-<model>.yaml    Deployment, Service, PodDisruptionBudget, HorizontalPodAutoscaler
  prometheus/<name>.yaml         ServiceMonitor per model (Prometheus Operator)
  prometheus-adapter/values.yaml the prometheus-adapter Helm values exposing neuronserve_queue_depth
  kserve/<name>.yaml             ServingRuntime + InferenceService per model, when models come from a PVC
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

from neuronserve.config import DEFAULT_PATH, Config
from neuronserve.devices import Core, Host
from neuronserve.errors import ConfigError, RenderError
from neuronserve.layout import Layout
from neuronserve.plan import Plan, listen_port, make_plan
from neuronserve.render import HEADER, render_template, template_env

# the server's routes (server/app.py) and the gauge the autoscaler reads (server/metrics.py)
READY_PATH, LIVE_PATH, METRICS_PATH = "/v2/health/ready", "/v2/health/live", "/metrics"
QUEUE_METRIC = "neuronserve_queue_depth"
# the device plugins' resources, and the taints EKS's accelerated node groups are usually given
DEVICE_RESOURCES = {"neuron": "aws.amazon.com/neuroncore", "cuda": "nvidia.com/gpu"}
DEVICE_TAINTS = {"neuron": "aws.amazon.com/neuron", "cuda": "nvidia.com/gpu"}
COMPILE = "compile"
CONFIG_MAP = "neuronserve-config"
# sorts after a sysadmin's conf.d files, so the backend the pods' resources were rendered for wins
BACKEND_DROPIN = "zz-kubernetes.toml"
STARTUP_PERIOD_S = 5
# python, torch, the tokenizer and a batch's activations, resident beside the weights footprint counts
PROCESS_MEMORY = 1 << 30
# Kubernetes quantity suffixes (the ones config.KubernetesSection.memory accepts)
_MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
# gunicorn's master exits a moment after its worker's graceful timeout
STOP_MARGIN_S = 5
# scalars YAML 1.1 (PyYAML) and 1.2 (kubectl) read alike in a literal block: printable, no other line breaks
_BLOCK_SAFE = re.compile("[\t\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]*")


def backend_of(cfg: Config) -> str:
    """The backend the pods are rendered for: named, never "auto" (the nodes decide, not this host)."""
    if cfg.server.backend == "auto":
        raise ConfigError("server.backend is auto, and which accelerator the pods get is the cluster's nodes' to "
                          "say, not this host's: pass --backend neuron, cuda or cpu (or set server.backend)")
    return cfg.server.backend


def cluster_plan(cfg: Config) -> Plan:
    """The plan of one pod per model: each model gets one group of cores_per_group cores on a stand-in host
    (models.*.groups and .cores describe a host's cores, not a cluster's). Refuses what make_plan refuses."""
    backend = backend_of(cfg)
    models = {name: m.model_copy(update={"groups": 1, "cores": None}) for name, m in cfg.models.items()}
    count = sum(m.cores_per_group for m in models.values())
    cores = list(range(count))
    # kind: what the nodes are is theirs to tell the pod; nothing rendered here depends on it
    host = Host(backend=backend, kind=backend, cores=[Core(c, c, (c,)) for c in cores], source="kubernetes pods",
                details={"cpus": cores})
    return make_plan(cfg.model_copy(update={"models": models}), host, python=sys.executable)


def object_names(cfg: Config) -> dict[str, str]:
    """model -> the name of its objects: a DNS label, which model names (with '_', or ending in '-') need not be."""
    names = {m: "neuronserve-" + re.sub(r"[^a-z0-9]+", "-", m).strip("-") for m in cfg.models}
    seen: dict[str, str] = {}
    for model, name in names.items():
        if name in seen:
            raise RenderError(f"models.{seen[name]} and models.{model} would both be named {name} in Kubernetes: "
                              "rename one")
        seen[name] = model
    return names


def config_files(cfg: Config) -> list[dict]:
    """The pods' /etc/neuronserve: each config file as it is (key, path under it, text), then a drop-in that pins
    the backend the manifests were rendered for."""
    if not cfg.sources:
        raise RenderError("rendering for Kubernetes needs the config file itself (the pods get it verbatim)")
    main, *dropins = cfg.sources
    out = [dict(key=DEFAULT_PATH.name, path=DEFAULT_PATH.name, text=_read(main))]
    for f in dropins:
        out.append(dict(key="conf.d." + re.sub(r"[^-._a-zA-Z0-9]", "-", f.name), path=f"conf.d/{f.name}",
                        text=_read(f)))
    out.append(dict(key="conf.d." + BACKEND_DROPIN, path=f"conf.d/{BACKEND_DROPIN}",
                    text=f"# {HEADER}: the backend the pods' resources were rendered for\n"
                         f"[server]\nbackend = \"{backend_of(cfg)}\"\n"))
    keys = [f["key"] for f in out]
    if len(set(keys)) != len(keys):
        raise RenderError(f"two config files share a ConfigMap key once sanitised: {', '.join(keys)}; rename one")
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None


def yaml_block(text: str, indent: int) -> str:
    """A string as a YAML literal block whose lines start at column `indent` (one level below its key), read
    back exactly; a quoted (JSON) scalar when a block cannot hold it (only line breaks, control characters,
    CR or another line break)."""
    if not text.strip("\n") or not _BLOCK_SAFE.fullmatch(text):
        return json.dumps(text)
    trailing = len(text) - len(text.rstrip("\n"))
    chomp = "-" if trailing == 0 else "" if trailing == 1 else "+"
    lines = text.split("\n")[:-1] if trailing else text.split("\n")
    pad = " " * indent
    # an explicit indentation indicator: the first line may itself start with spaces
    return f"|2{chomp}\n" + "\n".join(pad + line if line else "" for line in lines)


def quantity(value: float) -> str:
    """A Kubernetes quantity of `value`: a plain decimal, never Python's exponent form, of at most three decimal
    places (finer, Kubernetes rounds a quantity up to the next thousandth: so does this, keeping at least 0.001)."""
    milli = value * 1000
    whole = round(milli)
    milli = whole if abs(milli - whole) < 1e-6 else math.ceil(milli)
    milli = max(1, milli)
    units, frac = divmod(milli, 1000)
    return str(units) if not frac else f"{units}.{frac:03d}".rstrip("0")


def memory_bytes(text: str) -> int:
    """A Kubernetes memory quantity (config.KubernetesSection.memory's form) in bytes."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text).groups()
    return math.ceil(float(number) * _MEMORY_UNITS[unit])


def _resources(plan: Plan, model: str, group) -> dict[str, str]:
    """One container's requests (= its limits): the group's device cores and kubernetes.cpu_per_core CPUs each,
    or its CPUs; kubernetes.memory, or what the plan counts for a CPU model compiled here."""
    k8s, backend, cores = plan.config.kubernetes, plan.host.backend, len(group.cores)
    if backend in DEVICE_RESOURCES:
        requests = {DEVICE_RESOURCES[backend]: str(cores), "cpu": quantity(cores * k8s.cpu_per_core)}
    else:
        requests = {"cpu": str(cores)}
    footprint = plan.footprints.get(group.name)
    counted = footprint.host_bytes + PROCESS_MEMORY if backend == "cpu" and footprint is not None else None
    if k8s.memory is None:
        if counted is None:
            why = ("the plan counts a Neuron or CUDA model's device memory, not the host memory its pod needs"
                   if backend != "cpu" else f"models.{model} is not compiled in {plan.config.server.model_repository}"
                                            " here, so the plan cannot count its memory")
            raise ConfigError(f"kubernetes.memory is not set and {why}: set it to each pod's memory, requested and "
                              "its limit, e.g. memory = \"4Gi\" (the process holds about 1 GiB before the model)")
        requests["memory"] = f"{math.ceil(counted / (1 << 20))}Mi"
    else:
        if memory_bytes(k8s.memory) < PROCESS_MEMORY:
            raise ConfigError(f"kubernetes.memory {k8s.memory} is less than the 1Gi a pod's process holds before "
                              "any model (python, torch, the tokenizer)")
        if counted is not None and memory_bytes(k8s.memory) < counted:
            raise ConfigError(f"kubernetes.memory {k8s.memory} is less than the {math.ceil(counted / (1 << 20))}Mi "
                              f"the plan counts for models.{model} (its traces + 1 GiB for the process): raise it, "
                              "or unset it for each CPU model's own count")
        requests["memory"] = k8s.memory
    return requests


def _pod(plan: Plan, names: dict[str, str], model: str, config: list[dict]) -> dict:
    """What the templates need of one model's pod."""
    cfg = plan.config
    k8s, server = cfg.kubernetes, cfg.server
    group = plan.by_model()[model][0]
    requests = _resources(plan, model, group)
    compile_ = k8s.model_volume == COMPILE
    source = cfg.models[model].source
    if compile_ and not source.startswith("/"):
        # a hub id, or a path relative to the config (in the pod: /etc/neuronserve): neither is on sources_claim
        raise ConfigError(f"models.{model}.source {source!r} is not a directory under kubernetes.sources_path "
                          f"({k8s.sources_path}), and with kubernetes.model_volume = 'compile' the initContainer "
                          "compiles from there: the image runs offline (HF_HUB_OFFLINE=1), so it cannot download "
                          "a hub id. Put the model's Hugging Face directory on kubernetes.sources_claim and set "
                          f"source to its absolute path under {k8s.sources_path}, or compile it here and serve "
                          "the repository from a PersistentVolumeClaim (kubernetes.model_volume)")
    if compile_ and not Path(source).is_relative_to(k8s.sources_path):
        raise ConfigError(f"models.{model}.source {source} is not under kubernetes.sources_path "
                          f"({k8s.sources_path}), where the compile initContainer finds the sources")
    if compile_ and not k8s.sources_claim:
        raise ConfigError(f"models.{model}.source is a directory and kubernetes.model_volume is 'compile': set "
                          "kubernetes.sources_claim to the PersistentVolumeClaim holding it")
    name = names[model]
    labels = {"app.kubernetes.io/name": "neuronserve", "app.kubernetes.io/instance": name}
    return dict(
        model=model, name=name,
        labels=labels, monitor_labels={**labels, **k8s.service_monitor_labels},
        # requests = limits for cpu and memory in every container: Guaranteed QoS (a static CPU manager gives
        # such a pod exclusive CPUs when it asks for whole ones)
        resources={"requests": requests, "limits": requests},
        # minAvailable 1 with a lone pod: a drain waits for a second one rather than take the model to none
        pdb={"maxUnavailable": 1} if k8s.replicas >= 2 else {"minAvailable": 1},
        taint=DEVICE_TAINTS.get(plan.host.backend),
        http_port=listen_port(cfg.nginx.listen),
        grpc_port=listen_port(cfg.nginx.grpc_listen) if cfg.nginx.grpc_listen else None,
        startup_failures=max(1, math.ceil(server.start_timeout_s / STARTUP_PERIOD_S)),
        grace_s=math.ceil(server.graceful_timeout_s) + k8s.prestop_delay_s + STOP_MARGIN_S,
        config_sha256=hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        compile=compile_)


def render_files(layout: Layout, out_dir: Path) -> dict[Path, str]:
    """Every manifest for layout.config's models under out_dir: path -> content, for render.write_files.
    Templates: kubernetes/*.yaml.j2, overridable from <root>/etc/neuronserve/templates/kubernetes/."""
    cfg = layout.config
    k8s = cfg.kubernetes
    if not k8s.image:
        raise ConfigError("kubernetes.image is not set: name the image built from the .deb that runs "
                          "`neuronserve pod`, e.g. registry.example.com/neuronserve:0.2.0")
    plan = cluster_plan(cfg)
    names = object_names(cfg)
    config = config_files(cfg)
    jenv = template_env(layout)
    jenv.filters.update(json=json.dumps, yaml_block=yaml_block)
    common = dict(k8s=k8s, ns=k8s.namespace, image=k8s.image, backend=plan.host.backend, config_map=CONFIG_MAP,
                  config_dir=str(DEFAULT_PATH.parent), model_repository=str(cfg.server.model_repository),
                  ready_path=READY_PATH, live_path=LIVE_PATH, metrics_path=METRICS_PATH, metric=QUEUE_METRIC,
                  startup_period_s=STARTUP_PERIOD_S, files=config,
                  queue_target=quantity(k8s.queue_depth_target))
    out_dir = Path(out_dir)
    files = {}
    if k8s.namespace != "default":
        files[out_dir / "00-namespace.yaml"] = render_template(jenv, "kubernetes/namespace.yaml.j2", **common)
    files[out_dir / "10-config.yaml"] = render_template(jenv, "kubernetes/config.yaml.j2", **common)
    for model in cfg.models:
        pod = _pod(plan, names, model, config)
        files[out_dir / f"20-{pod['name']}.yaml"] = render_template(jenv, "kubernetes/model.yaml.j2", pod=pod, **common)
        files[out_dir / "prometheus" / f"{pod['name']}.yaml"] = render_template(
            jenv, "kubernetes/servicemonitor.yaml.j2", pod=pod, **common)
        if not pod["compile"]:
            files[out_dir / "kserve" / f"{pod['name']}.yaml"] = render_template(
                jenv, "kubernetes/kserve.yaml.j2", pod=pod, **common)
    files[out_dir / "prometheus-adapter" / "values.yaml"] = render_template(
        jenv, "kubernetes/prometheus-adapter.yaml.j2", **common)
    return files


def stale_files(out_dir: Path, files: dict[Path, str]) -> list[Path]:
    """Manifests render wrote into out_dir earlier that it no longer writes (a model removed, or renamed)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.rglob("*.yaml") if p not in files and HEADER in _read(p))
