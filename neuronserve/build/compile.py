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
from neuronserve.build.artifact import (SHARED_FILE, WEIGHTS_FILE, Bucket, Manifest, Warmup, bucket_file,
                                        sha256_file, write_manifest)
from neuronserve.errors import ArtifactError, ConfigError, DeviceError

# progress(done, total, message): called once before the first step and after each step
Progress = Callable[[int, int, str], None]
TARGETS = {"cpu": ("cpu",), "cuda": ("cuda",), "neuron": ("inf1", "inf2", "trn1", "trn2")}
# tasks whose answers name the classification head's labels (the manifest carries id2label for them)
LABELLED_TASKS = ("text-classification", "token-classification", "zero-shot-classification")


def compile_model(source: Path, out: Path, *, name: str, task: str, backend: str, target: str,
                  batch_sizes: Sequence[int], sequence_lengths: Sequence[int], compiler_args: Sequence[str] = (),
                  dtype: str | None = None, progress: Progress | None = None) -> Manifest:
    """Compile the model in `source` for `task` into `out`; returns the manifest written there.

    Raises ArtifactError (bad source, unsupported architecture, failed trace), DeviceError (the backend's
    framework is not importable here) or ConfigError (bad arguments).
    """
    import torch

    from neuronserve.build import backends

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
    options, dense = _embedding_options(source, model.config.hidden_size, max(sequence_lengths)) \
        if task == "feature-extraction" else ({}, [])
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and max(sequence_lengths) > max_positions:
        raise ConfigError(f"sequence length {max(sequence_lengths)} is over {source}'s limit of {max_positions} "
                          "positions (max_position_embeddings)")
    labels = {str(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()} \
        if task in LABELLED_TASKS else {}
    try:
        module = tasks.build_module(task, model, input_names, **options)
    except ValueError as e:
        raise ArtifactError(f"{source}: {e}") from None
    manifest = Manifest(
        name=name, task=task, backend=backend, target=target, source=str(source.resolve()),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions={**engine.versions(), "transformers": _transformers_version(), "neuronserve": __version__},
        input_names=input_names, output_names=list(spec.output_names),
        architecture=model.config.model_type, attn_implementation=model.config._attn_implementation,
        labels=labels, problem_type=getattr(model.config, "problem_type", None) or "single_label_classification",
        pooling=options.get("pooling", "none"), normalize=options.get("normalize", False), dense=dense,
        special={} if tokenizer.mask_token_id is None else {"mask": tokenizer.mask_token_id},
        entailment=_entailment(labels, source) if task == "zero-shot-classification" else None,
        dtype=dtype, compiler_args=list(compiler_args),
        buckets=[Bucket(batch=b, seq=s, file=bucket_file(b, s), sha256="") for b, s in buckets])
    # the known answer comes from the eager fp32 CPU module, before any backend moves or casts it
    manifest.warmup = _warmup(task, tokenizer, module, manifest, tasks.warmup_atol(backend, dtype))
    report(1, total, f"loaded {model.config.model_type} for {task} ({time.monotonic() - started:.1f}s)")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.compiling-", dir=out.parent))
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))

    def trace(batch: int, seq: int, what: str = ""):
        example = _example(task, tokenizer, batch, seq, input_names)
        bucket_dir = workdir / f"b{batch}_s{seq}{'_' + what if what else ''}"
        bucket_dir.mkdir()
        try:
            with warnings.catch_warnings():
                # "converting a tensor to a Python boolean": a bucket's shapes are fixed, as intended; a shared
                # trace that baked one in is caught by the check of every bucket against its own trace
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)    # transformers' deprecation notes
                return engine.trace(module, example, target=target, workdir=bucket_dir,
                                    compiler_args=list(compiler_args), dtype=dtype)
        except (ArtifactError, DeviceError):
            raise
        except Exception as e:   # the compilers raise anything; the message is what the user needs
            kept = f"; compiler files kept in {workdir}" if any(bucket_dir.iterdir()) else ""
            raise ArtifactError(f"tracing {name} {what + ' trace at ' if what else ''}bucket batch {batch} x seq "
                                f"{seq} for {target} failed: {type(e).__name__}: {e}{kept}") from e
    try:
        atol = tasks.warmup_atol(backend, dtype)
        shared = None
        if engine.shape_generic:
            # one trace at the largest shape serves every bucket whose outputs it reproduces (one set of weights)
            largest = (max(batch_sizes), max(sequence_lengths))
            shared = trace(*largest, "shared")
            engine.save(shared, stage / SHARED_FILE)
            shared_sha = sha256_file(stage / SHARED_FILE)
        for i, (batch, seq) in enumerate(buckets):
            t0 = time.monotonic()
            bucket = manifest.buckets[i]
            if shared is not None and (batch, seq) == largest:
                bucket.file, bucket.sha256 = SHARED_FILE, shared_sha
                report(i + 2, total, f"traced batch {batch} x seq {seq} (shared, {time.monotonic() - t0:.1f}s)")
                continue
            traced = trace(batch, seq)
            if shared is not None:
                example = _example(task, tokenizer, batch, seq, input_names)
                differs = _differs(engine.run(shared, example), engine.run(traced, example), manifest.output_names,
                                   atol)
                if not differs:
                    bucket.file, bucket.sha256 = SHARED_FILE, shared_sha
                    report(i + 2, total, f"checked batch {batch} x seq {seq} on the shared trace "
                                         f"({time.monotonic() - t0:.1f}s)")
                    continue
                bucket.own_trace = f"the shared trace's {differs}"
            path = stage / bucket_file(batch, seq)
            engine.save(traced, path)
            bucket.sha256 = sha256_file(path)
            report(i + 2, total, f"traced batch {batch} x seq {seq} ({time.monotonic() - t0:.1f}s)")
        if engine.separate_weights(target):
            # the weights the traces left out of their compiled graphs, once for every bucket
            weights = stage / WEIGHTS_FILE
            try:
                torch.save(module.state_dict(), str(weights))
            except (OSError, RuntimeError) as e:
                raise ArtifactError(f"{weights}: cannot write the weights: {e}") from None
            manifest.weights, manifest.weights_sha256 = WEIGHTS_FILE, sha256_file(weights)
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


def default_target(backend: str, cfg) -> str:
    """The target a backend compiles for when none is given: cpu/cuda, or this host's Neuron generation."""
    if backend != "neuron":
        return backend
    from neuronserve.context import discover

    try:
        return discover(cfg, "neuron").kind
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
    """(fast tokenizer, float32 eval model with the task's head), offline, from a local directory.

    The model gets the backend's attention kernel where the architecture has it, else eager attention, which
    every architecture has (DeBERTa-v2 and MPNet have no SDPA one); model.config._attn_implementation says which.
    """
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
    if type(config) not in auto._model_mapping:
        raise ArtifactError(f"{source}: architecture {config.model_type!r} has no {spec.name} model in "
                            f"transformers {transformers.__version__}")
    kernels = list(dict.fromkeys((attn_implementation, "eager")))
    for kernel in kernels:
        try:
            model, info = auto.from_pretrained(str(source), local_files_only=True, output_loading_info=True,
                                               attn_implementation=kernel)
            break
        except OSError as e:
            raise ArtifactError(f"{source}: cannot load the model weights: {e}") from None
        except Exception as e:   # transformers and safetensors raise many kinds; the message is what the user needs
            # a kernel the architecture lacks (or whose package is missing) is refused before any weights are read
            if kernel == kernels[-1] or "attention" not in str(e).lower():
                raise ArtifactError(f"{source}: cannot load the {config.model_type} model: {type(e).__name__}: "
                                    f"{e}") from None
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


# sentence-transformers' Pooling modes neuronserve traces, and the older configs' pooling_mode_* flags in the
# order sentence-transformers concatenates the modes they turn on
POOLING_MODES = ("mean", "cls", "max", "lasttoken")
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# the sentence-transformers modules neuronserve reproduces, in the one order it applies them; they are named by
# class alone, as the package has moved them between versions (sentence_transformers.models.Pooling,
# sentence_transformers.sentence_transformer.modules.pooling.Pooling, ...)
_MODULE_ORDER = {"Transformer": 0, "Pooling": 1, "Dense": 2, "Normalize": 3}


def _embedding_options(source: Path, width: int, longest: int = 0) -> tuple[dict, list[dict]]:
    """(tasks.build_module's feature-extraction options, the manifest's dense records) as the sentence-transformers
    modules.json says: the Transformer, its Pooling, any Dense layers, Normalize. Mean pooling when absent.

    `width` is the model's hidden size, the pooled embedding's. Any other module, or these in another order, is
    refused by name: the traced model would not compute what sentence-transformers does.
    """
    path = source / "modules.json"
    modules = _read_json(path, optional=True)
    if modules is None:
        return {"pooling": "mean", "normalize": False}, []
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ArtifactError(f"{path}: unreadable: not a list of modules")
    options, dense, records, done = {"pooling": "mean", "normalize": False}, [], [], -1
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        where = f"{path}: module {m.get('name', m.get('idx'))!r} ({m.get('type')})"
        order = _MODULE_ORDER.get(kind)
        if order is None:
            raise ArtifactError(f"{where} is not one neuronserve can reproduce; it traces "
                                "Transformer, Pooling, Dense and Normalize modules")
        if order < done or (order == done and kind != "Dense"):
            raise ArtifactError(f"{where} comes after a module it must precede; neuronserve applies one "
                                "Transformer, one Pooling, any Dense layers and Normalize in that order")
        done = order
        directory = source / str(m.get("path", ""))
        if kind == "Transformer":
            _transformer(directory, source, where, longest)
        elif kind == "Pooling":
            options["pooling"] = _pooling(directory / "config.json")
        elif kind == "Dense":
            layer, record = _dense(directory, records[-1]["out_features"] if records else width)
            dense.append(layer)
            records.append(record)
        elif kind == "Normalize":
            options["normalize"] = True
    if dense:
        options["dense"] = dense
    return options, records


def _transformer(directory: Path, source: Path, where: str, longest: int) -> None:
    """Refuse a Transformer module other than the token embeddings of the model compile loads, and sequence
    buckets (the `longest`) past its max_seq_length: sentence-transformers cuts text there, so a longer text would
    embed differently."""
    if directory.resolve() != source.resolve():
        raise ArtifactError(f"{where}: the transformer lives in {directory}, not beside modules.json where "
                            "compile reads it")
    path = directory / "sentence_bert_config.json"
    config = _read_json(path, optional=True)
    if config is None:
        return
    # newer sentence-transformers can take another head's outputs (fill-mask logits for sparse encoders)
    kind = config.get("transformer_task", "feature-extraction") if isinstance(config, dict) else None
    if kind != "feature-extraction":
        raise ArtifactError(f"{path}: transformer_task {kind!r} is not supported (neuronserve pools the "
                            "feature-extraction model's token embeddings)")
    limit = config.get("max_seq_length")
    if isinstance(limit, int) and longest > limit:
        raise ConfigError(f"sequence length {longest} is over the max_seq_length {limit} of {path}: "
                          f"sentence-transformers cuts text at {limit} tokens, so longer text would embed "
                          f"differently; use sequence lengths up to {limit}")


def _pooling(path: Path) -> str:
    """The one pooling mode of a sentence-transformers Pooling config (either format)."""
    config = _read_json(path, "pooling config")
    modes = config.get("pooling_mode")
    if modes is None:
        # the older format; sentence-transformers pools by mean when no flag is on
        modes = [mode for key, mode in _LEGACY_POOLING.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ArtifactError(f"{path}: pooling {'+'.join(map(str, modes))} is not supported (neuronserve pools by "
                            f"one of {', '.join(POOLING_MODES)})")
    return modes[0]


def _dense(directory: Path, width: int):
    """(Linear followed by its activation, as sentence-transformers' Dense computes it; the manifest's record) of
    a Dense module directory whose input is `width` wide."""
    import importlib

    import torch

    path = directory / "config.json"
    config = _read_json(path, "Dense config")
    try:
        in_features, out_features = int(config["in_features"]), int(config["out_features"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable Dense config: {e!r}") from None
    for key, plain in (("use_residual", False), ("module_input_name", "sentence_embedding"),
                       ("module_output_name", "sentence_embedding")):
        if config.get(key, plain) not in (plain, None):
            raise ArtifactError(f"{path}: a Dense layer with {key} {config[key]!r} is not supported (neuronserve "
                                "projects the sentence embedding, without a residual connection)")
    if in_features != width:
        raise ArtifactError(f"{path}: in_features {in_features}, but the embedding it projects has {width}")
    # sentence-transformers' default, and the only activations it restores without trust_remote_code: torch.nn's
    activation = config.get("activation_function") or "torch.nn.modules.activation.Tanh"
    module, _, name = activation.rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), name) if module.startswith("torch.") else None
    except (ImportError, AttributeError):
        kind = None
    if not (isinstance(kind, type) and issubclass(kind, torch.nn.Module)):
        raise ArtifactError(f"{path}: activation {activation!r} is not a torch.nn module; neuronserve reproduces "
                            "those only")
    linear = torch.nn.Linear(in_features, out_features, bias=bool(config.get("bias", True)))
    weights = {k.removeprefix("linear."): v for k, v in _weights(directory).items() if k.startswith("linear.")}
    try:
        linear.load_state_dict(weights)
    except RuntimeError as e:
        raise ArtifactError(f"{directory}: weights that do not fit its {in_features} -> {out_features} Dense "
                            f"layer: {e}") from None
    return (torch.nn.Sequential(linear, kind()).float().eval(),
            {"in_features": in_features, "out_features": out_features, "activation": activation})


def _read_json(path: Path, what: str = "", *, optional: bool = False):
    """A sentence-transformers JSON file's content; None for a missing `optional` one. ArtifactError naming the
    file (and `what` it is) when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if optional and isinstance(e, FileNotFoundError):
            return None
        raise ArtifactError(f"{path}: unreadable{' ' + what if what else ''}: {e}") from None


def _weights(directory: Path) -> dict:
    """The tensors of a sentence-transformers module: model.safetensors, or the older pytorch_model.bin."""
    import torch

    try:
        if (directory / "model.safetensors").is_file():
            from safetensors.torch import load_file

            return load_file(str(directory / "model.safetensors"))
        if (directory / "pytorch_model.bin").is_file():
            return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:   # safetensors' and torch's readers raise their own kinds on a damaged file
        raise ArtifactError(f"{directory}: unreadable weights: {e}") from None
    raise ArtifactError(f"{directory}: no weights (model.safetensors or pytorch_model.bin)")


def _entailment(labels: dict[str, str], source: Path) -> int:
    """The index of an NLI model's entailment label, which zero-shot classification scores each candidate by."""
    found = [int(i) for i, label in labels.items() if label.lower().startswith("entail")]
    if not found:
        raise ArtifactError(f"{source}: no entailment label among its labels ({', '.join(labels.values()) or 'none'})"
                            "; zero-shot-classification needs a model fine-tuned on NLI (e.g. MNLI)")
    return found[0]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------- example inputs and the warm-up answer

def _example(task: str, tokenizer, batch: int, seq: int, input_names: list[str]):
    """Trace inputs for one bucket: the warm-up items, repeated to fill the batch, so the mask has padding."""
    import torch

    items = list(itertools.islice(itertools.cycle(tasks.warmup_items(task, tokenizer)), batch))
    encoded = tasks.encode(task, tokenizer, [tasks.item_from_json(it) for it in items], seq, truncation=True)
    return tuple(torch.from_numpy(a) for a in tasks.pad(encoded, batch, seq, input_names))


def _differs(got: Sequence, want: Sequence, names: Sequence[str], atol: float) -> str:
    """'' when every output of `got` is within `atol` of `want`'s, else what differs (for the manifest)."""
    for name, a, b in zip(names, got, want):
        if a.shape != b.shape:
            return f"{name} has shape {list(a.shape)}, its own trace's {list(b.shape)}"
        worst = float((a - b).abs().max()) if a.numel() else 0.0
        if not worst <= atol:
            return f"{name} differs from its own trace's by {worst:.3g} (over {atol:g})"
    return ""


def _warmup(task: str, tokenizer, module, manifest: Manifest, atol: float) -> Warmup:
    import torch

    items = tasks.warmup_items(task, tokenizer)
    runs = []
    with torch.no_grad():
        for arrays, encoded in tasks.warmup_batches(task, tokenizer, manifest, items):
            outputs = module(*(torch.from_numpy(a) for a in arrays))
            runs.append(([o.float().numpy() for o in outputs], encoded))
    return Warmup(texts=items, expected=tasks.warmup_outputs(runs, manifest.output_names), atol=atol)


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
