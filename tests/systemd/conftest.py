"""A real systemd to apply units to: a throw-away container booted on an overlay of the host's root.

`container.sh` (next to this file) does the dangerous part and always undoes it: overlay (host / read-only below,
a tmpfs above), systemd-nspawn launched from a dedicated sub-cgroup (a systemd started from the root cgroup takes
over the host's cgroups), and an EXIT trap that powers the container off, unmounts and removes the sub-cgroup.
The fixture starts it with PR_SET_PDEATHSIG, so the trap runs even if pytest itself is killed, and checks at
the end that /proc/1/cgroup is what it was before.

What the container gets, copied over its root before boot (the host is never written):
- /etc/neuronserve/neuronserve.toml and a compiled model in /var/lib/neuronserve/models: pytest's tmp dirs are
  private (0700), so the unprivileged neuronserve user could not read a model there;
- when this venv's base interpreter lives under a home directory (pyenv in /root): the venv re-pointed at the
  system's python3 of the same X.Y, because the units hide /root (ProtectHome=) and pyenv's interpreter finds
  its libpython by an absolute path under /root. Same minor version, same ABI: the venv's packages load as they are;
- masks for the host's services that have no business in the container (postgresql, timers, ...).
Commands run inside with `nsenter` into all of the container's namespaces and a clean environment.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCRIPT = HERE / "container.sh"
CHECKOUT = HERE.parents[1]
# where the container's units find neuronserve and its dependencies (see runtime_seed)
RUNTIME = Path("/opt/neuronserve-test")
PYTHON = str(RUNTIME / "venv" / "bin" / "python")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOME_DIRS = ("/root", "/home", "/run/user")
# host services enabled on the CI image that would only cost CPU in the container
MASK = ("postgresql.service", "e2scrub_reap.service", "apt-daily.timer", "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer", "systemd-timesyncd.service")
BOOT_TIMEOUT_S = 60


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, overlay mounts, cgroups)"
    for tool in ("systemd-nspawn", "nsenter", "mountpoint"):
        if not shutil.which(tool):
            return f"{tool} is not installed (`make sysdeps` installs systemd-container)"
    if not (Path("/sys/fs/cgroup/cgroup.controllers").exists() or Path("/sys/fs/cgroup/systemd").is_dir()):
        return "no cgroup hierarchy that systemd can run in"
    if Path(sys.prefix) == Path(sys.base_prefix):
        return "the tests must run from a virtualenv (the container runs neuronserve from its site-packages)"
    return None


def _die_with_parent() -> None:
    # if pytest dies, the script gets SIGTERM and its trap tears the container down
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(entry), comm))
    return out


def runtime_seed(seed: Path) -> tuple[str | None, list[str]]:
    """Give the container a neuronserve environment its units can reach: (why not, else None; nspawn args).

    The checkout may lie under /tmp (hidden from the units by PrivateTmp=, and by nspawn's own /tmp) or a home
    (ProtectHome=), and the venv's interpreter may be a pyenv build under /root. So the container gets a venv
    shell at RUNTIME whose python is an interpreter outside those places, and whose .pth names the checkout
    and the host venv's site-packages, bind-mounted read-only beside it. Only .pth files in the shell's own
    site-packages are read, so the host's editable-install hook (which points into the checkout's old path)
    never runs there.
    """
    version = sysconfig.get_python_version()
    base = Path(os.path.realpath(sys._base_executable))
    hidden = HOME_DIRS + ("/tmp", "/var/tmp")
    if any(str(base).startswith(h + "/") for h in hidden):
        base = Path(f"/usr/bin/python{version}")
        if not base.exists():
            return (f"the venv's interpreter is under a home or /tmp, which the units cannot reach, and there is "
                    f"no {base} of the same version to use in its place"), []
    shell = seed / RUNTIME.relative_to("/")
    site = shell / "venv" / "lib" / f"python{version}" / "site-packages"
    site.mkdir(parents=True)
    for name in ("python", "python3", f"python{version}"):
        (shell / "venv" / "bin" / name).parent.mkdir(parents=True, exist_ok=True)
        (shell / "venv" / "bin" / name).symlink_to(base)
    (shell / "venv" / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                               f"version = {sysconfig.get_config_var('py_version')}\n")
    (site / "neuronserve-test.pth").write_text(f"{RUNTIME}/src\n{RUNTIME}/site\n")
    (shell / "src").mkdir()
    (shell / "site").mkdir()
    return None, [f"--bind-ro={CHECKOUT}:{RUNTIME}/src", f"--bind-ro={sysconfig.get_paths()['purelib']}:{RUNTIME}/site"]


class Container:
    def __init__(self, state: Path):
        self.state = state
        self.seed = state / "seed"
        self.seed.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.log = state / "container.log"
        self.nspawn_args: list[str] = []
        self.python = PYTHON            # the interpreter that runs neuronserve in the container

    # ---------------------------------------------------------------- life cycle

    def boot(self, *nspawn_args: str) -> None:
        for unit in MASK:
            link = self.seed / "etc/systemd/system" / unit
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/dev/null")
        self.proc = subprocess.Popen(["bash", str(SCRIPT), str(self.state), *self.nspawn_args, *nspawn_args],
                                     stdin=subprocess.DEVNULL, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        pidfile = self.state / "nspawn.pid"
        while self.leader is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not start:\n{self.diagnostics()}")
            if pidfile.exists() and pidfile.read_text().strip():
                found = [pid for pid, comm in _children(int(pidfile.read_text())) if comm == "systemd"]
                self.leader = found[0] if found else None
            time.sleep(0.1)
        while True:
            # until PID 1 has set up its bus, systemctl cannot connect at all
            r = self.sh("systemctl is-system-running --wait", timeout=BOOT_TIMEOUT_S, check=False)
            if "Failed to connect" not in r.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if r.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"the container's systemd did not finish booting ({r.stdout.strip()} {r.stderr.strip()}):\n"
                               f"{self.sh('systemctl --failed --no-pager', check=False).stdout}{self.diagnostics()}")

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                # the trap is stuck: SIGKILL would skip it, so report rather than leave mounts behind silently
                raise RuntimeError(f"container.sh did not finish its teardown in 60 s: see {self.log}")
        self.proc = None

    def diagnostics(self) -> str:
        parts = []
        for f in (self.log, self.state / "console.log"):
            if f.exists():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- commands inside

    def run(self, argv: list[str], *, timeout: float = 120, check: bool = True, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        """Run argv inside the container (all its namespaces), with a clean environment."""
        clean = {"PATH": PATH, "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        cmd = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *(f"{k}={v}" for k, v in clean.items()), *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(argv)} -> rc {r.returncode}\n"
                                 f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}")
        return r

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["bash", "-c", script], **kw)

    def popen_in_netns(self, argv: list[str], **kw) -> subprocess.Popen:
        """A host process in the container's network namespace only: it reaches 127.0.0.1 of the container."""
        return subprocess.Popen(["nsenter", "-t", str(self.leader), "-n", *argv], **kw)

    def write(self, path: str, text: str) -> None:
        """Write a file inside the running container (through its root, i.e. the overlay)."""
        target = Path(f"/proc/{self.leader}/root") / path.lstrip("/")
        target.write_text(text)


def _torn_down(box: Container) -> None:
    box.shutdown()
    assert (box.state / "torn-down").exists() or box.leader is None, f"no teardown record:\n{box.diagnostics()}"
    assert subprocess.run(["mountpoint", "-q", str(box.state / "merged")]).returncode != 0, "overlay left mounted"


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """make() -> a new container to boot (fill its `seed`, then `boot()`); every one made is torn down at the end
    of the module, and the host's cgroups are checked to be as they were."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    before = Path("/proc/1/cgroup").read_text()
    mine = Path("/proc/self/cgroup").read_text()
    made: list[Container] = []

    def make() -> Container:
        box = Container(tmp_path_factory.mktemp(f"nspawn-{uuid.uuid4().hex[:6]}"))
        why, box.nspawn_args = runtime_seed(box.seed)
        if why:
            pytest.skip(why)
        made.append(box)
        return box

    try:
        yield make
    finally:
        failures = []
        for box in made:            # every one, even after one failed to tear down
            try:
                _torn_down(box)
            except (AssertionError, RuntimeError) as e:
                failures.append(str(e))
        assert not failures, "\n".join(failures)
        assert Path("/proc/1/cgroup").read_text() == before, "the host's PID 1 changed cgroups"
        assert Path("/proc/self/cgroup").read_text() == mine, "pytest changed cgroups"


@pytest.fixture(scope="module")
def container(containers):
    """A container to boot: fill `container.seed` (copied over its root), then call `container.boot()`."""
    return containers()
