"""Every common encoder architecture compiles for every task and serves what transformers computes.

Small random models of each architecture (dev.random_models.build_model: real tokenizers of each family)
are traced on the CPU and compared with the transformers model run eagerly, batched and padded as the server runs
them and item by item unpadded; sentence-transformers models are compared with sentence-transformers itself.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from neuronserve import tasks
from dev import random_models
from neuronserve.build import compile as compiler
from neuronserve.errors import ArtifactError, ConfigError

ARCHITECTURES = list(random_models.ARCHITECTURES)
TASKS = [t for t in tasks.TASKS if t in random_models.HEADS]
# the architectures that have no SDPA attention in transformers: compile falls back to eager attention
EAGER_ONLY = {"deberta-v2", "mpnet"}
# the architectures whose forward takes token_type_ids and whose tokenizer makes them
TOKEN_TYPES = {"bert", "electra", "deberta-v2"}


def cases():
    """Every architecture with every task; every architecture for one task and every task for one architecture
    on each run, the rest marked slow."""
    for architecture in ARCHITECTURES:
        for task in TASKS:
            quick = task == "text-classification" or architecture == "roberta"
            yield pytest.param(architecture, task, id=f"{architecture}-{task}",
                               marks=() if quick else pytest.mark.slow)


def items_for(task: str, tokenizer) -> list:
    """The task's warm-up items, a short one (padding in every batch) and one over the sequence length."""
    items = [tasks.item_from_json(it) for it in tasks.warmup_items(task, tokenizer)]
    first = items[0]
    if isinstance(first, tasks.Pair):
        return [tasks.Pair("Why?", "Because."), *items, tasks.Pair(first.first, first.second + " and so on" * 20)]
    mask = f" {tokenizer.mask_token}" if task == "fill-mask" else ""     # fill-mask items hold the mask token
    return [f"Fine{mask}.", *items, first + " and so on" * 20]


def reference(task: str, source, input_names, **options):
    """The task's module around the transformers model loaded with eager attention: what compile traces, run as
    transformers computes it."""
    import transformers

    model = getattr(transformers, tasks.get(task).auto_class).from_pretrained(
        source, local_files_only=True, attn_implementation="eager")
    return tasks.build_module(task, model.float().eval(), input_names, **options)


def assert_serves_as_reference(out, manifest, eager, items, tokenizer):
    """Every bucket of the compiled model in `out` answers `items` as `eager` does: batched and padded, and as
    each item alone, unpadded. Only the items' rows and tokens count: eager and SDPA attention disagree on a query
    with nothing to attend to (a padding row, or ModernBERT's padding beyond a short text's sliding window)."""
    spec = tasks.get(manifest.task)
    checked = [manifest.output_names.index(n) for n in spec.checked_outputs or manifest.output_names]
    for bucket in manifest.buckets:
        traced = torch.jit.load(str(out / bucket.file)).eval()
        encoded = tasks.encode(manifest.task, tokenizer, items, bucket.seq, truncation=True)
        for start in range(0, len(encoded), bucket.batch):
            chunk = encoded[start:start + bucket.batch]
            arrays = [torch.from_numpy(a) for a in tasks.pad(chunk, bucket.batch, bucket.seq, manifest.input_names)]
            with torch.no_grad():
                got, batched = traced(*arrays), eager(*arrays)
            for row, item in enumerate(chunk):
                alone = [torch.from_numpy(a) for a in tasks.pad([item], 1, item.length, manifest.input_names)]
                with torch.no_grad():
                    single = eager(*alone)
                for i in checked:
                    mine = got[i][row, :item.length] if spec.per_token else got[i][row]
                    expected = batched[i][row, :item.length] if spec.per_token else batched[i][row]
                    where = (bucket.file, start + row, manifest.output_names[i])
                    assert torch.allclose(mine, expected, atol=1e-4), where
                    assert torch.allclose(mine, single[i][0], atol=1e-4), where


@pytest.mark.parametrize("architecture, task", list(cases()))
def test_every_architecture_serves_every_task(arch_model_dir, tmp_path, architecture, task):
    """Compiled for the CPU, the model answers as transformers' eager one; the manifest names the architecture,
    the attention kernel it was traced with, its inputs, labels and special tokens."""
    import transformers

    source = arch_model_dir(architecture, task)
    seq = 32 if task == "question-answering" else 16    # room for a question in the small vocabularies' tokens
    manifest = compiler.compile_model(source, tmp_path / "out", name=architecture, task=task, backend="cpu",
                                      target="cpu", batch_sizes=[1, 2], sequence_lengths=[seq])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / manifest.tokenizer)
    eager = reference(task, source, manifest.input_names,
                      **({"pooling": manifest.pooling, "normalize": manifest.normalize}
                         if task == "feature-extraction" else {}))

    assert manifest.architecture == architecture
    assert manifest.attn_implementation == ("eager" if architecture in EAGER_ONLY else "sdpa")
    assert manifest.input_names == ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if architecture in TOKEN_TYPES else [])
    assert manifest.special == {"mask": tokenizer.mask_token_id}
    config = eager.model.config
    labels = {str(i): label for i, label in config.id2label.items()}
    assert manifest.labels == (labels if task in compiler.LABELLED_TASKS else {})
    if task == "zero-shot-classification":
        assert labels[str(manifest.entailment)] == "entailment"
    assert_serves_as_reference(tmp_path / "out", manifest, eager, items_for(task, tokenizer), tokenizer)


@pytest.mark.parametrize("architecture, kind, model, layout", [
    ("bert", "BertTokenizer", "WordPiece", "[CLS] x [SEP] x [SEP]"),
    ("distilbert", "DistilBertTokenizer", "WordPiece", "[CLS] x [SEP] x [SEP]"),
    ("electra", "BertTokenizer", "WordPiece", "[CLS] x [SEP] x [SEP]"),
    ("mpnet", "MPNetTokenizer", "WordPiece", "<s> x </s> </s> x </s>"),
    ("roberta", "RobertaTokenizer", "BPE", "<s> x </s> </s> x </s>"),
    ("modernbert", "TokenizersBackend", "BPE", "[CLS] x [SEP] x [SEP]"),
    ("xlm-roberta", "XLMRobertaTokenizer", "Unigram", "<s> x </s> </s> x </s>"),
    ("camembert", "CamembertTokenizer", "Unigram", "<s> x </s> </s> x </s>"),
    ("albert", "AlbertTokenizer", "Unigram", "[CLS] x [SEP] x [SEP]"),
    ("deberta-v2", "DebertaV2Tokenizer", "Unigram", "[CLS] x [SEP] x [SEP]"),
])
def test_random_models_have_their_familys_tokenizer(arch_model_dir, architecture, kind, model, layout):
    """As the published checkpoints have: the architecture's own tokenizer class, its kind of vocabulary, its
    special tokens around a pair, token_type_ids only where the model takes them; the model's vocabulary is the
    tokenizer's."""
    import transformers

    source = arch_model_dir(architecture, "feature-extraction")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    assert (type(tokenizer).__name__, tokenizer.is_fast) == (kind, True)
    assert json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] == model
    assert transformers.AutoConfig.from_pretrained(source).vocab_size == len(tokenizer)
    encoded = tokenizer("a word", "another")
    marks = [t if t in (tokenizer.cls_token, tokenizer.sep_token) else "x"
             for t in tokenizer.convert_ids_to_tokens(encoded["input_ids"])]
    assert " ".join(m for i, m in enumerate(marks) if not (m == "x" and marks[i - 1] == "x")) == layout
    assert ("token_type_ids" in encoded) == (architecture in TOKEN_TYPES)
    assert tokenizer.mask_token_id is not None


# ---------------------------------------------------------------- sentence-transformers models

ST_CASES = [
    # all-mpnet-base-v2's shape: mean pooling, normalized
    pytest.param("mpnet", "mean", (), True, id="mpnet-mean-normalize"),
    pytest.param("bert", "cls", ((16, True, torch.nn.Tanh),), True, id="bert-cls-dense-normalize"),
    pytest.param("roberta", "max", ((24, False, None), (16, True, torch.nn.GELU)), False, id="roberta-max-dense2"),
    pytest.param("modernbert", "lasttoken", ((16, True, torch.nn.Tanh),), True, id="modernbert-lasttoken-dense"),
]
TEXTS = ["Fine.", "A man is eating food.", "The cat sits on the mat while the dog sleeps by the door.",
         "A long text that sentence-transformers and the compiled model both cut at the same token " * 3]


@pytest.mark.parametrize("architecture, pooling, dense, normalize", ST_CASES)
def test_sentence_transformers_models_embed_as_sentence_transformers(tmp_path, architecture, pooling, dense,
                                                                     normalize):
    st = pytest.importorskip("sentence_transformers")
    import transformers

    source = random_models.build_sentence_transformer(tmp_path / "st", architecture, pooling=pooling, dense=dense,
                                                      normalize=normalize, max_seq_length=16)
    manifest = compiler.compile_model(source, tmp_path / "out", name="st", task="feature-extraction",
                                      backend="cpu", target="cpu", batch_sizes=[1, 2], sequence_lengths=[16])
    assert (manifest.pooling, manifest.normalize) == (pooling, normalize)
    assert manifest.dense == [
        {"in_features": i, "out_features": o,
         "activation": f"{(a or torch.nn.Identity).__module__}.{(a or torch.nn.Identity).__name__}"}
        for i, (o, _, a) in zip([32] + [d[0] for d in dense], dense)]
    expected = torch.from_numpy(st.SentenceTransformer(str(source), device="cpu").encode(TEXTS))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / manifest.tokenizer)
    encoded = tasks.encode("feature-extraction", tokenizer, TEXTS, 16, truncation=True)
    for bucket in manifest.buckets:
        traced = torch.jit.load(str(tmp_path / "out" / bucket.file)).eval()
        for start in range(0, len(TEXTS), bucket.batch):
            chunk = encoded[start:start + bucket.batch]
            arrays = tasks.pad(chunk, bucket.batch, bucket.seq, manifest.input_names)
            with torch.no_grad():
                [got] = traced(*(torch.from_numpy(a) for a in arrays))
            assert torch.allclose(got[:len(chunk)], expected[start:start + len(chunk)], atol=1e-4), bucket.file


@pytest.fixture(scope="module")
def st_source(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    return random_models.build_sentence_transformer(tmp_path_factory.mktemp("st") / "st", "bert", pooling="mean",
                                                    dense=((16, True, torch.nn.Tanh),), normalize=True)


def _module(directory, kind: str) -> dict:
    return next(m for m in json.loads((directory / "modules.json").read_text()) if m["type"].endswith(kind))


def _custom_module(directory):
    modules = json.loads((directory / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "whiten", "path": "", "type": "my_package.modules.Whitening"})
    (directory / "modules.json").write_text(json.dumps(modules))


def _layer_norm(directory):
    modules = json.loads((directory / "modules.json").read_text())
    modules.append({"idx": 9, "name": "9", "path": "9_LayerNorm",
                    "type": "sentence_transformers.models.LayerNorm"})
    (directory / "modules.json").write_text(json.dumps(modules))


def _normalize_first(directory):
    modules = json.loads((directory / "modules.json").read_text())
    modules[2], modules[3] = modules[3], modules[2]
    (directory / "modules.json").write_text(json.dumps(modules))


def _edit(kind: str, **changes):
    def edit(directory):
        path = directory / _module(directory, kind)["path"] / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


@pytest.mark.parametrize("damage, message", [
    (_custom_module, r"module 'whiten' \(my_package.modules.Whitening\) is not one neuronserve can reproduce"),
    (_layer_norm, r"module '9' \(sentence_transformers.models.LayerNorm\) is not one neuronserve can reproduce"),
    (_normalize_first, r"module '2' \(.*Dense\) comes after a module it must precede"),
    (_edit("Pooling", pooling_mode="weightedmean"), r"pooling weightedmean is not supported"),
    (_edit("Pooling", pooling_mode=["mean", "max"]), r"pooling mean\+max is not supported"),
    (_edit("Dense", activation_function="my_package.Swish"), r"activation 'my_package.Swish' is not a torch.nn"),
    (_edit("Dense", use_residual=True), r"a Dense layer with use_residual True is not supported"),
], ids=["custom", "layer-norm", "order", "weightedmean", "concatenated", "activation", "residual"])
def test_modules_it_cannot_reproduce_are_refused_by_name(st_source, tmp_path, damage, message):
    source = tmp_path / "st"
    shutil.copytree(st_source, source)
    damage(source)
    with pytest.raises(ArtifactError, match=message):
        compiler.compile_model(source, tmp_path / "out", name="st", task="feature-extraction", backend="cpu",
                               target="cpu", batch_sizes=[1], sequence_lengths=[16])
    assert not (tmp_path / "out").exists()


def test_buckets_past_sentence_transformers_max_seq_length_are_refused(st_source, tmp_path):
    """sentence-transformers cuts text at max_seq_length: a longer bucket would embed long text differently."""
    source = tmp_path / "st"
    shutil.copytree(st_source, source)
    config = json.loads((source / "sentence_bert_config.json").read_text())
    (source / "sentence_bert_config.json").write_text(json.dumps({**config, "max_seq_length": 16}))
    with pytest.raises(ConfigError, match="sequence length 32 is over the max_seq_length 16 of .*use sequence "
                                          "lengths up to 16"):
        compiler.compile_model(source, tmp_path / "out", name="st", task="feature-extraction", backend="cpu",
                               target="cpu", batch_sizes=[1], sequence_lengths=[16, 32])


def test_older_pooling_configs_are_read(st_source, tmp_path):
    """sentence-transformers before 5 wrote pooling_mode_* flags; with none set it pools by mean."""
    source = tmp_path / "st"
    shutil.copytree(st_source, source)
    pooling = source / _module(source, "Pooling")["path"] / "config.json"
    for flags, mode in [({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, "max"),
                        ({"pooling_mode_cls_token": False}, "mean")]:
        pooling.write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
        assert compiler._embedding_options(source, 32)[0]["pooling"] == mode


# ---------------------------------------------------------------- loading: the attention kernel and the errors

def test_a_kernel_the_backend_prefers_but_cannot_have_falls_back_to_eager(arch_model_dir, tmp_path, monkeypatch):
    from neuronserve.build.backends import cpu

    monkeypatch.setattr(cpu.CpuBackend, "attn_implementation", "flash_attention_2")   # not installed here
    manifest = compiler.compile_model(arch_model_dir("bert", "text-classification"), tmp_path / "out", name="m",
                                      task="text-classification", backend="cpu", target="cpu", batch_sizes=[1],
                                      sequence_lengths=[16])
    assert manifest.attn_implementation == "eager"


def test_load_errors_name_their_cause(arch_model_dir, tmp_path):
    source = tmp_path / "damaged"
    shutil.copytree(arch_model_dir("mpnet", "text-classification"), source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"damaged: cannot load the mpnet model: SafetensorError: "):
        compiler.compile_model(source, tmp_path / "out", name="m", task="text-classification", backend="cpu",
                               target="cpu", batch_sizes=[1], sequence_lengths=[16])


@pytest.mark.skipif("zero-shot-classification" not in tasks.TASKS, reason="no zero-shot task in the registry")
def test_zero_shot_needs_an_entailment_label(arch_model_dir, tmp_path):
    source = arch_model_dir("roberta", "zero-shot-classification", labels=("NEGATIVE", "POSITIVE"))
    with pytest.raises(ArtifactError, match=r"no entailment label among its labels \(NEGATIVE, POSITIVE\)"):
        compiler.compile_model(source, tmp_path / "out", name="m", task="zero-shot-classification", backend="cpu",
                               target="cpu", batch_sizes=[1], sequence_lengths=[16])
    assert not (tmp_path / "out").exists()
