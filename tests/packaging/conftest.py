"""Fixtures of the package tests: the two builds, and clean Debian 12 roots to install them into.

A root is debootstrap's minbase of bookworm plus python3 and systemd (what a DLAMI or a server has), made once
and kept as a tarball under build/packaging/cache (NEURONSERVE_PACKAGING_CACHE), so a second run unpacks it in
seconds instead of bootstrapping for about 75 s. The maintainer scripts run in a chroot of it, with no systemd
manager running: what an image build sees.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import neuronserve

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NEURONSERVE_PACKAGING_CACHE", REPO / "build" / "packaging" / "cache"))
MIRROR = os.environ.get("NEURONSERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
INCLUDE = ("python3", "systemd")
TOOLS = ("debootstrap", "dpkg", "rpm", "lintian", "rpmlint", "chroot")


@pytest.fixture(scope="session")
def need_root_and_tools():
    if os.geteuid() != 0:
        pytest.skip("installing packages into a chroot needs root")
    missing = [t for t in TOOLS if not shutil.which(t) and not Path("/usr/sbin", t).exists()]
    assert not missing, f"missing {', '.join(missing)}: run `make sysdeps`"


@dataclass(frozen=True)
class Build:
    version: str
    deb: Path
    rpm: Path


def build(out: Path, version: str) -> Build:
    subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "dist", "--out", str(out),
                    "--version", version], check=True, timeout=900)
    (deb,) = out.glob(f"neuronserve_{version}_*.deb")
    (rpm,) = out.glob(f"neuronserve-{version}.*.rpm")
    return Build(version, deb, rpm)


@pytest.fixture(scope="session")
def builds(tmp_path_factory, need_root_and_tools) -> tuple[Build, Build]:
    """Version X (neuronserve's own) and X.1, to upgrade from one to the other."""
    out = tmp_path_factory.mktemp("dist")
    return build(out, neuronserve.__version__), build(out, neuronserve.__version__ + ".1")


@pytest.fixture(scope="session")
def root_tarball(need_root_and_tools) -> Path:
    tarball = CACHE / f"bookworm-minbase-{'-'.join(INCLUDE)}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / "debootstrap.tmp"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(INCLUDE), "bookworm", str(work),
                    MIRROR], check=True, stdout=subprocess.DEVNULL, timeout=900)
    # apt's downloaded .debs are not part of a clean system
    shutil.rmtree(work / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."], check=True)
    partial.rename(tarball)
    shutil.rmtree(work)
    return tarball


class Root:
    """A clean Debian root in a tmp dir; `run` executes a command chrooted into it."""

    def __init__(self, path: Path):
        self.path = path

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def run(self, *argv: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
               "DEBIAN_FRONTEND": "noninteractive"}
        out = subprocess.run(["chroot", str(self.path), *argv], env=env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> rc {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def put(self, src: Path, dst: str = "/tmp") -> str:
        shutil.copy2(src, self / dst)
        return f"{dst.rstrip('/')}/{src.name}"


@pytest.fixture
def debian_root(tmp_path, root_tarball) -> Root:
    path = tmp_path / "root"
    path.mkdir()
    subprocess.run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(root_tarball)], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(path / "proc")], check=True)
    try:
        yield Root(path)
    finally:
        subprocess.run(["umount", "-l", str(path / "proc")], check=False)
