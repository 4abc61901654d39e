"""Everything one group's worker needs, carried in its environment as NEURONSERVE_* variables.

The planner builds a ServerSettings per group and renders ``to_env()`` into the unit (Environment=) and into
`neuronserve up`; the worker reads it back with ``from_env()``. One definition serves both sides.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neuronserve.errors import ConfigError

PREFIX = "NEURONSERVE_"


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str = Field(description="group name, e.g. bert-0: shown in logs, metrics and neuron-top")
    model: str = Field(description="served model name: the {m} in /v2/models/{m}")
    model_dir: Path = Field(description="compiled artifact directory holding manifest.json")
    backend: Literal["neuron", "cuda", "cpu"]
    copies: int = Field(1, ge=1)
    threads: int = Field(1, ge=1, description="torch intra-op threads per copy")
    cpus: str = Field("", description="CPU affinity of the worker ('0-3'); empty: leave as is")
    lend_dir: str = Field("", description="where the CPU groups lend each other idle CPUs (per-CPU lock "
                                          "files); empty: this group neither lends nor borrows")
    lend_min_batch_ms: float = Field(10.0, ge=0, description="lend only for buckets whose batch takes this long")
    max_batch_delay_ms: float = Field(1.0, ge=0)
    return_wait_share: float = Field(0.1, ge=0, le=0.5)
    max_queue: int = Field(256, ge=1)
    pad_to_buckets: bool = False
    max_batch_tokens: int = Field(0, ge=0, description="0: no limit")
    truncation: bool = True
    timeout_s: float = Field(30.0, gt=0)
    graceful_timeout_s: float = Field(30.0, ge=0, description="how long a stop waits for the model's threads")
    listen_host: str = Field("127.0.0.1", description="address the group's HTTP and gRPC listen on: the loopback "
                                                      "behind nginx; every address in a pod (`neuronserve pod`)")
    grpc_port: int = Field(0, ge=0, le=65535, description="KServe v2 gRPC on listen_host:grpc_port; 0: no gRPC")
    grpc_front: str = Field("", description="the front's gRPC address, through which calls for the host's other "
                                            "models are passed on; empty: none are")
    log_level: str = "info"

    def to_env(self) -> dict[str, str]:
        out = {}
        for name, value in self.model_dump().items():
            if isinstance(value, bool):
                value = "1" if value else "0"
            out[PREFIX + name.upper()] = str(value)
        return out

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServerSettings":
        env = os.environ if env is None else env
        data = {name: env[PREFIX + name.upper()] for name in cls.model_fields if PREFIX + name.upper() in env}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{PREFIX}{'.'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors())
            raise ConfigError(f"bad server environment: {problems}") from None
