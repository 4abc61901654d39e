"""neuronserve.operate.mlenv: joining neuronserve's venv to an ML environment, with real venvs and real interpreters.

"ours" stands for /opt/neuronserve/venv and "ml" for a DLAMI venv; both are made from this interpreter's base
Python, and the .pth that `link` writes is read by the real `site` machinery of a fresh process.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from click.testing import CliRunner

from neuronserve.operate import mlenv
from neuronserve.cli import main

pytestmark = pytest.mark.packaging


def make_venv(path: Path, modules: dict[str, str]) -> tuple[Path, Path]:
    venv.create(path, with_pip=False, symlinks=True)
    python = path / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name, body in modules.items():
        (site / f"{name}.py").write_text(body)
    return python, site


@pytest.fixture
def ours_and_ml(tmp_path):
    ours = make_venv(tmp_path / "ours", {"shared": "WHO = 'ours'\n"})
    ml = make_venv(tmp_path / "ml", {"shared": "WHO = 'ml'\n", "mlonly": "WHO = 'ml'\n"})
    return ours, ml


def where(python: Path, *modules: str) -> dict[str, str]:
    code = "import json, sys; print(json.dumps({m: __import__(m).WHO for m in sys.argv[1:]}))"
    return json.loads(subprocess.run([python, "-c", code, *modules], capture_output=True, text=True,
                                     check=True).stdout)


def test_link_appends_the_ml_site_packages_after_our_own(ours_and_ml):
    (our_python, our_site), (ml_python, ml_site) = ours_and_ml
    joined = mlenv.link(str(ml_python), site_dir=our_site)
    assert joined.version == mlenv.own_version() and str(ml_site) in joined.site_dirs
    # neuronserve's copy of a package shadows the ML environment's; what only the ML env has is found there
    assert where(our_python, "shared", "mlonly") == {"shared": "ours", "mlonly": "ml"}
    assert mlenv.joined(our_site) == str(ml_python)
    path = subprocess.run([our_python, "-c", "import sys; print('\\n'.join(sys.path))"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert path.index(str(our_site)) < path.index(str(ml_site))


def test_link_again_replaces_and_unlink_removes(ours_and_ml, tmp_path):
    (our_python, our_site), (ml_python, _) = ours_and_ml
    other_python, _ = make_venv(tmp_path / "other", {"mlonly": "WHO = 'other'\n"})
    mlenv.link(str(ml_python), site_dir=our_site)
    mlenv.link(str(other_python), site_dir=our_site)
    assert mlenv.joined(our_site) == str(other_python)
    assert where(our_python, "mlonly") == {"mlonly": "other"}
    assert mlenv.unlink(our_site) and mlenv.joined(our_site) is None and not mlenv.unlink(our_site)
    missing = subprocess.run([our_python, "-c", "import mlonly"], capture_output=True, text=True)
    assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr


def other_python() -> str | None:
    """An interpreter of another Python X.Y that runs (pyenv's shims exist without working, hence the check)."""
    candidates = [shutil.which(f"python3.{minor}") for minor in (10, 12, 13, 9)]
    candidates += [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.*/bin/python3"))]
    for python in filter(None, candidates):
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() != mlenv.own_version():
            return python
    return None


def test_link_refuses_another_python_version(ours_and_ml):
    """A DLAMI venv on another Python X.Y cannot share compiled packages: a clear message, nothing written."""
    (_, our_site), _ = ours_and_ml
    other = other_python()
    if other is None:
        pytest.skip("no second Python version on this machine")
    with pytest.raises(mlenv.EnvError, match=r"is Python 3\.\d+ but neuronserve runs on Python .*install-venv "
                                             r"--python"):
        mlenv.link(other, site_dir=our_site)
    assert mlenv.joined(our_site) is None


def test_missing_interpreter_is_a_clear_error(tmp_path):
    with pytest.raises(mlenv.EnvError, match="no such interpreter"):
        mlenv.inspect(str(tmp_path / "nope" / "python"))
    result = CliRunner().invoke(main, ["env", "--python", str(tmp_path / "nope" / "python")])
    assert result.exit_code == 1 and "neuronserve: error:" in result.output and "Traceback" not in result.output


def test_find_ml_python_prefers_server_python(tmp_path):
    from neuronserve.config import Config

    cfg = Config()
    cfg.server.python = "/opt/somewhere/bin/python"
    assert mlenv.find_ml_python(cfg) == "/opt/somewhere/bin/python"


def test_env_shows_where_the_ml_modules_come_from():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    assert f"neuronserve: {sys.executable}" in result.output
    # a fresh interpreter of this environment finds each module where this process does
    for module, origin in mlenv.module_origins().items():
        spec = importlib.util.find_spec(module)
        assert origin == (spec.origin if spec else None), module
        assert f"{module:<14} {origin or '-'}" in result.output
