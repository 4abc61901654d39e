"""`neuronserve compile` on the CPU backend, for real: tiny random BERTs for every task and the real MiniLM."""
from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neuronserve import tasks
from dev import random_models
from neuronserve.build import compile as compiler
from neuronserve.build.artifact import Manifest, read_manifest
from neuronserve.build.backends import cpu as cpu_backend, get
from neuronserve.cli import main
from neuronserve.config import Config
from neuronserve.devices import Core, Host
from neuronserve.errors import ArtifactError, ConfigError, DeviceError

# model items per task (a pair's second text is the one cut to the sequence length)
TEXTS = {
    "question-answering": [tasks.Pair("Who wrote it?", "The report was written by Ada in 1843."),
                           tasks.Pair("When?", "It rained all day on Tuesday."),
                           tasks.Pair("What?", "A very long context " * 20)],
    "text-classification": ["An unexpected delight.", "Dull and far too long.", "word " * 80],
    "token-classification": ["Ada Lovelace lived in London.", "Dull and far too long.", "word " * 80],
    "fill-mask": ["An unexpected [MASK].", "Dull and far too [MASK].", "[MASK] " + "word " * 80],
    "zero-shot-classification": [tasks.Pair("An unexpected delight.", "This example is positive."),
                                 tasks.Pair("Dull.", "This example is negative."),
                                 tasks.Pair("word " * 80, "This example is long.")],
    "feature-extraction": ["A sentence to embed.", "Another, rather different one.", "word " * 80],
}


def cpu_host() -> Host:
    return Host(backend="cpu", kind="cpu", cores=[Core(0, 0)])


def compile_tiny(tiny_model_dir, out: Path, task: str, **kw) -> Manifest:
    args = dict(name=out.name, task=task, backend="cpu", target="cpu", batch_sizes=[1, 2], sequence_lengths=[16, 32])
    return compiler.compile_model(tiny_model_dir(task), out, **{**args, **kw})


def eager_outputs(task: str, source: Path, arrays, **options):
    import transformers

    model = getattr(transformers, tasks.TASKS[task].auto_class).from_pretrained(source, local_files_only=True)
    module = tasks.build_module(task, model.float().eval(), ["input_ids", "attention_mask", "token_type_ids"],
                                **options)
    with torch.no_grad():
        return module(*(torch.from_numpy(a) for a in arrays))


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, tmp_path_factory):
    """One compiled artifact per task (buckets 1,2 x 16,32)."""
    repo = tmp_path_factory.mktemp("repo")
    return {task: (repo / task, compile_tiny(tiny_model_dir, repo / task, task)) for task in tasks.TASKS}


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_manifest_describes_the_artifact(compiled, tiny_model_dir, task):
    out, manifest = compiled[task]
    assert read_manifest(out, backend="cpu") == manifest     # re-read from disk, checksums verified
    assert (manifest.task, manifest.backend, manifest.target, manifest.dtype) == (task, "cpu", "cpu", "float32")
    assert manifest.source == str(tiny_model_dir(task).resolve())
    assert manifest.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.output_names == list(tasks.TASKS[task].output_names)
    # one trace for every bucket: its outputs at each bucket's shape were checked against that bucket's own trace
    assert [(b.batch, b.seq, b.file, b.own_trace) for b in manifest.buckets] == [
        (1, 16, "model.pt", ""), (1, 32, "model.pt", ""), (2, 16, "model.pt", ""), (2, 32, "model.pt", "")]
    assert {"torch", "transformers", "neuronserve"} <= set(manifest.versions)
    assert manifest.labels == ({str(i): label for i, label in enumerate(random_models.DEFAULT_LABELS[task])}
                               if task in compiler.LABELLED_TASKS else {})
    assert (manifest.pooling, manifest.normalize) == (("mean", False) if task == "feature-extraction" else
                                                      ("none", False))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt", "tokenizer"]
    # readable by the unprivileged server user, whoever compiled
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o644
    # nothing left behind beside it
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_every_bucket_matches_the_eager_model(compiled, tiny_model_dir, task):
    out, manifest = compiled[task]
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(out / manifest.tokenizer)
    for bucket in manifest.buckets:
        run = get("cpu").load(out / bucket.file, copy_index=0, threads=1)
        items = tasks.encode(task, tokenizer, TEXTS[task][:bucket.batch], bucket.seq, truncation=True)
        arrays = tasks.pad(items, bucket.batch, bucket.seq, manifest.input_names)
        got = run(*(torch.from_numpy(a) for a in arrays))
        expected = eager_outputs(task, tiny_model_dir(task), arrays, **(
            {"pooling": "mean"} if task == "feature-extraction" else {}))
        assert len(got) == len(manifest.output_names)
        # fill-mask's candidate ids may swap where two probabilities all but tie; the warm-up skips them too
        checked = tasks.get(task).checked_outputs or manifest.output_names
        for name, g, e in zip(manifest.output_names, got, expected):
            assert g.dtype == torch.float32 and g.device.type == "cpu"
            assert name not in checked or torch.allclose(g, e, atol=1e-4), (bucket.file, name)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_warmup_is_the_known_answer_of_every_copy(compiled, task):
    out, manifest = compiled[task]
    import transformers

    warmup = manifest.warmup
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / manifest.tokenizer)
    assert warmup.texts == tasks.warmup_items(task, tokenizer) and warmup.atol == 1e-3
    batches = tasks.warmup_batches(task, tokenizer, manifest)
    items = [it for _, its in batches for it in its]
    # the server does exactly this with each loaded copy of the bucket the batch lands in
    runs = []
    for arrays, its in batches:
        run = get("cpu").load(out / manifest.bucket(*arrays[0].shape).file, copy_index=0, threads=1)
        runs.append(([o.numpy() for o in run(*(torch.from_numpy(a) for a in arrays))], its))
    got = tasks.warmup_outputs(runs, manifest.output_names)
    assert tasks.warmup_mismatch(manifest, got, items) is None
    assert len(warmup.expected[manifest.output_names[0]]) == len(warmup.texts)
    # a copy that answers the same thing for every input is caught (fill-mask by its log-probabilities: a random
    # model's probabilities, all about 1/vocabulary, would pass any absolute tolerance)
    broken = {k: np.full_like(np.asarray(v), np.asarray(v).mean()) for k, v in got.items()}
    assert tasks.warmup_mismatch(manifest, broken, items) is not None


def test_tokenizer_is_saved_with_the_artifact(compiled, minilm_dir):
    import transformers

    out, manifest = compiled["text-classification"]
    saved = transformers.AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    original = transformers.AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    assert saved.is_fast
    assert saved("Tokenize me, please.")["input_ids"] == original("Tokenize me, please.")["input_ids"]


def test_a_bucket_the_shared_trace_does_not_reproduce_keeps_its_own(tiny_model_dir, tmp_path, monkeypatch):
    """A trace that baked a shape in (here: the shared trace made to answer 0.5 off at batch 1) is caught by the
    check of every bucket against the bucket's own trace, which is then kept, with the reason in the manifest."""
    real_trace, real_run, traced = cpu_backend.CpuBackend.trace, cpu_backend.CpuBackend.run, []

    def trace(self, module, example, **kw):
        traced.append(real_trace(self, module, example, **kw))
        return traced[-1]

    def run(self, module, example):
        out = real_run(self, module, example)
        return tuple(o + 0.5 for o in out) if module is traced[0] and example[0].shape[0] == 1 else out

    monkeypatch.setattr(cpu_backend.CpuBackend, "trace", trace)
    monkeypatch.setattr(cpu_backend.CpuBackend, "run", run)
    out = tmp_path / "clf"
    manifest = compile_tiny(tiny_model_dir, out, "text-classification")
    assert [(b.batch, b.seq, b.file) for b in manifest.buckets] == [
        (1, 16, "b1_s16.pt"), (1, 32, "b1_s32.pt"), (2, 16, "model.pt"), (2, 32, "model.pt")]
    assert manifest.bucket(1, 16).own_trace == "the shared trace's logits differs from its own trace's by 0.5 " \
                                               "(over 0.001)"
    assert manifest.bucket(2, 16).own_trace == ""
    assert read_manifest(out, backend="cpu") == manifest     # every file's checksum, the shared one once
    assert sorted(p.name for p in out.iterdir()) == ["b1_s16.pt", "b1_s32.pt", "manifest.json", "model.pt",
                                                     "tokenizer"]


def test_loading_for_another_backend_or_a_damaged_file_is_refused(compiled, tmp_path):
    out, _ = compiled["text-classification"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(ArtifactError, match=r"compiled for cpu \(cpu\), but this group serves on neuron; run "
                                            r"`neuronserve compile --backend neuron`"):
        read_manifest(copy, backend="neuron")
    with open(copy / "model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match=r"model.pt: checksum mismatch"):
        read_manifest(copy, backend="cpu")


def test_real_minilm_embeddings(minilm_dir, tmp_path):
    manifest = compiler.compile_model(minilm_dir, tmp_path / "minilm", name="minilm", task="feature-extraction",
                                      backend="cpu", target="cpu", batch_sizes=[4], sequence_lengths=[32])
    assert (manifest.pooling, manifest.normalize) == ("mean", True)   # from 1_Pooling and 2_Normalize
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "minilm" / "tokenizer")
    model = transformers.AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A fast tokenizer."]
    items = tasks.encode("feature-extraction", tokenizer, texts, 32, truncation=True)
    arrays = tasks.pad(items, 4, 32, manifest.input_names)
    [emb] = get("cpu").load(tmp_path / "minilm" / manifest.bucket(4, 32).file, copy_index=0, threads=1)(
        *(torch.from_numpy(a) for a in arrays))
    # reference: sentence-transformers' recipe, written out, each sentence alone and unpadded
    with torch.no_grad():
        for row, item in enumerate(items):
            hidden = model(**{k: torch.from_numpy(v)[None] for k, v in item.ids.items()}).last_hidden_state[0]
            assert torch.allclose(emb[row], torch.nn.functional.normalize(hidden.mean(0), dim=0), atol=1e-4)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.5 > sims[0, 2]     # real weights: related sentences are close


def test_pooling_follows_modules_json(tiny_model_dir, tmp_path):
    source = tmp_path / "cls-model"
    shutil.copytree(tiny_model_dir("feature-extraction"), source)
    (source / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    manifest = compiler.compile_model(source, tmp_path / "out", name="cls", task="feature-extraction",
                                      backend="cpu", target="cpu", batch_sizes=[1], sequence_lengths=[16])
    assert (manifest.pooling, manifest.normalize) == ("cls", False)
    arrays = compiler._example("feature-extraction", _tokenizer(source), 1, 16, manifest.input_names)
    [got] = get("cpu").load(tmp_path / "out" / manifest.bucket(1, 16).file, copy_index=0, threads=1)(*arrays)
    [expected] = eager_outputs("feature-extraction", source, [a.numpy() for a in arrays], pooling="cls")
    assert torch.allclose(got, expected, atol=1e-5)

    (source / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ArtifactError, match="pooling weightedmean is not supported"):
        compiler.compile_model(source, tmp_path / "out2", name="wmean", task="feature-extraction", backend="cpu",
                               target="cpu", batch_sizes=[1], sequence_lengths=[16])


def _tokenizer(source):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)


# ---------------------------------------------------------------- errors a user can act on

def test_source_errors(tmp_path, tiny_model_dir):
    common = dict(name="m", backend="cpu", target="cpu", batch_sizes=[1], sequence_lengths=[16])
    with pytest.raises(ArtifactError, match="no such model directory; compile reads a local Hugging Face model"):
        compiler.compile_model(tmp_path / "nope", tmp_path / "o", task="text-classification", **common)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"not a Hugging Face model directory \(no config.json\)"):
        compiler.compile_model(tmp_path / "empty", tmp_path / "o", task="text-classification", **common)
    # a base model has no trained QA head: transformers would make a random one, which would serve noise
    with pytest.raises(ArtifactError, match=r"has no trained question-answering head .*qa_outputs.*BertModel"):
        compiler.compile_model(tiny_model_dir("feature-extraction"), tmp_path / "o", task="question-answering",
                               **common)
    with pytest.raises(ConfigError, match="sequence length 1024 is over .* 512 positions"):
        compiler.compile_model(tiny_model_dir("text-classification"), tmp_path / "o", task="text-classification",
                               **{**common, "sequence_lengths": [1024]})
    assert not (tmp_path / "o").exists()


def test_unsupported_architectures(tmp_path):
    import transformers

    vit = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, image_size=32, patch_size=16)
    transformers.ViTModel(config).save_pretrained(vit)
    with pytest.raises(ArtifactError, match="architecture 'vit' has no question-answering model in transformers"):
        compiler.compile_model(vit, tmp_path / "o", name="vit", task="question-answering", backend="cpu",
                               target="cpu", batch_sizes=[1], sequence_lengths=[16])
    t5 = tmp_path / "t5"
    transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16).save_pretrained(t5)
    with pytest.raises(ArtifactError, match="t5 is an encoder-decoder model"):
        compiler.compile_model(t5, tmp_path / "o", name="t5", task="text-classification", backend="cpu",
                               target="cpu", batch_sizes=[1], sequence_lengths=[16])


def test_backend_and_target_errors(tiny_model_dir, tmp_path):
    common = dict(name="m", task="text-classification", batch_sizes=[1], sequence_lengths=[16])
    src = tiny_model_dir("text-classification")
    with pytest.raises(DeviceError, match=r"cannot compile m for cuda: torch .* is a CPU-only build"):
        compiler.compile_model(src, tmp_path / "o", backend="cuda", target="cuda", **common)
    with pytest.raises(ConfigError, match="target 'inf2' is not a cpu target"):
        compiler.compile_model(src, tmp_path / "o", backend="cpu", target="inf2", **common)
    with pytest.raises(ArtifactError, match="traces in float32 only, not float16"):
        compiler.compile_model(src, tmp_path / "o", backend="cpu", target="cpu", dtype="float16", **common)
    with pytest.raises(ConfigError, match="batch sizes must be positive"):
        compiler.compile_model(src, tmp_path / "o", backend="cpu", target="cpu", **{**common, "batch_sizes": [0]})


# ---------------------------------------------------------------- atomic replacement

@pytest.mark.parametrize("failure", [RuntimeError("compiler crashed"), KeyboardInterrupt()])
def test_failed_recompile_keeps_the_previous_artifact(tiny_model_dir, tmp_path, monkeypatch, failure):
    out = tmp_path / "repo" / "clf"
    before = compile_tiny(tiny_model_dir, out, "text-classification", batch_sizes=[1], sequence_lengths=[16])
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_trace, calls = cpu_backend.CpuBackend.trace, []

    def trace_then_fail(self, module, example, **kw):
        calls.append(example[0].shape)
        if len(calls) == 2:
            raise failure
        return real_trace(self, module, example, **kw)

    monkeypatch.setattr(cpu_backend.CpuBackend, "trace", trace_then_fail)
    # a compiler error becomes a readable ArtifactError; Ctrl-C stays what it is
    with pytest.raises(ArtifactError if isinstance(failure, Exception) else KeyboardInterrupt) as e:
        compile_tiny(tiny_model_dir, out, "text-classification", batch_sizes=[1, 2], sequence_lengths=[16])
    if isinstance(failure, Exception):
        # the shared trace (at the largest shape, 2 x 16) went through; the check of bucket 1 x 16 failed
        assert "tracing clf bucket batch 1 x seq 16 for cpu failed: RuntimeError: compiler crashed" in str(e.value)
    assert read_manifest(out, backend="cpu") == before
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    assert [p.name for p in out.parent.iterdir()] == ["clf"]      # no staging or work directories left


def test_recompile_replaces_the_whole_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "clf"
    compile_tiny(tiny_model_dir, out, "text-classification", batch_sizes=[1, 2], sequence_lengths=[16])
    (out / "stray.txt").write_text("from an older version")
    after = compile_tiny(tiny_model_dir, out, "text-classification", batch_sizes=[4], sequence_lengths=[32])
    assert read_manifest(out) == after
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt", "tokenizer"]
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]


def test_swap_without_renameat2(tmp_path, monkeypatch):
    """Filesystems without RENAME_EXCHANGE get two renames; the result is the same."""
    monkeypatch.setattr(compiler, "_exchange", lambda a, b: False)
    out, stage = tmp_path / "m", tmp_path / "stage"
    out.mkdir()
    (out / "old").write_text("old")
    stage.mkdir()
    (stage / "new").write_text("new")
    compiler._swap_in(stage, out)
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["m"]


# ---------------------------------------------------------------- from the config, and the CLI

def write_config(tmp_path: Path, tiny_model_dir) -> Path:
    models = tmp_path / "sources"
    shutil.copytree(tiny_model_dir("text-classification"), models / "clf")
    shutil.copytree(tiny_model_dir("question-answering"), models / "qa")
    path = tmp_path / "etc" / "neuronserve.toml"
    path.parent.mkdir()
    path.write_text(f"""
[server]
backend = "cpu"
model_repository = "{tmp_path / 'repo'}"

[models.clf]
task = "text-classification"
source = "../sources/clf"      # relative to this file
batch_sizes = [1, 2]
sequence_lengths = [16]

[models.qa]
task = "question-answering"
source = "{models / 'qa'}"
batch_sizes = [1]
sequence_lengths = [32]
""")
    return path


def test_compile_config(tmp_path, tiny_model_dir):
    from neuronserve import config

    cfg = config.load(write_config(tmp_path, tiny_model_dir))
    seen = []
    done = compiler.compile_config(cfg, cpu_host(), ["qa"],
                                   progress=lambda name: lambda d, t, m: seen.append((name, d, t)))
    assert [n for n, _ in done] == ["qa"] and sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["qa"]
    assert seen[0] == ("qa", 0, 3) and seen[-1] == ("qa", 3, 3)
    done = compiler.compile_config(cfg, cpu_host())
    assert [(n, m.task, [(b.batch, b.seq) for b in m.buckets]) for n, m in done] == [
        ("clf", "text-classification", [(1, 16), (2, 16)]), ("qa", "question-answering", [(1, 32)])]
    assert read_manifest(tmp_path / "repo" / "clf").source == str((tmp_path / "sources" / "clf").resolve())
    with pytest.raises(ConfigError, match=r"no \[models.nope\] in the config \(configured: clf, qa\)"):
        compiler.compile_config(cfg, cpu_host(), ["nope"])
    with pytest.raises(ConfigError, match="no \\[models.<name>\\] section"):
        compiler.compile_config(Config(), cpu_host())


def test_compile_config_passes_neuron_and_cuda_settings(monkeypatch):
    cfg = Config.model_validate({"models": {"m": {"task": "feature-extraction", "source": "/src/m"}},
                                 "neuron": {"inf1_compiler_args": ["--fast-math", "none"]},
                                 "cuda": {"half": True}})
    calls = []
    monkeypatch.setattr(compiler, "compile_model", lambda source, out, **kw: calls.append((source, out, kw)))
    for backend, kind in [("neuron", "inf2"), ("neuron", "inf1"), ("cuda", "cuda")]:
        compiler.compile_config(cfg, Host(backend=backend, kind=kind, cores=[Core(0, 0)]))
    (src, out, inf2), (_, _, inf1), (_, _, cuda) = calls
    assert src == Path("/src/m") and out == Path("/var/lib/neuronserve/models/m")
    assert (inf2["backend"], inf2["target"], inf2["dtype"]) == ("neuron", "inf2", None)
    assert inf2["compiler_args"] == ["--auto-cast", "matmult", "--auto-cast-type", "bf16"]
    assert (inf1["target"], inf1["compiler_args"]) == ("inf1", ["--fast-math", "none"])
    assert (cuda["backend"], cuda["dtype"], cuda["compiler_args"]) == ("cuda", "float16", ())
    assert inf2["batch_sizes"] == [1, 4, 8] and inf2["sequence_lengths"] == [128]


def test_cli_compiles_the_configured_models(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(main, ["compile", "--config", str(path), "clf"])
    assert result.exit_code == 0, result.output
    assert f"clf: text-classification for cpu (cpu, float32), buckets 1x16 2x16 -> {tmp_path / 'repo' / 'clf'}" \
        in result.stdout
    # not a terminal: one log line per step
    assert "compile clf: [2/4] checked batch 1 x seq 16 on the shared trace" in result.stderr
    assert read_manifest(tmp_path / "repo" / "clf", backend="cpu").name == "clf"


def test_cli_one_off_form(tmp_path, tiny_model_dir):
    out = tmp_path / "models" / "emb"
    result = CliRunner().invoke(main, [
        "compile", "--source", str(tiny_model_dir("feature-extraction")), "--task", "feature-extraction",
        "--out", str(out), "--backend", "cpu", "--batch-sizes", "1,2", "--seq-lens", "16"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out, backend="cpu")
    assert (manifest.name, manifest.batch_sizes, manifest.sequence_lengths) == ("emb", [1, 2], [16])


@pytest.mark.parametrize("args, message", [
    (["--source", "/no/such/dir", "--task", "feature-extraction", "--out", "OUT", "--backend", "cpu"],
     "neuronserve: error: /no/such/dir: no such model directory"),
    (["--source", "/x", "--task", "feature-extraction", "--out", "OUT", "--backend", "cuda", "--target", "cuda"],
     "neuronserve: error: cannot compile OUT for cuda: torch"),
    (["--source", "/x", "--out", "OUT"], "--source needs --task"),
    (["--task", "feature-extraction", "m"], "--task, --name, --out, --target and --compiler-args go with --source"),
    (["--source", "/x", "--task", "feature-extraction", "m"], "not both"),
    (["--batch-sizes", "1,x"], "'1,x' is not a comma-separated list of integers"),
])
def test_cli_errors_are_one_readable_line(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "OUT")) for a in args]
    message = message.replace("OUT", "OUT" if "cannot compile" in message else str(tmp_path / "OUT"))
    result = CliRunner().invoke(main, ["compile", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "OUT").exists()


def test_progress_on_a_terminal_is_a_bar_per_model():
    display, progress = compiler.console_progress(tty=True)
    with display:
        report = progress("bert-qa")
        report(0, 4, "loading /src")
        report(2, 4, "traced batch 1 x seq 128 (3.1s)")
    [task] = display.tasks
    assert (task.completed, task.total, task.description) == (2, 4, "bert-qa: traced batch 1 x seq 128 (3.1s)")
    assert task.elapsed is not None
