"""Rendering: every unit passes `systemd-analyze verify` and rates 2.0 or better in `systemd-analyze security`,
every front config passes `nginx -t`, overrides win, and only changed files are rewritten.

systemd-analyze runs with --root=<the layout's scratch root>, into which the host's system units are copied
(for sysinit.target & co.) and a stub interpreter is put at the plan's python path, so ExecStart resolves.
"""
from __future__ import annotations

import json
import re
import runpy
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from neuronserve import config
from neuronserve.devices import Core, Host, cpu
from neuronserve.errors import ConfigError, RenderError
from neuronserve.layout import Layout
from neuronserve.plan import make_plan
from neuronserve.render import (HEADER, Secret, auth_map_path, render_files, stale_units, systemd_arg, systemd_env,
                                write_files)
from neuronserve.operate.up import prepare_front

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NGINX = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin:/usr/local/sbin"))
needs_systemd = pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze is not installed")
needs_nginx = pytest.mark.skipif(not NGINX, reason="nginx is not installed (make sysdeps)")
MAX_EXPOSURE = 2.0

TWO_MODELS = """
[models.emb]
task = "feature-extraction"
source = "/srv/src/emb"
copies = 1

[models.qa]
task = "question-answering"
source = "/srv/src/qa"
groups = 1
"""


def load_cfg(tmp_path: Path, text: str, server: str = "") -> config.Config:
    p = tmp_path / "neuronserve.toml"
    p.write_text(f'[server]\nmodel_repository = "/srv/models"\n{server}\n[nginx]\nlisten = "127.0.0.1:18080"\n'
                 + text)
    return config.load(p)


def with_nginx(cfg: config.Config, **keys) -> config.Config:
    for k, v in keys.items():
        setattr(cfg.nginx, k, v)
    return cfg


HOSTS = {
    "cpu": lambda: cpu.discover(affinity={0, 1, 2, 3}),
    # inf2.8xlarge-like: one chip, 2 cores; plus a second chip to check device numbering
    "neuron": lambda: Host(backend="neuron", kind="inf2", source="test",
                           cores=[Core(index=i, device=i // 2, cpus=tuple(range(8 * (i // 2), 8 * (i // 2) + 8)))
                                  for i in range(4)]),
    "cuda": lambda: Host(backend="cuda", kind="cuda", source="test",
                         cores=[Core(index=i, device=i, cpus=(2 * i, 2 * i + 1)) for i in range(3)]),
}
PYTHONS = {"cpu": "/usr/local/venv/bin/python3",
           "neuron": "/opt/aws_neuronx_venv_pytorch_2_9/bin/python",
           "cuda": "/opt/conda envs/torch %2/bin/python"}   # a space and a % to exercise ExecStart quoting


def system_root(layout: Layout, python: str) -> None:
    """Make the layout's root a place systemd-analyze --root can load units from."""
    shutil.copytree("/usr/lib/systemd/system", layout.root / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True)
    exe = layout.under(python)
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)


def verify(layout: Layout, units: list[Path | str]) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", f"--root={layout.root}", *map(str, units)],
                          capture_output=True, text=True, timeout=60)


def exposure(layout: Layout, unit: Path | str) -> float:
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", f"--root={layout.root}", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


@needs_systemd
@pytest.mark.parametrize("backend", sorted(HOSTS))
def test_units_verify_cleanly_and_are_hardened(tmp_path, backend):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    plan = make_plan(cfg, HOSTS[backend](), python=PYTHONS[backend])
    layout = Layout(tmp_path / "root", cfg)
    write_files(render_files(plan, layout))
    system_root(layout, plan.python)
    # no package installed the shipped units in this root: copies in /etc, beside each instance's drop-in
    assert sorted(p.name for p in layout.unit_dir.iterdir()) == sorted(
        ["neuronserve.target", "neuronserve@.service", *(g.unit + ".d" for g in plan.groups)])
    units = [layout.unit_path("neuronserve.target"), *(g.unit for g in plan.groups)]
    r = verify(layout, units)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    for g in plan.groups:
        assert exposure(layout, g.unit) <= MAX_EXPOSURE, g.unit


@needs_systemd
def test_verify_catches_a_missing_interpreter(tmp_path):
    """The check above is real: the same unit without the interpreter on disk fails verification."""
    cfg = load_cfg(tmp_path, TWO_MODELS)
    plan = make_plan(cfg, HOSTS["cuda"](), python=PYTHONS["cuda"])
    layout = Layout(tmp_path / "root", cfg)
    write_files(render_files(plan, layout))
    system_root(layout, "/elsewhere/python")
    r = verify(layout, [plan.groups[0].unit])
    assert r.returncode != 0 and "/opt/conda envs/torch %2/bin/python" in r.stderr


def test_unit_content_per_backend(tmp_path):
    cfg = load_cfg(tmp_path, TWO_MODELS, server='user = "svc"\ngraceful_timeout_s = 20')
    units = {}
    for backend, make_host in HOSTS.items():
        plan = make_plan(cfg, make_host(), python=PYTHONS[backend])
        layout = Layout(tmp_path / backend, cfg)
        files = render_files(plan, layout)
        units[backend] = {g.name: files[layout.dropin_path(g.unit)] for g in plan.groups}
        g = plan.groups[1]
        text = units[backend][g.name]
        assert text.startswith(f"# {HEADER}\n")
        assert "\nUser=svc\n" in text and not re.search(r"^Group=", text, re.M)
        # the template's ExecStart reset first, then the group's own
        assert re.search(r"^ExecStart=\nExecStart=\S", text, re.M)
        assert "TimeoutStopSec=30" in text and "TimeoutStartSec=600" in text and "WatchdogSec=30000ms" in text
        assert f"CPUAffinity={g.settings.cpus}\n" in text
        # every variable of the group's environment, and nothing else
        envs = re.findall(r'^Environment="([^=]+)=(.*)"$', text, re.M)
        assert dict(envs) == plan.env(g, layout)
    # what every group shares is in the template unit
    template = files[layout.unit_path("neuronserve@.service")]
    assert "PartOf=neuronserve.target" in template and "WantedBy=neuronserve.target" in template
    assert "Before=neuronserve.target" in template and "Type=notify" in template and "NotifyAccess=all" in template
    assert "Restart=on-failure" in template and "KillMode=mixed" in template
    assert "SyslogIdentifier=neuronserve-%i" in template and "StandardOutput=journal" in template
    assert "MemoryDenyWriteExecute" not in template.replace("# no MemoryDenyWriteExecute", "")
    # CPU groups lend each other idle CPUs through lock files in a shared runtime directory; no other backend
    cpu_unit = units["cpu"]["emb-1"]
    assert "\nRuntimeDirectory=neuronserve/cpus\nRuntimeDirectoryPreserve=yes\n" in cpu_unit
    assert f'Environment="NEURONSERVE_LEND_DIR={tmp_path}/cpu/run/neuronserve/cpus"' in cpu_unit
    assert not any("RuntimeDirectory" in u for b in ("neuron", "cuda") for u in units[b].values())
    assert "SupplementaryGroups=neuron" in units["neuron"]["emb-1"]
    assert re.findall(r"^DeviceAllow=(.*)$", units["neuron"]["emb-1"], re.M) == ["/dev/neuron0 rw", "/dev/neuron1 rw"]
    # a GPU group may open its own GPU and the control nodes, not the other GPUs (qa-0 has GPU 0, emb-1 GPU 2)
    cuda_allow = re.findall(r"^DeviceAllow=(\S+)", units["cuda"]["emb-1"], re.M)
    assert cuda_allow == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia2"]
    for backend in ("cpu", "cuda"):
        assert "SupplementaryGroups" not in units[backend]["emb-0"]
    assert "PrivateDevices" not in units["cpu"]["emb-0"] and "DevicePolicy" not in units["cpu"]["emb-0"]
    assert "PrivateDevices=no" in units["cuda"]["emb-0"] and "DevicePolicy=closed" in units["cuda"]["emb-0"]
    assert "ExecStart=\"/opt/conda envs/torch %%2/bin/python\" -m gunicorn" in units["cuda"]["emb-0"]


def test_models_under_home_are_readable(tmp_path):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    cfg.server.model_repository = Path("/home/ml/models")
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    layout = Layout(tmp_path / "root", cfg)
    text = render_files(plan, layout)[layout.dropin_path(plan.groups[0].unit)]
    assert "ProtectHome=read-only" in text and "ReadOnlyPaths=-/home/ml/models" in text
    # a venv whose interpreter links into a home directory (pyenv) needs it visible too
    cfg.server.model_repository = Path("/srv/models")
    venv_python = tmp_path / "venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to("/root/.pyenv/versions/3.11.7/bin/python3.11")
    for python, protect in [("/usr/bin/python3", False), (str(venv_python), True)]:
        plan = make_plan(cfg, HOSTS["cpu"](), python=python)
        text = render_files(plan, layout)[layout.dropin_path(plan.groups[0].unit)]
        assert ("ProtectHome=read-only\n" in text) == protect     # else the template's ProtectHome=yes


def test_systemd_quoting():
    assert systemd_arg("/usr/bin/python3") == "/usr/bin/python3"
    assert systemd_arg("neuronserve.server.app:create_app()") == "neuronserve.server.app:create_app()"
    assert systemd_arg("a b") == '"a b"'
    assert systemd_arg('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert systemd_arg("100%") == "100%%" and systemd_arg("$HOME") == '"$$HOME"'
    assert systemd_arg(";") == "\\;" and systemd_arg("") == '""'
    assert systemd_env("A", 'x "y" 5%') == '"A=x \\"y\\" 5%%"'
    with pytest.raises(RenderError):
        systemd_env("A B", "1")


def test_gunicorn_config(tmp_path):
    from gunicorn.config import KNOWN_SETTINGS

    cfg = load_cfg(tmp_path, TWO_MODELS, server="timeout_s = 20\ngraceful_timeout_s = 12\nlog_level = \"debug\"")
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    layout = Layout(tmp_path / "root", cfg)
    write_files(render_files(plan, layout))
    g = plan.groups[2]
    settings = {k: v for k, v in runpy.run_path(str(layout.gunicorn_conf(g.name))).items() if not k.startswith("__")}
    # every name is a gunicorn setting: a typo would be silently ignored by gunicorn
    assert set(settings) <= {s.name for s in KNOWN_SETTINGS}
    assert settings["bind"] == [f"127.0.0.1:{g.port}"]
    assert settings["workers"] == 1 and settings["preload_app"] is False
    assert settings["worker_class"] == "neuronserve.server.worker.Worker"
    assert settings["graceful_timeout"] == 12 and settings["timeout"] >= 20
    assert settings["loglevel"] == "debug" and settings["proc_name"] == f"neuronserve-{g.name}"
    assert settings["accesslog"] is None and settings["errorlog"] == "-" and settings["max_requests"] == 0


def test_front_routes_each_model_to_its_groups(tmp_path):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    layout = Layout(tmp_path / "root", cfg)
    text = render_files(plan, layout, down={"emb-1"})[layout.nginx_conf]
    upstreams = dict(re.findall(r"^upstream (\S+) \{\n(.*?)^\}", text, re.M | re.S))
    assert set(upstreams) == {"neuronserve_emb", "neuronserve_qa", "neuronserve__all", "neuronserve_grpc_emb",
                              "neuronserve_grpc_qa", "neuronserve_grpc__all"}
    emb = upstreams["neuronserve_emb"]
    assert "least_conn;" in emb and "keepalive 64;" in emb
    # one balancing state for all nginx workers, a zone of its own per upstream
    zones = [re.search(r"^\s*zone (\S+) 64k;$", u, re.M).group(1) for u in upstreams.values()]
    assert zones[0] == "neuronserve_upstream_emb" and len(set(zones)) == 6
    # gRPC: each group's own port, the drained one down there too, routed by the model header
    grpc = upstreams["neuronserve_grpc_emb"]
    assert "server 127.0.0.1:9100 max_fails" in grpc and "server 127.0.0.1:9101 down;" in grpc
    assert "server 127.0.0.1:9103 max_fails" in upstreams["neuronserve_grpc_qa"]
    assert re.search(r"map \$http_x_neuronserve_model \$neuronserve_grpc_upstream \{\s+default neuronserve_grpc__all;"
                     r"\s+\"emb\" neuronserve_grpc_emb;\s+\"qa\" neuronserve_grpc_qa;\s+\}", text)
    assert "listen 0.0.0.0:8081 http2;" in text and 'grpc_set_header x-neuronserve-models "emb,qa";' in text
    assert "grpc_pass grpc://$neuronserve_grpc_upstream;" in text
    assert "server 127.0.0.1:8100 max_fails=0 fail_timeout=2s;" in emb
    assert "server 127.0.0.1:8101 down;" in emb and "8103" not in emb
    assert "server 127.0.0.1:8103 max_fails" in upstreams["neuronserve_qa"]
    assert "location ~ ^/(v2/)?models/emb(/|$) {" in text and "proxy_pass http://neuronserve_emb;" in text
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in text
    assert "listen 127.0.0.1:18080;" in text and "Bearer" not in text and "limit_req" not in text
    with pytest.raises(RenderError, match="nope"):
        render_files(plan, layout, down={"nope"})


@needs_nginx
@pytest.mark.parametrize("variant", ["plain", "auth+rate", "drained"])
def test_front_passes_nginx_t(tmp_path, variant):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    if variant == "auth+rate":
        (tmp_path / "token").write_text("s3cr3t-T0ken_ok\n")
        with_nginx(cfg, auth_token_file=tmp_path / "token", rate_limit="50r/m")
    for backend, make_host in HOSTS.items():
        plan = make_plan(cfg, make_host(), python="/usr/bin/python3")
        # drained: every group of a model down at once is still a valid config
        down = {g.name for g in plan.groups if g.model == "emb"} if variant == "drained" else set()
        layout = Layout(tmp_path / backend, cfg)
        write_files(render_files(plan, layout, down=down))
        prepare_front(layout)       # raises ServiceError with nginx's message unless `nginx -t` passes


@needs_nginx
@pytest.mark.parametrize("njs", [True, False])
def test_openai_routing_and_the_model_listing_with_njs_and_without(tmp_path, monkeypatch, njs):
    from neuronserve import render

    if njs and not render.njs_module():
        pytest.skip("nginx's njs module is not installed (make sysdeps)")
    if not njs:
        monkeypatch.setattr(render, "njs_module", lambda: None)
    cfg = load_cfg(tmp_path, TWO_MODELS)
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    layout = Layout(tmp_path / "root", cfg)
    files = render_files(plan, layout)
    text = files[layout.nginx_conf]
    listing = json.loads(re.search(r"location = /v1/models \{\n\s*return 200 '(.*)\\n';", text).group(1))
    assert [m["id"] for m in listing["data"]] == ["emb", "qa"]
    if njs:
        script = files[render.njs_script_path(layout)]
        models = json.loads(re.search(r"^var MODELS = (.*);$", script, re.M).group(1))
        assert models == {"emb": {"task": "feature-extraction", "groups": ["emb-0", "emb-1", "emb-2"]},
                          "qa": {"task": "question-answering", "groups": ["qa-0"]}}
        assert f'js_import neuronserve from "{render.njs_script_path(layout)}";' in text
        assert "js_content neuronserve.embeddings;" in text and "js_content neuronserve.repository;" in text
        # each group's readiness, for the script's subrequests
        assert "location = /_neuronserve/ready/qa-0 {\n        internal;\n        proxy_pass http://127.0.0.1:8103/v2" \
            "/health/ready;" in text
    else:
        assert render.njs_script_path(layout) not in files and "js_" not in text
        assert "use http://<host>/models/<name>/v1 as the base URL" in text
        assert "return 501 '{\"error\": \"listing the models with their state needs nginx\\'s njs" in text
    write_files(files)
    prepare_front(layout)
    # one model: the root goes to it, TEI's routes too
    one_model = load_cfg(tmp_path, TWO_MODELS.split("[models.qa]")[0])
    single = make_plan(one_model, HOSTS["cpu"](), python="/usr/bin/python3")
    text = render_files(single, layout)[layout.nginx_conf]
    assert re.search(r"location = /v1/embeddings \{\n\s*proxy_pass http://neuronserve_emb;", text)
    assert "location ~ ^/(embed|embed_all|rerank|predict|tokenize|decode|info)$ {" in text
    assert "location = /health {" in text           # TEI's readiness: turns 503 while the host is drained


@needs_nginx
def test_nginx_t_failure_is_reported(tmp_path):
    from neuronserve.errors import ServiceError

    cfg = load_cfg(tmp_path, TWO_MODELS)
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    layout = Layout(tmp_path / "root", cfg)
    (layout.template_override_dir).mkdir(parents=True)
    (layout.template_override_dir / "nginx.conf.j2").write_text("server { bogus_directive on; }\n")
    write_files(render_files(plan, layout))
    with pytest.raises(ServiceError, match="bogus_directive"):
        prepare_front(layout)


def test_auth_token_is_a_secret(tmp_path):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    (tmp_path / "token").write_text("abcDEF123456\n")
    with_nginx(cfg, auth_token_file=tmp_path / "token", rate_limit="100r/s")
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    layout = Layout(tmp_path / "root", cfg)
    files = render_files(plan, layout)
    front = files[layout.nginx_conf]
    assert "abcDEF123456" not in front and str(auth_map_path(layout)) in front
    assert "limit_req_zone $binary_remote_addr zone=neuronserve_clients:10m rate=100r/s;" in front
    assert "burst=100 nodelay" in front and "limit_req_status 429;" in front
    assert isinstance(files[auth_map_path(layout)], Secret)
    changes = write_files(files)
    assert all("abcDEF123456" not in c.diff for c in changes)
    assert stat.S_IMODE(auth_map_path(layout).stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.nginx_conf.stat().st_mode) == 0o644
    assert '"Bearer abcDEF123456" 1;' in auth_map_path(layout).read_text()


@pytest.mark.parametrize("content, message", [("two words\n", "one bearer token"), ('quo"te', "one bearer token"),
                                              (None, "cannot read")])
def test_bad_token_file(tmp_path, content, message):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    if content is not None:
        (tmp_path / "token").write_text(content)
    with_nginx(cfg, auth_token_file=tmp_path / "token")
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    with pytest.raises(ConfigError, match=message):
        render_files(plan, Layout(tmp_path / "root", cfg))


def test_override_template_wins(tmp_path):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    layout = Layout(tmp_path / "root", cfg)
    layout.template_override_dir.mkdir(parents=True)
    (layout.template_override_dir / "group.conf.j2").write_text(
        "# site copy\n[Service]\nExecStart=\nExecStart={{ argv | map('systemd_arg') | join(' ') }} --site\n")
    files = render_files(plan, layout)
    for g in plan.groups:
        assert files[layout.dropin_path(g.unit)].startswith("# site copy\n[Service]\n")
        assert files[layout.dropin_path(g.unit)].endswith(" --site\n")
    # the other templates still come from the package
    assert files[layout.gunicorn_conf(plan.groups[0].name)].startswith(f"# {HEADER}")
    # an override naming a variable that does not exist fails loudly, naming the template
    (layout.template_override_dir / "group.conf.j2").write_text("{{ no_such_thing }}")
    with pytest.raises(RenderError, match="group.conf.j2"):
        render_files(plan, layout)


def test_write_files_rewrites_only_changes(tmp_path):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    layout = Layout(tmp_path / "root", cfg)
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    files = render_files(plan, layout)

    preview = write_files(files, dry_run=True)
    assert {c.path for c in preview} == set(files) and all(c.action == "create" for c in preview)
    assert not any(p.exists() for p in files)

    first = write_files(files)
    assert {c.path for c in first} == set(files)
    assert all(p.read_text() == text for p, text in files.items())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert write_files(render_files(plan, layout)) == []
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    cfg.models["qa"].copies = 3
    changes = write_files(render_files(make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3"), layout))
    qa_unit = layout.dropin_path("neuronserve@qa-0.service")
    assert [c.path for c in changes] == [qa_unit] and changes[0].action == "update"
    assert '-Environment="NEURONSERVE_COPIES=2"' in changes[0].diff
    assert '+Environment="NEURONSERVE_COPIES=3"' in changes[0].diff
    assert 'NEURONSERVE_COPIES=3' in qa_unit.read_text()
    assert not list(qa_unit.parent.glob(".*"))      # no temp file left behind


def test_stale_units(tmp_path):
    cfg = load_cfg(tmp_path, TWO_MODELS)
    layout = Layout(tmp_path / "root", cfg)
    plan = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    write_files(render_files(plan, layout))
    assert stale_units(layout, plan) == {}
    # an earlier version's whole unit of a group (written by neuronserve), and one of someone else's
    legacy = layout.unit_path("neuronserve-emb-0.service")
    legacy.write_text(f"# {HEADER}\n[Service]\n")
    layout.unit_path("neuronserve-exporter.service").write_text("[Service]\n")
    del cfg.models["qa"]
    smaller = make_plan(cfg, HOSTS["cpu"](), python="/usr/bin/python3")
    assert stale_units(layout, smaller) == {"neuronserve-emb-0.service": [legacy],
                                            "neuronserve@qa-0.service": [layout.dropin_path("neuronserve@qa-0.service")]}


def test_cli_render(tmp_path):
    from click.testing import CliRunner

    from neuronserve.cli import main

    cfg_path = tmp_path / "neuronserve.toml"
    cfg_path.write_text('[server]\nbackend = "cpu"\n' + TWO_MODELS)
    root = tmp_path / "root"
    args = ["render", "--config", str(cfg_path), "--root", str(root)]
    preview = CliRunner().invoke(main, args + ["--dry-run"])
    assert preview.exit_code == 0, preview.output
    assert "+++ " + str(root / "etc/systemd/system/neuronserve@emb-0.service.d/10-neuronserve.conf") in preview.output
    assert re.search(r"would change \d+ file\(s\)", preview.output) and not root.exists()
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and (root / "etc/nginx/conf.d/neuronserve.conf").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.output.startswith("changed 0 file(s)")
    cfg_path.write_text(cfg_path.read_text().replace("[models.emb]", f'[nginx]\nauth_token_file = "{tmp_path}/none"\n'
                                                                   "[models.emb]"))
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code == 2 and "neuronserve: error: nginx.auth_token_file: cannot read" in bad.output
