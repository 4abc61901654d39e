"""Make the host match the config: render, daemon-reload, enable, roll the changed groups one at a time.

A running group whose files changed is rolled without losing a request:
  drain     render nginx with the group `down`, `nginx -t`, reload nginx, wait until the nginx workers that
            still had the old upstream list have exited (they finish their requests first) and the group
            reports no request in flight;
  stop      `systemctl stop` (gunicorn finishes what it holds within its graceful timeout);
  start     `systemctl start`, then wait until /v2/health/ready answers 200 (the warm-up passed);
  admit     render nginx with the group back in, reload nginx.
Always stop, then start: never gunicorn's HUP reload nor `systemctl reload`, because on Neuron the new worker
could not reserve the cores the old one still holds. On Neuron, apply also checks (neuron-ls) that no process
holds the group's cores any more before it starts the group again.

Groups that are not running are started together and admitted once ready; groups the config no longer has
are taken out of nginx, then stopped, disabled and their files removed. A group still running under the whole
unit an earlier version wrote (neuronserve-<group>.service) is rolled the same way onto its instance of the
template unit (neuronserve@<group>.service), and the old unit removed after.
"""
from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from neuronserve import render
from neuronserve.config import format_core_list
from neuronserve.devices import Holder
from neuronserve.errors import ServiceError
from neuronserve.layout import Layout
from neuronserve.plan import Group, Plan, group_of_unit
from neuronserve.measure.probe import Probe
from neuronserve.operate.systemctl import Runner, Systemctl, run_command

NGINX_UNIT = "nginx.service"
# without an in-flight gauge from the group, this short grace lets requests that reached it just before the
# drain finish (gunicorn's graceful stop covers the rest)
DRAIN_GRACE_S = 1.0
POLL_S = 0.25


@dataclass(frozen=True)
class Step:
    """One thing apply did (or, with dry_run, would do), printed as it happens."""

    action: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action:<13} {self.target}{'  ' + self.detail if self.detail else ''}"


@dataclass
class Result:
    steps: list[Step] = field(default_factory=list)
    changes: list[render.Change] = field(default_factory=list)
    started: list[str] = field(default_factory=list)      # groups that were not running
    rolled: list[str] = field(default_factory=list)       # running groups restarted one at a time
    removed: list[str] = field(default_factory=list)      # units the config no longer has


def nginx_workers(master: int) -> set[int]:
    """PIDs of the worker processes of an nginx master, old (shutting down) ones included, from /proc."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == master and cmdline.startswith(b"nginx: worker process"):
            out.add(int(entry))
    return out


class Front:
    """The nginx in front of the groups, run by systemd: validate, reload, and know when a reload took effect."""

    def __init__(self, systemctl: Systemctl, runner: Runner = run_command, *, timeout_s: float = 40.0,
                 workers: Callable[[int], set[int]] = nginx_workers, sleep=time.sleep, clock=time.monotonic):
        self.systemctl, self.runner, self.timeout_s = systemctl, runner, timeout_s
        self.workers, self.sleep, self.clock = workers, sleep, clock

    def check(self) -> None:
        result = self.runner(["nginx", "-t", "-q"])
        if result.returncode != 0:
            raise ServiceError(f"nginx -t rejects the configuration:\n{(result.stderr or result.stdout).strip()}")

    def reload(self) -> None:
        """Reload nginx (start it if it is not running) and return once no old worker is left.

        `systemctl reload nginx` only sends the master a signal. Old workers finish their requests before they
        exit, so once they are gone nothing sends a request by the previous upstream list any more.
        """
        self.check()
        if self.systemctl.is_active(NGINX_UNIT) != "active":
            self.systemctl.start(NGINX_UNIT)
            return
        master = int(self.systemctl.show(NGINX_UNIT, "MainPID")["MainPID"] or 0)
        old = self.workers(master) if master else set()
        self.systemctl.reload(NGINX_UNIT)
        deadline = self.clock() + self.timeout_s
        while old:
            now = self.workers(master)
            if not (now & old) and now:
                return
            if self.clock() > deadline:
                raise ServiceError(f"nginx has not finished reloading after {self.timeout_s:g} s: old worker(s) "
                                   f"{', '.join(map(str, sorted(now & old)))} still serve requests")
            self.sleep(POLL_S)


def check_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ServiceError(f"user {user!r} (server.user) does not exist: install the neuronserve package, which "
                           f"creates it, or `useradd --system --home-dir /var/lib/neuronserve --shell "
                           f"/usr/sbin/nologin {user}`") from None


class Applier:
    def __init__(self, plan: Plan, layout: Layout, *, systemctl: Systemctl | None = None, front: Front | None = None,
                 probe: Probe | None = None, holders: Callable[[], list[Holder]] | None = None,
                 log: Callable[[Step], None] = lambda step: None, ready_timeout_s: float = 300.0,
                 sleep=time.sleep, clock=time.monotonic):
        self.plan, self.layout, self.cfg = plan, layout, plan.config
        self.systemctl = systemctl or Systemctl()
        self.front = front or Front(self.systemctl, timeout_s=self.cfg.server.graceful_timeout_s + 10)
        self.probe = probe or Probe()
        if holders is None and plan.host.backend == "neuron":
            from neuronserve.context import discover

            holders = lambda: discover(self.cfg, "neuron").holders    # noqa: E731  processes holding cores now
        self.holders = holders
        self.log, self.ready_timeout_s, self.sleep, self.clock = log, ready_timeout_s, sleep, clock
        self.result = Result()

    # ------------------------------------------------------------ helpers

    def step(self, action: str, target: str, detail: str = "") -> None:
        s = Step(action, target, detail)
        self.result.steps.append(s)
        self.log(s)

    def reload_front(self) -> None:
        """Reload nginx; if it rejects the new front config, put back the one it ran with before apply."""
        try:
            self.front.reload()
        except ServiceError as e:
            path = self.layout.nginx_conf
            if self.front_before is None:
                path.unlink(missing_ok=True)
            else:
                render.write_files({path: self.front_before})
            raise ServiceError(f"{e}\n{path} is back to what it was before this apply") from None

    def write_front(self, down: set[str], why: str, target: str) -> None:
        if not self.cfg.nginx.enabled:
            return
        path = self.layout.nginx_conf
        render.write_files({path: render.render_files(self.plan, self.layout, down=down)[path]})
        self.reload_front()
        self.step("nginx", target, why)

    def wait_ready(self, g: Group) -> float:
        t0 = self.clock()
        while not self.probe.ready(g.port):
            state = self.systemctl.is_active(g.unit)
            waited = self.clock() - t0
            if state in ("failed", "inactive") or waited > self.ready_timeout_s:
                why = f"is {state}" if state in ("failed", "inactive") else f"not ready after {waited:.0f} s"
                raise ServiceError(f"{g.unit} {why} (http://{g.address}/v2/health/ready); it stays out of nginx. "
                                   f"Last log lines (journalctl -u {g.unit}):\n{self.systemctl.journal(g.unit)}")
            self.sleep(POLL_S)
        return self.clock() - t0

    def wait_drained(self, g: Group) -> None:
        deadline = self.clock() + self.cfg.server.graceful_timeout_s
        n = self.probe.in_flight(g.port)
        if n is None:
            self.sleep(DRAIN_GRACE_S)
            return
        while n and self.clock() < deadline:
            self.sleep(POLL_S)
            n = self.probe.in_flight(g.port) or 0

    def wait_cores_free(self, g: Group) -> None:
        """Neuron: the stopped group's cores must be free before it starts again, or its start would fail."""
        if self.holders is None:
            return
        from neuronserve.operate.status import classify

        others = {o.unit for o in self.plan.groups if o is not g and self.systemctl.is_active(o.unit) == "active"}
        deadline = self.clock() + 10
        while True:
            # neuron-ls names devices, not cores: a sibling group on the same device is no obstacle
            held = [h for h in classify(self.plan, self.holders(), others)
                    if h.stale and set(h.cores) & set(g.cores)]
            if not held:
                return
            if self.clock() > deadline:
                who = "; ".join(f"PID {h.pid} ({h.command}, {h.why}) holds core(s) {format_core_list(h.cores)}"
                                for h in held)
                raise ServiceError(f"{g.unit} stopped but its cores are still held: {who}. Stop that process, "
                                   "then run `neuronserve apply` again")
            self.sleep(POLL_S)

    # ------------------------------------------------------------ the apply

    def run(self, *, restart_all: bool = False) -> Result:
        check_user(self.cfg.server.user)
        groups = self.plan.groups
        running = running_groups(self.plan, self.systemctl)
        # groups serving from a legacy unit: moved onto their instance one at a time, like a changed group
        legacy = {g.name for g in groups if running.get(g.name) == g.legacy_unit}
        new = [g for g in groups if g.name not in running]
        planned_legacy = {g.legacy_unit for g in groups}
        stale = render.stale_units(self.layout, self.plan)
        removed = {u: files for u, files in stale.items() if u not in planned_legacy}
        try:
            self.front_before = self.layout.nginx_conf.read_text(encoding="utf-8")
        except OSError:
            self.front_before = None

        # units and gunicorn configs for everything; nginx keeps groups that are not serving yet out
        changes = render.write_files(render.render_files(self.plan, self.layout, down={g.name for g in new}))
        self.result.changes = changes
        for c in changes:
            self.step(c.action, str(c.path))
        roll = [g for g in groups_to_roll(self.plan, self.layout, running, changes, restart_all)
                if g.name not in legacy] + [g for g in groups if g.name in legacy]
        for path in render.superseded_units(self.layout):
            path.unlink()
            self.step("remove", str(path), "the package's copy takes over")

        self.systemctl.daemon_reload()
        self.step("daemon-reload", "systemd")
        if self.cfg.nginx.enabled and (removed or self.layout.nginx_conf in {c.path for c in changes}):
            self.reload_front()
            self.step("nginx", NGINX_UNIT, "reloaded" + (f": {len(new)} new group(s) stay out until ready"
                                                         if new else ""))
        for unit, files in removed.items():
            self.remove_unit(unit, files)
        if removed:
            self.systemctl.daemon_reload()
            self.step("daemon-reload", "systemd")

        # a migrating group's instance is enabled when it starts: the target must not start it beside the
        # legacy unit that still holds its port
        enabled = [g.unit for g in groups if g.name not in legacy]
        self.systemctl.enable(render.TARGET, *enabled)
        self.step("enable", render.TARGET, f"and {len(enabled)} group unit(s)")
        if new:
            self.systemctl.start(*(g.unit for g in new))
            for g in new:
                self.step("start", g.unit, f"cores {g.core_list}, port {g.port}")
            for g in new:
                self.step("ready", g.unit, f"after {self.wait_ready(g):.1f} s")
            self.result.started = [g.name for g in new]
        self.systemctl.start(render.TARGET)
        if new:
            self.write_front(set(), "admitted " + ", ".join(g.name for g in new), NGINX_UNIT)

        for g in roll:
            self.roll(g, migrate=g.name in legacy)
        migrated = {u: files for u, files in stale.items() if u in planned_legacy}
        for unit, files in migrated.items():
            self.remove_unit(unit, files, why="replaced by its instance of neuronserve@.service", keep_conf=True)
        if migrated:
            self.systemctl.daemon_reload()
            self.step("daemon-reload", "systemd")

        # the final state: every group in; a no-op write when the last admit already wrote it
        if self.cfg.nginx.enabled:
            render.write_files({self.layout.nginx_conf: render.render_files(self.plan, self.layout)[
                self.layout.nginx_conf]})
            self.reload_front()
            self.step("nginx", NGINX_UNIT, "reloaded")
        return self.result

    def roll(self, g: Group, *, migrate: bool = False) -> None:
        siblings = [o for o in self.plan.groups if o.model == g.model and o is not g]
        if not siblings:
            self.step("warning", g.name, f"the only group of model {g.model}: its requests fail while it restarts")
        self.write_front({g.name}, "drained", g.name)
        self.wait_drained(g)
        old = g.legacy_unit if migrate else g.unit
        self.systemctl.stop(old)
        self.step("stop", old)
        self.wait_cores_free(g)
        if migrate:
            self.systemctl.enable(g.unit)
        self.systemctl.start(g.unit)
        self.step("start", g.unit, f"cores {g.core_list}, port {g.port}")
        self.step("ready", g.unit, f"after {self.wait_ready(g):.1f} s")
        self.write_front(set(), "admitted", g.name)
        self.result.rolled.append(g.name)

    def remove_unit(self, unit: str, files: list[Path], *, why: str = "no longer in the config",
                    keep_conf: bool = False) -> None:
        self.systemctl.stop(unit)
        self.systemctl.disable(unit)
        for path in files:
            path.unlink(missing_ok=True)
            if path.parent.name.endswith(".d") and not any(path.parent.iterdir()):
                path.parent.rmdir()     # a sysadmin's override.conf beside it keeps the directory
        if not keep_conf:
            self.layout.gunicorn_conf(group_of_unit(unit)).unlink(missing_ok=True)
        self.step("remove", unit, f"{why}: stopped, disabled, deleted")
        self.result.removed.append(unit)


def group_files(layout: Layout, g: Group) -> set[Path]:
    """The rendered files a group's process reads at start: a change in one means a restart (a change to the
    template unit itself, by a package upgrade, waits for `apply --restart-all`)."""
    return {layout.dropin_path(g.unit), layout.gunicorn_conf(g.name)}


def running_groups(plan: Plan, systemctl: Systemctl) -> dict[str, str]:
    """Groups serving now, by name: the unit each serves from, its instance or a legacy unit."""
    running = {}
    for g in plan.groups:
        unit = next((u for u in (g.unit, g.legacy_unit) if systemctl.is_active(u) == "active"), None)
        if unit is not None:
            running[g.name] = unit
    return running


def groups_to_roll(plan: Plan, layout: Layout, running: dict[str, str], changes: list[render.Change],
                   restart_all: bool) -> list[Group]:
    changed = {c.path for c in changes}
    return [g for g in plan.groups if g.name in running and (restart_all or group_files(layout, g) & changed)]


@dataclass
class Preview:
    changes: list[render.Change]
    start: list[str]
    roll: list[str]
    remove: list[str]


def preview(plan: Plan, layout: Layout, systemctl: Systemctl | None = None, *, restart_all: bool = False) -> Preview:
    """What `apply` would write and do, touching nothing."""
    running = running_groups(plan, systemctl or Systemctl())
    changes = render.write_files(render.render_files(plan, layout), dry_run=True)
    return Preview(changes=changes, start=[g.name for g in plan.groups if g.name not in running],
                   roll=[g.name for g in groups_to_roll(plan, layout, running, changes, restart_all)],
                   remove=list(render.stale_units(layout, plan)))


def apply(plan: Plan, layout: Layout, *, restart_all: bool = False, **kwargs) -> Result:
    return Applier(plan, layout, **kwargs).run(restart_all=restart_all)
