"""The generated reference docs (docs/neuronserve.1, neuronserve.toml.5, cli.md, configuration.md): current,
valid roff, and complete: every command, option, config key and group environment variable is in them."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from neuronserve import config
from dev import manpage
from neuronserve.cli import main
from neuronserve.devices import Core, Host
from neuronserve.plan import make_plan

DOCS = Path(__file__).resolve().parents[2] / "docs"
MAN_PAGES = ("neuronserve.1", "neuronserve.toml.5")


@pytest.fixture(scope="module")
def fresh() -> dict[str, str]:
    return manpage.render_all()


@pytest.mark.parametrize("name", list(manpage.PAGES))
def test_committed_page_is_current(name, fresh):
    committed = DOCS / name
    assert committed.exists(), f"{committed} is missing: run make docs"
    assert committed.read_text(encoding="utf-8") == fresh[name], \
        f"{committed} differs from what neuronserve/cli.py and config.py say now: run make docs"


def test_check_mode_names_a_stale_page(tmp_path, capsys):
    assert manpage.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(manpage.PAGES)
    assert manpage.main([str(tmp_path), "--check"]) == 0
    (tmp_path / "cli.md").write_text("old\n")
    assert manpage.main([str(tmp_path), "--check"]) == 1
    assert "cli.md is out of date: run make docs" in capsys.readouterr().err


@pytest.mark.parametrize("name", MAN_PAGES)
def test_roff_is_clean(name, fresh, tmp_path):
    """groff with every warning on, as `man` and lintian run it: not a single message."""
    groff = shutil.which("groff")
    assert groff, "groff is missing: run `make sysdeps` (Debian package groff-base)"
    page = tmp_path / name
    page.write_text(fresh[name], encoding="utf-8")
    out = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert fresh[name].isascii()


def _text(fresh: dict[str, str], name: str) -> str:
    """A man page as a reader sees it (groff's formatted text), so escapes do not hide words."""
    out = subprocess.run([shutil.which("groff") or "groff", "-man", "-Tascii", "-P-cbou", "-rLL=200n"],
                         input=fresh[name], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def _commands() -> dict[str, click.Command]:
    return {name: cmd for name, cmd in main.commands.items() if not cmd.hidden}


def test_every_command_and_option_is_documented(fresh):
    man = _text(fresh, "neuronserve.1")
    md = fresh["cli.md"]
    assert _commands(), "no commands found in the click tree"
    for name, cmd in _commands().items():
        assert f"neuronserve {name} [OPTIONS]" in man, name
        assert f"## neuronserve {name}\n" in md, name
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt in man and f"`{opt}" in md, f"{name} {opt}"
    bench_section = man[man.index("\n   bench\n"):man.index("\n   top\n")]
    assert "--max-duration SECONDS" in bench_section and "Default: 300." in bench_section


def test_every_config_key_is_documented(fresh):
    toml5 = _text(fresh, "neuronserve.toml.5")
    reference = config.settings_reference()
    assert len(reference) > 30
    for key, default, doc in reference:
        section, name = key.rsplit(".", 1)
        assert doc, f"{key} has no description: give it Field(description=...) in neuronserve/config.py"
        assert f"[{section}]" in toml5 and f"{name} = {default}" in toml5, key
        body = toml5[toml5.index(f"[{section}]"):]
        assert f"{name} = {default}" in body, f"{key} is not under [{section}]"
        md_body = fresh["configuration.md"].split(f"\n## [{manpage.md(section)}]\n")[1].split("\n## ")[0]
        row = re.search(rf"^\| `{re.escape(name)}` \| `(.*?)` \| (.*) \|$", md_body, re.M)
        assert row and row.group(1) == default, key


def test_environment_is_what_the_planner_sets(fresh):
    """ENVIRONMENT lists exactly the variables of a group's unit, on every backend."""
    man = _text(fresh, "neuronserve.1")
    documented = dict(manpage.environment())
    env_section = man[man.index("\nENVIRONMENT\n"):man.index("\nEXIT STATUS\n")]
    for backend, kind in (("neuron", "inf2"), ("cuda", "cuda"), ("cpu", "cpu")):
        cfg = config.Config(models={"m": config.ModelSection(task="feature-extraction", source="m")})
        host = Host(backend, kind, [Core(i, i // 2, (i,)) for i in range(4)], details={"cpus": [0, 1, 2, 3]})
        for group in make_plan(cfg, host, python="python3").groups:
            assert set(group.env) <= documented.keys(), backend
            for var in group.env:
                assert f"\n       {var}\n" in env_section, var
    assert {"NEURON_RT_VISIBLE_CORES", "CUDA_VISIBLE_DEVICES", "NEURONSERVE_COPIES"} <= documented.keys()


def test_files_exit_status_and_see_also(fresh):
    man = _text(fresh, "neuronserve.1")
    for path in ("/etc/neuronserve/neuronserve.toml", "/etc/neuronserve/conf.d/*.toml", "/etc/neuronserve/templates/",
                 "/usr/lib/systemd/system/neuronserve@.service", "/usr/lib/systemd/system/neuronserve.target",
                 "/etc/systemd/system/neuronserve@GROUP.service.d/10-neuronserve.conf",
                 "/etc/nginx/conf.d/neuronserve.conf", "/var/lib/neuronserve/models", "/opt/neuronserve"):
        assert path in man[man.index("\nFILES\n"):man.index("\nENVIRONMENT\n")], path
    status = man[man.index("\nEXIT STATUS\n"):man.index("\nEXAMPLES\n")]
    for code in (0, 1, 2):
        assert f"\n       {code}  " in status, code
    assert "The config file is wrong" in status.split("\n       2  ")[1]
    for ref in ("systemctl(1)", "journalctl(1)", "nginx(8)", "neuron-ls", "neuron-top", "neuronserve.toml(5)"):
        assert ref in man[man.index("\nSEE ALSO\n"):], ref


def test_examples_parse_against_the_cli():
    """Every `neuronserve ...` line in EXAMPLES names a real command with real options and valid values."""
    checked = 0
    for _, lines in manpage.EXAMPLES:
        for line in lines:
            argv = shlex.split(line.replace("\\\n", " "))
            if argv[0] == "sudo":
                argv = argv[1:]
            if argv[0] != "neuronserve":
                continue
            cmd = main.commands[argv[1]]
            cmd.make_context(argv[1], argv[2:])     # raises on an unknown option or a bad value
            checked += 1
    assert checked >= 10


def test_example_config_loads_and_plans_as_described(tmp_path):
    """The neuronserve.toml(5) example, on an inf2.24xlarge: six bert-qa groups on cores 0-5, minilm on 6-7."""
    path = tmp_path / "neuronserve.toml"
    path.write_text(manpage.EXAMPLE_CONFIG)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / manpage.EXAMPLE_DROPIN[0]).write_text(manpage.EXAMPLE_DROPIN[1])
    cfg = config.load(path)
    host = Host("neuron", "inf2", [Core(i, i // 2) for i in range(12)], details={"cpus": list(range(96))})
    plan = make_plan(cfg, host, python="python3")
    bert = [g for g in plan.groups if g.model == "bert-qa"]
    minilm = [g for g in plan.groups if g.model == "minilm"]
    assert [g.cores for g in bert] == [[i] for i in range(6)] and all(g.settings.copies == 2 for g in bert)
    assert [g.cores for g in minilm] == [[6, 7]]
    assert plan.groups[0].port == 9100


@pytest.mark.parametrize("text, expected", [
    ("-rf .x", "\\-rf .x"),
    (".starts with a dot", "\\&.starts with a dot"),
    ("a\\b", "a\\eb"),
    ("caf\u00e9", "caf\\[u00E9]"),
])
def test_roff_escaping(text, expected):
    assert manpage.roff(text) == expected


def test_markdown_escaping_keeps_code_spans():
    assert manpage.md("conf.d/*.toml `a*b <c>` <name> model_repository [x]") == \
        "conf.d/\\*.toml `a*b <c>` \\<name\\> model_repository \\[x\\]"


def test_help_blocks_keep_laid_out_lines_and_fill_prose():
    blocks = manpage.help_blocks("Summary.\n\n\b\nExamples:\n  a --b\n  c\n\b\nPlain\nprose here.\n\nLast\nparagraph.")
    assert [(b.kind, b.text) for b in blocks] == [
        ("text", "Summary."), ("text", "Examples:"), ("pre", "a --b\nc"), ("text", "Plain prose here."),
        ("text", "Last paragraph.")]
