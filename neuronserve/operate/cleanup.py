"""`neuronserve cleanup`: stop, disable and remove neuronserve's own units and nginx config, and nothing else.

"Own" is decided file by file: the groups' drop-ins (neuronserve@<group>.service.d/10-neuronserve.conf), the
legacy whole units of earlier versions (neuronserve-<group>.service), copies of the template unit and target
written where no package installed them, the front config at nginx.conf_path, its token map and the gunicorn
configs, each only if it carries the header `neuronserve render` writes. A package's own files (the template
unit and target in /usr/lib) and a sysadmin's override.conf stay. A file with one of those names but without
the header was written by someone else: it is reported and left alone. No other unit, service or container is
ever stopped. The config, the model repository and the neuronserve user stay (the package's purge removes
those).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from neuronserve import render
from neuronserve.operate.apply import NGINX_UNIT, Front, Step
from neuronserve.layout import Layout
from neuronserve.plan import LEGACY_PREFIX, UNIT_SUFFIX, group_of_unit
from neuronserve.operate.systemctl import Systemctl


@dataclass
class Found:
    units: list[str] = field(default_factory=list)           # to stop (loaded or with a file)
    unit_files: list[Path] = field(default_factory=list)     # to disable and delete
    front_files: list[Path] = field(default_factory=list)    # nginx conf and token map
    other_files: list[Path] = field(default_factory=list)    # gunicorn configs
    foreign: list[Path] = field(default_factory=list)        # our names, someone else's content: left alone


def _is_our_unit_name(name: str) -> bool:
    return name == render.TARGET or group_of_unit(name) is not None


def find(layout: Layout, systemctl: Systemctl) -> Found:
    found = Found()
    if any((d / render.TARGET).is_file() for d in (layout.unit_dir, layout.packaged_unit_dir)):
        found.units.append(render.TARGET)       # first: stopping it stops every group (PartOf=)
    for unit, files in render.group_unit_files(layout).items():
        found.units.append(unit)
        found.unit_files.extend(files)
    for name in render.SHIPPED_UNITS:
        path = layout.unit_path(name)
        if path.is_file():
            (found.unit_files if render.ours(path) else found.foreign).append(path)
    for path in layout.unit_dir.glob(f"{LEGACY_PREFIX}*{UNIT_SUFFIX}"):
        if group_of_unit(path.name) and not render.ours(path):
            found.foreign.append(path)
    # units still loaded (running, or failed) whose file is already gone
    foreign_names = {p.name for p in found.foreign}
    for unit in systemctl.loaded_units("neuronserve*"):
        if _is_our_unit_name(unit) and unit not in found.units and unit not in foreign_names:
            found.units.append(unit)
    for path in (layout.nginx_conf, render.auth_map_path(layout)):
        if path.is_file():
            (found.front_files if render.ours(path) else found.foreign).append(path)
    for path in sorted(layout.gunicorn_dir.glob("*.conf.py")) if layout.gunicorn_dir.is_dir() else []:
        (found.other_files if render.ours(path) else found.foreign).append(path)
    # enable links left by a unit file deleted by hand (disable needs the file to find them)
    for link in sorted(layout.unit_dir.glob("*.wants/*")):
        if link.is_symlink() and _is_our_unit_name(link.name) and not link.exists():
            found.other_files.append(link)
    return found


def cleanup(layout: Layout, *, systemctl: Systemctl | None = None, front: Front | None = None,
            dry_run: bool = False, log: Callable[[Step], None] = lambda step: None) -> list[Step]:
    systemctl = systemctl or Systemctl()
    front = front or Front(systemctl)
    found = find(layout, systemctl)
    steps: list[Step] = []

    def step(action: str, target: str, detail: str = "") -> None:
        s = Step(action, target, detail + (" (dry run)" if dry_run else ""))
        steps.append(s)
        log(s)

    for path in found.foreign:
        step("keep", str(path), "not written by neuronserve")
    # nginx first: clients get a clean 404 from nginx rather than errors from stopping groups
    for path in found.front_files:
        if not dry_run:
            path.unlink(missing_ok=True)
        step("remove", str(path))
    if found.front_files and systemctl.is_active(NGINX_UNIT) == "active":
        if not dry_run:
            front.reload()
        step("nginx", NGINX_UNIT, "reloaded")
    if found.units:
        if not dry_run:
            systemctl.stop(*found.units)
        step("stop", " ".join(found.units))
    if found.unit_files:
        if not dry_run:
            systemctl.disable(*found.units)
        step("disable", " ".join(found.units))
    for path in found.unit_files + found.other_files:
        if not dry_run:
            path.unlink(missing_ok=True)
            if path.parent.name.endswith(".d") and not any(path.parent.iterdir()):
                path.parent.rmdir()     # a sysadmin's override.conf beside it keeps the directory
        step("remove", str(path))
    wants = layout.unit_path(render.TARGET + ".wants")
    if wants.is_dir() and not any(wants.iterdir()) and not dry_run:
        wants.rmdir()
    if found.units and not dry_run:
        systemctl.daemon_reload()
        systemctl.reset_failed(*found.units)
    if found.units:
        step("daemon-reload", "systemd")
    if not steps:
        step("nothing", "to clean", "no neuronserve unit or front config found")
    return steps
