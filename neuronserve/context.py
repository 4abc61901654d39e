"""What every command starts from: the config, this host as discovered for it, where files live, and the plan.

One place builds it, so that every command sees the host the same way: `neuron.tools_dir` is honoured by
`plan`, `apply`, `compile`, `bench` and `top` alike, and a host is discovered once per command.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from neuronserve.config import Config
from neuronserve.devices import Host, discover_host
from neuronserve.layout import Layout
from neuronserve.plan import Plan, make_plan


def discovery_options(cfg: Config) -> dict:
    """discover_host's per-backend options that come from the config."""
    return {"neuron": {"tools_dir": cfg.neuron.tools_dir}}


def discover(cfg: Config, backend: str | None = None) -> Host:
    """This host for `cfg` (its server.backend unless `backend` names one): DeviceError when absent."""
    return discover_host(backend or cfg.server.backend, **discovery_options(cfg))


@dataclass
class HostContext:
    config: Config
    root: Path = field(default=Path("/"))     # a scratch root for `render --root` and `up`

    @cached_property
    def host(self) -> Host:
        return discover(self.config)

    @cached_property
    def plan(self) -> Plan:
        return make_plan(self.config, self.host)

    @cached_property
    def layout(self) -> Layout:
        return Layout(self.root, self.config)

