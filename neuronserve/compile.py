"""`neuronserve compile`: a local Hugging Face model directory -> a compiled model directory (see artifact.py).

One traced artifact per (batch size, sequence length) bucket, the tokenizer, and manifest.json with the
known-answer warm-up the server checks before it reports ready. The result is built in a staging directory
beside `out` and swapped in at the end, so an interrupted or failed compile leaves the previous artifact as
it was, and a server never reads half of one.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import shutil
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from neuronserve import __version__, tasks
from neuronserve.artifact import Bucket, Manifest, Warmup, bucket_file, sha256_file, write_manifest
from neuronserve.errors import ArtifactError, ConfigError, DeviceError

# progress(done, total, message): called once before the first step and after each step
Progress = Callable[[int, int, str], None]
TARGETS = {"cpu": ("cpu",), "cuda": ("cuda",), "neuron": ("inf1", "inf2", "trn1", "trn2")}


def compile_model(source: Path, out: Path, *, name: str, task: str, backend: str, target: str,
                  batch_sizes: Sequence[int], sequence_lengths: Sequence[int], compiler_args: Sequence[str] = (),
                  dtype: str | None = None, progress: Progress | None = None) -> Manifest:
    """Compile the model in `source` for `task` into `out`; returns the manifest written there.

    Raises ArtifactError (bad source, unsupported architecture, failed trace), DeviceError (the backend's
    framework is not importable here) or ConfigError (bad arguments).
    """
    import torch

    from neuronserve import backends

    source, out = Path(source), Path(out)
    spec = _task(task)
    engine = backends.get(backend)
    if target not in TARGETS[backend]:
        raise ConfigError(f"target {target!r} is not a {backend} target; one of {', '.join(TARGETS[backend])}")
    batch_sizes, sequence_lengths = _sizes("batch sizes", batch_sizes), _sizes("sequence lengths", sequence_lengths)
    reason = engine.unavailable()
    if reason:
        raise DeviceError(f"cannot compile {name} for {backend}: {reason}")
    dtype = engine.dtype(dtype, compiler_args, target)
    buckets = list(itertools.product(batch_sizes, sequence_lengths))
    total = len(buckets) + 2    # load + buckets + tokenizer/warm-up/manifest
    report = progress or (lambda done, total, message: None)
    report(0, total, f"loading {source}")
    started = time.monotonic()

    tokenizer, model = _load(source, spec, engine.attn_implementation)
    input_names = _input_names(model, tokenizer, source)
    options = _embedding_options(source) if task == "feature-extraction" else {}
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and max(sequence_lengths) > max_positions:
        raise ConfigError(f"sequence length {max(sequence_lengths)} is over {source}'s limit of {max_positions} "
                          "positions (max_position_embeddings)")
    try:
        module = tasks.build_module(task, model, input_names, **options)
    except ValueError as e:
        raise ArtifactError(f"{source}: {e}") from None
    manifest = Manifest(
        name=name, task=task, backend=backend, target=target, source=str(source.resolve()),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions={**engine.versions(), "transformers": _transformers_version(), "neuronserve": __version__},
        input_names=input_names, output_names=list(spec.output_names),
        labels={str(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
        if task == "text-classification" else {},
        problem_type=getattr(model.config, "problem_type", None) or "single_label_classification",
        pooling=options.get("pooling", "none"), normalize=options.get("normalize", False), dtype=dtype,
        compiler_args=list(compiler_args),
        buckets=[Bucket(batch=b, seq=s, file=bucket_file(b, s), sha256="") for b, s in buckets])
    # the known answer comes from the eager fp32 CPU module, before any backend moves or casts it
    manifest.warmup = _warmup(task, tokenizer, module, manifest, tasks.warmup_atol(backend, dtype))
    report(1, total, f"loaded {model.config.model_type} for {task} ({time.monotonic() - started:.1f}s)")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.compiling-", dir=out.parent))
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        for i, (batch, seq) in enumerate(buckets):
            t0 = time.monotonic()
            example = _example(task, tokenizer, batch, seq, input_names)
            bucket_dir = workdir / f"b{batch}_s{seq}"
            bucket_dir.mkdir()
            try:
                with warnings.catch_warnings():
                    # "converting a tensor to a Python boolean": shapes are fixed per bucket, as intended
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.simplefilter("ignore", FutureWarning)    # transformers' deprecation notes
                    traced = engine.trace(module, example, target=target, workdir=bucket_dir,
                                          compiler_args=list(compiler_args), dtype=dtype)
            except (ArtifactError, DeviceError):
                raise
            except Exception as e:   # the compilers raise anything; the message is what the user needs
                kept = f"; compiler files kept in {workdir}" if any(bucket_dir.iterdir()) else ""
                raise ArtifactError(f"tracing {name} bucket batch {batch} x seq {seq} for {target} failed: "
                                    f"{type(e).__name__}: {e}{kept}") from e
            path = stage / bucket_file(batch, seq)
            engine.save(traced, path)
            manifest.buckets[i].sha256 = sha256_file(path)
            report(i + 2, total, f"traced batch {batch} x seq {seq} ({time.monotonic() - t0:.1f}s)")
        try:
            tokenizer.save_pretrained(str(stage / manifest.tokenizer))
            write_manifest(stage, manifest)    # last: a directory with a manifest is complete
        except Exception as e:     # OSError, or the tokenizers library's plain Exception (disk full: os error 28)
            raise ArtifactError(f"{out}: cannot write the compiled model: {e}") from None
        os.chmod(stage, 0o755)             # mkdtemp makes it 0700; the unprivileged server user reads it
        _swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if not any(p.is_file() for p in workdir.rglob("*")):
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    report(total, total, f"wrote {out} ({time.monotonic() - started:.1f}s)")
    return manifest


def compile_config(cfg, host, models: Sequence[str] | None = None, progress: Callable[[str], Progress] | None = None,
                   ) -> list[tuple[str, Manifest]]:
    """Compile every [models.*] of `cfg` (or the named ones) for `host` into server.model_repository/<name>.

    `progress(name)` returns the Progress callback for that model. Relative sources are resolved against
    the directory of the config file.
    """
    names = list(models) if models else list(cfg.models)
    unknown = [n for n in names if n not in cfg.models]
    if unknown:
        known = ", ".join(cfg.models) or "none"
        raise ConfigError(f"no [models.{unknown[0]}] in the config (configured: {known})")
    if not names:
        raise ConfigError("the config has no [models.<name>] section to compile")
    base = Path(cfg.sources[0]).parent if cfg.sources else Path.cwd()
    done = []
    for name in names:
        m = cfg.models[name]
        compiler_args, dtype = (), None
        if host.backend == "neuron":
            compiler_args = cfg.neuron.inf1_compiler_args if host.kind == "inf1" else cfg.neuron.compiler_args
        elif host.backend == "cuda":
            dtype = "float16" if cfg.cuda.half else "float32"
        done.append((name, compile_model(
            base / Path(m.source).expanduser(), Path(cfg.server.model_repository) / name, name=name, task=m.task,
            backend=host.backend, target=host.kind, batch_sizes=m.batch_sizes, sequence_lengths=m.sequence_lengths,
            compiler_args=compiler_args, dtype=dtype, progress=progress(name) if progress else None)))
    return done


def default_target(backend: str) -> str:
    """The target a backend compiles for when none is given: cpu/cuda, or this host's Neuron generation."""
    if backend != "neuron":
        return backend
    from neuronserve.devices import discover_host

    try:
        return discover_host("neuron").kind
    except DeviceError as e:
        raise ConfigError(f"no Neuron device here to take the target from ({e}); pass --target inf2 "
                          "(or inf1, trn1, trn2) to compile for another host") from None


# ---------------------------------------------------------------- loading the source model

def _task(task: str) -> tasks.Task:
    try:
        return tasks.get(task)
    except tasks.BadInput as e:
        raise ConfigError(str(e)) from None


def _sizes(what: str, values: Sequence[int]) -> list[int]:
    values = sorted(set(int(v) for v in values))
    if not values or values[0] < 1:
        raise ConfigError(f"{what} must be positive integers, got {values}")
    return values


def _load(source: Path, spec: tasks.Task, attn_implementation: str):
    """(fast tokenizer, float32 eval model with the task's head), offline, from a local directory."""
    if not source.is_dir():
        raise ArtifactError(f"{source}: no such model directory; compile reads a local Hugging Face model "
                            "directory (fetch one first, e.g. `huggingface-cli download ID --local-dir DIR`)")
    if not (source / "config.json").is_file():
        raise ArtifactError(f"{source}: not a Hugging Face model directory (no config.json)")
    import transformers

    # our own progress says what is happening; transformers' bars and advice would only bury it
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{source}: unreadable config.json: {e}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ArtifactError(f"{source}: {config.model_type} is an encoder-decoder model; neuronserve serves "
                            "encoder models (BERT, RoBERTa, DistilBERT, ...)")
    auto = getattr(transformers, spec.auto_class)
    try:
        model, info = auto.from_pretrained(str(source), local_files_only=True, output_loading_info=True,
                                           attn_implementation=attn_implementation)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not support" in str(e):
            raise ArtifactError(f"{source}: architecture {config.model_type!r} has no {spec.name} model in "
                                f"transformers {transformers.__version__}") from None
        raise ArtifactError(f"{source}: cannot load the model: {e}") from None
    except OSError as e:
        raise ArtifactError(f"{source}: cannot load the model weights: {e}") from None
    # a checkpoint without this task's head loads with a randomly initialised one: refuse, it would serve noise
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        architectures = ", ".join(config.architectures or ["unknown"])
        raise ArtifactError(f"{source}: has no trained {spec.name} head (the checkpoint lacks "
                            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; it is a {architectures})")
    tokenizer = tasks.load_tokenizer(source, fix="convert it to a fast tokenizer (tokenizer.json) first")
    return tokenizer, model.float().eval()


def _input_names(model, tokenizer, source: Path) -> list[str]:
    """The token inputs both the model's forward and the tokenizer have, in tasks.TOKEN_INPUTS order."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    names = [n for n in tasks.TOKEN_INPUTS if n in accepted and n in tokenizer.model_input_names]
    if "input_ids" not in names:
        raise ArtifactError(f"{source}: {type(model).__name__} does not take input_ids; not a text encoder")
    return names


def _embedding_options(source: Path) -> dict:
    """Pooling and normalization as the sentence-transformers modules.json says; mean pooling when absent."""
    try:
        modules = json.loads((source / "modules.json").read_text())
    except FileNotFoundError:
        return {"pooling": "mean", "normalize": False}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{source}/modules.json: unreadable: {e}") from None
    pooling = "mean"
    for m in modules:
        if str(m.get("type", "")).endswith(".Pooling"):
            path = source / m.get("path", "") / "config.json"
            try:
                pool = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{path}: unreadable pooling config: {e}") from None
            modes = [k.removeprefix("pooling_mode_") for k, v in pool.items() if k.startswith("pooling_mode_") and v]
            if modes == ["cls_token"]:
                pooling = "cls"
            elif modes != ["mean_tokens"]:
                raise ArtifactError(f"{path}: pooling {'+'.join(modes) or 'none'} is not supported "
                                    "(neuronserve pools by mean_tokens or cls_token)")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return {"pooling": pooling, "normalize": normalize}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------- example inputs and the warm-up answer

def _example(task: str, tokenizer, batch: int, seq: int, input_names: list[str]):
    """Trace inputs for one bucket: the warm-up texts, repeated to fill the batch, so the mask has padding."""
    import torch

    texts = list(itertools.islice(itertools.cycle(tasks.get(task).warmup), batch))
    items = tasks.encode(task, tokenizer, tasks.parse_inputs(task, texts), seq, truncation=True)
    return tuple(torch.from_numpy(a) for a in tasks.pad(items, batch, seq, input_names))


def _warmup(task: str, tokenizer, module, manifest: Manifest, atol: float) -> Warmup:
    import torch

    texts = list(tasks.get(task).warmup)
    runs = []
    with torch.no_grad():
        for arrays, items in tasks.warmup_batches(task, tokenizer, manifest, texts):
            outputs = module(*(torch.from_numpy(a) for a in arrays))
            runs.append(([o.float().numpy() for o in outputs], items))
    return Warmup(texts=texts, expected=tasks.warmup_outputs(runs, manifest.output_names), atol=atol)


# ---------------------------------------------------------------- the atomic swap

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_in(stage: Path, out: Path) -> None:
    """Make `stage` be `out`: an atomic exchange where the kernel has one, else two renames."""
    if out.exists() and _exchange(stage, out):
        shutil.rmtree(stage, ignore_errors=True)    # now holds the previous version
        return
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "previous")
    os.rename(stage, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two directories in one step. False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")


# ---------------------------------------------------------------- progress display for the CLI

def console_progress(tty: bool):
    """(context manager, progress(name) -> Progress): a rich bar per model on a terminal, else log lines."""
    import contextlib

    import click

    if not tty:
        def plain(name: str) -> Progress:
            return lambda done, total, message: click.echo(f"compile {name}: [{done}/{total}] {message}", err=True)

        return contextlib.nullcontext(), plain

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              console=Console(stderr=True))

    def rich_bar(name: str) -> Progress:
        task_id = bar.add_task(name, total=None)

        def report(done: int, total: int, message: str) -> None:
            bar.update(task_id, completed=done, total=total, description=f"{name}: {message}")

        return report

    return bar, rich_bar
