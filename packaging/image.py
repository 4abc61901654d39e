#!/usr/bin/env python3
"""Build the container image neuronserve:<version> from the project's own .deb: no Dockerfile, no registry.

    python packaging/image.py [--deb dist/neuronserve_<ver>_<arch>.deb] [--tag neuronserve:<ver>]   # `make image`

1. base: a Debian 12 root from Debian's mirror, `debootstrap --variant=minbase bookworm` with python3 and
   ca-certificates;
2. ml: the CPU image's ML environment in /opt/ml (torch 2.13.0 CPU build, transformers, tokenizers, numpy: the
   versions the tests run against), installed offline in a chroot from wheels pip fetches here, through this
   machine's pip configuration (its local indexes and find-links);
3. the .deb, installed with dpkg in a chroot: its postinst creates the `neuronserve` user and builds
   /opt/neuronserve/venv offline, joined to /opt/ml (conf.d/00-image.toml names it as server.python);
4. `podman import` of the root, as the unprivileged `neuronserve` user (by uid, so that Kubernetes'
   runAsNonRoot can check it), entrypoint `neuronserve`, to be run as `neuronserve pod --model NAME`.

Steps 1 and 2 are cached as tarballs under build/image/, keyed by what decides them (the debootstrap arguments;
those and the exact wheels), so a rebuild only installs the .deb and imports: tens of seconds. Needs root
(debootstrap, chroot) and podman.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / "build" / "image"
MIRROR = os.environ.get("NEURONSERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
INCLUDE = ("python3", "ca-certificates")
# bookworm's python3: the ML wheels and the .deb's wheelhouse must be for it
PYTHON = "3.11"
ML_VENV = "/opt/ml"
# the CPU image's ML stack: what the test suite runs against (torch's CPU build lies on the build machines' disk)
ML_REQUIREMENTS = ("torch==2.13.0", "transformers==5.25.0", "tokenizers==0.23.3", "numpy==2.4.6")
MANYLINUX = ("manylinux2014", "manylinux_2_28")      # bookworm's glibc 2.36 runs both
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
              "DEBIAN_FRONTEND": "noninteractive"}
# what the image's containers get: offline (models come compiled, from a volume), unbuffered logs
IMAGE_ENV = {"PATH": CHROOT_ENV["PATH"], "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PYTHONUNBUFFERED": "1"}
PORTS = (8080, 8081)     # nginx.listen's and nginx.grpc_listen's defaults: where `neuronserve pod` listens
WORKDIR = "/var/lib/neuronserve"
# podman as it runs on Debian 12 hosts with hybrid cgroups (reference/TESTING.md): crun refuses them, runc does
# not; podman's default ulimits raise RLIMIT_NPROC/NOFILE, which a sandbox may forbid
PODMAN = ("podman", "--runtime", "runc")
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"


def progress(message: str) -> None:
    print(f"image.py: {message}", file=sys.stderr, flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def podman_env() -> dict[str, str]:
    """The environment podman runs with: CONTAINERS_CONF pointing at a file without default ulimits."""
    conf = CACHE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        CACHE.mkdir(parents=True, exist_ok=True)
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args, **kw) -> subprocess.CompletedProcess:
    return run([*PODMAN, *args], env=podman_env(), **kw)


def version() -> str:
    text = (REPO / "neuronserve" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@contextmanager
def timed(what: str):
    start = time.monotonic()
    progress(what + " ...")
    yield
    progress(f"{what}: {time.monotonic() - start:.0f} s")


# ---------------------------------------------------------------- cached stages

def cached(name: str, make) -> Path:
    """build/image/<name>.tar, made by make(root) into an empty root when it is missing."""
    tarball = CACHE / f"{name}.tar"
    if tarball.exists():
        progress(f"{tarball.name}: cached")
        return tarball
    work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=CACHE))
    try:
        root = work / "root"
        root.mkdir()
        make(root)
        partial = work / "root.tar"
        run(["tar", "-C", root, "--numeric-owner", "-cf", partial, "."])
        # renamed into place: a concurrent or interrupted build never sees a partial tarball
        partial.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stale in CACHE.glob(f"{name.split('-')[0]}-*.tar"):     # what older inputs made
        if stale != tarball:
            stale.unlink()
    return tarball


def unpack(tarball: Path, root: Path) -> None:
    run(["tar", "-C", root, "--numeric-owner", "-xpf", tarball])


def base(arch: str) -> Path:
    def make(root: Path) -> None:
        with timed(f"debootstrap --variant=minbase {SUITE} from {MIRROR} (about a minute)"):
            run(["debootstrap", "--variant=minbase", f"--arch={arch}", "--include=" + ",".join(INCLUDE), SUITE,
                 root, MIRROR], stdout=subprocess.DEVNULL)
        clean(root)

    return cached(f"base-{key(SUITE, 'minbase', INCLUDE, MIRROR, arch)}", make)


def ml_wheels(out: Path, machine: str) -> list[str]:
    """Download the ML stack's wheels (and pip's, to install them) for bookworm's Python into `out`."""
    flags = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
             "--abi", "cp" + PYTHON.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for ml in MANYLINUX:
        flags += ["--platform", f"{ml}_{machine}"]
    with timed("fetching the ML wheels (pip download)"):
        run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", out, *flags, *ML_REQUIREMENTS, "pip"])
    return sorted(p.name for p in out.glob("*.whl"))


def ml(base_tar: Path, machine: str) -> Path:
    wheels = Path(tempfile.mkdtemp(prefix="wheels.", dir=CACHE))
    try:
        names = ml_wheels(wheels, machine)

        def make(root: Path) -> None:
            unpack(base_tar, root)
            inside = root / "tmp" / "wheels"
            shutil.copytree(wheels, inside)
            (pip,) = (n for n in names if n.startswith("pip-"))
            with timed(f"installing {', '.join(ML_REQUIREMENTS)} into {ML_VENV} (a minute or two)"), mounted(root):
                chroot(root, "python3", "-m", "venv", "--without-pip", ML_VENV)
                # pip runs from its wheel: the ML venv carries no installer, as neuronserve's own does not
                chroot(root, f"{ML_VENV}/bin/python", f"/tmp/wheels/{pip}/pip", "install", "--quiet", "--no-index",
                       "--no-cache-dir", "--find-links", "/tmp/wheels", "--disable-pip-version-check",
                       *ML_REQUIREMENTS)
            shutil.rmtree(inside)

        return cached(f"ml-{key(base_tar.name, names)}", make)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)


# ---------------------------------------------------------------- the root and the image

def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess:
    return run(["chroot", root, *argv], env=CHROOT_ENV, stdin=subprocess.DEVNULL)


@contextmanager
def mounted(root: Path):
    """/proc inside the root while scripts run there (python and dpkg's maintainer scripts read it)."""
    run(["mount", "-t", "proc", "proc", root / "proc"])
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)


def clean(root: Path) -> None:
    """What a package installation leaves that an image does not need."""
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "root/.cache"):
        shutil.rmtree(root / rel, ignore_errors=True)
    for rel in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    for path in (root / "tmp").iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def install_deb(root: Path, deb: Path) -> tuple[int, int]:
    """dpkg -i the package into the root, joined to the ML venv; returns the neuronserve user's (uid, gid)."""
    dropin = root / "etc/neuronserve/conf.d/00-image.toml"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    # first in name order: an operator's own conf.d drop-ins still win
    dropin.write_text("# the image's ML environment (packaging/image.py): install-venv and `neuronserve env --link`"
                      f" join it\n[server]\npython = \"{ML_VENV}/bin/python\"\n")
    shutil.copy2(deb, root / "tmp" / deb.name)
    with timed(f"dpkg -i {deb.name} (its postinst builds /opt/neuronserve/venv)"), mounted(root):
        chroot(root, "dpkg", "-i", f"/tmp/{deb.name}")
        # the image's own check: neuronserve's venv sees the ML stack through the join
        chroot(root, "/opt/neuronserve/venv/bin/python", "-c",
               "import numpy, tokenizers, torch, transformers, neuronserve; print('image.py: neuronserve', "
               "neuronserve.__version__, 'with torch', torch.__version__, 'transformers', transformers.__version__)")
    clean(root)
    for line in (root / "etc/passwd").read_text().splitlines():
        name, _, uid, gid, *_ = line.split(":")
        if name == "neuronserve":
            return int(uid), int(gid)
    raise SystemExit("image.py: the package's postinst made no neuronserve user")


def changes(user: tuple[int, int], ver: str) -> list[str]:
    """podman import's --change instructions: how containers of the image run."""
    out = [f"USER {user[0]}:{user[1]}", f"WORKDIR {WORKDIR}", 'ENTRYPOINT ["neuronserve"]', 'CMD ["pod", "--help"]',
           f"LABEL org.opencontainers.image.version={ver}", "LABEL org.opencontainers.image.title=neuronserve"]
    out += [f"ENV {k}={v}" for k, v in IMAGE_ENV.items()]
    out += [f"EXPOSE {port}/tcp" for port in PORTS]
    return out


def build(deb: Path, tag: str) -> str:
    if os.geteuid() != 0:
        raise SystemExit("image.py: needs root (debootstrap, chroot, dpkg in the root, podman import)")
    machine = platform.machine()
    if machine not in ARCHES:
        raise SystemExit(f"image.py: no image for {machine}")
    CACHE.mkdir(parents=True, exist_ok=True)
    ml_tar = ml(base(ARCHES[machine]), machine)
    work = Path(tempfile.mkdtemp(prefix="image.", dir=CACHE))
    try:
        root = work / "root"
        root.mkdir()
        unpack(ml_tar, root)
        user = install_deb(root, deb)
        with timed(f"podman import as {tag}"):
            tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-cf", "-", "."],
                                   stdout=subprocess.PIPE)
            args = [a for change in changes(user, version()) for a in ("--change", change)]
            podman("import", "--quiet", "--message", f"neuronserve from {deb.name}", *args, "-", tag,
                   stdin=tar.stdout, stdout=subprocess.DEVNULL)
            tar.stdout.close()
            if tar.wait() != 0:
                raise SystemExit("image.py: tar of the root failed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = podman("image", "inspect", "--format", "{{.Size}}", tag, capture_output=True, text=True).stdout.strip()
    progress(f"{tag}: {int(size) / 1e9:.2f} GB")
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ver = version()
    arch = ARCHES.get(platform.machine(), platform.machine())
    parser.add_argument("--deb", type=Path, default=REPO / "dist" / f"neuronserve_{ver}_{arch}.deb",
                        help="the package to install (default: what `make packages` built, %(default)s)")
    parser.add_argument("--tag", default=f"neuronserve:{ver}", help="image name:tag (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.deb.is_file():
        parser.error(f"{args.deb} does not exist: build it with `make packages`, or name one with --deb")
    print(build(args.deb.resolve(), args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
