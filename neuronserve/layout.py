"""Where every file neuronserve reads or writes lives, under one root.

The root is "/" on a real host. `render --root DIR` and `neuronserve up` use a scratch root, and the rendered
files then refer to each other under that root, so the same templates serve both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neuronserve.config import Config


# the file neuronserve owns in a unit's drop-in directory
DROPIN = "10-neuronserve.conf"


@dataclass(frozen=True)
class Layout:
    root: Path
    config: Config

    def __post_init__(self) -> None:
        # rendered files name each other by absolute path: a relative root would be resolved twice
        object.__setattr__(self, "root", Path(self.root).absolute())

    def under(self, path: Path | str) -> Path:
        path = Path(path)
        return self.root / path.relative_to("/") if path.is_absolute() else self.root / path

    @property
    def unit_dir(self) -> Path:
        return self.under("/etc/systemd/system")

    @property
    def packaged_unit_dir(self) -> Path:
        """Where the packages install the template unit and the target (systemd/ in the source tree)."""
        return self.under("/usr/lib/systemd/system")

    @property
    def etc_dir(self) -> Path:
        return self.under("/etc/neuronserve")

    @property
    def gunicorn_dir(self) -> Path:
        return self.etc_dir / "gunicorn"

    @property
    def template_override_dir(self) -> Path:
        return self.etc_dir / "templates"

    @property
    def nginx_conf(self) -> Path:
        return self.under(self.config.nginx.conf_path)

    @property
    def state_dir(self) -> Path:
        """Runtime state of the front in `up` (pid, temp paths, logs); /var/lib/neuronserve on a host."""
        return self.under("/var/lib/neuronserve")

    @property
    def drain_flag(self) -> Path:
        """Present while the host is drained: the front's readiness answers 503 (`neuronserve drain`). State, not
        runtime: a drained host that reboots stays out of its load balancer until `neuronserve undrain`."""
        return self.state_dir / "drained"

    @property
    def model_repository(self) -> Path:
        # the model repository is data, not rendered output: it is never moved under a scratch root
        return self.config.server.model_repository

    def gunicorn_conf(self, group_name: str) -> Path:
        return self.gunicorn_dir / f"{group_name}.conf.py"

    def unit_path(self, unit: str) -> Path:
        return self.unit_dir / unit

    def dropin_path(self, unit: str) -> Path:
        """The drop-in neuronserve owns for a unit; a sysadmin's `systemctl edit` writes override.conf beside it,
        which sorts after it and so wins."""
        return self.unit_dir / f"{unit}.d" / DROPIN
