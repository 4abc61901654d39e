"""`neuronserve render --kubernetes DIR`: every manifest is valid for two Kubernetes minor versions (offline, with
kubernetes-validate's bundled OpenAPI schemas, strict: an unknown field fails), and means what it should:
resources per backend, probes on declared ports at the server's paths, one set of labels across every selector,
the autoscaler on the gauge the server exports, a startup budget covering server.start_timeout_s, the config
verbatim in the ConfigMap. Real config files and output directories in tmp dirs; no cluster.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import jsonschema           # kubernetes-validate's own validator (and PyYAML its parser)
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from neuronserve import config, kubernetes
from neuronserve.build import artifact
from neuronserve.cli import main
from neuronserve.errors import ConfigError, RenderError
from neuronserve.layout import Layout
from neuronserve.render import HEADER, write_files
from neuronserve.server.metrics import Metrics

# the oldest minor kubernetes-validate 1.37 still bundles that EKS has offered in extended support, and the newest
VERSIONS = ("1.29", "1.37")
APP_SOURCE = Path(config.__file__).parent / "server" / "app.py"
GIB = 1 << 30

# Custom resources kubernetes-validate has no schema for, checked against SUBSETS of their CRDs: the fields their
# CRDs require (prometheus-operator's ServiceMonitor: spec.selector, endpoints' port; KServe's ServingRuntime:
# spec.containers, supportedModelFormats[].name, protocolVersions from v1, v2, grpc-v1, grpc-v2; KServe's
# InferenceService: spec.predictor, with model.modelFormat.name), and at each level whose fields are listed,
# additionalProperties: false, so that a misspelt key in a template fails. The names listed are the real CRDs'
# (prometheus-operator v0.7x's ServiceMonitorSpec, pkg/apis/monitoring/v1/servicemonitor_types.go; KServe
# v0.13-v0.15's ServingRuntimeSpec, v1alpha1/servingruntime_types.go, and InferenceServiceSpec, PredictorSpec's
# replicas and ModelSpec, v1beta1): every one at the levels that list them all (ServiceMonitor's spec, a
# LabelSelector, NamespaceSelector, ServingRuntime's spec, SupportedModelFormat, InferenceService's spec,
# ModelFormat), only those rendered where the CRD inlines a whole PodSpec or Container (predictor, model) and in
# an Endpoint: a field newly rendered there must be added here, after checking the CRD. Their pod parts
# (containers, volumes, tolerations) are core/v1 types: those are validated strictly as a Pod's below.
_NAME = {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"}
_META = {"type": "object", "required": ["name", "namespace"], "properties": {"name": _NAME}}
_ANY = {}
_PROTOCOLS = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False,
                   "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                                  "matchExpressions": {"type": "array"}}}


def _closed(properties: dict, required: tuple = ()) -> dict:
    """An object with exactly these properties (additionalProperties: false)."""
    return {"type": "object", "required": list(required), "additionalProperties": False, "properties": properties}


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {"properties": {"spec": _closed({
        "selector": {**_LABEL_SELECTOR, "required": ["matchLabels"]},
        "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": {"type": "array",
                                                                                 "items": {"type": "string"}}}),
        "endpoints": {"type": "array", "minItems": 1, "items": _closed(
            {"port": {"type": "string"}, "path": {"type": "string"}}, required=("port", "path"))},
        **{k: _ANY for k in ("jobLabel", "targetLabels", "podTargetLabels", "sampleLimit", "scrapeProtocols",
                             "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
                             "keepDroppedTargets", "attachMetadata", "scrapeClass", "bodySizeLimit")}},
        required=("selector", "endpoints"))}},
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): {"properties": {"spec": _closed({
        "supportedModelFormats": {"type": "array", "items": _closed(
            {"name": {"type": "string"}, "version": {"type": "string"}, "autoSelect": {"type": "boolean"},
             "priority": {"type": "integer", "minimum": 1}}, required=("name",))},
        "protocolVersions": {"type": "array", "items": _PROTOCOLS},
        "multiModel": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "containers": {"type": "array", "minItems": 1},
        **{k: _ANY for k in ("volumes", "nodeSelector", "affinity", "tolerations", "labels", "annotations",
                             "imagePullSecrets", "hostIPC", "workerSpec", "grpcEndpoint", "grpcDataEndpoint",
                             "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter")}},
        required=("containers", "supportedModelFormats", "protocolVersions"))}},
    ("serving.kserve.io/v1beta1", "InferenceService"): {"properties": {"spec": _closed({
        "predictor": _closed({
            "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
            "model": _closed({"modelFormat": _closed({"name": {"type": "string"}, "version": {"type": "string"}},
                                                     required=("name",)),
                              "runtime": {"type": "string"}, "protocolVersion": _PROTOCOLS},
                             required=("modelFormat", "runtime"))},
            required=("model",)),
        "explainer": _ANY, "transformer": _ANY},
        required=("predictor",))}},
}


def check_custom_resource(doc: dict) -> None:
    """jsonschema.ValidationError unless doc passes its CRD_SCHEMAS subset."""
    jsonschema.validate(doc, {"required": ["apiVersion", "kind", "metadata", "spec"],
                              "properties": {"metadata": _META}, **CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]})


MODELS = """
[models.bert-qa]
task = "question-answering"
source = "/srv/models/bert"
cores_per_group = 2
groups = 3

[models.mini_lm]
task = "feature-extraction"
source = "/srv/models/minilm"
"""


def write_config(tmp_path: Path, backend: str = "neuron", extra: str = "", models: str = MODELS,
                 memory: str | None = "4Gi") -> Path:
    """memory: kubernetes.memory (None: unset, required unless every model is a CPU one compiled here)."""
    path = tmp_path / "etc" / "neuronserve.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[server]\nbackend = "{backend}"\nmodel_repository = "{tmp_path}/repo"\n'
                    'start_timeout_s = 301.5\ngraceful_timeout_s = 20.5\n\n'
                    '[kubernetes]\nimage = "registry.example.com/neuronserve:0.2.0"\n'
                    + (f'memory = "{memory}"\n' if memory else "") + extra + models)
    return path


def rendered(tmp_path: Path, backend: str = "neuron", extra: str = "", models: str = MODELS,
             out: str = "k8s", memory: str | None = "4Gi") -> dict[Path, str]:
    cfg = config.load(write_config(tmp_path, backend, extra, models, memory))
    return kubernetes.render_files(Layout(tmp_path / "root", cfg), tmp_path / out)


def docs(files: dict[Path, str]) -> list[dict]:
    return [d for path, text in files.items() if path.parent.name != "prometheus-adapter"
            for d in yaml.safe_load_all(text) if d is not None]


def one(files, kind: str, name: str = "neuronserve-bert-qa") -> dict:
    hits = [d for d in docs(files) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in docs(files)])
    return hits[0]


def pod_spec(files, name="neuronserve-bert-qa") -> dict:
    return one(files, "Deployment", name)["spec"]["template"]["spec"]


def server(files, name="neuronserve-bert-qa") -> dict:
    (c,) = pod_spec(files, name)["containers"]
    return c


def qos_class(spec: dict) -> str:
    """The QoS class Kubernetes gives a pod of this spec, by its rules: BestEffort when no container (init ones
    included) requests or limits cpu or memory (device resources do not count); Guaranteed when every one has cpu
    and memory limits and its requests (defaulting to its limits) equal them; Burstable otherwise."""
    resources = []
    for c in spec["containers"] + spec.get("initContainers", []):
        limits = c.get("resources", {}).get("limits", {})
        resources.append(({**limits, **c.get("resources", {}).get("requests", {})}, limits))
    if not any(r in requests or r in limits for requests, limits in resources for r in ("cpu", "memory")):
        return "BestEffort"
    if all(r in limits and requests[r] == limits[r] for requests, limits in resources for r in ("cpu", "memory")):
        return "Guaranteed"
    return "Burstable"


def compiled_cpu(tmp_path: Path, name: str, size: int) -> None:
    """A compiled CPU model in the config's repository: one shared trace of `size` bytes (sparse)."""
    directory = tmp_path / "repo" / name
    directory.mkdir(parents=True)
    with open(directory / "model.pt", "wb") as f:
        f.truncate(size)
    artifact.write_manifest(directory, artifact.Manifest(
        name=name, task="question-answering", backend="cpu", target="cpu", source="/srv/models/bert",
        created="now", versions={}, input_names=["input_ids"], output_names=["start_logits", "end_logits"],
        buckets=[artifact.Bucket(batch=b, seq=128, file="model.pt", sha256="0") for b in (1, 4)]))


# ---------------------------------------------------------------- schemas

def _as_pod(doc: dict) -> dict:
    """A custom resource's core/v1 parts (containers, volumes, tolerations) as a Pod, for the core schemas."""
    spec = doc["spec"]
    keep = {k: spec[k] for k in ("containers", "volumes", "tolerations") if k in spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": keep}


@pytest.mark.parametrize("backend", ["neuron", "cuda", "cpu"])
@pytest.mark.parametrize("volume", ["pvc", "compile"])
def test_every_manifest_is_valid_for_two_kubernetes_versions(tmp_path, backend, volume):
    extra = 'model_volume = "compile"\nsources_claim = "hf-sources"\n' if volume == "compile" else ""
    if backend == "cpu":
        compiled_cpu(tmp_path, "bert-qa", GIB // 2)
    files = rendered(tmp_path, backend, extra)
    kinds = set()
    for doc in docs(files):
        kinds.add(doc["kind"])
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        for version in VERSIONS:
            if schema is None:
                assert kubernetes_validate.validate(doc, version, strict=True) == version
            else:
                # a custom resource: no schema in kubernetes-validate (it says so), checked by CRD_SCHEMAS instead
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(doc, version, strict=True)
                check_custom_resource(doc)
                if doc["kind"] == "ServingRuntime":
                    kubernetes_validate.validate(_as_pod(doc), version, strict=True)
    core = {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ServiceMonitor"}
    assert kinds == core | ({"ServingRuntime", "InferenceService"} if volume == "pvc" else set())
    # every object's name is a DNS label, also for a model name with '_'
    assert {d["metadata"]["name"] for d in docs(files) if d["kind"] == "Deployment"} == \
        {"neuronserve-bert-qa", "neuronserve-mini-lm"}


def test_the_validator_rejects_what_a_cluster_would(tmp_path):
    """The check above is not vacuous: a misspelt field, a wrong type and a missing name all fail."""
    deployment = one(rendered(tmp_path), "Deployment")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
    c["readinessProbe"] = c.pop("readinesProbe")
    c["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type 'integer'"):
        kubernetes_validate.validate(deployment, VERSIONS[1], strict=True)


@pytest.mark.parametrize("kind, path, misspelt", [
    ("ServiceMonitor", ("spec",), "namespaceSelecter"),
    ("ServiceMonitor", ("spec", "namespaceSelector"), "matchName"),
    ("ServiceMonitor", ("spec", "selector"), "matchLabel"),
    ("ServiceMonitor", ("spec", "endpoints", 0), "interval_s"),
    ("ServingRuntime", ("spec",), "protocolVersion"),
    ("ServingRuntime", ("spec", "supportedModelFormats", 0), "autoselect"),
    ("InferenceService", ("spec",), "predicter"),
    ("InferenceService", ("spec", "predictor"), "minReplica"),
    ("InferenceService", ("spec", "predictor", "model"), "runtimeName"),
    ("InferenceService", ("spec", "predictor", "model", "modelFormat"), "named"),
])
def test_the_crd_subsets_reject_a_misspelt_field(tmp_path, kind, path, misspelt):
    doc = one(rendered(tmp_path), kind)
    check_custom_resource(doc)
    node = doc
    for step in path:
        node = node[step]
    node[misspelt] = "x"
    with pytest.raises(jsonschema.ValidationError, match=misspelt):
        check_custom_resource(doc)


# ---------------------------------------------------------------- what the manifests mean

@pytest.mark.parametrize("backend", ["neuron", "cuda", "cpu"])
@pytest.mark.parametrize("volume", ["pvc", "compile"])
def test_every_pod_is_guaranteed(tmp_path, backend, volume):
    """cpu and memory requested = their limits in every container (the compile initContainer and KServe's too),
    the device's as well: the Guaranteed QoS class, the last evicted under memory pressure."""
    extra = 'model_volume = "compile"\nsources_claim = "hf-sources"\n' if volume == "compile" else ""
    files = rendered(tmp_path, backend, extra)
    specs = [pod_spec(files, name) for name in ("neuronserve-bert-qa", "neuronserve-mini-lm")]
    if volume == "pvc":
        specs += [one(files, "ServingRuntime", name)["spec"] for name in ("neuronserve-bert-qa",
                                                                          "neuronserve-mini-lm")]
    for spec in specs:
        assert qos_class(spec) == "Guaranteed"
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["resources"]["requests"] == c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(c["resources"]["limits"])
            if backend != "cpu":
                assert kubernetes.DEVICE_RESOURCES[backend] in c["resources"]["limits"]
    # what the check tells apart: a pod without a memory limit is Burstable, and one asking for its device only
    # (as these pods did) BestEffort, the first a node under memory pressure evicts
    cpu_only = {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}
    assert qos_class({"containers": [{"resources": cpu_only}]}) == "Burstable"
    guaranteed = {"limits": {"cpu": "1", "memory": "1Gi"}}
    assert qos_class({"containers": [{"resources": guaranteed}]}) == "Guaranteed"
    assert qos_class({"containers": [{"resources": guaranteed}], "initContainers": [{"name": "x"}]}) == "Burstable"
    device_only = {"requests": {"aws.amazon.com/neuroncore": "1"}, "limits": {"aws.amazon.com/neuroncore": "1"}}
    assert qos_class({"containers": [{"resources": device_only}]}) == "BestEffort"


def test_resources_per_backend(tmp_path):
    neuron = rendered(tmp_path / "n", "neuron")
    assert server(neuron)["resources"] == {
        "requests": {"aws.amazon.com/neuroncore": "2", "cpu": "2", "memory": "4Gi"},
        "limits": {"aws.amazon.com/neuroncore": "2", "cpu": "2", "memory": "4Gi"}}
    assert pod_spec(neuron)["tolerations"][0]["key"] == "aws.amazon.com/neuron"
    # kubernetes.cpu_per_core CPUs per device core, a decimal quantity where not whole
    cuda = rendered(tmp_path / "g", "cuda", extra="cpu_per_core = 1.5\n", memory="6.5Gi")
    assert server(cuda)["resources"] == {"requests": {"nvidia.com/gpu": "2", "cpu": "3", "memory": "6.5Gi"},
                                         "limits": {"nvidia.com/gpu": "2", "cpu": "3", "memory": "6.5Gi"}}
    assert server(cuda, "neuronserve-mini-lm")["resources"]["limits"] == {"nvidia.com/gpu": "1", "cpu": "1.5",
                                                                          "memory": "6.5Gi"}
    # CPU: the group's CPUs, and unset memory is what the plan counts of a compiled model (+1 GiB process)
    compiled_cpu(tmp_path / "c", "bert-qa", GIB // 2)
    compiled_cpu(tmp_path / "c", "mini_lm", 3 * GIB)
    cpu = rendered(tmp_path / "c", "cpu", memory=None)
    assert server(cpu)["resources"] == {"requests": {"cpu": "2", "memory": "1536Mi"},
                                        "limits": {"cpu": "2", "memory": "1536Mi"}}
    assert server(cpu, "neuronserve-mini-lm")["resources"] == {"requests": {"cpu": "1", "memory": "4096Mi"},
                                                               "limits": {"cpu": "1", "memory": "4096Mi"}}
    assert "tolerations" not in pod_spec(cpu)
    # set, it is every pod's: never less than the plan counts
    assert server(rendered(tmp_path / "c", "cpu", memory="5Gi", out="set"))["resources"]["limits"] == \
        {"cpu": "2", "memory": "5Gi"}
    with pytest.raises(ConfigError, match=r"kubernetes.memory 2Gi is less than the 4096Mi the plan counts for "
                                          r"models.mini_lm"):
        rendered(tmp_path / "c", "cpu", memory="2Gi", out="small")


def test_memory_is_required_where_the_plan_cannot_count_it(tmp_path):
    for backend in ("neuron", "cuda"):
        with pytest.raises(ConfigError, match=r"kubernetes.memory is not set and the plan counts a Neuron or "
                                              r"CUDA model's device memory.*memory = \"4Gi\""):
            rendered(tmp_path / backend, backend, memory=None)
    # a CPU model not compiled here: nothing to count
    compiled_cpu(tmp_path / "c", "bert-qa", GIB // 2)
    with pytest.raises(ConfigError, match=r"kubernetes.memory is not set and models.mini_lm is not compiled"):
        rendered(tmp_path / "c", "cpu", memory=None)
    with pytest.raises(ConfigError, match=r"kubernetes.memory 512Mi is less than the 1Gi"):
        rendered(tmp_path / "small", memory="512Mi")
    for bad in ("4 GiB", "4gb", "-1Gi", "1e9"):
        with pytest.raises(ConfigError, match="memory"):
            rendered(tmp_path / "bad", memory=bad)
    assert kubernetes.memory_bytes("1.5Gi") == 3 * GIB // 2 and kubernetes.memory_bytes("2G") == 2 * 10**9
    assert kubernetes.memory_bytes("1073741824") == GIB


@pytest.mark.parametrize("value, text", [(2.5, "2.5"), (4.0, "4"), (0.1, "0.1"), (1e-7, "0.001"),
                                         (1 / 3, "0.334"), (0.0015, "0.002"), (0.25, "0.25"),
                                         (1234.5678, "1234.568"), (1e6, "1000000"), (0.07, "0.07")])
def test_quantities_keep_the_value(value, text):
    """Kubernetes keeps three decimal places, rounding a finer quantity up: so does quantity(), never to 0."""
    assert kubernetes.quantity(value) == text


def test_auto_is_refused_and_the_cli_names_the_backend_option(tmp_path):
    path = write_config(tmp_path, "auto")
    with pytest.raises(ConfigError, match="pass --backend neuron, cuda or cpu"):
        kubernetes.render_files(Layout(tmp_path, config.load(path)), tmp_path / "k8s")
    result = CliRunner().invoke(main, ["render", "--config", str(path), "--kubernetes", str(tmp_path / "k8s")])
    assert result.exit_code == 2 and "--backend" in result.output and not (tmp_path / "k8s").exists()
    # --backend names it: the pods' config pins what the resources were rendered for
    result = CliRunner().invoke(main, ["render", "--config", str(path), "--backend", "cuda",
                                       "--kubernetes", str(tmp_path / "k8s")])
    assert result.exit_code == 0, result.output
    cm = yaml.safe_load((tmp_path / "k8s" / "10-config.yaml").read_text())
    assert 'backend = "cuda"' in cm["data"]["conf.d.zz-kubernetes.toml"]
    assert "nvidia.com/gpu" in (tmp_path / "k8s" / "20-neuronserve-bert-qa.yaml").read_text()


def test_image_is_required(tmp_path):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('image = "registry.example.com/neuronserve:0.2.0"\n', ""))
    with pytest.raises(ConfigError, match="kubernetes.image is not set"):
        kubernetes.render_files(Layout(tmp_path, config.load(path)), tmp_path / "k8s")


def test_probes_are_on_declared_ports_at_the_servers_paths(tmp_path):
    routes = set(re.findall(r'@app\.get\("([^"]+)"\)', APP_SOURCE.read_text()))
    assert {kubernetes.READY_PATH, kubernetes.LIVE_PATH, kubernetes.METRICS_PATH} <= routes
    files = rendered(tmp_path)
    c = server(files)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "grpc": 8081}       # nginx.listen's and nginx.grpc_listen's defaults
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["args"] == ["pod", "--model", "bert-qa"]
    service = one(files, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == \
        {"http": (8080, "http"), "grpc": (8081, "grpc")}
    monitor = one(files, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics"}]
    (kserve,) = one(files, "ServingRuntime")["spec"]["containers"]
    assert kserve["readinessProbe"]["httpGet"]["port"] in {p["name"] for p in kserve["ports"]}
    assert kserve["args"] == c["args"] and kserve["image"] == c["image"]
    # the listen ports move with the config; no gRPC without nginx.grpc_listen
    moved = rendered(tmp_path / "moved", models='[nginx]\nlisten = "0.0.0.0:9000"\ngrpc_listen = ""\n' + MODELS)
    assert [(p["name"], p["containerPort"]) for p in server(moved)["ports"]] == [("http", 9000)]
    assert [p["name"] for p in one(moved, "Service")["spec"]["ports"]] == ["http"]


def test_one_set_of_labels_across_every_selector(tmp_path):
    files = rendered(tmp_path, extra='service_monitor_labels = { release = "kube-prometheus-stack" }\n')
    for name in ("neuronserve-bert-qa", "neuronserve-mini-lm"):
        deployment = one(files, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        service = one(files, "Service", name)
        assert service["spec"]["selector"] == labels
        assert one(files, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"] == labels
        monitor = one(files, "ServiceMonitor", name)
        # a ServiceMonitor selects Services: the Service carries the same labels
        assert monitor["spec"]["selector"]["matchLabels"] == labels == service["metadata"]["labels"]
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        hpa = one(files, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        # the autoscaler owns the scale: a replicas in the Deployment would reset it at every kubectl apply
        assert "replicas" not in deployment["spec"]
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)     # kubernetes.replicas, max
        assert one(files, "InferenceService", name)["spec"]["predictor"]["model"]["runtime"] == \
            one(files, "ServingRuntime", name)["metadata"]["name"]
    other = one(files, "Deployment", "neuronserve-mini-lm")["spec"]["selector"]["matchLabels"]
    assert other != one(files, "Deployment")["spec"]["selector"]["matchLabels"]


def test_replica_bounds_and_the_disruption_budget(tmp_path):
    files = rendered(tmp_path, extra="replicas = 3\nmax_replicas = 5\n")
    hpa = one(files, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 5) and "replicas" not in one(files, "Deployment")["spec"]
    assert one(files, "InferenceService")["spec"]["predictor"] | {"model": None} == \
        {"minReplicas": 3, "maxReplicas": 5, "model": None}
    # several pods: a drain takes one at a time; unready pods serve nothing, a drain may always evict them
    pdb = one(files, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # one pod: a drain evicts it only while another one is ready, never taking the model to no pod
    lone = one(rendered(tmp_path / "lone", extra="replicas = 1\n"), "PodDisruptionBudget")["spec"]
    assert lone["minAvailable"] == 1 and "maxUnavailable" not in lone
    assert lone["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_autoscaler_reads_the_gauge_the_server_exports(tmp_path):
    files = rendered(tmp_path, extra="queue_depth_target = 2.5\n")
    (metric,) = one(files, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2.5"}
    name = metric["pods"]["metric"]["name"]
    exported = Metrics("bert-qa", "bert-qa-0").render().decode()
    assert re.search(rf"^# TYPE {name} gauge$", exported, re.M)
    (rule,) = yaml.safe_load(files[tmp_path / "k8s" / "prometheus-adapter" / "values.yaml"])["rules"]["custom"]
    assert rule["name"]["as"] == name and re.fullmatch(rule["name"]["matches"], name)
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # a target finer than Kubernetes' thousandths is rounded up to one, never down to 0
    tiny = rendered(tmp_path / "tiny", extra="queue_depth_target = 0.0000001\n")
    (metric,) = one(tiny, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["pods"]["target"]["averageValue"] == "0.001"


def test_startup_budget_and_termination_grace(tmp_path):
    files = rendered(tmp_path, extra="prestop_delay_s = 7\n")
    spec, c = pod_spec(files), server(files)
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 301.5        # server.start_timeout_s
    assert (startup["failureThreshold"] - 1) * startup["periodSeconds"] < 301.5   # and not much more
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sleep", "7"]
    assert spec["terminationGracePeriodSeconds"] >= 7 + math.ceil(20.5)          # preStop + graceful_timeout_s
    no_delay = server(rendered(tmp_path / "0", extra="prestop_delay_s = 0\n"))
    assert "lifecycle" not in no_delay


def test_security_settings_on_every_container(tmp_path):
    files = rendered(tmp_path, extra='model_volume = "compile"\nsources_claim = "hf-sources"\nuid = 4242\n')
    spec = pod_spec(files)
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 4242, "runAsGroup": 4242,
                                       "fsGroup": 4242, "seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["automountServiceAccountToken"] is False
    # unset: the image's own user, which it names by uid (packaging/image.py), so runAsNonRoot can check it
    assert pod_spec(rendered(tmp_path / "image-user"))["securityContext"] == {
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    pvc = rendered(tmp_path / "pvc", extra="uid = 4242\n")
    (kserve,) = one(pvc, "ServingRuntime")["spec"]["containers"]
    for c in spec["initContainers"] + spec["containers"] + [kserve]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        # what a read-only root leaves writable: the scratch volume
        assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "scratch"} == {"/tmp", "/var/tmp"}
    assert kserve["securityContext"]["runAsNonRoot"] is True and kserve["securityContext"]["runAsUser"] == 4242
    assert kserve["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_models_from_a_claim_or_compiled_by_an_init_container(tmp_path):
    spec = pod_spec(rendered(tmp_path / "pvc", extra='model_volume = "compiled-models"\n'))
    assert "initContainers" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "compiled-models", "readOnly": True}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["models"]["mountPath"].endswith("/pvc/repo") and mounts["models"]["readOnly"] is True

    files = rendered(tmp_path / "c", extra='model_volume = "compile"\nsources_claim = "hf-sources"\n')
    spec = pod_spec(files)
    (init,) = spec["initContainers"]
    assert init["args"] == ["compile", "bert-qa"] and init["image"] == spec["containers"][0]["image"]
    # it compiles for the device the pod was given, so it asks for the same
    assert init["resources"] == spec["containers"][0]["resources"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"] == {"name": "models", "emptyDir": {}}
    assert volumes["sources"]["persistentVolumeClaim"] == {"claimName": "hf-sources", "readOnly": True}
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert init_mounts["models"]["readOnly"] is False and init_mounts["models"]["mountPath"] == \
        f"{tmp_path}/c/repo"
    assert init_mounts["sources"] == {"name": "sources", "mountPath": "/srv/models", "readOnly": True}
    assert not any(p.parent.name == "kserve" for p in files)     # KServe's example mounts a claim

    with pytest.raises(ConfigError, match="not under kubernetes.sources_path"):
        rendered(tmp_path / "o", extra='model_volume = "compile"\nsources_claim = "s"\nsources_path = "/data"\n')
    # the image runs offline: a hub id (or a path relative to the config) cannot be compiled in a pod
    for source in ("bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", "models/minilm"):
        with pytest.raises(ConfigError, match=rf"models.mini_lm.source '{source}' is not a directory under "
                                              r"kubernetes.sources_path .*HF_HUB_OFFLINE=1.*sources_claim"):
            rendered(tmp_path / "hub", extra='model_volume = "compile"\nsources_claim = "s"\n',
                     models=MODELS.replace('"/srv/models/minilm"', f'"{source}"'))
    # a compiled repository on a claim takes any source: the pods never read it
    hub = rendered(tmp_path / "hub-pvc", models=MODELS.replace('"/srv/models/minilm"', '"bert-base-uncased"'))
    assert "initContainers" not in pod_spec(hub, "neuronserve-mini-lm")
    with pytest.raises(ConfigError, match="set kubernetes.sources_claim"):
        rendered(tmp_path / "n", extra='model_volume = "compile"\n')


def test_the_configmap_holds_the_exact_config(tmp_path):
    path = write_config(tmp_path, "neuron")
    # what a block scalar could get wrong: leading and trailing spaces, tabs, blank lines, non-ASCII, no final newline
    (path.parent / "conf.d").mkdir()
    dropin = path.parent / "conf.d" / "50 local.toml"
    dropin.write_text("  # indented first line\t\n\n[models.bert-qa]\ncopies = 3   \nsource = \"/srv/models/bé\"")
    cfg = config.load(path)
    files = kubernetes.render_files(Layout(tmp_path / "root", cfg), tmp_path / "k8s")
    cm = one(files, "ConfigMap", "neuronserve-config")
    assert cm["data"]["neuronserve.toml"] == path.read_text()
    assert cm["data"]["conf.d.50-local.toml"] == dropin.read_text()
    # the pod's /etc/neuronserve, laid out as the volume's items and the container's mounts say (file by file,
    # beside the image's own conf.d/00-image.toml), loads to the config rendered for
    (volume,) = [v for v in pod_spec(files)["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == "neuronserve-config"
    items = {i["path"]: i["key"] for i in volume["configMap"]["items"]}
    assert list(items) == ["neuronserve.toml", "conf.d/50 local.toml", "conf.d/zz-kubernetes.toml"]
    pod_root = tmp_path / "pod"
    for mount in server(files)["volumeMounts"]:
        if mount["name"] == "config":
            assert mount["readOnly"] is True
            target = pod_root / mount["mountPath"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(cm["data"][items[mount["subPath"]]])
    assert sorted(str(p.relative_to(pod_root)) for p in pod_root.rglob("*.toml")) == [
        "etc/neuronserve/conf.d/50 local.toml", "etc/neuronserve/conf.d/zz-kubernetes.toml",
        "etc/neuronserve/neuronserve.toml"]
    assert config.load(pod_root / "etc/neuronserve/neuronserve.toml").model_dump() == cfg.model_dump()
    # a changed config rolls the pods
    before = one(files, "Deployment")["spec"]["template"]["metadata"]["annotations"]["neuronserve/config-sha256"]
    dropin.write_text(dropin.read_text().replace("copies = 3", "copies = 4"))
    again = kubernetes.render_files(Layout(tmp_path / "root", config.load(path)), tmp_path / "k8s")
    assert one(again, "Deployment")["spec"]["template"]["metadata"]["annotations"]["neuronserve/config-sha256"] \
        != before


@pytest.mark.parametrize("text", ["a = 1\n", "a = 1", "a = 1\n\n\n", "\n\n  b = 2\n", "   \n x\t\n", "é ∑ 😀\n",
                                  "a\r\nb\r\n", "bell \x07\n", "nel \x85 line\u2028sep\n", "\ufeffbom\n", "", "\n"])
def test_yaml_block_reads_back_exactly(text):
    doc = yaml.safe_load(f"data:\n  key: {kubernetes.yaml_block(text, 4)}\nafter: 1\n")
    assert doc == {"data": {"key": text}, "after": 1}


def test_model_names_become_dns_labels_and_clashes_are_refused(tmp_path):
    cfg = config.load(write_config(tmp_path, models=MODELS + '\n[models.mini-lm]\ntask = "fill-mask"\n'
                                                           'source = "/srv/models/x"\n'))
    with pytest.raises(RenderError, match="models.mini_lm and models.mini-lm would both be named neuronserve-mini-lm"):
        kubernetes.render_files(Layout(tmp_path, cfg), tmp_path / "k8s")


def test_cli_writes_atomically_reports_changes_and_stale_files(tmp_path):
    path = write_config(tmp_path)
    out = tmp_path / "k8s"
    args = ["render", "--config", str(path), "--root", str(tmp_path / "root"), "--kubernetes", str(out)]
    dry = CliRunner().invoke(main, args + ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would change 9 file(s)" in dry.output and "+kind: Deployment" in dry.output and not out.exists()
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and "changed 9 file(s)" in first.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.yaml")) == [
        "00-namespace.yaml", "10-config.yaml", "20-neuronserve-bert-qa.yaml", "20-neuronserve-mini-lm.yaml",
        "kserve/neuronserve-bert-qa.yaml", "kserve/neuronserve-mini-lm.yaml", "prometheus-adapter/values.yaml",
        "prometheus/neuronserve-bert-qa.yaml", "prometheus/neuronserve-mini-lm.yaml"]
    assert all(HEADER in p.read_text() for p in out.rglob("*.yaml"))
    again = CliRunner().invoke(main, args)
    assert "changed 0 file(s)" in again.output
    # mini_lm removed from the config: its files are named, not deleted (kubectl delete -f them first)
    path.write_text(path.read_text().split("[models.mini_lm]")[0])
    less = CliRunner().invoke(main, args)
    assert less.exit_code == 0 and "no longer rendered" in less.output
    assert str(out / "20-neuronserve-mini-lm.yaml") in less.output and (out / "20-neuronserve-mini-lm.yaml").exists()


def test_templates_are_overridable(tmp_path):
    cfg = config.load(write_config(tmp_path))
    layout = Layout(tmp_path / "root", cfg)
    override = layout.template_override_dir / "kubernetes" / "namespace.yaml.j2"
    override.parent.mkdir(parents=True)
    override.write_text("# {{ header }}\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {{ ns | json }}\n"
                        "  labels: {team: search}\n")
    files = kubernetes.render_files(layout, tmp_path / "k8s")
    assert one(files, "Namespace", "neuronserve")["metadata"]["labels"] == {"team": "search"}
    assert write_files(files, dry_run=True)       # the same writer as every other rendered file
    default = kubernetes.render_files(Layout(tmp_path / "root", config.load(write_config(
        tmp_path, extra='namespace = "default"\n'))), tmp_path / "k8s")
    assert not any(d["kind"] == "Namespace" for d in docs(default))
    assert {d["metadata"]["namespace"] for d in docs(default) if d["kind"] != "Namespace"} == {"default"}
