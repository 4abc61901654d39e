"""Turn the config and the host's cores into core groups: who owns which cores, on which port, with what env.

A plan is refused, with a message that says what to change, when it cannot work: more cores than the host
has, two models on one core, a port past 65535 or on the front's port, a model left without cores.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from neuronserve.config import Config, ModelSection, format_core_list
from neuronserve.build import footprint
from neuronserve.devices import Host, backend_module
from neuronserve.errors import PlanError
from neuronserve.layout import Layout
from neuronserve.server.settings import ServerSettings

APP = "neuronserve.server.app:create_app()"
# the CPU groups' shared lock files for lending idle CPUs (server/lending.py): the units' RuntimeDirectory=
LEND_DIR = "/run/neuronserve/cpus"


# a group is an instance of the template unit, neuronserve@<group>.service: the names apply, cleanup, status and
# doctor recognise as ours. Earlier versions gave each group a whole unit of its own, neuronserve-<group>.service: apply
# migrates those, cleanup removes them.
UNIT_TEMPLATE = "neuronserve@.service"
UNIT_PREFIX, LEGACY_PREFIX, UNIT_SUFFIX = "neuronserve@", "neuronserve-", ".service"


def group_of_unit(unit: str) -> str | None:
    """The group a unit name belongs to (an instance, or a legacy whole unit), or None for any other unit."""
    for prefix in (UNIT_PREFIX, LEGACY_PREFIX):
        if unit.startswith(prefix) and unit.endswith(UNIT_SUFFIX) and len(unit) > len(prefix + UNIT_SUFFIX):
            return unit[len(prefix):-len(UNIT_SUFFIX)]
    return None


@dataclass
class Group:
    name: str                   # <model>-<n>
    model: str
    index: int
    cores: list[int]
    cpus: list[int]
    port: int
    settings: ServerSettings
    grpc_port: int = 0          # 0: no gRPC
    env: dict[str, str] = field(default_factory=dict)   # pinning + settings, exactly what the worker gets

    @property
    def unit(self) -> str:
        return UNIT_PREFIX + self.name + UNIT_SUFFIX

    @property
    def legacy_unit(self) -> str:
        """The whole unit an earlier version wrote for this group (apply migrates it)."""
        return LEGACY_PREFIX + self.name + UNIT_SUFFIX

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def core_list(self) -> str:
        return format_core_list(self.cores)


@dataclass
class Plan:
    config: Config
    host: Host
    groups: list[Group]
    python: str
    footprints: dict = field(default_factory=dict)     # group -> footprint.Footprint, for compiled models

    def argv(self, group: Group, layout: Layout) -> list[str]:
        """The command a group's unit (and `neuronserve up`) runs."""
        return [self.python, "-m", "gunicorn", "--config", str(layout.gunicorn_conf(group.name)), APP]

    def env(self, group: Group, layout: Layout) -> dict[str, str]:
        """The environment a group's unit (and `neuronserve up`) gives its worker: group.env with its runtime
        paths under the layout's root."""
        if not group.settings.lend_dir:
            return group.env
        return {**group.env, "NEURONSERVE_LEND_DIR": str(layout.under(group.settings.lend_dir))}

    def by_model(self) -> dict[str, list[Group]]:
        out: dict[str, list[Group]] = {}
        for g in self.groups:
            out.setdefault(g.model, []).append(g)
        return out

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise PlanError(f"no group named {name!r}; groups: {', '.join(g.name for g in self.groups)}")


def _front_ports(cfg: Config) -> dict[int, str]:
    """The front's ports -> the setting that names each."""
    out = {}
    for key in ("listen", "grpc_listen"):
        tail = getattr(cfg.nginx, key).rsplit(":", 1)[-1]
        if tail.isdigit():
            out[int(tail)] = f"nginx.{key}"
    return out


def listen_port(listen: str) -> int:
    """The port of an nginx.listen-style [address:]port: what a pod listens on (operate/pod.py, kubernetes.py)."""
    return int(listen.rsplit(":", 1)[-1])


def loopback(listen: str) -> str:
    """host:port a local client dials for a listen address ('0.0.0.0:8081', '[::]:8081', '8081', 'host:port')."""
    host, sep, port = listen.rpartition(":")
    if not sep or host in ("", "*", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "[::]":
        host = "[::1]"
    return f"{host}:{port}"


def _assign_cores(cfg: Config, host: Host) -> dict[str, list[list[int]]]:
    """model -> list of core lists, one per group. Fixed-count models first, then 'all' ones share the rest."""
    present = [c.index for c in host.cores]
    free = list(present)
    out: dict[str, list[list[int]]] = {}

    def pool_for(name: str, m: ModelSection) -> list[int]:
        if m.core_list is None:
            return [c for c in free]
        missing = [c for c in m.core_list if c not in present]
        if missing:
            raise PlanError(f"models.{name}.cores names {format_core_list(missing)}, which this host does not have "
                            f"({host.backend} cores: {format_core_list(present) or 'none'})")
        taken = [c for c in m.core_list if c not in free]
        if taken:
            owner = next(n for n, gs in out.items() if any(set(taken) & set(g) for g in gs))
            raise PlanError(f"models.{name}.cores overlaps models.{owner} on core(s) {format_core_list(taken)}: "
                            "a core is owned by one process")
        return [c for c in m.core_list]

    def take(name: str, pool: list[int], groups: int, cpg: int) -> None:
        chunks = [pool[i * cpg:(i + 1) * cpg] for i in range(groups)]
        out[name] = chunks
        for chunk in chunks:
            for c in chunk:
                free.remove(c)

    fixed = [(n, m) for n, m in cfg.models.items() if m.groups != "all"]
    flexible = [(n, m) for n, m in cfg.models.items() if m.groups == "all"]
    for name, m in fixed:
        pool = pool_for(name, m)
        need = m.groups * m.cores_per_group
        if need > len(pool):
            raise PlanError(f"models.{name} asks for {m.groups} group(s) x {m.cores_per_group} core(s) = {need} "
                            f"cores, but only {len(pool)} are free ({format_core_list(pool) or 'none'}); "
                            "lower groups or cores_per_group")
        take(name, pool, m.groups, m.cores_per_group)
    shared = [(n, m) for n, m in flexible if m.core_list is None]
    for name, m in flexible:
        pool = pool_for(name, m)
        if m.core_list is None:
            # unrestricted 'all' models split what is left evenly, in config order
            k = len(shared)
            i = [n for n, _ in shared].index(name)
            share = len(pool) // (k - i)
            pool = pool[:share]
        groups = len(pool) // m.cores_per_group
        if groups == 0:
            raise PlanError(f"models.{name} gets no group: {len(pool)} free core(s) and cores_per_group = "
                            f"{m.cores_per_group}; free cores or lower cores_per_group")
        take(name, pool, groups, m.cores_per_group)
    return out


def resolve_python(cfg: Config, host: Host) -> str:
    from neuronserve.operate import mlenv

    if mlenv.joined():
        # packaged install: neuronserve's venv sees torch & co. through its .pth join, the ML venv has no gunicorn
        return sys.executable
    if cfg.server.python != "auto":
        return cfg.server.python
    finder = getattr(backend_module(host.backend), "find_python", None)
    found = finder(cfg, kind=host.kind) if finder else None
    return found or sys.executable


def make_plan(cfg: Config, host: Host, *, python: str | None = None) -> Plan:
    if not cfg.models:
        raise PlanError("no models configured: add a [models.<name>] table")
    backend = backend_module(host.backend)
    assignment = _assign_cores(cfg, host)
    front = _front_ports(cfg)
    grpc = bool(cfg.nginx.grpc_listen)
    # groups pass calls for the host's other models back through the front, which routes them by model
    grpc_front = loopback(cfg.nginx.grpc_listen) if grpc and cfg.nginx.enabled and len(cfg.models) > 1 else ""
    grpc_base = cfg.server.grpc_base_port or cfg.server.base_port + 1000
    grpc_setting = "server.grpc_base_port" if cfg.server.grpc_base_port else \
        "server.base_port, or set server.grpc_base_port (default: base_port + 1000),"
    count = sum(len(a) for a in assignment.values())
    http_ports = range(cfg.server.base_port, cfg.server.base_port + count)
    groups: list[Group] = []
    for name, m in cfg.models.items():
        for i, cores in enumerate(assignment[name]):
            gname = f"{name}-{i}"
            port = cfg.server.base_port + len(groups)
            grpc_port = grpc_base + len(groups) if grpc else 0
            for p, what, setting in ((port, "listen", "server.base_port"), (grpc_port, "serve gRPC", grpc_setting)):
                if p > 65535:
                    raise PlanError(f"group {gname} would {what} on port {p}: lower {setting}")
                if p in front:
                    raise PlanError(f"group {gname} would {what} on {p}, the port {front[p]} uses: move {setting} "
                                    f"or {front[p]}")
            if grpc_port in http_ports:
                raise PlanError(f"group {gname} would serve gRPC on {grpc_port}, a port of the groups' HTTP "
                                f"({http_ports.start}-{http_ports.stop - 1}): move server.grpc_base_port")
            pin = backend.pin_env(host, cores, m.copies, cfg, gname)
            cpus = backend.group_cpus(host, cores)
            settings = ServerSettings(
                group=gname, model=name, model_dir=Path(cfg.server.model_repository) / name,
                backend=host.backend, copies=m.copies, threads=int(pin.get("NEURONSERVE_THREADS", 1)),
                cpus=format_core_list(cpus), max_batch_delay_ms=m.max_batch_delay_ms,
                return_wait_share=m.return_wait_share, max_queue=m.max_queue, pad_to_buckets=m.pad_to_buckets,
                max_batch_tokens=m.max_batch_tokens or 0,
                truncation=m.truncation, timeout_s=cfg.server.timeout_s,
                graceful_timeout_s=cfg.server.graceful_timeout_s, log_level=cfg.server.log_level,
                lend_dir=LEND_DIR if host.backend == "cpu" and cfg.cpu.lend_idle_cpus else "",
                lend_min_batch_ms=cfg.cpu.lend_min_batch_ms, grpc_port=grpc_port, grpc_front=grpc_front)
            env = {**pin, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
            groups.append(Group(name=gname, model=name, index=i, cores=cores, cpus=cpus, port=port,
                                settings=settings, env=env, grpc_port=grpc_port))
    plan = Plan(config=cfg, host=host, groups=groups, python=python or resolve_python(cfg, host))
    plan.footprints = {f.group: f for f in footprint.check(plan)}     # refuses what the device cannot hold
    return plan
