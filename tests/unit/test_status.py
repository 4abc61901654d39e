"""status: unit properties from a recording systemctl, requests/s from two real /metrics texts, core holders."""
from __future__ import annotations

import subprocess

from neuronserve import config
from neuronserve.operate import status
from neuronserve.devices import Core, Holder, Host
from neuronserve.plan import make_plan
from neuronserve.operate.systemctl import Systemctl

U0, U1 = "neuronserve@tiny-0.service", "neuronserve@tiny-1.service"


def metrics(n_ok: int, n_503: int = 0) -> str:
    return (f'# TYPE neuronserve_requests_total counter\n'
            f'neuronserve_requests_total{{code="200",group="g",model="tiny"}} {n_ok}\n'
            f'neuronserve_requests_total{{code="503",group="g",model="tiny"}} {n_503}\n')


class Probe:
    def __init__(self, pages):
        self.pages = pages           # port -> list of /metrics texts, one per scrape

    def ready(self, port):
        return port in self.pages

    def metrics(self, port):
        return self.pages[port].pop(0)


def neuron_plan(tmp_path):
    path = tmp_path / "neuronserve.toml"
    path.write_text('[server]\nbackend = "neuron"\n[models.tiny]\ntask = "text-classification"\nsource = "/src"\n')
    cfg = config.load(path)
    host = Host(backend="neuron", kind="inf2", cores=[Core(0, 0), Core(1, 0)], details={"cpus": [0, 1]})
    return make_plan(cfg, host, python="/usr/bin/python3")


def systemctl(states):
    calls = []

    def runner(argv):
        calls.append(" ".join(argv))
        unit = argv[2]
        state, sub, pid, restarts = states.get(unit, ("inactive", "dead", 0, 0))
        if argv[1] == "show":
            out = f"ActiveState={state}\nSubState={sub}\nMainPID={pid}\nNRestarts={restarts}\n"
        else:
            out = state + "\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    return Systemctl(runner), calls


def test_groups_state_pid_ready_and_requests_per_second(tmp_path):
    plan = neuron_plan(tmp_path)
    sc, calls = systemctl({U0: ("active", "running", 1234, 0), U1: ("activating", "auto-restart", 0, 3),
                           "neuronserve.target": ("active", "active", 0, 0)})
    clock = iter([10.0, 12.0])
    st = status.collect(plan, systemctl=sc, probe=Probe({8100: [metrics(100, 5), metrics(150, 15)]}),
                        holders=[], interval_s=2.0, sleep=lambda s: None, clock=lambda: next(clock))
    g0, g1 = st.groups
    assert (g0.state, g0.pid, g0.restarts, g0.cores, g0.port, g0.ready) == ("active (running)", 1234, 0, "0", 8100, True)
    assert g0.rps == 30.0                           # (150+15 - 100-5) requests over 2 s, every code counted
    assert (g1.state, g1.pid, g1.restarts, g1.ready, g1.rps) == ("activating (auto-restart)", None, 3, False, None)
    assert f"systemctl show {U0} --property=ActiveState,SubState,MainPID,NRestarts" in calls
    assert st.target == "active" and not status.healthy(st)
    text = status.as_text(st)
    assert "tiny-0" in text and "30.0" in text and "auto-restart" in text and "DRAINED" not in text


def test_a_drained_host_says_so(tmp_path):
    sc, _ = systemctl({})
    st = status.collect(neuron_plan(tmp_path), systemctl=sc, probe=Probe({}), holders=[], drained=True,
                        sleep=lambda s: None)
    assert status.as_text(st).splitlines()[0].endswith("front: DRAINED (readiness 503; `neuronserve undrain` re-admits)")
    assert '"drained": true' in status.as_json(st)


def test_holders_inside_their_groups_unit_are_fine_and_the_others_are_stale(tmp_path):
    plan = neuron_plan(tmp_path)
    sc, _ = systemctl({U0: ("active", "running", 10, 0), U1: ("active", "running", 20, 0)})
    units = {11: U0, 21: U1, 31: "jupyter.service", 41: None, 51: U0}
    holders = [Holder(11, "gunicorn: worker", 0, (0, 1)), Holder(21, "gunicorn: worker", 0, (0, 1)),
               Holder(31, "python notebook", 0, (0, 1)), Holder(41, "neuron-bench exec", 0, (0, 1))]
    st = status.collect(plan, systemctl=sc, probe=Probe({8100: [metrics(1)] * 2, 8101: [metrics(1)] * 2}),
                        holders=holders, unit_of=units.get, sleep=lambda s: None)
    by_pid = {h.pid: h for h in st.holders}
    assert not by_pid[11].stale and not by_pid[21].stale
    assert by_pid[31].stale and "jupyter.service, which is not a group" in by_pid[31].why
    assert by_pid[41].stale and "not started by neuronserve" in by_pid[41].why
    assert not status.healthy(st)
    assert [line.split()[:3] for line in status.as_text(st).splitlines() if "STALE" in line][:2] == [
        ["STALE", "PID", "31"], ["STALE", "PID", "41"]]

    # a process left in a unit that is no longer active
    sc, _ = systemctl({U0: ("failed", "failed", 0, 0), U1: ("active", "running", 20, 0)})
    st = status.collect(plan, systemctl=sc, probe=Probe({8101: [metrics(1)] * 2}),
                        holders=[Holder(51, "gunicorn: worker", 0, (0, 1))], unit_of=units.get,
                        sleep=lambda s: None)
    assert st.holders[0].stale and "left over" in st.holders[0].why


def test_unit_of_reads_the_service_from_the_cgroup_path(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cgroup").write_text(
        "9:name=systemd:/system.slice/system-neuronserve.slice/neuronserve@tiny-0.service\n0::/system.slice/system-neuronserve.slice/neuronserve@tiny-0.service\n")
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "cgroup").write_text("0::/user.slice/user-0.slice/session-1.scope\n")
    assert status.unit_of(7, proc=tmp_path) == "neuronserve@tiny-0.service"
    assert status.unit_of(8, proc=tmp_path) is None
    assert status.unit_of(9, proc=tmp_path) is None
