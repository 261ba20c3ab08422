"""Encoders on tiny checkpoints: pooling, prefixes, MRL, ColBERT projection, markers, augmentation, skiplist."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from embedding.encoder import Encoder
from embedding.model import EncoderSettings, ModelError, fingerprint, load_model, read_settings, resolve_precision
from embedding.mrl import truncate

TEXTS = ["The river flows into the sea.", "Der Fluss mündet in die Nordsee!", "火山は噴火する。"]


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return Encoder(load_model(tiny_model_dir, device="cpu", precision="float32"))


def test_dense_mean_pooling_matches_manual(plain):
    lm = plain.lm
    vecs = plain.encode_documents(TEXTS).dense
    assert vecs.shape == (3, 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    enc = lm.tokenizer(TEXTS[1], return_tensors="pt")
    with torch.no_grad():
        hidden = lm.model(**enc).last_hidden_state[0]
    manual = hidden.mean(0).numpy()
    np.testing.assert_allclose(vecs[1], manual / np.linalg.norm(manual), atol=1e-5)


def test_length_bucketing_keeps_input_order(plain):
    texts = [t * (i + 1) for i, t in enumerate(TEXTS * 3)]
    together = plain.encode_documents(texts).dense
    one_by_one = np.stack([plain.encode_documents([t]).dense[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_mrl_truncation_renormalises():
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float16)
    t = truncate(x, 8)
    assert t.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(t, x[:, :8] / np.linalg.norm(x[:, :8].astype(np.float32), axis=1, keepdims=True),
                               atol=1e-3)
    with pytest.raises(ValueError, match="not in 1..32"):
        truncate(x, 33)


def test_prefixes_and_queries_differ(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (folder / "tessera_encoder.json").write_text(json.dumps({"query_prefix": "query: ", "passage_prefix": "passage: "}))
    enc = Encoder(load_model(folder, device="cpu", precision="float32"))
    q = enc.encode_queries([TEXTS[0]])[0]
    d = enc.encode_documents([TEXTS[0]]).dense[0]
    assert not np.allclose(q, d)
    assert fingerprint(folder, read_settings(folder)) != fingerprint(tiny_model_dir, read_settings(tiny_model_dir))


def test_colbert_documents_skip_punctuation_and_truncate(tiny_model_dir):
    enc = Encoder(load_model(tiny_model_dir, EncoderSettings(doc_maxlen=12), device="cpu", precision="float32"))
    out = enc.encode_documents(["a b c d e f g h i j k l m n", "river , , , ! ! sea"], dense=False, colbert=True)
    assert out.truncated.tolist() == [True, False]
    assert len(out.tokens[0]) == 12                     # [CLS] + 10 words + [SEP] at doc_maxlen 12
    assert len(out.tokens[1]) == 7                      # [CLS] r ##ive ##r se ##a [SEP]: punctuation dropped
    np.testing.assert_allclose(np.linalg.norm(out.tokens[1], axis=1), 1.0, atol=1e-5)
    keep = Encoder(load_model(tiny_model_dir, EncoderSettings(skip_punctuation=False), device="cpu"))
    assert len(keep.encode_documents(["river , , , ! ! sea"], dense=False, colbert=True).tokens[0]) == 12


def test_query_augmentation_pads_with_mask_tokens(plain):
    q = plain.encode_queries_colbert(["river", "a much longer question about rivers and seas"])
    assert q.shape == (2, 32, 32)
    # every position, the [MASK] expansion included, carries a unit vector
    np.testing.assert_allclose(np.linalg.norm(q, axis=2), 1.0, atol=1e-5)


def test_stanford_colbert_projection_and_markers(tiny_colbert_dir):
    lm = load_model(tiny_colbert_dir, device="cpu", precision="float32")
    assert lm.projection is not None and lm.colbert_dim == 16
    assert lm.settings.query_marker == "[unused0]" and lm.settings.doc_marker == "[unused1]"
    enc = Encoder(lm)
    ids, _ = enc.tokenize(["river"], 32, enc.doc_marker_id)
    assert ids[0][1] == lm.tokenizer.convert_tokens_to_ids("[unused1]")
    docs = enc.encode_documents(TEXTS, dense=True, colbert=True)
    assert docs.dense.shape == (3, 32) and docs.tokens[0].shape[1] == 16
    q = enc.encode_queries_colbert(["river"])
    assert q.shape == (1, lm.settings.query_maxlen, 16)


def test_pylate_dense_module_and_prefix_tokens(tiny_pylate_dir):
    lm = load_model(tiny_pylate_dir, device="cpu", precision="float32")
    assert lm.projection is not None and lm.colbert_dim == 16
    assert lm.settings.query_prefix == "[Q] " and lm.settings.passage_prefix == "[D] "
    enc = Encoder(lm)
    docs = enc.encode_documents(["river"], dense=False, colbert=True)
    assert docs.tokens[0].shape[1] == 16


def test_model_without_weights_is_refused(tiny_model_no_weights_dir, tmp_path):
    with pytest.raises(ModelError, match="has no weights"):
        load_model(tiny_model_no_weights_dir)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")


# ---- tokenizer snapshots --------------------------------------------------------------
def _snapshots(cache) -> list:
    return sorted((cache / "tokenizers").glob("*.pkl"))


def _fresh(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def test_tokenizer_snapshot_is_reused_and_tokenizes_identically(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    from embedding import model as model_mod

    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    first = model_mod.load_tokenizer(tiny_model_dir)
    (snap,) = _snapshots(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained called although a snapshot exists")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    second = model_mod.load_tokenizer(tiny_model_dir)
    monkeypatch.undo()
    fresh = _fresh(tiny_model_dir)
    texts = TEXTS + list(model_mod.TOKENIZER_PROBES)
    assert second is not first and type(second) is type(fresh)
    assert second(texts)["input_ids"] == fresh(texts)["input_ids"] == first(texts)["input_ids"]
    assert second.name_or_path == str(tiny_model_dir)
    assert _snapshots(tmp_path) == [snap]


def test_tokenizer_snapshot_follows_the_files(tiny_model_dir, tmp_path, monkeypatch):
    """An edited tokenizer file gets a snapshot of its own; the old one is not used for it."""
    from embedding import model as model_mod

    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    before = model_mod.load_tokenizer(d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 77
    cfg_path.write_text(json.dumps(cfg))
    after = model_mod.load_tokenizer(d)
    assert before.model_max_length != 77 and after.model_max_length == 77
    assert len(_snapshots(tmp_path / "cache")) == 2


def test_unreadable_tokenizer_snapshot_is_replaced(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from embedding import model as model_mod

    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    model_mod.load_tokenizer(tiny_model_dir)
    (snap,) = _snapshots(tmp_path)
    snap.write_bytes(b"not a pickle")
    with caplog.at_level("WARNING", logger="embedding.model"):
        tok = model_mod.load_tokenizer(tiny_model_dir)
    assert "unreadable" in caplog.text and str(snap) in caplog.text
    assert tok(TEXTS)["input_ids"] == _fresh(tiny_model_dir)(TEXTS)["input_ids"]
    assert snap.read_bytes() != b"not a pickle"
    assert model_mod.load_tokenizer(tiny_model_dir)(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]


def test_tokenizer_cache_can_be_turned_off(tiny_model_dir, tmp_path, monkeypatch):
    from embedding import model as model_mod

    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TESSERA_TOKENIZER_CACHE", "off")
    assert model_mod.tokenizer_cache_dir() is None
    load_model(tiny_model_dir, device="cpu", precision="float32")
    assert not (tmp_path / "tokenizers").exists()


def test_unwritable_tokenizer_cache_only_costs_time(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from embedding import model as model_mod

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(blocker))
    with caplog.at_level("WARNING", logger="embedding.model"):
        tok = model_mod.load_tokenizer(tiny_model_dir)
    assert "not written" in caplog.text
    assert tok(TEXTS)["input_ids"] == _fresh(tiny_model_dir)(TEXTS)["input_ids"]


def test_me5_tokenizer_snapshot_gives_the_same_ids_on_xquad(me5_small_dir, shared_data_dir, tmp_path, monkeypatch):
    """The real XLM-R tokenizer: a snapshot-loaded copy tokenizes every XQuAD paragraph and
    question of all 12 languages like a fresh ``AutoTokenizer`` load (vectors depend on it)."""
    from embedding import model as model_mod

    texts = []
    for path in sorted((shared_data_dir / "xquad").glob("xquad.*.json")):
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for para in article["paragraphs"]:
                texts.append(para["context"])
                texts += [qa["question"] for qa in para["qas"]]
    assert len(texts) > 10_000
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    model_mod.load_tokenizer(me5_small_dir)
    cached = model_mod.load_tokenizer(me5_small_dir)
    fresh = _fresh(me5_small_dir)
    assert cached(texts, truncation=True, max_length=512)["input_ids"] == \
        fresh(texts, truncation=True, max_length=512)["input_ids"]


# ---- precision -------------------------------------------------------------------------
@pytest.mark.parametrize("native, want", [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_on_cpu_follows_native_bfloat16(monkeypatch, native, want):
    from embedding import codec

    monkeypatch.setattr(codec, "native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == want
    assert resolve_precision("float32", "cpu") == "float32"       # asked for: kept, whatever the CPU
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"


def test_float16_on_cpu_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="float16 runs on CUDA only, not on cpu"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, float16, got 'half'"):
        resolve_precision("half", "cpu")


def test_bfloat16_encoder_is_close_to_float32(tiny_model_dir, tiny_colbert_dir):
    """A bfloat16 encoder runs in bfloat16 and gives float32 arrays within rounding of float32's."""
    for folder in (tiny_model_dir, tiny_colbert_dir):
        full = Encoder(load_model(folder, device="cpu", precision="float32"))
        half = Encoder(load_model(folder, device="cpu", precision="bfloat16"))
        assert next(half.lm.model.parameters()).dtype == torch.bfloat16
        assert next(full.lm.model.parameters()).dtype == torch.float32
        a = full.encode_documents(TEXTS, dense=True, colbert=True)
        b = half.encode_documents(TEXTS, dense=True, colbert=True)
        assert b.dense.dtype == np.float32 and b.tokens[0].dtype == np.float32
        assert np.all(np.sum(a.dense * b.dense, axis=1) > 0.99)
        for x, y in zip(a.tokens, b.tokens):
            assert x.shape == y.shape and np.all(np.sum(x * y, axis=1) > 0.98)
        assert not np.array_equal(a.dense, b.dense)                  # it did run in bfloat16


def _bin_copy(src, dst):
    """``src`` with its safetensors weights saved as a pickled ``pytorch_model.bin`` instead."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        torch.save(load_file(str(path)), path.with_name("pytorch_model.bin"))
        path.unlink()
    return dst


def test_projection_shape_is_the_loaded_projections(tiny_model_dir, tiny_colbert_dir, tiny_pylate_dir, tmp_path):
    """The driver's torch-free size of a ColBERT projection (``projection_shape``, from the
    weights' header) is the shape of the layer ``load_projection`` builds, for each layout;
    a wrong width is the same error in both."""
    from safetensors.torch import load_file, save_file

    from embedding.model import load_projection, projection_shape
    from fixtures_models import build_tiny_colbert

    layouts = {"stanford": tiny_colbert_dir, "pylate": tiny_pylate_dir,
               "stanford .bin": _bin_copy(tiny_colbert_dir, tmp_path / "bin")}
    for name, d in layouts.items():
        layer = load_projection(d, 32)
        assert projection_shape(d, 32) == tuple(layer.weight.shape) == (16, 32), name
    assert projection_shape(tiny_model_dir, 32) is None and load_projection(tiny_model_dir, 32) is None
    odd = build_tiny_colbert(tmp_path / "odd")
    weights = next(odd.glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors["linear.weight"] = torch.zeros(16, 24)
    save_file(tensors, str(weights))
    for probe in (load_projection, projection_shape):
        with pytest.raises(ModelError, match=r"projection has shape \(16, 24\), expected \(dim, 32\)"):
            probe(odd, 32)


def test_describing_a_model_imports_no_torch(tiny_colbert_dir, tiny_pylate_dir):
    """``jobs.embed.describe_model`` (the embed and re-index drivers') reads the projection's
    size without torch: the dimensions load_model gives, in a process that never imports it."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import json, sys
from jobs.embed import EmbedConfig, describe_model
dims = [describe_model(EmbedConfig(corpus=("x.jsonl",), model=d, set_name="t")).colbert_dim
        for d in ({str(tiny_colbert_dir)!r}, {str(tiny_pylate_dir)!r})]
print(json.dumps({{"dims": dims, "torch": "torch" in sys.modules}}))
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"dims": [16, 16], "torch": False}
    assert [load_model(d, device="cpu").colbert_dim for d in (tiny_colbert_dir, tiny_pylate_dir)] == [16, 16]
