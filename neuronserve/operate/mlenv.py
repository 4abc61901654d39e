"""Join neuronserve's own environment to the host's ML environment (torch, torch-neuronx, transformers, numpy).

The .deb and .rpm install neuronserve and its pure dependencies into /opt/neuronserve/venv; the ML stack stays
where the host has it, built for its accelerator: a DLAMI venv (/opt/aws_neuronx_venv_pytorch_*) or the
interpreter named by server.python. `link` writes a .pth file into the venv's site-packages that appends the ML
environment's site-packages to sys.path after neuronserve's own, so neuronserve's dependencies win and torch
and friends come from the host. Both must run the same Python X.Y: compiled packages (torch, pydantic-core,
orjson) load only in the Python they were built for.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from neuronserve.errors import NeuronserveError

PTH = "zz-neuronserve-ml-env.pth"   # "zz": site reads .pth files in name order, this one after the venv's own
MARK = "# neuronserve ml-env: "      # first line of the .pth: which interpreter it joins
ML_MODULES = ("torch", "torch_neuronx", "torch_neuron", "transformers", "numpy")
_PROBE = ("import json, site, sys; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
          "'site': site.getsitepackages()}))")


class EnvError(NeuronserveError):
    """The ML environment cannot be joined (missing, or another Python version)."""


@dataclass(frozen=True)
class Interpreter:
    python: str
    version: str                # "3.11"
    site_dirs: tuple[str, ...]  # its site-packages, in its own order


def own_version() -> str:
    return "%d.%d" % sys.version_info[:2]


def own_site_dir() -> Path:
    return Path(sysconfig.get_path("purelib"))


def inspect(python: str) -> Interpreter:
    """Ask an interpreter for its Python version and site-packages."""
    try:
        out = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, PermissionError):
        raise EnvError(f"{python}: no such interpreter") from None
    except subprocess.TimeoutExpired:
        raise EnvError(f"{python} did not answer within 60 s") from None
    if out.returncode != 0:
        raise EnvError(f"{python} failed to start: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    probe = json.loads(out.stdout)
    return Interpreter(python=python, version=probe["version"], site_dirs=tuple(probe["site"]))


def find_ml_python(cfg) -> str | None:
    """server.python when set, else the first backend's DLAMI search (find_python) that finds one."""
    from neuronserve.devices import backend_module

    if cfg.server.python != "auto":
        return cfg.server.python
    for backend in ("neuron", "cuda"):
        try:
            finder = getattr(backend_module(backend), "find_python", None)
        except ImportError:
            continue
        found = finder(cfg) if finder else None
        if found:
            return found
    return None


def link(ml_python: str, site_dir: Path | None = None) -> Interpreter:
    """Append `ml_python`'s site-packages to this environment's (after its own); returns what was joined."""
    ml = inspect(ml_python)
    if ml.version != own_version():
        raise EnvError(
            f"{ml_python} is Python {ml.version} but neuronserve runs on Python {own_version()} "
            f"({sys.executable}); compiled packages load only in the Python they were built for. Rebuild "
            f"neuronserve's environment on that interpreter: /opt/neuronserve/bin/install-venv --python {ml_python}")
    site_dir = site_dir or own_site_dir()
    dirs = [d for d in ml.site_dirs if Path(d).resolve() != site_dir.resolve()]
    # site.addsitedir appends and also reads the ML environment's own .pth files (editable installs, ...)
    lines = [f"{MARK}{ml_python}", "# its site-packages come after neuronserve's; rewrite with `neuronserve env --link`"]
    lines += [f"import site; site.addsitedir({d!r})" for d in dirs]
    tmp = site_dir / f".{PTH}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, site_dir / PTH)
    return ml


def unlink(site_dir: Path | None = None) -> bool:
    path = (site_dir or own_site_dir()) / PTH
    if path.exists():
        path.unlink()
        return True
    return False


def joined(site_dir: Path | None = None) -> str | None:
    """The ML interpreter this environment is joined to, or None."""
    path = (site_dir or own_site_dir()) / PTH
    if not path.exists():
        return None
    first = path.read_text().splitlines()[:1]
    return first[0][len(MARK):] if first and first[0].startswith(MARK) else None


def module_origins(python: str | None = None) -> dict[str, str | None]:
    """Where each ML module would be imported from by a fresh interpreter (None: not importable).

    A fresh process, so a .pth just written counts; find_spec does not import torch, so this is quick.
    """
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({m: getattr(importlib.util.find_spec(m), 'origin', None) for m in sys.argv[1:]}))")
    out = subprocess.run([python or sys.executable, "-c", code, *ML_MODULES], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)
