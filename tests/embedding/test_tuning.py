"""Query-encoder tuning on tiny models: the differentiable query side equals the Encoder,
training lowers the loss, freezing is exact, and the saved folder reloads as is."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from embedding.codec import ResidualCodec
from embedding.encoder import Encoder
from embedding.model import fingerprint, load_model, read_settings
from embedding.mrl import truncate
from embedding.tuning import (
    DenseDocs,
    QueryTower,
    TokenDocs,
    TrainConfig,
    TrainingData,
    batch_candidates,
    match_freeze,
    parameter_changes,
    save_query_encoder,
    train_query_encoder,
)
from fixtures_models import MULTILINGUAL_TEXTS

TEXTS = [t for lang in ("en", "de", "fr", "es") for t in MULTILINGUAL_TEXTS[lang][:8]]
LONG = " ".join(MULTILINGUAL_TEXTS["en"]) * 3  # longer than every limit below


def _queries() -> list[str]:
    return [" ".join(t.split()[:4]) for t in TEXTS] + [LONG, "x"]


def _load(path, **changes):
    settings = read_settings(path).replace(**changes) if changes else None
    return load_model(path, settings, device="cpu", precision="float32")


# ---- the query side equals the Encoder --------------------------------------------------
@pytest.mark.parametrize("changes, dim", [({}, None), ({"query_prefix": "query: ", "max_length": 12}, None),
                                          ({"pooling": "cls", "max_length": 9}, 16)])
def test_dense_tower_equals_encode_queries(tiny_model_dir, changes, dim):
    lm = _load(tiny_model_dir, **changes)
    expected = truncate(Encoder(lm, max_batch=5).encode_queries(_queries()), dim)
    tower = QueryTower(lm, colbert=False, dim=dim)
    with torch.no_grad():
        got = tower(_queries()).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert tower(_queries()[:2]).requires_grad  # the same path, differentiable


@pytest.mark.parametrize("fixture, changes", [("tiny_colbert_dir", {}),
                                              ("tiny_colbert_dir", {"attend_to_mask_tokens": True}),
                                              ("tiny_pylate_dir", {"query_maxlen": 8}),
                                              ("tiny_model_dir", {"query_augmentation": False})])
def test_colbert_tower_equals_encode_queries_colbert(request, fixture, changes):
    path = request.getfixturevalue(fixture)
    lm = _load(path, **changes)
    expected = Encoder(lm, max_batch=5).encode_queries_colbert(_queries())
    with torch.no_grad():
        got = QueryTower(lm, colbert=True)(_queries()).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5)


# ---- planners and checks -----------------------------------------------------------------
def test_batch_candidates_mask_padding_duplicates_and_own_positives():
    data = TrainingData(["a", "b", "c"], [np.array([0, 1]), np.array([2]), np.array([1])],
                        [np.array([5, 2]), np.array([6]), np.array([0, 7])])
    batch = np.array([[0, 0], [1, 2], [2, 1]])
    unique, cand, valid = batch_candidates(data, batch, n_negatives=2, in_batch=True)
    rows = unique[cand]
    assert cand.shape == (3, 1 + 2 + 2)
    assert list(rows[:, 0]) == [0, 2, 1]             # the positive first
    # query 0: negatives 5, 2; in-batch 2 (duplicate of its negative) and 1 (its own other positive)
    assert list(valid[0]) == [True, True, True, False, False]
    # query 1: one mined negative (padding), in-batch 0 and 1
    assert list(valid[1]) == [True, True, False, True, True] and rows[1, 1] == 6
    assert set(unique) == {0, 1, 2, 5, 6, 7}
    _, cand, valid = batch_candidates(data, batch, n_negatives=1, in_batch=False)
    assert cand.shape == (3, 2)


def test_freeze_patterns_and_config_checks():
    names = ["encoder.layer.0.output.dense.weight", "encoder.layer.0.attention.output.dense.weight",
             "embeddings.word_embeddings.weight"]
    m = match_freeze(names, ("*output.dense.weight",))
    assert m["*output.dense.weight"] == names[:2]    # fnmatch: '*' crosses dots
    with pytest.raises(ValueError, match="match no parameter.*typo"):
        match_freeze(names, ("*ouput.dense.weight",))
    with pytest.raises(ValueError, match="nothing left to train"):
        match_freeze(names, ("*",))
    for bad in ({"lr": 0}, {"lr": -1e-8}, {"lr": float("nan")}, {"batch_size": 0}, {"temperature": 0},
                {"warmup_ratio": 1.0}, {"freeze": ("",)}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# ---- training ------------------------------------------------------------------------------
def _dense_setup(path):
    lm = _load(path)
    docs = Encoder(lm).encode_documents(TEXTS).dense
    n = len(TEXTS)
    rng = np.random.default_rng(0)
    negatives = [np.array([j for j in rng.permutation(n) if j != i][:3]) for i in range(n)]
    data = TrainingData(_queries()[:n], [np.array([i]) for i in range(n)], negatives)
    return lm, DenseDocs(docs), data


def test_training_lowers_the_loss_and_freezes_exactly(tiny_model_dir):
    lm, docs, data = _dense_setup(tiny_model_dir)
    base = {k: v.detach().clone() for k, v in lm.model.named_parameters()}
    cfg = TrainConfig(lr=2e-3, steps=12, batch_size=8, warmup_ratio=0.0, freeze=("*output.dense.weight",))
    model, stats = train_query_encoder(lm, data, docs, cfg, n_negatives=3)
    assert stats["steps"] == 12 and stats["loss_after"] < stats["loss_before"] - 0.05, stats
    changes = parameter_changes(model, base)
    frozen = set(stats["frozen"])
    assert frozen == {n for n in base if n.endswith("output.dense.weight")} and len(frozen) == 4
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, base[name]), name
    # every parameter in the graph moved; the pooler is not used for queries
    assert set(changes["changed"]) == {n for n in base if n not in frozen and not n.startswith("pooler.")}
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_adiabatic_step_is_tiny_and_deterministic(tiny_model_dir):
    moved = []
    for _ in range(2):
        lm, docs, data = _dense_setup(tiny_model_dir)
        base = {k: v.detach().clone() for k, v in lm.model.named_parameters()}
        model, _ = train_query_encoder(lm, data, docs, TrainConfig(steps=3, batch_size=8), n_negatives=3)
        moved.append(parameter_changes(model, base))
    assert moved[0] == moved[1]
    assert 0 < moved[0]["max_abs_change"] < 1e-6 and moved[0]["tensors_changed"] > 0


def test_colbert_training_on_decompressed_tokens(tiny_colbert_dir):
    lm = _load(tiny_colbert_dir)
    tokens = Encoder(lm).encode_documents(TEXTS, dense=False, colbert=True).tokens
    flat = np.concatenate(tokens)
    codec = ResidualCodec.fit(flat, 4, 16, seed=0)
    codes, residuals = codec.compress(flat)
    docs = TokenDocs(codec, codes, residuals, np.array([len(t) for t in tokens]))
    vecs, mask = docs(np.array([3, 0]))
    assert vecs.shape == (2, max(len(tokens[3]), len(tokens[0])), 16) and int(mask[1].sum()) == len(tokens[0])
    n = len(TEXTS)
    data = TrainingData(_queries()[:n], [np.array([i]) for i in range(n)],
                        [np.array([(i + 1) % n, (i + 5) % n]) for i in range(n)])
    _, stats = train_query_encoder(lm, data, docs, TrainConfig(lr=2e-3, steps=10, batch_size=8,
                                                               warmup_ratio=0.0), n_negatives=2)
    assert stats["loss_after"] < stats["loss_before"], stats
    assert lm.projection.weight.grad is None          # the projection stays as stored


# ---- saving --------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_colbert_dir"])
def test_saved_folder_reloads_with_transformers(request, fixture, tmp_path):
    from transformers import AutoModel

    path = request.getfixturevalue(fixture)
    lm, docs, data = _dense_setup(path)
    model, _ = train_query_encoder(lm, data, docs, TrainConfig(lr=1e-3, steps=2, batch_size=8), n_negatives=3)
    settings = dataclasses.replace(lm.settings, query_prefix="q: ")
    out = save_query_encoder(path, model, settings, tmp_path / "tuned")
    reloaded = AutoModel.from_pretrained(str(out), local_files_only=True)
    for name, p in model.named_parameters():
        assert torch.equal(reloaded.state_dict()[name], p), name
    assert read_settings(out) == settings
    assert json.loads((out / "tessera_encoder.json").read_text())["query_prefix"] == "q: "
    assert fingerprint(out, settings) != fingerprint(path, settings)
    again = load_model(out, device="cpu", precision="float32")
    if lm.projection is not None:   # Stanford layout: linear.weight kept next to the tuned BERT weights
        assert torch.equal(again.projection.weight, lm.projection.weight)
    q = _queries()[:3]
    np.testing.assert_allclose(Encoder(again).encode_queries(q),
                               Encoder(dataclasses.replace(lm, settings=settings)).encode_queries(q), atol=1e-6)
