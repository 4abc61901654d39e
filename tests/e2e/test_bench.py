"""`neuronserve bench` against the real CPU stack: both protocols, the open loop, and a two-point sweep."""
from __future__ import annotations

import csv
import json
import socket
import sys

from click.testing import CliRunner

from neuronserve.measure import bench
from neuronserve.cli import main
from neuronserve.operate.up import local_ports


def test_closed_loop_through_nginx_both_protocols(stack):
    for protocol in ("hf", "v2"):
        path, body = bench.request_body("feature-extraction", "emb", protocol)
        row = bench.measure(bench.targets_for([stack.front_url], path, body), bench.Load("closed", 2),
                            bench.Options(duration_s=None, count=20, ramp_s=0.5, timeout_s=20),
                            {g: u + "/metrics" for g, u in stack.group_urls.items()})
        assert row.ok == 20 and row.errors == 0, (protocol, row.errors_by_kind)
        assert row.p50_ms <= row.p99_ms <= row.max_ms
        # the share comes from each group's neuronserve_requests_total: it sums to one over the groups
        assert set(row.share) <= set(stack.group_urls) and abs(sum(row.share.values()) - 1) < 1e-9


def test_open_loop_directly_on_the_groups(stack):
    path, body = bench.request_body("feature-extraction", "emb")
    targets = bench.targets_for(list(stack.group_urls.values()), path, body)
    row = bench.measure(targets, bench.Load("open", 20.0),
                        bench.Options(duration_s=2.0, ramp_s=0.5, timeout_s=20, seed=3),
                        {g: u + "/metrics" for g, u in stack.group_urls.items()})
    assert row.ok > 10 and row.errors == 0, row.errors_by_kind
    # arrivals alternate between the two groups, so each served some of them
    assert set(row.share) == set(stack.group_urls) and all(f > 0 for f in row.share.values())



def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sweep_over_groups_and_copies_on_the_cpu_stack(model_repo, tmp_path):
    ports = local_ports(2)
    cfg = tmp_path / "neuronserve.toml"
    cfg.write_text(
        f'[server]\nbackend = "cpu"\nmodel_repository = "{model_repo}"\nbase_port = {ports["server"]["base_port"]}\n'
        f'grpc_base_port = {ports["server"]["grpc_base_port"]}\n'
        f'log_level = "warning"\ntimeout_s = 20.0\ngraceful_timeout_s = 5.0\npython = "{sys.executable}"\n'
        f'[nginx]\nlisten = "{ports["nginx"]["listen"]}"\ngrpc_listen = "{ports["nginx"]["grpc_listen"]}"\n'
        f'[models.cls]\ntask = "text-classification"\nsource = "/unused/cls"\ngroups = 1\ncopies = 1\n'
        f'max_batch_delay_ms = 2.0\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["bench", "--config", str(cfg), "--sweep", "1x1,2x1", "--concurrency", "2",
                                    "--duration", "2", "--ramp", "1", "--ready-timeout", "240",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "# 1 group(s) x 1 copies" in res.output and "# 2 group(s) x 1 copies" in res.output

    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [(r["groups"], r["copies"], r["mode"], r["level"]) for r in rows] == \
        [("1", "1", "closed", "2"), ("2", "1", "closed", "2")]
    for r in rows:
        assert int(r["ok"]) > 0 and r["errors"] == "0" and float(r["throughput_rps"]) > 0
        assert float(r["client_cpu_s"]) > 0
    data = json.loads((out / "bench.json").read_text())
    one, two = data["rows"]
    assert set(one["share"]) == {"cls-0"} and one["share"]["cls-0"] == 1.0
    # nginx least_conn spreads two connections over both groups
    assert set(two["share"]) == {"cls-0", "cls-1"} and all(f > 0 for f in two["share"].values())
    assert data["meta"]["sweep"] == "1x1,2x1"
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # every shape was taken down again: the front's and the groups' HTTP and gRPC ports are free
    first = int(ports["nginx"]["listen"].rpartition(":")[2])
    assert all(port_free(p) for p in range(first, first + 6))
