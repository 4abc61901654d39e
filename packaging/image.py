#!/usr/bin/env python3
"""Build the container image neuronserve:<version> from the project's own .deb: no Dockerfile, no registry.

    python packaging/image.py [--deb dist/neuronserve_<ver>_<arch>.deb] [--tag neuronserve:<ver>]   # `make image`
                              [--torch SPEC] [--pip-arg ARG ...]

1. base: a Debian 12 root from Debian's mirror, `debootstrap --variant=minbase bookworm` with python3 and
   ca-certificates;
2. ml: the CPU image's ML environment in /opt/ml (torch 2.13.0 CPU build, transformers, tokenizers, numpy: the
   versions the tests run against), installed offline in a chroot from wheels `pip download` fetches here,
   through this machine's pip configuration (its indexes and find-links) and the --pip-arg arguments;
3. the .deb, installed with dpkg in a chroot: its postinst creates the `neuronserve` user and builds
   /opt/neuronserve/venv offline, joined to /opt/ml (conf.d/00-image.toml names it as server.python);
4. `podman import` of the root, as the unprivileged `neuronserve` user (by uid, so that Kubernetes'
   runAsNonRoot can check it), entrypoint `neuronserve`, to be run as `neuronserve pod --model NAME`.

The torch wheel must be a CPU build. `--torch` (NEURONSERVE_IMAGE_TORCH; default torch==2.13.0) is its
requirement: this machine's pip configuration finds the CPU build of 2.13.0 in a local find-links directory, but
on PyPI alone torch==2.13.0 is the CUDA build and pulls gigabytes of nvidia-* wheels. Elsewhere name the CPU
build and PyTorch's CPU index (which has only torch and its own dependencies, so as an extra index):

    python packaging/image.py --torch 'torch==2.13.0+cpu' \\
        --pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu
    NEURONSERVE_IMAGE_TORCH='torch==2.13.0+cpu' \\
        NEURONSERVE_IMAGE_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu' make image

Steps 1 and 2 are cached as tarballs under build/image/, keyed by what decides them (the debootstrap arguments;
those and the exact wheels). Every build runs `pip download` to learn the exact wheels (the key), which takes
seconds when pip's cache or a local find-links holds them and as long as the downloads when not; when they are
those of the cached stage, the build then only installs the .deb and imports (a minute here). A root that a
failed step leaves is removed without crossing a mount: what is mounted under it is unmounted first. Needs root
(debootstrap, chroot, mount) and podman.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
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
# the CPU image's ML stack: what the test suite runs against. torch's CPU build lies on the build machines' disk
# (find-links); where it does not, --torch / NEURONSERVE_IMAGE_TORCH and --pip-arg / NEURONSERVE_IMAGE_PIP_ARGS
# name it and its index (the module docstring)
TORCH = os.environ.get("NEURONSERVE_IMAGE_TORCH") or "torch==2.13.0"
PIP_ARGS = tuple(shlex.split(os.environ.get("NEURONSERVE_IMAGE_PIP_ARGS", "")))
ML_REQUIREMENTS = ("transformers==5.25.0", "tokenizers==0.23.3", "numpy==2.4.6")
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
        remove_root(work)
    for stale in CACHE.glob(f"{name.split('-')[0]}-*.tar"):     # what older inputs made
        if stale != tarball:
            stale.unlink()
    return tarball


def mounts_under(path: Path) -> list[str]:
    """Mount points at or under `path` (/proc/self/mountinfo), the ones to unmount first first: the deepest, and of
    those the last mounted (a mount stacked on another)."""
    top = os.path.realpath(path)
    found = []
    for order, line in enumerate(Path("/proc/self/mountinfo").read_text().splitlines()):
        fields = line.split()
        if len(fields) < 5:
            continue
        # spaces, tabs, newlines and backslashes in a mount point are octal escapes (\040)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == top or point.startswith(top.rstrip("/") + "/"):
            found.append((point.count("/"), order, point))
    return [point for *_, point in sorted(found, reverse=True)]


def unmount_under(path: Path) -> list[str]:
    """Unmount everything mounted under `path` (a chroot's /proc, what a killed debootstrap left mounted):
    `umount`, else `umount -l`. Returns what stays mounted."""
    failed: list[str] = []
    while True:
        points = [p for p in mounts_under(path) if p not in failed]
        if not points:
            return failed
        point = points[0]
        for argv in (["umount", point], ["umount", "-l", point]):
            if subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                break
        else:
            failed.append(point)


def remove_root(work: Path) -> None:
    """Remove a work directory that held a root, never what is mounted in it: a root's /proc or a bind mount of
    the host's /dev would otherwise be walked into and deleted. Everything under it is unmounted first; if
    something will not unmount, the directory stays (and says so); `rm --one-file-system` never crosses into
    another filesystem either way."""
    if not os.path.lexists(work):
        return
    stuck = unmount_under(work)
    if stuck:
        progress(f"left {work} in place: {', '.join(stuck)} would not unmount")
        return
    done = subprocess.run(["rm", "-rf", "--one-file-system", "--", str(work)], stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        progress(f"could not remove all of {work}: {done.stderr.strip()[-500:]}")


def unpack(tarball: Path, root: Path) -> None:
    run(["tar", "-C", root, "--numeric-owner", "-xpf", tarball])


def base(arch: str) -> Path:
    def make(root: Path) -> None:
        with timed(f"debootstrap --variant=minbase {SUITE} from {MIRROR} (about a minute)"):
            run(["debootstrap", "--variant=minbase", f"--arch={arch}", "--include=" + ",".join(INCLUDE), SUITE,
                 root, MIRROR], stdout=subprocess.DEVNULL)
        clean(root)

    return cached(f"base-{key(SUITE, 'minbase', INCLUDE, MIRROR, arch)}", make)


def ml_wheels(out: Path, machine: str, requirements: tuple[str, ...], pip_args: tuple[str, ...]) -> list[str]:
    """Download the ML stack's wheels (and pip's, to install them) for bookworm's Python into `out`."""
    flags = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
             "--abi", "cp" + PYTHON.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for ml in MANYLINUX:
        flags += ["--platform", f"{ml}_{machine}"]
    with timed(f"fetching the ML wheels (pip download {' '.join(requirements)}"
               f"{' ' + shlex.join(pip_args) if pip_args else ''})"):
        run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", out, *flags, *pip_args, *requirements,
             "pip"])
    names = sorted(p.name for p in out.glob("*.whl"))
    nvidia = [n for n in names if n.lower().startswith(("nvidia_", "nvidia-", "triton-"))]
    if nvidia:
        raise SystemExit(f"image.py: {requirements[0]} resolved to a CUDA build of torch (it pulled "
                         f"{', '.join(nvidia[:3])}{', ...' if len(nvidia) > 3 else ''}): the image is CPU-only. "
                         "Name the CPU build: --torch 'torch==<version>+cpu' "
                         "--pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu")
    return names


def ml(base_tar: Path, machine: str, torch: str = TORCH, pip_args: tuple[str, ...] = PIP_ARGS) -> Path:
    requirements = (torch, *ML_REQUIREMENTS)
    wheels = Path(tempfile.mkdtemp(prefix="wheels.", dir=CACHE))
    try:
        names = ml_wheels(wheels, machine, requirements, pip_args)

        def make(root: Path) -> None:
            unpack(base_tar, root)
            inside = root / "tmp" / "wheels"
            shutil.copytree(wheels, inside)
            (pip,) = (n for n in names if n.startswith("pip-"))
            with timed(f"installing {', '.join(requirements)} into {ML_VENV} (a minute or two)"), mounted(root):
                chroot(root, "python3", "-m", "venv", "--without-pip", ML_VENV)
                # pip runs from its wheel: the ML venv carries no installer, as neuronserve's own does not
                chroot(root, f"{ML_VENV}/bin/python", f"/tmp/wheels/{pip}/pip", "install", "--quiet", "--no-index",
                       "--no-cache-dir", "--find-links", "/tmp/wheels", "--disable-pip-version-check",
                       *requirements)
            shutil.rmtree(inside)

        return cached(f"ml-{key(base_tar.name, names)}", make)
    finally:
        remove_root(wheels)


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


def build(deb: Path, tag: str, torch: str = TORCH, pip_args: tuple[str, ...] = PIP_ARGS) -> str:
    if os.geteuid() != 0:
        raise SystemExit("image.py: needs root (debootstrap, chroot, dpkg in the root, podman import)")
    machine = platform.machine()
    if machine not in ARCHES:
        raise SystemExit(f"image.py: no image for {machine}")
    CACHE.mkdir(parents=True, exist_ok=True)
    ml_tar = ml(base(ARCHES[machine]), machine, torch, pip_args)
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
        remove_root(work)
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
    parser.add_argument("--torch", default=TORCH, metavar="SPEC",
                        help="the torch requirement, a CPU build (default: NEURONSERVE_IMAGE_TORCH or %(default)s; "
                             "without a local CPU wheel: 'torch==2.13.0+cpu' and the --pip-arg below)")
    parser.add_argument("--pip-arg", action="append", dest="pip_args", metavar="ARG",
                        help="an argument for `pip download`, repeatable, e.g. "
                             "--pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu "
                             "(default: NEURONSERVE_IMAGE_PIP_ARGS, split as a shell does)")
    args = parser.parse_args(argv)
    if not args.deb.is_file():
        parser.error(f"{args.deb} does not exist: build it with `make packages`, or name one with --deb")
    pip_args = PIP_ARGS if args.pip_args is None else tuple(args.pip_args)
    print(build(args.deb.resolve(), args.tag, args.torch, pip_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
