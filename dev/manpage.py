"""The reference documentation, generated from the code so that it cannot drift from it.

    python -m dev.manpage docs            # what `make docs` runs: rewrite the four files below
    python -m dev.manpage docs --check    # exit 1 naming the files that differ from a fresh render

neuronserve(1) and docs/cli.md come from the click command tree (neuronserve/cli.py: every command, its help
and its options with their defaults), neuronserve.toml(5) and docs/configuration.md from
`config.settings_reference()`. The environment section lists exactly the variables the planner puts into a
group's environment, the exit codes come from errors.py, the paths from Layout. Prose that the code does not
carry (what each file or variable is for, the examples) is data here, shared by the man and markdown pages;
the templates (neuronserve/templates/*.j2) only lay it out.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import click
import jinja2

try:
    from click._utils import UNSET      # click >= 8.3 marks "no default" with this, not None
except ImportError:
    UNSET = None

from neuronserve import __version__, config, errors

# output file -> template
PAGES = {
    "neuronserve.1": "neuronserve.1.j2",
    "neuronserve.toml.5": "neuronserve.toml.5.j2",
    "cli.md": "cli.md.j2",
    "configuration.md": "configuration.md.j2",
}

# prose shared by the man and the markdown pages; `code` is set in bold in roff
PROSE = {
    "commands": "Every command reads one configuration, {config} plus its conf.d drop-ins (see neuronserve.toml(5)), "
                "or the file named by `--config`, and takes `-h`, `--help`. An error the user can fix is printed "
                "as one line, `neuronserve: error: MESSAGE`, without a traceback (see EXIT STATUS).",
    "environment": "Each group's process runs with the environment below, written by the planner into its unit "
                   "(Environment=); `neuronserve up` runs it with the same. `neuronserve plan --json` shows it "
                   "per group.",
    "success": "Success. `neuronserve status`: every group is active and ready and no process holds a core it "
               "should not; `neuronserve doctor`: no check failed.",
    "exit1": "`neuronserve status` or `neuronserve doctor` found a problem; or an error, named on standard error:",
    "exit": "An error, named on standard error:",
    "config": [
        "One TOML file drives neuronserve: which models are served, on which cores, behind which front. The files "
        "in conf.d/ beside it are merged over it in name order, table by table: a later file overrides a key of an "
        "earlier one and leaves the table's other keys as they are.",
        "Every key has a default except a model's `task` and `source`, so a file needs little more than its "
        "`[models.NAME]` tables. An unknown key, a value of the wrong type or out of range, and a setting that "
        "contradicts another are errors: `neuronserve config` prints each one as `FILE:LINE: KEY: MESSAGE` (with "
        "the likely key for a misspelt one) and exits 2, and the commands that need the config stop on it with "
        "the same message.",
        "`neuronserve config` prints the merged result, `neuronserve config --reference` the list below, "
        "`neuronserve plan` the core groups the file gives on this host. A change takes effect with "
        "`neuronserve apply`, which rolls the groups it touches one at a time.",
    ],
    "settings": "Defaults are written as they would be in the file; (unset) means the key is left out.",
    "example": "Two models on an inf2.24xlarge (12 NeuronCores): question answering on NeuronCores 0 to 5, one "
               "group per core with two copies each; sentence embeddings in one group that owns cores 6 and 7. "
               "Clients must send the bearer token in /etc/neuronserve/token.",
    "dropin": "A drop-in, {dropin}, that moves the groups' ports:",
}

SECTION_INTROS = {
    "server": "Host-wide settings: the accelerator, where compiled models live, the groups' ports and user.",
    "nginx": "The front: the only listener clients reach. It spreads each model's requests over its groups "
             "(least_conn, keepalive) and can require a bearer token and limit request rates.",
    "neuron": "AWS Inferentia and Trainium (inf1, inf2, trn1, trn2): compiler and runtime settings.",
    "cuda": "NVIDIA GPUs.",
    "cpu": "Plain CPUs: every CPU is a core; a group's copies share its CPUs.",
    "kubernetes": "What `neuronserve render --kubernetes DIR` writes: per model, a Deployment whose pods each serve "
                  "one core group (`neuronserve pod`), with its Service, PodDisruptionBudget and "
                  "HorizontalPodAutoscaler, a ServiceMonitor and a KServe example; the config goes in a ConfigMap.",
    "models.<name>": "One table per served model; <name> becomes part of unit names and URLs, so it matches "
                     f"{config.NAME_RE}. The model's cores are split into groups of cores_per_group cores; each "
                     "group is one process (one systemd unit) holding `copies` copies of the model.",
}

# what the planner's variables are for; the other NEURONSERVE_* ones are described by ServerSettings itself
ENV_HELP = {
    "NEURONSERVE_BACKEND": "The backend the group serves on: neuron, cuda or cpu (server.backend, resolved).",
    "NEURONSERVE_LOG_LEVEL": "server.log_level: debug, info, warning or error.",
    "NEURON_RT_VISIBLE_CORES": "The NeuronCores the group's one process owns, e.g. 0-1 (Neuron). "
                               "NEURON_RT_NUM_CORES is never set beside it.",
    "NEURON_PROCESS_TAG": "The group's name, shown against the process by neuron-ls and neuron-top (Neuron).",
    "NEURON_RT_EXEC_TIMEOUT": "neuron.exec_timeout_s: the runtime reports a hung execution after this many "
                              "seconds (Neuron).",
    "NEURON_RT_LOG_LEVEL": "neuron.log_level (Neuron).",
    "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "neuron.async_inflight: executions queued per NeuronCore "
                                                 "(Neuron, not on Inf1).",
    "CUDA_VISIBLE_DEVICES": "The GPUs the group owns (CUDA).",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID, so that CUDA_VISIBLE_DEVICES counts GPUs as nvidia-smi does (CUDA).",
    "OMP_NUM_THREADS": "Same as NEURONSERVE_THREADS: OpenMP reads it at import, before torch can be told.",
    "MKL_NUM_THREADS": "Same as NEURONSERVE_THREADS, for MKL.",
    "GOMP_SPINCOUNT": "10000, in groups of one thread per copy: the OpenMP thread of a batch that borrowed an idle "
                      "group's CPU spins about 2 ms after it, not 10 ms, before it leaves that CPU to its group.",
    "TOKENIZERS_PARALLELISM": "false: the copies already tokenize in parallel; the tokenizer's own pool "
                              "would compete with them.",
    "PYTHONUNBUFFERED": "1, so that log lines reach the journal as they are written.",
}

FILES = [
    ("{config}", "The configuration; see neuronserve.toml(5)."),
    ("{dropins}", "Drop-ins, merged over it in name order."),
    ("{templates}/", "A template here replaces the packaged one of the same name in what `neuronserve render` "
                     "writes."),
    ("{template}", "The template unit every core group is an instance of (neuronserve@<group>.service), "
                   "installed by the package; `systemctl edit neuronserve@.service` changes every group."),
    ("{unit_dropins}", "What one group has of its own (ExecStart, Environment, CPUAffinity, devices), written by "
                  "`neuronserve render` and `neuronserve apply`."),
    ("{target}", "Every enabled group: `systemctl start neuronserve.target` returns once they are ready, "
                 "`systemctl stop neuronserve.target` stops them all."),
    ("{gunicorn}", "Each group's gunicorn configuration (bind 127.0.0.1:PORT, one worker)."),
    ("{nginx}", "The nginx front: one upstream per model, and the server clients reach (nginx.conf_path)."),
    ("{auth_map}", "The front's bearer token, when nginx.auth_token_file is set."),
    ("{models}/NAME/", "Compiled models (server.model_repository): manifest.json, the tokenizer and one "
                       "b<batch>_s<seq>.pt per bucket."),
    ("/opt/neuronserve/", "The packaged install: wheels/, the venv/ the postinst builds from them, and "
                          "bin/install-venv that rebuilds it."),
]

EXAMPLES = [
    ("Check the host, compile the configured models, look at the plan, then install and start the groups:",
     ["neuronserve doctor", "sudo neuronserve compile", "neuronserve plan", "sudo neuronserve apply"]),
    ("Compile a local model directory for the CPU, without a config:",
     ["neuronserve compile --source ./all-MiniLM-L6-v2 --task feature-extraction \\\n"
      "    --backend cpu --out ./models/minilm"]),
    ("See what a config change would do, then roll it out one group at a time:",
     ["sudo neuronserve apply --dry-run", "sudo neuronserve apply"]),
    ("Write the units and the nginx front under a scratch directory, to read them:",
     ["neuronserve render --root /tmp/neuronserve"]),
    ("Write Kubernetes manifests for Neuron nodes, then apply them:",
     ["neuronserve render --kubernetes k8s --backend neuron", "kubectl apply -f k8s"]),
    ("Run a config in the foreground, without systemd or root:",
     ["neuronserve up --config ./neuronserve.toml --backend cpu"]),
    ("Throughput and latency at three concurrency levels, then over shapes of groups x copies:",
     ["neuronserve bench --concurrency 1,4,16 --duration 20",
      "neuronserve bench --sweep 1x2,2x1 --concurrency 16"]),
    ("Health for a monitoring script (exit status 1 when a group is not ready), and one group's log:",
     ["neuronserve status --json", "journalctl -u neuronserve@bert-qa-0.service -f"]),
    ("Stop and remove the units and the nginx front neuronserve wrote:", ["sudo neuronserve cleanup"]),
]

EXAMPLE_CONFIG = """\
[server]
backend = "neuron"

[nginx]
listen = "0.0.0.0:8080"
auth_token_file = "/etc/neuronserve/token"

[models.bert-qa]
task = "question-answering"
source = "/srv/models/bert-large-uncased-whole-word-masking-finetuned-squad"
batch_sizes = [1, 4]
sequence_lengths = [128, 384]
copies = 2
cores = "0-5"

[models.minilm]
task = "feature-extraction"
source = "/srv/models/all-MiniLM-L6-v2"
cores = "6-7"
cores_per_group = 2
"""
EXAMPLE_DROPIN = ("50-port.toml", "[server]\nbase_port = 9100\n")

SEE_ALSO = [("neuronserve.toml", 5), ("systemctl", 1), ("journalctl", 1), ("systemd.exec", 5), ("nginx", 8),
            ("neuron-ls", 1), ("neuron-top", 1)]


# ---------------------------------------------------------------- the click tree

@dataclass(frozen=True)
class Block:
    kind: str       # "text": one paragraph to fill | "pre": lines kept as they are
    text: str


@dataclass(frozen=True)
class OptionDoc:
    names: list[str]
    metavar: str
    help: str
    default: str | None


@dataclass(frozen=True)
class CommandDoc:
    name: str
    prog: str           # "neuronserve compile"
    pieces: list[str]   # what click's usage line puts after it: "[OPTIONS]", "[MODELS]..."
    summary: str
    blocks: list[Block]
    options: list[OptionDoc] = field(default_factory=list)


def help_blocks(text: str) -> list[Block]:
    """click help text -> paragraphs. A `\\b` paragraph keeps its lines when they are laid out (indented
    lines: examples, file lists) and is filled like the others when it is plain prose; a heading line over
    indented ones becomes a paragraph of its own."""
    out: list[Block] = []
    raw = inspect.cleandoc(text or "").split("\f")[0]
    for para in re.split(r"\n\s*\n", raw):
        lines = para.splitlines()
        if not lines:
            continue
        if lines[0].strip() != "\b":
            out.append(Block("text", " ".join(line.strip() for line in lines)))
            continue
        # a \b line inside a kept paragraph separates two blocks, as click prints it
        chunks: list[list[str]] = [[]]
        for line in lines[1:]:
            if line.strip() == "\b":
                chunks.append([])
            else:
                chunks[-1].append(line)
        for chunk in filter(None, chunks):
            laid_out = [line for line in chunk if line[:1].isspace()]
            if not laid_out:
                out.append(Block("text", " ".join(line.strip() for line in chunk)))
            elif not chunk[0][:1].isspace() and len(laid_out) == len(chunk) - 1:
                out.append(Block("text", chunk[0].strip()))
                out.append(Block("pre", textwrap.dedent("\n".join(chunk[1:]))))
            else:
                out.append(Block("pre", "\n".join(chunk)))
    return out


def _default(opt: click.Option, ctx: click.Context) -> str | None:
    if opt.is_flag or opt.count:
        return None
    if isinstance(opt.show_default, str):
        return opt.show_default
    value = opt.get_default(ctx, call=False)
    if value is None or value is UNSET or callable(value):
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _option(opt: click.Option, ctx: click.Context) -> OptionDoc:
    names = sorted(opt.opts + opt.secondary_opts, key=lambda n: (n.startswith("--"), n))
    metavar = "" if opt.is_flag else opt.make_metavar(ctx).removesuffix(" RANGE")
    return OptionDoc(names, metavar, " ".join((opt.help or "").split()), _default(opt, ctx))


def _command(cmd: click.Command, ctx: click.Context, prog: str, skip_help: bool) -> CommandDoc:
    blocks = help_blocks(cmd.help or "")
    summary = blocks[0].text if blocks and blocks[0].kind == "text" else (cmd.short_help or "")
    rest = blocks[1:] if blocks and blocks[0].kind == "text" else blocks
    help_names = set(ctx.help_option_names)
    options = [_option(p, ctx) for p in cmd.get_params(ctx)
               if isinstance(p, click.Option) and not p.hidden and not (skip_help and set(p.opts) <= help_names)]
    return CommandDoc(cmd.name or prog, prog, cmd.collect_usage_pieces(ctx), summary, rest, options)


def commands(group: click.Group | None = None) -> tuple[CommandDoc, list[CommandDoc]]:
    """The top-level command (global options) and each subcommand, in the order cli.py defines them."""
    if group is None:
        from neuronserve.cli import main as group
    top = click.Context(group, info_name="neuronserve", **group.context_settings)
    subs = [_command(cmd, click.Context(cmd, info_name=name, parent=top), f"neuronserve {name}", skip_help=True)
            for name, cmd in group.commands.items() if not cmd.hidden]
    return _command(group, top, "neuronserve", skip_help=False), subs


# ---------------------------------------------------------------- config, environment, exit codes, paths

def config_sections() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """[(section, intro, [(key, default, description)])] from settings_reference, in its order."""
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for key, default, doc in config.settings_reference():
        section, name = key.rsplit(".", 1)
        sections.setdefault(section, []).append((name, default, doc))
    return [(s, SECTION_INTROS.get(s, ""), rows) for s, rows in sections.items()]


def _sample_plans():
    """One single-group plan per backend on a made-up host: their env is what the planner really sets."""
    from neuronserve.devices import BACKENDS, Core, Host
    from neuronserve.plan import make_plan

    cfg = config.Config(models={"m": config.ModelSection(task="feature-extraction", source="m", groups=1)})
    kinds = {"neuron": "inf2", "cuda": "cuda", "cpu": "cpu"}
    for backend in BACKENDS:
        host = Host(backend, kinds[backend], [Core(0, 0, (0,))], details={"cpus": [0]})
        yield make_plan(cfg, host, python=sys.executable)


def environment() -> list[tuple[str, str]]:
    """(variable, meaning) for every variable the planner gives a group, NEURONSERVE_* first."""
    from neuronserve.server.settings import PREFIX, ServerSettings

    # a group's settings come from [server] and its [models.<name>] table
    refs = {key.rsplit(".", 1)[1]: (key, doc) for key, _, doc in config.settings_reference()
            if key.rsplit(".", 1)[0] in ("server", "models.<name>")}
    rows: dict[str, str] = {}
    for name, f in ServerSettings.model_fields.items():
        if PREFIX + name.upper() in ENV_HELP:
            rows[PREFIX + name.upper()] = ENV_HELP[PREFIX + name.upper()]
        elif f.description:
            rows[PREFIX + name.upper()] = f.description[:1].upper() + f.description[1:] + "."
        elif name in refs:
            key, doc = refs[name]
            rows[PREFIX + name.upper()] = f"{key}" + (f": {doc}." if doc else ".")
        else:
            raise RuntimeError(f"ServerSettings.{name} has no description and no config key of that name: "
                               "give it a Field(description=...)")
    names = {k for plan in _sample_plans() for g in plan.groups for k in g.env}
    missing, unset = sorted(names - rows.keys() - ENV_HELP.keys()), sorted(ENV_HELP.keys() - names)
    if missing:
        raise RuntimeError(f"the planner sets {', '.join(missing)}: describe it in dev.manpage.ENV_HELP")
    if unset:
        raise RuntimeError(f"the planner no longer sets {', '.join(unset)}: drop it from dev.manpage.ENV_HELP")
    rows.update((k, ENV_HELP[k]) for k in ENV_HELP if k in names and k not in rows)
    return list(rows.items())


def exit_codes() -> list[tuple[int, list[str]]]:
    """Each exit code with what causes it: errors.py's classes (their docstrings) and click's usage error."""
    codes: dict[int, list[str]] = {}
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.NeuronserveError) and cls.__doc__ \
                and cls.__module__ == errors.__name__:
            codes.setdefault(cls.exit_code, []).append(inspect.cleandoc(cls.__doc__).split("\n\n")[0])
    codes.setdefault(click.UsageError.exit_code, []).append(
        "The command line is wrong: an unknown option, a missing argument or a bad value.")
    return sorted(codes.items())


def paths() -> dict[str, str]:
    """Where things live on a host with the default config, as Layout and render name them."""
    from neuronserve import render
    from neuronserve.layout import Layout
    from neuronserve.plan import UNIT_TEMPLATE

    layout = Layout(Path("/"), config.Config())
    found = dict(config=config.DEFAULT_PATH, dropins=config.DEFAULT_PATH.parent / "conf.d" / "*.toml",
                 templates=layout.template_override_dir,
                 template=layout.packaged_unit_dir / UNIT_TEMPLATE,
                 unit_dropins=layout.dropin_path("neuronserve@GROUP.service"),
                 target=layout.packaged_unit_dir / render.TARGET, gunicorn=layout.gunicorn_conf("GROUP"),
                 nginx=layout.nginx_conf, auth_map=render.auth_map_path(layout), models=layout.model_repository)
    return {k: str(v) for k, v in found.items()}


def files() -> list[tuple[str, str]]:
    where = paths()
    return [(path.format(**where), what) for path, what in FILES]


# ---------------------------------------------------------------- escaping

def _spans(text: str, plain, code) -> str:
    """Apply `plain` outside `backtick` spans and `code` to what is inside them."""
    parts = text.split("`")
    if len(parts) % 2 == 0:         # an unpaired backtick is just a character
        return plain(text)
    return "".join(code(p) if i % 2 else plain(p) for i, p in enumerate(parts))


def roff(text: str) -> str:
    """Literal text for roff: backslashes, minus signs, non-ASCII, and control characters at a line start."""
    text = str(text).replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def roff_prose(text: str) -> str:
    """A paragraph: `code` in bold."""
    return _spans(text, roff, lambda s: f"\\fB{roff(s)}\\fR")


# an underscore inside a word (model_repository) is never emphasis in CommonMark: left alone for legibility
_MD_SPECIAL = re.compile(r"([\\*<>\[\]|#]|(?<!\w)_|_(?!\w))")


def whatis(summary: str) -> str:
    """A NAME line's description: lower case, no full stop ("Serve models." -> "serve models")."""
    return summary[:1].lower() + summary[1:].rstrip(".")


def md(text: str) -> str:
    """A markdown paragraph: `code` kept, everything else literal."""
    return _spans(str(text), lambda s: _MD_SPECIAL.sub(r"\\\1", s), lambda s: f"`{s}`")


def md_code(text: str) -> str:
    """Inline code that may sit in a table cell."""
    return "`" + str(text).replace("|", "\\|") + "`"


# ---------------------------------------------------------------- rendering

def _env() -> jinja2.Environment:
    # the packaged templates only: docs never pick up a host's /etc/neuronserve/templates overrides
    env = jinja2.Environment(loader=jinja2.PackageLoader("neuronserve", "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                             lstrip_blocks=True, autoescape=False)
    env.filters.update(roff=roff, roff_prose=roff_prose, md=md, md_code=md_code, whatis=whatis)
    return env


def context() -> dict:
    main, subs = commands()
    where = paths()
    prose = {k: v.format(config=where["config"], dropin=where["dropins"].replace("*.toml", EXAMPLE_DROPIN[0]))
             if isinstance(v, str) else v for k, v in PROSE.items()}
    return dict(version=__version__, main=main, commands=subs, sections=config_sections(), prose=prose,
                environment=environment(), exit_codes=exit_codes(), files=files(), examples=EXAMPLES,
                example_config=EXAMPLE_CONFIG, example_dropin=EXAMPLE_DROPIN, see_also=SEE_ALSO, paths=where)


def render_all() -> dict[str, str]:
    """file name -> content, for every page in PAGES."""
    env, ctx = _env(), context()
    return {name: env.get_template(template).render(**ctx) for name, template in PAGES.items()}


def stale(docs: Path) -> list[str]:
    """The pages under `docs` that differ from a fresh render (or are missing)."""
    fresh = render_all()
    return [name for name, text in fresh.items()
            if not (docs / name).exists() or (docs / name).read_text(encoding="utf-8") != text]


def write(docs: Path) -> list[Path]:
    """Write every page whose content changed; returns those written."""
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = docs / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.manpage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", type=Path, help="folder of the generated pages (the repository's docs/)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    if args.check:
        out = stale(args.docs)
        for name in out:
            print(f"{args.docs / name} is out of date: run make docs", file=sys.stderr)
        return 1 if out else 0
    for path in write(args.docs):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
