"""The planner on CPU hosts (the Neuron and CUDA hosts are covered with recorded samples in test_devices)."""
from __future__ import annotations

from pathlib import Path

import pytest

from neuronserve import config
from neuronserve.devices import cpu
from neuronserve.errors import PlanError
from neuronserve.layout import Layout
from neuronserve.plan import group_of_unit, make_plan
from neuronserve.server.settings import ServerSettings


def cfg_from(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "neuronserve.toml"
    p.write_text('[server]\nbackend = "cpu"\nmodel_repository = "/srv/models"\n' + text)
    return config.load(p)


def model(name: str, **keys) -> str:
    body = {"task": '"feature-extraction"', "source": '"/srv/src"', **{k: str(v) for k, v in keys.items()}}
    return f"[models.{name}]\n" + "".join(f"{k} = {v}\n" for k, v in body.items())


def host(n: int):
    return cpu.discover(affinity=set(range(n)))


def test_all_cores_one_per_group(tmp_path):
    plan = make_plan(cfg_from(tmp_path, model("emb", copies=1)), host(4), python="/usr/bin/python3")
    assert [g.name for g in plan.groups] == ["emb-0", "emb-1", "emb-2", "emb-3"]
    assert [g.cores for g in plan.groups] == [[0], [1], [2], [3]]
    assert [g.port for g in plan.groups] == [8100, 8101, 8102, 8103]
    g = plan.groups[1]
    assert g.unit == "neuronserve@emb-1.service" and g.address == "127.0.0.1:8101"
    assert g.env["NEURONSERVE_CPUS"] == "1" and g.env["OMP_NUM_THREADS"] == "1"
    # one thread per copy: only a lent batch has OpenMP threads, and they must not spin long on a lent CPU
    assert g.env["GOMP_SPINCOUNT"] == "10000"
    wide = make_plan(cfg_from(tmp_path, model("emb", copies=1, cores_per_group=2)), host(4), python="py")
    assert wide.groups[0].env["OMP_NUM_THREADS"] == "2" and "GOMP_SPINCOUNT" not in wide.groups[0].env


def test_env_round_trips_into_server_settings(tmp_path):
    plan = make_plan(cfg_from(tmp_path, model("emb", copies=2, cores_per_group=4)), host(8), python="py")
    g = plan.groups[0]
    s = ServerSettings.from_env(g.env)
    assert s == g.settings
    assert s.model_dir == Path("/srv/models/emb") and s.cpus == "0-3" and s.threads == 2 and s.copies == 2
    layout = Layout(Path("/"), plan.config)
    assert plan.argv(g, layout) == ["py", "-m", "gunicorn", "--config", "/etc/neuronserve/gunicorn/emb-0.conf.py",
                                    "neuronserve.server.app:create_app()"]


def test_threads_never_oversubscribe(tmp_path):
    plan = make_plan(cfg_from(tmp_path, model("emb", copies=3, cores_per_group=2)), host(4), python="py")
    # 2 CPUs shared by 3 copies: one thread each is the most that does not oversubscribe
    assert all(g.settings.threads == 1 for g in plan.groups)


def test_fixed_models_first_then_all_split_the_rest(tmp_path):
    text = model("qa", groups=1, cores_per_group=2) + model("emb") + model("cls")
    plan = make_plan(cfg_from(tmp_path, text), host(8), python="py")
    by = {m: [g.cores for g in gs] for m, gs in plan.by_model().items()}
    assert by["qa"] == [[0, 1]]
    assert by["emb"] == [[2], [3], [4]]
    assert by["cls"] == [[5], [6], [7]]
    cores = [c for g in plan.groups for c in g.cores]
    assert len(cores) == len(set(cores)) == 8


def test_explicit_cores(tmp_path):
    plan = make_plan(cfg_from(tmp_path, model("emb", cores='"2-3"') + model("qa", cores="[0]")), host(4),
                     python="py")
    assert [(g.name, g.cores) for g in plan.groups] == [("emb-0", [2]), ("emb-1", [3]), ("qa-0", [0])]


@pytest.mark.parametrize("text,host_cores,message", [
    (model("a", groups=3, cores_per_group=2), 4, r"models.a asks for 3 group\(s\) x 2 core\(s\) = 6 cores, but only 4"),
    (model("a", cores='"6"'), 4, r"models.a.cores names 6, which this host does not have \(cpu cores: 0-3\)"),
    (model("a", cores='"0-1"') + model("b", cores='"1-2"'), 4, r"models.b.cores overlaps models.a on core\(s\) 1"),
    (model("a", cores_per_group=3), 2, r"models.a gets no group: 2 free core\(s\) and cores_per_group = 3"),
    (model("a", groups=2) + model("b"), 2, r"models.b gets no group: 0 free core"),
    ("", 2, r"no models configured"),
])
def test_impossible_plans_are_refused_with_the_reason(tmp_path, text, host_cores, message):
    with pytest.raises(PlanError, match=message):
        make_plan(cfg_from(tmp_path, text), host(host_cores), python="py")


def test_port_conflicts(tmp_path):
    text = "[nginx]\nlisten = \"127.0.0.1:8101\"\n" + model("a")
    with pytest.raises(PlanError, match="would listen on 8101, the port nginx.listen uses"):
        make_plan(cfg_from(tmp_path, text), host(4), python="py")
    cfg = cfg_from(tmp_path, model("a", copies=1))
    cfg.server.base_port = 65000
    with pytest.raises(PlanError, match=r"group a-0 would serve gRPC on port 66000: lower server.base_port, or set "
                                        r"server.grpc_base_port \(default: base_port \+ 1000\)"):
        make_plan(cfg, host(600), python="py")
    cfg.nginx.grpc_listen = ""
    with pytest.raises(PlanError, match="port 65536: lower server.base_port"):
        make_plan(cfg, host(600), python="py")


def test_grpc_ports_and_the_front_groups_pass_other_models_through(tmp_path):
    one = make_plan(cfg_from(tmp_path, model("a", copies=1)), host(2), python="py")
    assert [g.grpc_port for g in one.groups] == [9100, 9101] and one.groups[1].grpc_address == "127.0.0.1:9101"
    # one model: nothing to pass on
    assert [g.settings.grpc_port for g in one.groups] == [9100, 9101] and one.groups[0].settings.grpc_front == ""
    text = '[nginx]\ngrpc_listen = "[::]:9000"\n' + model("a", copies=1, groups=1) + model("b", copies=1)
    two = make_plan(cfg_from(tmp_path, text), host(3), python="py")
    assert {g.settings.grpc_front for g in two.groups} == {"[::1]:9000"}
    assert [g.grpc_port for g in two.groups] == [9100, 9101, 9102]
    off = make_plan(cfg_from(tmp_path, '[nginx]\ngrpc_listen = ""\n' + model("a", copies=1)), host(2), python="py")
    assert [(g.grpc_port, g.env["NEURONSERVE_GRPC_PORT"]) for g in off.groups] == [(0, "0"), (0, "0")]
    cfg = cfg_from(tmp_path, model("a", copies=1))
    cfg.server.grpc_base_port = 8079
    with pytest.raises(PlanError, match="group a-1 would serve gRPC on 8080, the port nginx.listen uses: move "
                                        "server.grpc_base_port or nginx.listen"):
        make_plan(cfg, host(2), python="py")
    cfg = cfg_from(tmp_path, model("a", copies=1))
    cfg.server.grpc_base_port = 8101
    with pytest.raises(PlanError, match="would serve gRPC on 8101, a port of the groups' HTTP \\(8100-8101\\)"):
        make_plan(cfg, host(2), python="py")


def test_unit_names_map_back_to_their_group(tmp_path):
    plan = make_plan(cfg_from(tmp_path, model("emb-x", copies=1)), host(2), python="py")
    for g in plan.groups:
        assert group_of_unit(g.unit) == g.name
        assert group_of_unit(g.legacy_unit) == g.name       # an earlier version's whole unit, to migrate
    assert group_of_unit("neuronserve@.service") is None
    assert group_of_unit("neuronserve.target") is None
    assert group_of_unit("neuronserve-.service") is None
    assert group_of_unit("nginx.service") is None
    assert group_of_unit("neuronserve-bert-0.socket") is None
