"""The one configuration object: /etc/neuronserve/neuronserve.toml plus conf.d/*.toml drop-ins.

Every error a sysadmin can make in the file is reported as ``file:line: key: message`` (ConfigError),
never as a traceback. Drop-ins are merged table by table in name order, so a later file overrides a key
of an earlier one; each key remembers which file and line it came from, for the error messages.
"""
from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:       # Python 3.10 (Ubuntu 22.04 DLAMIs)
    import tomli as tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neuronserve.errors import ConfigError

DEFAULT_PATH = Path("/etc/neuronserve/neuronserve.toml")

Backend = Literal["auto", "neuron", "cuda", "cpu"]
# the task registry's names (neuronserve.tasks.TASKS; a test keeps the two equal: config must not import tasks)
Task = Literal["feature-extraction", "text-classification", "question-answering", "token-classification",
               "fill-mask", "zero-shot-classification"]
NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,39}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_core_list(spec: str | list[int]) -> list[int]:
    """``"0-3,6"`` or ``[0, 1]`` -> sorted unique core indices. Raises ValueError with the reason."""
    if isinstance(spec, list):
        cores = spec
    else:
        cores = []
        for part in str(spec).replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"{spec!r} is not a core list like '0-3,6'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"range {part!r} runs backwards")
            cores.extend(range(lo, hi + 1))
    if any(c < 0 for c in cores):
        raise ValueError("core indices are never negative")
    if len(set(cores)) != len(cores):
        raise ValueError(f"core list {spec!r} names a core twice")
    return sorted(cores)


def format_core_list(cores: list[int]) -> str:
    """[0,1,2,5] -> "0-2,5": the form NEURON_RT_VISIBLE_CORES and CPUAffinity= accept."""
    out, cores = [], sorted(cores)
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        out.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(out)


class ServerSection(_Section):
    """Host-wide settings."""

    backend: Backend = Field("auto", description="accelerator to serve on: auto picks neuron, then cuda, then cpu")
    model_repository: Path = Field(Path("/var/lib/neuronserve/models"),
                                   description="where `neuronserve compile` writes artifacts and the groups read them")
    base_port: int = Field(8100, ge=1024, le=65000,
                           description="group i listens on 127.0.0.1:base_port+i (never on a public address)")
    grpc_base_port: int | None = Field(None, ge=1024, le=65000,
                                       description="group i serves KServe v2 gRPC on 127.0.0.1:grpc_base_port+i, "
                                                   "unless nginx.grpc_listen is empty; default: base_port + 1000")
    python: str = Field("auto", description="interpreter that has torch (and torch-neuronx on Neuron); auto: a "
                                            "DLAMI venv that imports the backend's framework, else this one. In "
                                            "a packaged install it names the ML environment `neuronserve env "
                                            "--link` joins, and the units run neuronserve's own venv")
    user: str = Field("neuronserve", description="unprivileged user the units run as")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="gunicorn's and the workers' log level: debug, info, warning or error")
    timeout_s: float = Field(30.0, gt=0, le=3600,
                             description="a request that has not been answered by then gets 504")
    graceful_timeout_s: float = Field(30.0, gt=0, le=3600,
                                      description="how long a stopping group may finish in-flight requests")
    start_timeout_s: float = Field(600.0, gt=0, le=86400,
                                   description="how long systemd waits for a group to load and warm up every copy "
                                               "(READY=1) before it fails the start")
    watchdog_s: float = Field(30.0, ge=0, le=3600,
                              description="systemd restarts a group whose event loop has not turned for this long "
                                          "(WatchdogSec=); 0: no watchdog")


class NginxSection(_Section):
    """The front: the only listener clients reach."""

    enabled: bool = Field(True, description="render and run the nginx front; false: clients talk to the groups' "
                                            "ports on 127.0.0.1 directly")
    listen: str = Field("0.0.0.0:8080", description="address:port nginx listens on")
    grpc_listen: str = Field("0.0.0.0:8081", description="address:port of the front's KServe v2 gRPC (HTTP/2) "
                                                         "listener; empty: no gRPC, here or on the groups")
    conf_path: Path = Field(Path("/etc/nginx/conf.d/neuronserve.conf"), description="where the front config is written")
    client_max_body_size: str = Field("1m", pattern=r"^\d+[kKmM]?$", description="larger bodies get 413")
    keepalive: int = Field(64, ge=0, le=4096, description="idle keepalive connections kept open to each group")
    max_fails: int = Field(0, ge=0, description="passive health check: failures before a group is skipped for "
                                                "fail_timeout_s; 0 never skips one (a refused or 503'd request "
                                                "simply moves to the next group, which on the loopback costs "
                                                "nothing, so an overload or a restart never empties a model)")
    fail_timeout_s: int = Field(2, ge=1, description="how long a failed group is skipped")
    auth_token_file: Path | None = Field(None, description="if set, clients must send 'Authorization: Bearer <token>' "
                                                           "with the token in this file")
    rate_limit: str | None = Field(None, pattern=r"^\d+r/[sm]$", description="per-client request rate, e.g. '100r/s'")
    rate_limit_burst: int | None = Field(None, ge=0, description="requests a client may send at once above "
                                         "rate_limit before getting 429; default: one second's worth")

    @field_validator("listen", "grpc_listen")
    @classmethod
    def _listen(cls, v: str, info) -> str:
        # written into nginx's config unquoted and parsed by `up` and `doctor`: only address:port gets through
        if not v and info.field_name == "grpc_listen":
            return v
        m = re.fullmatch(r"(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+|\*):)?(\d{1,5})", v)
        if not m or not 1 <= int(m.group(1)) <= 65535:
            raise ValueError(f"{v!r} is not [address:]port, e.g. '0.0.0.0:8080', '[::]:8080' or '8080'")
        return v


class NeuronSection(_Section):
    compiler_args: list[str] = Field(["--auto-cast", "matmult", "--auto-cast-type", "bf16"],
                                     description="neuronx-cc arguments for `compile` on Inf2/Trn")
    inf1_compiler_args: list[str] = Field([], description="neuron-cc arguments for `compile` on Inf1")
    exec_timeout_s: int = Field(10, ge=1, description="NEURON_RT_EXEC_TIMEOUT; kept below server.timeout_s")
    log_level: Literal["ERROR", "WARNING", "INFO", "DEBUG", "TRACE"] = Field(
        "WARNING", description="NEURON_RT_LOG_LEVEL: ERROR, WARNING, INFO, DEBUG or TRACE")
    async_inflight: int = Field(3, ge=1, le=64, description="NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS")
    tools_dir: Path = Field(Path("/opt/aws/neuron/bin"), description="where neuron-ls and neuron-monitor live")


class CudaSection(_Section):
    half: bool = Field(True, description="trace in float16 on the GPU")


class CpuSection(_Section):
    threads_per_copy: int | Literal["auto"] = Field(
        "auto", description="torch intra-op threads per model copy; auto: the group's CPUs divided by its copies")
    lend_idle_cpus: bool = Field(
        True, description="a lone batch (nothing else queued in its group) also runs on the CPUs of CPU groups "
                          "that are idle at that moment, with as many more threads; kept per bucket only where "
                          "measured faster")
    lend_min_batch_ms: float = Field(
        10.0, ge=0, description="lend only for buckets whose batch takes at least this long on the group's own "
                                "CPUs: re-sizing torch's thread pools costs milliseconds of CPU around a lent batch "
                                "(a 5 ms batch lost to it, a 13 ms one gained)")


class MonitoringSection(_Section):
    """What `neuronserve render --prometheus DIR` writes for Prometheus: scrape targets and alert thresholds."""

    hosts: list[str] = Field([], description="address:port of each host's nginx front that Prometheus scrapes "
                                             "(every host serving this config's groups); empty: this host's "
                                             "nginx.listen")
    scrape_interval_s: int = Field(15, ge=1, le=300, description="how often Prometheus scrapes each group and "
                                                                 "evaluates the rules; rates span 4 of them")
    p99_objective_ms: float = Field(500.0, gt=0, description="alert when a group's p99 request time stays above "
                                                             "this")
    queue_saturation: float = Field(0.8, gt=0, le=1, description="alert when a group's queue stays fuller than "
                                                                 "this share of its max_queue")
    padding_waste: float = Field(0.5, gt=0, lt=1, description="alert when more than this share of the token "
                                                              "positions a group executes is padding (add "
                                                              "buckets closer to the traffic's lengths)")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        # written into the targets file and dialled by Prometheus: only address:port gets through
        for host in v:
            m = re.fullmatch(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})", host)
            if not m or not 1 <= int(m.group(1)) <= 65535:
                raise ValueError(f"{host!r} is not address:port, e.g. '10.0.0.5:8080' or '[fd00::5]:8080'")
        if len(set(v)) != len(v):
            raise ValueError("a host is listed twice")
        return v


class KubernetesSection(_Section):
    """What `neuronserve render --kubernetes DIR` writes: one Deployment of single-group pods per model."""

    image: str | None = Field(None, description="the container image built from the .deb that runs `neuronserve "
                                                "pod`; required to render for Kubernetes")
    namespace: str = Field("neuronserve", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                           description="namespace of every rendered object (a Namespace object is rendered "
                                       "unless it is 'default')")
    uid: int | None = Field(None, ge=1, description="numeric user (and group) id the pods run as; unset: the "
                                                    "image's own user, which packaging/image.py names by uid so "
                                                    "that runAsNonRoot can check it")
    replicas: int = Field(2, ge=1, le=1000, description="pods per model, each serving one core group: the "
                                                        "autoscaler's minReplicas (the Deployment leaves its scale "
                                                        "to the autoscaler). With 1, the disruption budget lets a "
                                                        "node drain evict the pod only while another one is ready: "
                                                        "a drain waits for a second pod instead of taking the model "
                                                        "to none")
    max_replicas: int = Field(8, ge=1, le=1000, description="most pods per model the autoscaler may run")
    queue_depth_target: float = Field(4.0, gt=0, description="the autoscaler adds pods while the average "
                                                             "neuronserve_queue_depth per pod is above this "
                                                             "(a Kubernetes quantity: rounded up to thousandths)")
    cpu_per_core: float = Field(1.0, gt=0, le=64, description="CPUs a Neuron or CUDA pod asks for per NeuronCore "
                                                              "or GPU of its group: the host threads that "
                                                              "tokenize, batch and feed the device (a CPU pod asks "
                                                              "for its group's cores: they are its CPUs). Whole "
                                                              "numbers let a static CPU manager give the pod CPUs "
                                                              "of its own")
    memory: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
                               description="memory of every pod (a Kubernetes quantity, e.g. '6Gi'), requested "
                                           "and its limit; unset: what the plan counts for a CPU model compiled in "
                                           "server.model_repository here (its traces + 1 GiB for the process). "
                                           "Required for Neuron and CUDA pods (the plan counts their device "
                                           "memory, not the host's) and for CPU models not compiled here")
    model_volume: str = Field("neuronserve-models", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
                              description="PersistentVolumeClaim holding the compiled models (server."
                                          "model_repository's layout), mounted read-only; 'compile': each pod's "
                                          "initContainer runs `neuronserve compile <model>` into an emptyDir")
    sources_claim: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
                                      description="with model_volume = 'compile': PersistentVolumeClaim holding "
                                                  "the models' Hugging Face directories, mounted read-only at "
                                                  "sources_path")
    sources_path: Path = Field(Path("/srv/models"), description="where sources_claim is mounted: the models' "
                                                                "source directories must lie under it")
    prestop_delay_s: int = Field(10, ge=0, le=300, description="a stopping pod keeps serving this long before "
                                                               "SIGTERM, while its removal from the Service's "
                                                               "endpoints reaches every node")
    service_monitor_labels: dict[str, str] = Field(
        {}, description="labels of the ServiceMonitors, for the Prometheus Operator's serviceMonitorSelector "
                        "(kube-prometheus-stack selects release = <its release name>)")

    @model_validator(mode="after")
    def _replica_range(self) -> "KubernetesSection":
        if self.max_replicas < self.replicas:
            raise ValueError("kubernetes.max_replicas must be at least kubernetes.replicas")
        return self


class ModelSection(_Section):
    """One served model: [models.<name>]."""

    task: Task = Field(description="what the model answers: " + ", ".join(Task.__args__))
    source: str = Field(..., description="Hugging Face model directory (or hub id, only where a network is allowed)")
    batch_sizes: list[int] = Field([1, 4, 8], min_length=1, description="compiled batch buckets")
    sequence_lengths: list[int] = Field([128], min_length=1, description="compiled sequence-length buckets")
    copies: int = Field(2, ge=1, le=64, description="model copies per group, each executed on its own thread")
    cores_per_group: int = Field(1, ge=1, description="cores one group owns")
    groups: int | Literal["all"] = Field("all", description="number of groups, or all the cores left")
    cores: str | list[int] | None = Field(None, description="restrict this model to these cores ('0-3,6')")
    max_batch_delay_ms: float = Field(1.0, ge=0, le=1000,
                                      description="how long the batcher may wait to fill a batch")
    return_wait_share: float = Field(
        0.1, ge=0, le=0.5,
        description="an idle copy finding fewer requests queued than its group held when its last batch ended "
                    "waits up to this share of the run time of a batch of them all for the clients that batch "
                    "answered to come "
                    "back (no longer: it runs as soon as they are all back), so that steady load keeps its "
                    "batches instead of falling apart into smaller ones that take turns (0: take what is queued "
                    "at once)")
    max_queue: int = Field(256, ge=1, description="queued sequences per group before 503 + Retry-After")
    pad_to_buckets: bool = Field(False, description="pad every batch to a compiled bucket; by default a batch runs "
                                                    "at its own shape (its items, its longest item's length, rounded "
                                                    "up to 8 where the warm-up found that faster) when the "
                                                    "artifact's one trace runs any shape (CPU and CUDA)")
    max_batch_tokens: int | None = Field(None, ge=1, description="most token slots (batch x sequence) one batch "
                                                                 "may hold; a single item always runs")
    truncation: bool = Field(True, description="truncate text longer than the largest sequence bucket, else 422")

    @field_validator("batch_sizes", "sequence_lengths")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("bucket sizes are positive")
        if len(set(v)) != len(v):
            raise ValueError("a bucket size is listed twice")
        return sorted(v)

    @field_validator("cores")
    @classmethod
    def _cores(cls, v):
        if v is not None:
            parse_core_list(v)
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("groups is at least 1, or 'all'")
        return v

    @property
    def core_list(self) -> list[int] | None:
        return None if self.cores is None else parse_core_list(self.cores)


class Config(_Section):
    server: ServerSection = ServerSection()
    nginx: NginxSection = NginxSection()
    neuron: NeuronSection = NeuronSection()
    cuda: CudaSection = CudaSection()
    cpu: CpuSection = CpuSection()
    monitoring: MonitoringSection = MonitoringSection()
    kubernetes: KubernetesSection = KubernetesSection()
    models: dict[str, ModelSection] = Field(default_factory=dict)
    # where it came from, for messages; not a key in the file
    sources: list[Path] = Field(default_factory=list, exclude=True)

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, ModelSection]) -> dict[str, ModelSection]:
        for name in v:
            if not re.match(NAME_RE, name):
                raise ValueError(f"model name {name!r} must match {NAME_RE} (it becomes part of unit names)")
        return v

    @model_validator(mode="after")
    def _timeouts(self) -> "Config":
        if self.neuron.exec_timeout_s >= self.server.timeout_s:
            raise ValueError("neuron.exec_timeout_s must be below server.timeout_s, or requests time out before "
                             "the runtime reports the hung execution")
        return self


# ---------------------------------------------------------------- loading with file:line in every error

def _key_lines(text: str) -> dict[tuple, int]:
    """Map each dotted key path in a TOML text to its 1-based line.

    tomllib keeps no positions, so we scan the text for table headers and ``key =`` lines. It only has to be
    right for well-formed files (tomllib already rejected the others) and is used only to point at a line.
    """
    lines: dict[tuple, int] = {}
    table: tuple = ()
    array_counts: dict[tuple, int] = {}
    key_re = r'(?:"[^"]*"|\'[^\']*\'|[A-Za-z0-9_-]+)'
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if m := re.match(rf"^\[\[\s*({key_re}(?:\s*\.\s*{key_re})*)\s*\]\]", line):
            path = _split_key(m.group(1))
            idx = array_counts.get(path, -1) + 1
            array_counts[path] = idx
            table = path + (idx,)
            lines.setdefault(table, no)
            for i in range(1, len(path) + 1):
                lines.setdefault(path[:i], no)
        elif m := re.match(rf"^\[\s*({key_re}(?:\s*\.\s*{key_re})*)\s*\]", line):
            table = _split_key(m.group(1))
            for i in range(1, len(table) + 1):
                lines.setdefault(table[:i], no)
        elif m := re.match(rf"^({key_re}(?:\s*\.\s*{key_re})*)\s*=", line):
            path = table + _split_key(m.group(1))
            for i in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:i], no)
    return lines


def _split_key(dotted: str) -> tuple:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', dotted)
    return tuple(a or b or c for a, b, c in parts)


def _merge(base: dict, over: dict, origin: dict, file: Path, lines: dict, prefix: tuple = ()) -> None:
    for key, value in over.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, file, lines, path)
        else:
            base[key] = value
            origin[path] = (file, lines.get(path))
        origin.setdefault(path, (file, lines.get(path)))
        _record(value, path, origin, file, lines)


def _record(value: Any, path: tuple, origin: dict, file: Path, lines: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            origin[path + (k,)] = (file, lines.get(path + (k,)))
            _record(v, path + (k,), origin, file, lines)


def _locate(loc: tuple, origin: dict, fallback: Path) -> tuple[Path, int | None]:
    """Closest recorded position for a pydantic error location (walks up to the nearest known key)."""
    loc = tuple(loc)
    while loc:
        if loc in origin:
            return origin[loc]
        loc = loc[:-1]
    return fallback, None


def dropin_files(path: Path) -> list[Path]:
    d = path.parent / "conf.d"
    return sorted(d.glob("*.toml")) if d.is_dir() else []


def load(path: Path | str | None = None, *, dropins: bool = True) -> Config:
    """Load and validate the config file and its conf.d/*.toml drop-ins. Raises ConfigError."""
    path = Path(path) if path is not None else DEFAULT_PATH
    files = [path] + (dropin_files(path) if dropins else [])
    merged: dict = {}
    origin: dict[tuple, tuple[Path, int | None]] = {}
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{f}: no such file (write one, or pass --config)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f}: cannot read: {e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            where = f"{f}:{m.group(1)}" if m else str(f)
            msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e)) or "invalid TOML"
            raise ConfigError(f"{where}: {msg}") from None
        _merge(merged, data, origin, f, _key_lines(text))
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_describe(e, origin, path)) from None
    cfg.sources = files
    return cfg


def _describe(err: ValidationError, origin: dict, fallback: Path) -> str:
    out = []
    for item in err.errors(include_url=False):
        loc = tuple(item["loc"])
        file, line = _locate(loc, origin, fallback)
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in loc[:-1]) or "the top level"
            msg = f"unknown key in {section}"
            close = _close_keys(loc)
            if close:
                msg += f" (did you mean {close}?)"
        elif item["type"] == "missing":
            msg = "required key is missing"
        elif item["type"] == "literal_error":
            msg = f"got {item.get('input')!r}; {msg.lower()}"
        out.append(f"{file}:{line}: {key}: {msg}" if line else f"{file}: {key}: {msg}")
    return "\n".join(out)


def _close_keys(loc: tuple) -> str:
    """A known key close to a misspelt one, for the 'unknown key' message."""
    import difflib

    sections = {"server": ServerSection, "nginx": NginxSection, "neuron": NeuronSection,
                "cuda": CudaSection, "cpu": CpuSection, "monitoring": MonitoringSection,
                "kubernetes": KubernetesSection}
    if len(loc) == 1:
        names = [n for n in Config.model_fields if n != "sources"]
    elif loc[0] == "models" and len(loc) == 3:
        names = list(ModelSection.model_fields)
    elif len(loc) == 2 and loc[0] in sections:
        names = list(sections[loc[0]].model_fields)
    else:
        return ""
    hits = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return repr(hits[0]) if hits else ""


def _toml_value(value) -> str:
    """A default as it would be written in the file (None: the key is simply left out)."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def settings_reference() -> list[tuple[str, str, str]]:
    """(key, default, description) for every setting: feeds the docs and `neuronserve config --reference`."""
    rows = []
    sections: list[tuple[str, type[BaseModel]]] = [
        ("server", ServerSection), ("nginx", NginxSection), ("neuron", NeuronSection),
        ("cuda", CudaSection), ("cpu", CpuSection), ("monitoring", MonitoringSection),
        ("kubernetes", KubernetesSection),
        ("models.<name>", ModelSection)]
    for prefix, model in sections:
        for name, field in model.model_fields.items():
            default = "(required)" if field.is_required() else _toml_value(field.get_default(call_default_factory=True))
            rows.append((f"{prefix}.{name}", default, field.description or ""))
    return rows


__all__ = ["Config", "ModelSection", "ConfigError", "load", "parse_core_list", "format_core_list",
           "settings_reference", "DEFAULT_PATH"]
