"""apply and cleanup against a pretend host: every systemctl/nginx call and HTTP probe lands in one ordered log.

The rendered files are real (written under a tmp root); only systemd, nginx and the groups' HTTP answers are
played by `FakeHost`, which changes its state the way the real ones would (start makes a unit active, a
reload of nginx replaces its workers) so that the order of the calls is what is checked.
"""
from __future__ import annotations

import getpass
import subprocess
from pathlib import Path

import pytest

from neuronserve import config
from neuronserve.operate import apply, cleanup
from neuronserve.devices import Core, Holder, Host, cpu
from neuronserve.errors import ServiceError
from neuronserve.layout import Layout
from neuronserve.plan import make_plan
from neuronserve.render import HEADER
from neuronserve.operate.systemctl import Systemctl

NGINX = "nginx.service"


def make_cfg(tmp_path: Path, *, groups: int = 2, copies: int = 1, extra: str = "") -> config.Config:
    p = tmp_path / "neuronserve.toml"
    p.write_text(f"""
[server]
backend = "cpu"
model_repository = "/srv/models"
user = "{getpass.getuser()}"
graceful_timeout_s = 5
[nginx]
listen = "127.0.0.1:8080"
[models.tiny]
task = "text-classification"
source = "/srv/src"
groups = {groups}
copies = {copies}
{extra}""")
    return config.load(p)


def cpu_plan(tmp_path, **kw):
    return make_plan(make_cfg(tmp_path, **kw), cpu.discover(affinity={0, 1, 2, 3}), python="/usr/bin/python3")


class FakeHost:
    """systemd, nginx and the groups of a pretend host. `log` holds every call in order."""

    def __init__(self, layout: Layout, active=(), ready_fails=(), holders=None):
        self.layout = layout
        self.log: list[str] = []
        self.active = set(active) | {NGINX}
        self.ready_fails = set(ready_fails)
        self.workers = {101, 102}
        self.next_pid = 200
        self.nginx_confs: list[str] = []     # the front config at each nginx reload
        self.holders_seq = list(holders or [])

    # systemctl, journalctl, nginx
    def runner(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.log.append(" ".join(argv))
        out, rc = "", 0
        if argv[0] == "systemctl":
            verb, args = argv[1], argv[2:]
            if verb == "is-active":
                out = "failed\n" if args[0] in self.ready_fails and args[0] in self.active else (
                    "active\n" if args[0] in self.active else "inactive\n")
                rc = 0 if out == "active\n" else 3
            elif verb == "start":
                self.active |= set(args)
            elif verb == "stop":
                self.active -= set(args)
            elif verb == "show":
                out = "MainPID=42\n"
            elif verb == "reload" and args == [NGINX]:
                self.workers = {self.next_pid, self.next_pid + 1}
                self.next_pid += 2
                conf = self.layout.nginx_conf
                self.nginx_confs.append(conf.read_text() if conf.exists() else "")
            elif verb == "list-units":
                out = "".join(f"{u} loaded active running x\n" for u in sorted(self.active) if u.startswith("neuronserve"))
        elif argv[0] == "journalctl":
            out = "Traceback: the model would not load\n"
        return subprocess.CompletedProcess(argv, rc, out, "")

    # the HTTP probes of the groups
    def port_unit(self, port: int) -> str:
        return next(g.unit for g in self.plan.groups if g.port == port)

    def ready(self, port: int) -> bool:
        unit = self.port_unit(port)
        self.log.append(f"probe ready {unit}")
        return unit in self.active and unit not in self.ready_fails

    def in_flight(self, port: int) -> float:
        self.log.append(f"probe in-flight {self.port_unit(port)}")
        return 0.0

    def nginx_workers(self, master: int) -> set[int]:
        return self.workers

    def holders(self) -> list[Holder]:
        self.log.append("neuron-ls")
        return self.holders_seq.pop(0) if self.holders_seq else []

    def applier(self, plan, **kw) -> apply.Applier:
        self.plan = plan
        sc = Systemctl(self.runner)
        front = apply.Front(sc, self.runner, workers=self.nginx_workers, sleep=lambda s: None)
        return apply.Applier(plan, self.layout, systemctl=sc, front=front, probe=self, sleep=lambda s: None, **kw)


def group_calls(log: list[str]) -> list[str]:
    """The calls that act on groups or nginx, without the read-only queries."""
    return [c for c in log if not c.startswith(("systemctl is-active", "systemctl show", "probe"))]


def down_groups(nginx_conf: str) -> list[str]:
    """Groups marked down (each appears in its model's upstream and in the all-groups one)."""
    return sorted({line.split("#")[1].split(":")[0].strip() for line in nginx_conf.splitlines() if " down;" in line})


def test_first_apply_starts_groups_out_of_nginx_then_admits_them(tmp_path):
    plan = cpu_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    host = FakeHost(layout)
    result = host.applier(plan).run()

    u0, u1 = "neuronserve@tiny-0.service", "neuronserve@tiny-1.service"
    assert group_calls(host.log) == [
        "systemctl daemon-reload",
        "nginx -t -q", f"systemctl reload {NGINX}",
        f"systemctl enable neuronserve.target {u0} {u1}",
        f"systemctl start {u0} {u1}",
        "systemctl start neuronserve.target",
        "nginx -t -q", f"systemctl reload {NGINX}",         # admit
        "nginx -t -q", f"systemctl reload {NGINX}",         # the final reload
    ]
    # the groups are probed ready only after their start, and before they are admitted
    assert host.log.index(f"probe ready {u0}") > host.log.index(f"systemctl start {u0} {u1}")
    assert down_groups(host.nginx_confs[0]) == ["tiny-0", "tiny-1"]
    assert down_groups(host.nginx_confs[1]) == [] and down_groups(host.nginx_confs[2]) == []
    assert result.started == ["tiny-0", "tiny-1"] and result.rolled == []
    assert layout.dropin_path(u0).read_text().count("User=" + plan.config.server.user) == 1
    assert layout.gunicorn_conf("tiny-1").is_file() and layout.unit_path("neuronserve.target").is_file()


def test_config_change_rolls_one_group_at_a_time_stop_then_start(tmp_path):
    plan = cpu_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan).run()
    changed = cpu_plan(tmp_path, extra="max_batch_delay_ms = 5\n")
    u0, u1 = "neuronserve@tiny-0.service", "neuronserve@tiny-1.service"
    host = FakeHost(layout, active={u0, u1, "neuronserve.target"})
    result = host.applier(changed).run()

    assert group_calls(host.log) == [
        "systemctl daemon-reload",
        f"systemctl enable neuronserve.target {u0} {u1}",
        "systemctl start neuronserve.target",
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-0 down
        f"systemctl stop {u0}", f"systemctl start {u0}",
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-0 back
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-1 down
        f"systemctl stop {u1}", f"systemctl start {u1}",
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-1 back
        "nginx -t -q", f"systemctl reload {NGINX}",          # final
    ]
    assert [down_groups(c) for c in host.nginx_confs] == [["tiny-0"], [], ["tiny-1"], [], []]
    # drained (in-flight checked) before the stop, ready checked after the start, for each group
    for u in (u0, u1):
        i_stop, i_start = host.log.index(f"systemctl stop {u}"), host.log.index(f"systemctl start {u}")
        assert host.log.index(f"probe in-flight {u}") < i_stop
        assert host.log.index(f"probe ready {u}", i_start) > i_start
    assert not [c for c in host.log if " restart " in f"{c} " or c.startswith("systemctl reload neuronserve")]
    assert result.rolled == ["tiny-0", "tiny-1"] and result.started == []
    assert 'NEURONSERVE_MAX_BATCH_DELAY_MS=5.0' in layout.dropin_path(u0).read_text()


def test_groups_under_an_earlier_versions_whole_units_move_onto_their_instances_one_at_a_time(tmp_path):
    plan = cpu_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan).run()
    # what an earlier version left: a whole unit per group, running, and no instance drop-ins
    legacy = {g.legacy_unit: layout.unit_path(g.legacy_unit) for g in plan.groups}
    for g in plan.groups:
        legacy[g.legacy_unit].write_text(f"# {HEADER}\n[Service]\nExecStart=/usr/bin/python3 -m gunicorn\n")
        layout.dropin_path(g.unit).unlink()
        layout.dropin_path(g.unit).parent.rmdir()
    l0, l1 = legacy
    u0, u1 = "neuronserve@tiny-0.service", "neuronserve@tiny-1.service"
    host = FakeHost(layout, active={l0, l1, "neuronserve.target"})
    result = host.applier(plan).run()

    assert group_calls(host.log) == [
        "systemctl daemon-reload",
        "systemctl enable neuronserve.target",              # not the instances yet: the target would start them
        "systemctl start neuronserve.target",
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-0 down
        f"systemctl stop {l0}", f"systemctl enable {u0}", f"systemctl start {u0}",
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-0 back
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-1 down
        f"systemctl stop {l1}", f"systemctl enable {u1}", f"systemctl start {u1}",
        "nginx -t -q", f"systemctl reload {NGINX}",          # tiny-1 back
        f"systemctl stop {l0}", f"systemctl disable {l0}", f"systemctl stop {l1}", f"systemctl disable {l1}",
        "systemctl daemon-reload",
        "nginx -t -q", f"systemctl reload {NGINX}",          # final
    ]
    assert [down_groups(c) for c in host.nginx_confs] == [["tiny-0"], [], ["tiny-1"], [], []]
    assert result.rolled == ["tiny-0", "tiny-1"] and result.removed == [l0, l1]
    assert not any(p.exists() for p in legacy.values()) and layout.gunicorn_conf("tiny-0").is_file()
    assert host.active >= {u0, u1} and not host.active & {l0, l1}


def test_unchanged_config_touches_no_group(tmp_path):
    plan = cpu_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan).run()
    host = FakeHost(layout, active={"neuronserve@tiny-0.service", "neuronserve@tiny-1.service"})
    result = host.applier(cpu_plan(tmp_path)).run()
    assert not [c for c in host.log if c.startswith(("systemctl stop", "systemctl start neuronserve-"))]
    assert result.changes == [] and result.rolled == []
    # --restart rolls them anyway (after a recompile the files are the same)
    host = FakeHost(layout, active={"neuronserve@tiny-0.service", "neuronserve@tiny-1.service"})
    assert host.applier(cpu_plan(tmp_path)).run(restart_all=True).rolled == ["tiny-0", "tiny-1"]


def test_a_group_that_never_gets_ready_fails_with_its_journal_and_stays_drained(tmp_path):
    plan = cpu_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan).run()
    u0 = "neuronserve@tiny-0.service"
    host = FakeHost(layout, active={u0, "neuronserve@tiny-1.service"}, ready_fails={u0})
    with pytest.raises(ServiceError) as err:
        host.applier(cpu_plan(tmp_path, copies=2)).run()
    assert f"{u0} is failed" in str(err.value) and "the model would not load" in str(err.value)
    assert f"journalctl --unit {u0} --lines 30 --no-pager --output cat" in host.log
    assert down_groups(layout.nginx_conf.read_text()) == ["tiny-0"]
    assert "systemctl stop neuronserve@tiny-1.service" not in host.log


def test_groups_removed_from_the_config_are_drained_stopped_disabled_deleted(tmp_path):
    plan = cpu_plan(tmp_path, groups=2)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan).run()
    u0, u1 = "neuronserve@tiny-0.service", "neuronserve@tiny-1.service"
    host = FakeHost(layout, active={u0, u1})
    result = host.applier(cpu_plan(tmp_path, groups=1)).run()
    calls = group_calls(host.log)
    # out of nginx first, then stopped
    assert calls.index(f"systemctl reload {NGINX}") < calls.index(f"systemctl stop {u1}")
    assert calls[calls.index(f"systemctl stop {u1}"):][:3] == [
        f"systemctl stop {u1}", f"systemctl disable {u1}", "systemctl daemon-reload"]
    assert "tiny-1" not in host.nginx_confs[0]
    assert not layout.dropin_path(u1).exists() and not layout.gunicorn_conf("tiny-1").exists()
    assert result.removed == [u1] and u0 not in " ".join(c for c in calls if "stop" in c)


def test_missing_user_is_a_clear_error(tmp_path):
    plan = cpu_plan(tmp_path)
    plan.config.server.user = "no-such-user-here"
    host = FakeHost(Layout(tmp_path / "root", plan.config))
    with pytest.raises(ServiceError, match="user 'no-such-user-here' .* does not exist.*useradd"):
        host.applier(plan).run()
    assert host.log == []


def neuron_plan(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.server.backend = "neuron"
    host = Host(backend="neuron", kind="inf2", cores=[Core(0, 0), Core(1, 0), Core(2, 1), Core(3, 1)],
                details={"cpus": [0, 1, 2, 3]})
    cfg.models["tiny"].groups = 2
    cfg.models["tiny"].cores_per_group = 2
    return make_plan(cfg, host, python="/opt/aws_neuronx_venv_pytorch_2_9/bin/python")


def test_neuron_roll_waits_for_the_cores_to_be_free_between_stop_and_start(tmp_path, monkeypatch):
    plan = neuron_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan, holders=lambda: []).run()
    u0, u1 = "neuronserve@tiny-0.service", "neuronserve@tiny-1.service"
    # tiny-0's old worker (device 0) is still exiting at the first neuron-ls after the stop; tiny-1 holds device 1
    old = Holder(pid=500, command="gunicorn: worker [neuronserve-tiny-0]", device=0, cores=(0, 1))
    sibling = Holder(pid=600, command="gunicorn: worker [neuronserve-tiny-1]", device=1, cores=(2, 3))
    monkeypatch.setattr("neuronserve.operate.status.unit_of", lambda pid: {500: u0, 600: u1}.get(pid))
    host = FakeHost(layout, active={u0, u1}, holders=[[old, sibling], [sibling]])
    result = host.applier(plan, holders=host.holders).run(restart_all=True)
    i = host.log.index(f"systemctl stop {u0}")
    assert host.log[i + 1:i + 5] == [f"systemctl is-active {u1}", "neuron-ls", "neuron-ls", f"systemctl start {u0}"]
    assert result.rolled == ["tiny-0", "tiny-1"]
    unit = layout.dropin_path(u0).read_text()
    assert "NEURON_RT_VISIBLE_CORES=0-1" in unit and "SupplementaryGroups=neuron" in unit


def test_neuron_stale_holder_of_the_groups_cores_stops_the_apply_naming_it(tmp_path, monkeypatch):
    plan = neuron_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan, holders=lambda: []).run()
    u0 = "neuronserve@tiny-0.service"
    stale = Holder(pid=777, command="python bench.py", device=0, cores=(0, 1))
    monkeypatch.setattr("neuronserve.operate.status.unit_of", lambda pid: None)
    host = FakeHost(layout, active={u0, "neuronserve@tiny-1.service"}, holders=[[stale]] * 1000)
    clock = iter(range(0, 10_000, 1))
    with pytest.raises(ServiceError, match=r"PID 777 \(python bench.py, not started by neuronserve"):
        host.applier(plan, holders=host.holders, clock=lambda: next(clock)).run(restart_all=True)
    assert f"systemctl start {u0}" not in host.log[host.log.index(f"systemctl stop {u0}"):]


def test_nginx_rejecting_the_config_stops_before_any_group_is_touched(tmp_path):
    plan = cpu_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    host = FakeHost(layout)
    real = host.runner

    def runner(argv):
        if argv[:2] == ["nginx", "-t"]:
            host.log.append(" ".join(argv))
            return subprocess.CompletedProcess(argv, 1, "", "nginx: [emerg] unknown directive \"x\"")
        return real(argv)

    host.runner = runner
    with pytest.raises(ServiceError, match=r"(?s)nginx -t rejects.*unknown directive.*back to what it was"):
        host.applier(plan).run()
    assert not [c for c in host.log if c.startswith(("systemctl start", "systemctl reload"))]
    # nginx had no neuronserve front before: a broken one is not left for its next reload or boot
    assert not layout.nginx_conf.exists()


def test_nginx_reload_waits_until_the_old_workers_are_gone(tmp_path):
    calls, generations = [], iter([{1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4}])

    def runner(argv):
        calls.append(" ".join(argv))
        out = "MainPID=9\n" if argv[1:2] == ["show"] else ("active\n" if argv[1:2] == ["is-active"] else "")
        return subprocess.CompletedProcess(argv, 0, out, "")

    seen = []
    front = apply.Front(Systemctl(runner), runner, workers=lambda m: seen.append(m) or next(generations),
                        sleep=lambda s: None)
    front.reload()
    assert calls == ["nginx -t -q", f"systemctl is-active {NGINX}", f"systemctl show {NGINX} --property=MainPID",
                     f"systemctl reload {NGINX}"]
    assert seen == [9, 9, 9, 9]      # before, then until neither 1 nor 2 is left


def test_cleanup_removes_only_what_neuronserve_wrote(tmp_path):
    plan = cpu_plan(tmp_path)
    layout = Layout(tmp_path / "root", plan.config)
    FakeHost(layout).applier(plan).run()
    # a unit with our prefix that someone else wrote, an unrelated unit, and the enable link of a unit of
    # ours whose file was deleted by hand
    foreign = layout.unit_dir / "neuronserve-exporter.service"
    foreign.write_text("[Service]\nExecStart=/usr/bin/exporter\n")
    other = layout.unit_dir / "postgresql.service"
    other.write_text("[Service]\nExecStart=/usr/bin/postgres\n")
    wants = layout.unit_dir / "neuronserve.target.wants"
    wants.mkdir()
    (wants / "neuronserve@tiny-9.service").symlink_to(layout.unit_dir / "neuronserve@tiny-9.service")
    host = FakeHost(layout, active={"neuronserve@tiny-0.service", "neuronserve@tiny-1.service",
                                    "neuronserve.target", "postgresql.service"})
    sc = Systemctl(host.runner)
    front = apply.Front(sc, host.runner, workers=host.nginx_workers, sleep=lambda s: None)

    # a sysadmin's change for every group (`systemctl edit neuronserve@.service`)
    override = layout.unit_dir / "neuronserve@.service.d" / "override.conf"
    override.parent.mkdir()
    override.write_text("[Service]\nNice=5\n")

    dry = cleanup.cleanup(layout, systemctl=sc, front=front, dry_run=True)
    assert layout.dropin_path("neuronserve@tiny-0.service").exists() and layout.nginx_conf.exists()
    assert any(s.action == "keep" and s.target == str(foreign) for s in dry)
    host.log.clear()

    cleanup.cleanup(layout, systemctl=sc, front=front)
    units = "neuronserve.target neuronserve@tiny-0.service neuronserve@tiny-1.service"
    assert group_calls(host.log) == [
        "systemctl list-units --all --no-legend --plain --full neuronserve*",
        "nginx -t -q", f"systemctl reload {NGINX}",
        f"systemctl stop {units}", f"systemctl disable {units}",
        "systemctl daemon-reload", f"systemctl reset-failed {units}"]
    assert sorted(p.name for p in layout.unit_dir.iterdir()) == [
        "neuronserve-exporter.service", "neuronserve@.service.d", "postgresql.service"]
    assert override.read_text() == "[Service]\nNice=5\n"
    assert not layout.nginx_conf.exists() and not list(layout.gunicorn_dir.iterdir())
    assert foreign.read_text().startswith("[Service]")
