"""The config loader: real files in tmp dirs, errors that name file, line and key."""
from __future__ import annotations

import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronserve import config
from neuronserve.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
[server]
backend = "cpu"
base_port = 9100

[models.bert]
task = "question-answering"
source = "/srv/bert"
batch_sizes = [8, 1, 4]
copies = 2
"""


def write(tmp_path: Path, text: str, name: str = "neuronserve.toml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_shipped_default_is_valid_and_documented():
    cfg = config.load(REPO / "etc" / "neuronserve.toml")
    assert cfg.server.backend == "auto" and cfg.models == {}
    text = (REPO / "etc" / "neuronserve.toml").read_text()
    # every section of the schema appears in the shipped file, so a sysadmin finds it there
    for section in ("[server]", "[nginx]", "[neuron]", "[cpu]", "[models."):
        assert section in text


def test_good_file_parses_and_sorts_buckets(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    m = cfg.models["bert"]
    assert m.batch_sizes == [1, 4, 8] and m.copies == 2 and cfg.server.base_port == 9100
    assert cfg.sources == [tmp_path / "neuronserve.toml"]


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, GOOD + "copise = 3\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value) == (f"{p}:10: models.bert.copise: unknown key in models.bert (did you mean 'copies'?)")


def test_wrong_type_points_at_its_line(tmp_path):
    p = write(tmp_path, GOOD.replace("copies = 2", 'copies = "two"'))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(f"{p}:9: models.bert.copies: ")


def test_bad_literal_lists_choices(tmp_path):
    p = write(tmp_path, GOOD.replace('backend = "cpu"', 'backend = "tpu"'))
    with pytest.raises(ConfigError, match=r":2: server.backend: got 'tpu'; input should be 'auto', 'neuron'"):
        config.load(p)


def test_missing_required_key(tmp_path):
    p = write(tmp_path, GOOD.replace('source = "/srv/bert"\n', ""))
    with pytest.raises(ConfigError, match=r":5: models.bert.source: required key is missing"):
        config.load(p)


def test_toml_syntax_error_has_line(tmp_path):
    p = write(tmp_path, GOOD + "[models.x\n")
    with pytest.raises(ConfigError, match=rf"^{p}:10: "):
        config.load(p)


def test_dropin_overrides_and_errors_name_the_dropin(tmp_path):
    main = write(tmp_path, GOOD)
    write(tmp_path, "[models.bert]\ncopies = 4\n", "conf.d/10-copies.toml")
    assert config.load(main).models["bert"].copies == 4
    bad = write(tmp_path, "[server]\n\nbase_port = 80\n", "conf.d/20-port.toml")
    with pytest.raises(ConfigError) as e:
        config.load(main)
    assert str(e.value).startswith(f"{bad}:3: server.base_port: ")
    assert config.load(main, dropins=False).server.base_port == 9100


def test_cross_field_rule_is_explained(tmp_path):
    p = write(tmp_path, GOOD + "[neuron]\nexec_timeout_s = 60\n")
    with pytest.raises(ConfigError, match="exec_timeout_s must be below server.timeout_s"):
        config.load(p)


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_model_name_becomes_unit_name_so_it_is_checked(tmp_path):
    p = write(tmp_path, GOOD.replace("[models.bert]", '[models."Bert QA"]'))
    with pytest.raises(ConfigError, match="model name 'Bert QA' must match"):
        config.load(p)


@pytest.mark.parametrize("spec,cores", [("0-3,6", [0, 1, 2, 3, 6]), ("5", [5]), ([2, 0], [0, 2]), ("1, 3", [1, 3])])
def test_core_lists_round_trip(spec, cores):
    assert config.parse_core_list(spec) == cores
    assert config.parse_core_list(config.format_core_list(cores)) == cores


@pytest.mark.parametrize("spec", ["3-1", "a", "0,0", "1-", ""])
def test_bad_core_lists(spec):
    with pytest.raises(ValueError):
        config.parse_core_list(spec)


def test_reference_covers_every_field():
    keys = {k for k, _, _ in config.settings_reference()}
    assert "server.base_port" in keys and "models.<name>.copies" in keys and "nginx.rate_limit" in keys
    assert len(keys) == sum(len(s.model_fields) for s in (
        config.ServerSection, config.NginxSection, config.NeuronSection, config.CudaSection, config.CpuSection,
        config.MonitoringSection, config.KubernetesSection, config.ModelSection))


def test_cli_reports_config_error_without_traceback(tmp_path):
    p = write(tmp_path, GOOD + "copise = 3\n")
    r = subprocess.run([sys.executable, "-m", "neuronserve", "config", "--config", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and f"{p}:10: models.bert.copise" in r.stderr


# ---------------------------------------------------------------- fuzz: a valid config or a clear error

KEYS = ["server", "nginx", "models", "cpu", "neuron", "backend", "copies", "task", "source", "base_port",
        "batch_sizes", "groups", "cores", "listen", "x", "bert"]
SCALARS = st.one_of(st.integers(-5, 70000), st.booleans(), st.text(string.printable, max_size=8),
                    st.sampled_from(["cpu", "auto", "all", "0-3", "question-answering", "1m", "100r/s"]),
                    st.floats(allow_nan=False, allow_infinity=False))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)


def _toml(value) -> str:
    import tomli_w

    return tomli_w.dumps(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4))
def test_fuzz_structured_documents(tmp_path, doc):
    try:
        text = _toml(doc)
    except (TypeError, ValueError):
        return  # not representable in TOML (e.g. mixed arrays the writer refuses)
    check_loads_or_explains(tmp_path, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=string.printable + "é\u2028", max_size=200))
def test_fuzz_raw_text(tmp_path, text):
    check_loads_or_explains(tmp_path, text)


def check_loads_or_explains(tmp_path: Path, text: str) -> None:
    p = tmp_path / "fuzz.toml"
    p.write_text(text, encoding="utf-8")
    try:
        cfg = config.load(p, dropins=False)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(str(p)), msg     # always names the file
        assert "Traceback" not in msg and msg.strip()
    else:
        assert isinstance(cfg, config.Config)


# ---------------------------------------------------------------- fuzz: a valid config never breaks what reads it
# load() accepting a value is not enough: the planner, the renderer (nginx takes some values unquoted) and
# `up`/`doctor` (which parse nginx.listen) must take it too, or refuse it with a NeuronserveError.

LISTENS = st.one_of(st.text(string.printable, max_size=24),
                    st.sampled_from(["8080", "0.0.0.0:8080", "[::]:8080", "localhost:80", "*:8080", "0:0", "x:65536",
                                     "127.0.0.1:80; include /etc/shadow", "[::1]:99999", "a b:80", ":80", "8080:"]))
NGINX = st.fixed_dictionaries({}, optional={
    "listen": LISTENS, "client_max_body_size": st.sampled_from(["1m", "0", "64k", "1g", "1 m", "-1m"]),
    "keepalive": st.integers(-1, 5000), "max_fails": st.integers(-1, 10), "fail_timeout_s": st.integers(-1, 10),
    "rate_limit": st.sampled_from(["10r/s", "1r/m", "0r/s", "10r/h", "fast"]),
    "rate_limit_burst": st.integers(-1, 100)})
SERVER = st.fixed_dictionaries({"backend": st.just("cpu")}, optional={
    "base_port": st.integers(0, 70000), "timeout_s": st.floats(0, 5000, allow_nan=False),
    "graceful_timeout_s": st.floats(0, 5000, allow_nan=False), "log_level": st.sampled_from(["info", "loud"])})
MODEL = st.fixed_dictionaries({"task": st.just("feature-extraction"), "source": st.just("/srv/m")}, optional={
    "groups": st.one_of(st.integers(0, 3), st.just("all")), "copies": st.integers(0, 3),
    "batch_sizes": st.lists(st.integers(-1, 64), max_size=3), "sequence_lengths": st.lists(st.integers(-1, 512),
                                                                                            max_size=3)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(server=SERVER, nginx=NGINX, model=MODEL)
def test_fuzz_valid_configs_plan_and_render_or_explain(tmp_path, server, nginx, model):
    from neuronserve.devices import cpu
    from neuronserve.errors import NeuronserveError
    from neuronserve.layout import Layout
    from neuronserve.plan import make_plan
    from neuronserve.render import render_files
    from neuronserve.operate.up import front_url_for

    p = write(tmp_path, _toml({"server": server, "nginx": nginx, "models": {"m": model}}))
    try:
        cfg = config.load(p, dropins=False)
    except ConfigError as e:
        assert str(e).startswith(str(p)), e
        return
    try:
        plan = make_plan(cfg, cpu.discover(affinity={0, 1}), python=sys.executable)
        files = render_files(plan, Layout(tmp_path / "root", cfg))
    except NeuronserveError as e:
        assert str(e).strip() and "Traceback" not in str(e)
        return
    front = next(text for path, text in files.items() if path.suffix == ".conf" and "upstream" in text)
    assert f"listen {cfg.nginx.listen};" in front
    port = int(front_url_for(cfg.nginx.listen).rsplit(":", 1)[1])
    assert 1 <= port <= 65535
