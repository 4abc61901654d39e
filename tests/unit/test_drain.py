"""drain's wait on a stepped clock: a host is drained once no request came for `quiet_s` and none is in flight,
and gives up (still drained) when a load balancer keeps sending. The groups' /metrics pages are played by a probe
double that writes what the server exports, as a function of the clock."""
from __future__ import annotations

import pytest

from neuronserve import config
from neuronserve.devices import cpu
from neuronserve.errors import ServiceError
from neuronserve.layout import Layout
from neuronserve.operate import drain
from neuronserve.plan import make_plan


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class Groups:
    """Each group's /metrics at the clock's time: `traffic(t)` -> (answered so far, in flight), or None when the
    group is stopped."""

    def __init__(self, clock: Clock, plan, traffic):
        self.clock, self.ports, self.traffic = clock, {g.port: g.name for g in plan.groups}, traffic

    def metrics(self, port: int) -> str | None:
        now = self.traffic(self.clock.now, self.ports[port])
        if now is None:
            return None
        answered, in_flight = now
        labels = f'group="{self.ports[port]}",model="tiny"'
        return (f"# TYPE neuronserve_requests counter\nneuronserve_requests_total{{code=\"200\",{labels}}} "
                f"{answered}\n# TYPE neuronserve_requests_in_flight gauge\n"
                f"neuronserve_requests_in_flight{{{labels}}} {in_flight}\n")


@pytest.fixture
def host(tmp_path):
    p = tmp_path / "neuronserve.toml"
    p.write_text('[server]\nbackend = "cpu"\n[models.tiny]\ntask = "text-classification"\nsource = "/srv/src"\n'
                 'groups = 2\n')
    cfg = config.load(p)
    return make_plan(cfg, cpu.discover(affinity={0, 1}), python="/usr/bin/python3"), Layout(tmp_path / "root", cfg)


def run(host, traffic, **kw):
    plan, layout = host
    clock = Clock()
    lines: list[str] = []
    waited = drain.drain(plan, layout, probe=Groups(clock, plan, traffic), sleep=clock.sleep, clock=clock,
                         progress=lines.append, **kw)
    return waited, lines


def test_drained_once_quiet_for_quiet_s(host):
    # the balancer sends until t=3 (its checks failed by then); the last request is answered at 3
    def traffic(t, group):
        return (10 * min(t, 3.0), 1 if t < 3.0 else 0)

    waited, lines = run(host, traffic, quiet_s=2.0)
    assert waited == 5.0                 # last change seen at 3.0, then 2 s without one
    assert drain.drained(host[1]) and "load balancers checking /v2/health/ready stop sending" in lines[0]
    assert lines[-1] == "drained: no request for 2 s, none in flight (5.0 s)"


def test_a_request_in_flight_keeps_it_waiting(host):
    # no new answer after t=0, but one request runs until t=4 (a long batch on emb-1)
    def traffic(t, group):
        return (5, 1 if group == "tiny-1" and t < 4.0 else 0)

    waited, _ = run(host, traffic, quiet_s=1.0)
    assert waited == 4.5                 # last seen in flight at 3.5 (looks every 0.5 s), then 1 s without


def test_stopped_groups_count_as_quiet(host):
    waited, _ = run(host, lambda t, group: None, quiet_s=1.5)
    assert waited == 1.5


def test_a_balancer_that_keeps_sending_is_reported_and_the_host_stays_drained(host):
    with pytest.raises(ServiceError, match=r"requests still arrive 10 s after .*health-checking.*/v2/health/ready"):
        run(host, lambda t, group: (100 * t, 2), quiet_s=2.0, timeout_s=10.0)
    assert drain.drained(host[1])


def test_no_wait_only_turns_the_front_unready(host):
    waited, lines = run(host, lambda t, group: (100 * t, 2), wait=False)
    assert waited == 0.0 and len(lines) == 1 and drain.drained(host[1])


def test_undrain(host):
    layout = host[1]
    assert not drain.undrain(layout)
    run(host, lambda t, group: None, quiet_s=0.5)
    assert drain.undrain(layout) and not drain.drained(layout) and not layout.drain_flag.exists()


def test_a_host_without_a_front_is_refused(host):
    plan, layout = host
    plan.config.nginx.enabled = False
    with pytest.raises(ServiceError, match="nginx.enabled is false"):
        run(host, lambda t, group: None)
    assert not drain.drained(layout)
