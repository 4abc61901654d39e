"""The .deb and .rpm from packaging/build.py: lint-clean, and installed for real into a clean Debian 12 root.

The root stands in for a Deep Learning AMI: a venv at /opt/aws_neuronx_venv_pytorch_2_5 made with the root's own
python3 carries stand-in `torch`, `torch_neuronx` (real packages of a few lines: a real torch would be gigabytes)
and a `pydantic` that raises on import, so the join is seen to put neuronserve's own packages first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import neuronserve

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DLAMI = "/opt/aws_neuronx_venv_pytorch_2_5"
VENV = "/opt/neuronserve/venv"
CONFFILE = "/etc/neuronserve/neuronserve.toml"
EDIT = "\n# edited by the admin: must survive upgrades and removal\n"
MODEL_CONFIG = """\
[server]
backend = "cpu"

[models.minilm]
task = "feature-extraction"
source = "/srv/models/minilm"
groups = 1
"""
# paths a package install may change without leaving anything of the package behind
VOLATILE = ("proc", "dev", "run", "tmp", "var/lib/dpkg", "var/log", "var/cache", "var/lib/rpm", "root/.cache")


def fake_dlami(root) -> None:
    root.run("python3", "-m", "venv", "--without-pip", DLAMI)
    inside = root.run(f"{DLAMI}/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
                      ).stdout.strip()
    site = root / inside
    for module, body in {"torch": '__version__ = "2.5.1+dlami-stand-in"\n',
                         "torch_neuronx": '__version__ = "2.5.0+dlami-stand-in"\n',
                         "pydantic": 'raise ImportError("the ML environment\'s pydantic came before neuronserve\'s")\n'
                         }.items():
        (site / module).mkdir()
        (site / module / "__init__.py").write_text(body)
    # byte-compiled like a real DLAMI venv, so importing the stand-ins leaves no new files behind
    root.run(f"{DLAMI}/bin/python", "-m", "compileall", "-q", inside)


def snapshot(root) -> set[str]:
    """Every path in the root but the package managers' own records and scratch space."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root.path):
        rel = os.path.relpath(dirpath, root.path)
        if rel.startswith(VOLATILE):
            dirnames[:] = []
            continue
        # backups the shadow tools write when a user or group changes (passwd-, group-, ...)
        out.update(os.path.join(rel, n) for n in dirnames + filenames if not n.endswith("-"))
    return out


def accounts(root) -> dict[str, str]:
    return {name: (root / f"etc/{name}").read_text() for name in ("passwd", "group", "shadow", "gshadow")}


def imported_from(root, *modules: str) -> dict[str, str]:
    code = f"import json, {', '.join(modules)}; print(json.dumps({{m: __import__(m).__file__ for m in {modules!r}}}))"
    return json.loads(root.run(f"{VENV}/bin/python", "-c", code).stdout)


def test_lint_clean(builds):
    """lintian: no error (rc 2 otherwise); rpmlint: no error (rc 64 otherwise), justified filters only."""
    new, _ = builds
    out = subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "lint", str(new.deb), str(new.rpm)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "E: " not in out.stdout and " 0 errors" in out.stdout, out.stdout


def test_package_contents(builds):
    old, _ = builds
    deb = subprocess.run(["dpkg-deb", "-c", str(old.deb)], capture_output=True, text=True, check=True).stdout
    wheels = [line.rsplit("/", 1)[-1] for line in deb.splitlines() if "/opt/neuronserve/wheels/" in line]
    names = {w.split("-")[0].lower() for w in wheels if w.endswith(".whl")}
    assert {"neuronserve", "fastapi", "gunicorn", "uvicorn", "uvicorn_worker", "jinja2", "click", "pydantic",
            "prometheus_client", "pip"} <= names
    assert not names & {"torch", "torch_neuronx", "transformers", "numpy", "tokenizers"}, "the ML stack is the host's"
    for tag in ("cp310", "cp311", "cp312"):     # compiled dependencies for every Python a DLAMI venv may run
        assert any(w.startswith("pydantic_core-") and f"-{tag}-" in w for w in wheels), tag
        assert f"requirements-{tag}.txt" in wheels
    for path in ("./usr/bin/neuronserve", "./opt/neuronserve/bin/install-venv", "." + CONFFILE,
                 "./usr/lib/systemd/system/neuronserve@.service", "./usr/lib/systemd/system/neuronserve.target",
                 "./usr/lib/sysusers.d/neuronserve.conf", "./usr/lib/tmpfiles.d/neuronserve.conf",
                 "./usr/share/neuronserve/udev/60-neuronserve-neuron.rules", "./usr/share/man/man1/neuronserve.1.gz",
                 "./usr/share/man/man5/neuronserve.toml.5.gz"):
        assert path in deb, path
    version = subprocess.run(["dpkg-deb", "-f", str(old.deb), "Version"], capture_output=True, text=True).stdout
    assert version.strip() == f"{old.version}-1"
    ctrl = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(old.deb)], capture_output=True, check=True).stdout
    listing = subprocess.run(["tar", "-xO", "./conffiles"], input=ctrl, capture_output=True, check=True).stdout
    assert listing.decode().split() == [CONFFILE]
    rpm_conf = subprocess.run(["rpm", "-qp", "--configfiles", str(old.rpm)], capture_output=True, text=True).stdout
    assert rpm_conf.split() == [CONFFILE]


def test_deb_install_upgrade_remove_purge(builds, debian_root):
    old, new = builds
    root = debian_root
    fake_dlami(root)
    before, before_accounts = snapshot(root), accounts(root)

    # install: user, venv built offline on the root's python3, joined to the DLAMI venv
    out = root.run("dpkg", "-i", root.put(old.deb))
    assert f"linked {DLAMI}/bin/python" in out.stdout, out.stdout + out.stderr
    assert root.run("neuronserve", "--version").stdout.strip().endswith(neuronserve.__version__)
    origins = imported_from(root, "pydantic", "torch", "torch_neuronx", "fastapi", "gunicorn", "uvicorn_worker")
    assert origins["torch"].startswith(DLAMI) and origins["torch_neuronx"].startswith(DLAMI)
    for own in ("pydantic", "fastapi", "gunicorn", "uvicorn_worker"):
        assert origins[own].startswith(VENV), origins
    env = root.run("neuronserve", "env").stdout
    assert f"ML environment: {DLAMI}/bin/python" in env and f"{DLAMI}/lib" in env, env
    assert not list((root / VENV).glob("lib/python3*/site-packages/numpy")), "numpy is the ML environment's"
    user = root.run("getent", "passwd", "neuronserve").stdout.split(":")
    assert user[5:] == ["/var/lib/neuronserve", "/usr/sbin/nologin\n"]
    assert "neuronserve" in root.run("id", "-nG", "neuronserve").stdout and "neuron" in root.run(
        "id", "-nG", "neuronserve").stdout.split()
    assert (root / "var/lib/neuronserve/models").is_dir()

    # render what the installed neuronserve plans, and let systemd check the units against the installed files
    (root / "etc/neuronserve/conf.d/50-test.toml").write_text(MODEL_CONFIG)
    root.run("neuronserve", "render")
    # the package installed the template unit and the target: render writes only the group's drop-in
    rendered = sorted(p.name for p in (root / "etc/systemd/system").glob("neuronserve*"))
    assert rendered == ["neuronserve@minilm-0.service.d"], rendered
    assert (root / "usr/lib/systemd/system/neuronserve@.service").is_file()
    unit_text = (root / "etc/systemd/system/neuronserve@minilm-0.service.d/10-neuronserve.conf").read_text()
    assert f"ExecStart={VENV}/bin/python" in unit_text, unit_text
    verify = root.run("systemd-analyze", "verify", "--man=no", "neuronserve.target", "neuronserve@minilm-0.service",
                      check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    root.run("systemctl", "enable", "neuronserve.target", "neuronserve@minilm-0.service")
    assert [p.name for p in (root / "etc/systemd/system").glob("neuronserve.target.wants/*")] == [
        "neuronserve@minilm-0.service"]

    # upgrade to X.1: the edited conffile is kept without a prompt, the venv is rebuilt and joined again
    with open(root / CONFFILE, "a") as f:
        f.write(EDIT)
    out = root.run("dpkg", "-i", root.put(new.deb))
    assert root.run("dpkg-query", "-W", "-f=${Version}", "neuronserve").stdout == f"{new.version}-1"
    assert (root / CONFFILE).read_text().endswith(EDIT)
    assert not list((root / "etc/neuronserve").glob("*.dpkg-*"))
    assert root.run("neuronserve", "--version").returncode == 0
    assert imported_from(root, "torch")["torch"].startswith(DLAMI)
    assert root.run("getent", "passwd", "neuronserve").stdout.count("\n") == 1

    # remove: units disabled, code and venv gone, the edited conffile stays
    root.run("dpkg", "-r", "neuronserve")
    assert not (root / "opt/neuronserve").exists() and not (root / "usr/bin/neuronserve").exists()
    assert not list((root / "etc/systemd/system").glob("*.wants/neuronserve*"))
    assert (root / CONFFILE).read_text().endswith(EDIT)
    assert root.run("dpkg-query", "-W", "-f=${Status}", "neuronserve").stdout == "deinstall ok config-files"

    # purge: nothing of neuronserve is left, not even its user and groups
    root.run("dpkg", "--purge", "neuronserve")
    left = snapshot(root) - before
    assert not left, sorted(left)[:20]
    assert accounts(root) == before_accounts


def test_rpm_install_upgrade_erase(builds, debian_root):
    """rpm --root runs the scriptlets chrooted in the root (install 1, upgrade 2, erase 0)."""
    old, new = builds
    root = debian_root
    rpm = ["rpm", "--root", str(root.path), "--nodeps"]
    subprocess.run(["rpm", "--root", str(root.path), "--initdb"], check=True)

    subprocess.run([*rpm, "-i", str(old.rpm)], check=True, capture_output=True)
    assert root.run("neuronserve", "--version").stdout.strip().endswith(neuronserve.__version__)
    files = subprocess.run(["rpm", "--root", str(root.path), "-ql", "neuronserve"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert {"/usr/bin/neuronserve", CONFFILE, "/opt/neuronserve/bin/install-venv"} <= set(files)
    assert imported_from(root, "fastapi")["fastapi"].startswith(VENV)
    assert "neuronserve" in (root / "etc/passwd").read_text()

    with open(root / CONFFILE, "a") as f:
        f.write(EDIT)
    subprocess.run([*rpm, "-U", str(new.rpm)], check=True, capture_output=True)
    version = subprocess.run(["rpm", "--root", str(root.path), "-q", "--qf", "%{VERSION}", "neuronserve"],
                             capture_output=True, text=True, check=True).stdout
    assert version == new.version
    assert (root / CONFFILE).read_text().endswith(EDIT)
    assert root.run("neuronserve", "--version").returncode == 0, "the old package's %postun kept the new venv"

    subprocess.run([*rpm, "-e", "neuronserve"], check=True, capture_output=True)
    assert not (root / "opt/neuronserve").exists() and not (root / "usr/bin/neuronserve").exists()
    # RPM has no purge: the edited config is kept aside, the user stays
    assert (root / (CONFFILE + ".rpmsave")).read_text().endswith(EDIT)
