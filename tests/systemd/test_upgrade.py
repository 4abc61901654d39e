"""A package upgrade under load, under the real systemd: from the last release whose groups were whole units
(neuronserve-<group>.service, LEGACY_REV) to this checkout's template unit, with no failed request.

Both .debs are built here (the legacy one from a git worktree of LEGACY_REV, sharing the wheel cache) and
installed with dpkg in a throw-away container (conftest.py) whose ML environment is the test runtime's venv
(server.python). The legacy package is installed and applied: two groups behind the host's nginx. Then, with a
closed-loop load running through nginx: `dpkg -i` of this checkout's package (its postinst rebuilds the venv
the groups run from), then `neuronserve apply`, which moves each group onto its instance of neuronserve@.service
one at a time. Figures go to <pytest basetemp>/upgrade-figures.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import neuronserve
from systemd_kit import Load, nginx_says, prop, wait_until

pytestmark = [pytest.mark.systemd, pytest.mark.packaging, pytest.mark.slow]

CHECKOUT = Path(__file__).resolve().parents[2]
LEGACY_REV = "19f1f31"          # the last commit before the template unit
LEGACY_VERSION = "0.1.0"
REPO = "/var/lib/neuronserve/models"
LEGACY_UNITS = ["neuronserve-tiny-0.service", "neuronserve-tiny-1.service"]
UNITS = ["neuronserve@tiny-0.service", "neuronserve@tiny-1.service"]
# keys both versions know; the ML environment is the test runtime's venv (what a DLAMI venv is on a host)
DROPIN = """
[server]
backend = "cpu"
python = "{python}"
graceful_timeout_s = 10
[nginx]
listen = "127.0.0.1:8080"
grpc_listen = ""
[models.tiny]
task = "text-classification"
source = "/nonexistent: compiled on the host before boot"
groups = 2
batch_sizes = [1, 4]
sequence_lengths = [32]
"""


def build(src: Path, out: Path, version: str) -> Path:
    subprocess.run([sys.executable, str(src / "packaging" / "build.py"), "dist", "--out", str(out),
                    "--version", version], check=True, timeout=900, capture_output=True)
    (deb,) = out.glob(f"neuronserve_{version}_*.deb")
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> tuple[Path, Path]:
    if subprocess.run(["git", "-C", str(CHECKOUT), "cat-file", "-e", f"{LEGACY_REV}^{{commit}}"]).returncode:
        pytest.skip(f"the checkout's history lacks {LEGACY_REV} (a shallow clone): no legacy package to upgrade")
    out = tmp_path_factory.mktemp("upgrade-dist")
    tree = out / "legacy-src"
    subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "add", "--detach", str(tree), LEGACY_REV], check=True,
                   capture_output=True)
    try:
        # the dependency wheels already downloaded, hard-linked (never the whole build/: setuptools' build/lib
        # would carry one tree's modules into the other's wheel)
        cache = tree / "build" / "packaging"
        cache.mkdir(parents=True)
        for deps in (CHECKOUT / "build" / "packaging").glob("deps-*"):
            subprocess.run(["cp", "-al", str(deps), str(cache)], check=True)
        legacy = build(tree, out / "legacy", LEGACY_VERSION)
    finally:
        subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "remove", "--force", str(tree)], check=False)
    return legacy, build(CHECKOUT, out / "new", neuronserve.__version__)


@pytest.fixture(scope="module")
def box(container, debs, tiny_model_dir, tmp_path_factory):
    from neuronserve.build.compile import compile_model

    seed = container.seed
    compile_model(tiny_model_dir("text-classification"), seed / REPO.lstrip("/") / "tiny", name="tiny",
                  task="text-classification", backend="cpu", target="cpu", batch_sizes=[1, 4],
                  sequence_lengths=[32])
    (seed / "etc/neuronserve/conf.d").mkdir(parents=True)
    (seed / "etc/neuronserve/conf.d/50-test.toml").write_text(DROPIN.format(python=container.python))
    for deb in debs:
        (seed / "root").mkdir(exist_ok=True)
        (seed / "root" / deb.name).write_bytes(deb.read_bytes())
    container.boot()
    yield container


def active(box, *units: str) -> list[str]:
    return box.run(["systemctl", "is-active", *units], check=False).stdout.split()


def test_a_deb_upgrade_and_apply_under_load_move_every_group_onto_the_template_unit_without_a_failed_request(
        box, debs, tmp_path_factory):
    legacy, new = debs
    assert not box.run(["test", "-e", "/usr/lib/systemd/system/neuronserve@.service"], check=False).returncode == 0
    box.run(["dpkg", "-i", f"/root/{legacy.name}"], timeout=600)
    box.run(["neuronserve", "apply"], timeout=600)
    assert active(box, *LEGACY_UNITS) == ["active"] * 2

    load = Load(box, concurrency=4, max_s=600)
    time.sleep(2)
    t0 = time.monotonic()
    upgrade = box.run(["dpkg", "-i", f"/root/{new.name}"], timeout=600)
    upgrade_s = time.monotonic() - t0
    assert "roll them with: neuronserve apply" in upgrade.stdout + upgrade.stderr
    assert active(box, *LEGACY_UNITS) == ["active"] * 2         # the upgrade itself restarts nothing
    t1 = time.monotonic()
    applied = box.run(["neuronserve", "apply"], timeout=600)
    apply_s = time.monotonic() - t1
    time.sleep(1)
    result = load.finish()
    figures = {"requests_sent": result["sent"], "failed": result["failed"], "errors": result["errors"],
               "max_latency_s": result["max_latency_s"], "dpkg_upgrade_s": round(upgrade_s, 1),
               "apply_s": round(apply_s, 1)}
    out = tmp_path_factory.getbasetemp() / "upgrade-figures.json"
    out.write_text(json.dumps(figures, indent=2))
    print(f"\nupgrade figures ({out}):\n{json.dumps(figures, indent=2)}")

    steps = [line.split()[:2] for line in applied.stdout.splitlines()]
    # one group at a time: tiny-0 serves from its instance before tiny-1's old unit stops
    assert steps.index(["stop", LEGACY_UNITS[0]]) < steps.index(["ready", UNITS[0]]) \
        < steps.index(["stop", LEGACY_UNITS[1]]), applied.stdout
    assert result["sent"] > 50 and result["failed"] == 0, f"{result}\n{applied.stdout}\n{nginx_says(box)}"
    assert active(box, *UNITS, "neuronserve.target") == ["active"] * 3
    assert active(box, *LEGACY_UNITS) == ["inactive"] * 2
    # the package's template unit and target serve; nothing of the legacy layout is left in /etc
    # (Debian's systemd names /usr/lib/systemd/system by its /lib alias)
    for unit, name in ((UNITS[0], "neuronserve@.service"), ("neuronserve.target", "neuronserve.target")):
        assert prop(box, unit, "FragmentPath") in (f"/usr/lib/systemd/system/{name}", f"/lib/systemd/system/{name}")
    left = box.sh("ls -d /etc/systemd/system/neuronserve-* /etc/systemd/system/neuronserve.target "
                  "/etc/systemd/system/neuronserve@.service 2>/dev/null", check=False).stdout
    assert left.strip() == "", left
    wait_until(lambda: prop(box, UNITS[1], "StatusText").startswith("ready: "), 30, "tiny-1's status line")
