"""systemctl and journalctl, every call made through one injectable runner.

The runner takes an argv and returns a CompletedProcess; tests pass a recording one and check the exact calls
(`apply` and `cleanup` promise an order: drain before stop, stop before start, never a HUP reload of a group).
"""
from __future__ import annotations

import subprocess
from typing import Callable

from neuronserve.devices import run_tool
from neuronserve.errors import ServiceError

Runner = Callable[[list[str]], subprocess.CompletedProcess]

# A stop waits for the group's graceful timeout (in-flight requests) and systemd's own; a start only forks.
CALL_TIMEOUT_S = 300.0


def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    """The real runner: a missing tool or a hung call becomes a failed CompletedProcess, never an exception."""
    return run_tool(argv, timeout=CALL_TIMEOUT_S)


class Systemctl:
    def __init__(self, runner: Runner = run_command):
        self.runner = runner

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["systemctl", *args]
        result = self.runner(argv)
        if check and result.returncode != 0:
            why = (result.stderr or result.stdout or "").strip() or f"exit status {result.returncode}"
            raise ServiceError(f"`{' '.join(argv)}` failed: {why}")
        return result

    def daemon_reload(self) -> None:
        self._run("daemon-reload")

    def enable(self, *units: str) -> None:
        self._run("enable", *units)

    def disable(self, *units: str) -> None:
        self._run("disable", *units)

    def start(self, *units: str) -> None:
        self._run("start", *units)

    def stop(self, *units: str) -> None:
        self._run("stop", *units)

    def reload(self, unit: str) -> None:
        self._run("reload", unit)

    def reset_failed(self, *units: str) -> None:
        # a unit that is not failed (or not loaded) is not an error here: cleanup calls it on whatever is left
        self._run("reset-failed", *units, check=False)

    def is_active(self, unit: str) -> str:
        """active, inactive, failed, activating, deactivating, reloading (or unknown): the unit's ActiveState."""
        out = self._run("is-active", unit, check=False).stdout.strip()
        return out or "unknown"

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self._run("show", unit, "--property=" + ",".join(props)).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {p: values.get(p, "") for p in props}

    def loaded_units(self, pattern: str) -> list[str]:
        """Units matching a glob that the manager has loaded, in any state (failed and inactive included)."""
        out = self._run("list-units", "--all", "--no-legend", "--plain", "--full", pattern, check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def journal(self, unit: str, lines: int = 30) -> str:
        """The unit's last log lines (journald), for error messages."""
        result = self.runner(["journalctl", "--unit", unit, "--lines", str(lines), "--no-pager", "--output", "cat"])
        return result.stdout.strip()
