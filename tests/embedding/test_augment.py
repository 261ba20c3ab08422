"""xQG augmentation arithmetic on hand-made vectors, and augmented sets stored and indexed."""
from __future__ import annotations

import numpy as np
import pytest

from embedding.augment import augment_dense, augment_tokens, check_weight, interleave, query_means, select_queries
from embedding.codec import ResidualCodec
from embedding.mrl import truncate
from indexing import dense as dense_index
from indexing.plaid import CentroidIndex
from storage import schemas
from storage.fs import Location


def unit(*v):
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


def test_dense_weighted_mean_by_hand():
    p = np.stack([unit(1, 0, 0, 0), unit(0, 1, 0, 0), unit(0, 0, 1, 0)])
    q = np.stack([unit(0, 1, 0, 0), unit(0, 0, 1, 0), unit(0, 0, 0, 1)])
    owner = np.array([0, 0, 1])
    got = augment_dense(p, q, owner, weight=0.5)
    # passage 0: 0.5*(1,0,0,0) + 0.5*mean((0,1,0,0),(0,0,1,0)) = (.5,.25,.25,0) -> /sqrt(.375)
    np.testing.assert_allclose(got[0], np.array([.5, .25, .25, 0]) / np.sqrt(.375), rtol=1e-6)
    # passage 1: 0.5*(0,1,0,0) + 0.5*(0,0,0,1) -> (0, 1, 0, 1)/sqrt(2)
    np.testing.assert_allclose(got[1], unit(0, 1, 0, 1), rtol=1e-6)
    np.testing.assert_array_equal(got[2], p[2])  # no queries: unchanged
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-6)


def test_dense_weight_extremes_and_weight_check():
    rng = np.random.default_rng(0)
    p = truncate(rng.normal(size=(4, 8)))
    q = truncate(rng.normal(size=(6, 8)))
    owner = np.array([0, 0, 1, 2, 2, 2])
    np.testing.assert_allclose(augment_dense(p, q, owner, 1.0), p, atol=1e-6)
    means, counts = query_means(q, owner, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    only_q = augment_dense(p, q, owner, 0.0)
    np.testing.assert_allclose(only_q[:3], truncate(means[:3]), atol=1e-6)
    np.testing.assert_allclose(only_q[3], p[3], atol=1e-6)
    for bad in (-0.1, 1.5, "0.5"):
        with pytest.raises(ValueError, match="weight"):
            check_weight(bad)
    with pytest.raises(ValueError, match="owner"):
        augment_dense(p, q, np.array([0, 0, 1, 2, 2, 9]), 0.5)


def test_dense_augmented_vectors_are_mrl_truncatable():
    rng = np.random.default_rng(1)
    p = truncate(rng.normal(size=(3, 16)).astype(np.float16))
    q = truncate(rng.normal(size=(5, 16)))
    owner = np.array([0, 1, 1, 2, 2])
    full = augment_dense(p, q, owner, 0.7)
    np.testing.assert_allclose(np.linalg.norm(truncate(full, 8), axis=1), 1, rtol=1e-5)
    # dim= mixes the MRL prefixes (each truncated and re-normalised first), by hand for passage 0
    pre = augment_dense(p, q, owner, 0.7, dim=8)
    expect = 0.7 * truncate(p, 8)[0] + 0.3 * truncate(q, 8)[0]
    np.testing.assert_allclose(pre[0], expect / np.linalg.norm(expect), rtol=1e-5)


def test_tokens_appended_with_cap():
    p = [np.ones((3, 2), np.float32), np.full((2, 2), 2, np.float32)]
    q = [np.full((2, 2), 10, np.float32), np.full((3, 2), 20, np.float32), np.full((1, 2), 30, np.float32)]
    owner = np.array([0, 0, 1])
    got = augment_tokens(p, q, owner, cap=None)
    assert [len(t) for t in got] == [3 + 2 + 3, 2 + 1]
    np.testing.assert_array_equal(got[0][:3], p[0])  # passage tokens first, unchanged
    np.testing.assert_array_equal(got[0][3:5], q[0])
    capped = augment_tokens(p, q, owner, cap=4)
    assert [len(t) for t in capped] == [3 + 4, 2 + 1]  # 2 of query 0, then 2 of query 1's 3
    np.testing.assert_array_equal(capped[0][5:], q[1][:2])
    assert [len(t) for t in augment_tokens(p, q, owner, cap=0)] == [3, 2]
    with pytest.raises(ValueError, match="cap"):
        augment_tokens(p, q, owner, cap=-1)


def test_select_and_interleave():
    owner = np.array([0, 0, 0, 0, 1, 1])
    langs = ["de", "de", "fr", "fr", "de", "de"]
    assert select_queries(owner, langs, 1).tolist() == [0, 2, 4]
    assert select_queries(owner, langs, None).tolist() == list(range(6))
    # passage 0: first de, first fr, second de, second fr
    assert interleave(owner, langs).tolist() == [0, 2, 1, 3, 4, 5]


def test_augmented_and_plain_vectors_both_stored_and_indexed(tmp_path):
    """One set holds both; each reads back and builds a flat and a PLAID index that find
    what the arithmetic says they should."""
    rng = np.random.default_rng(2)
    n, d = 40, 16
    p = truncate(rng.normal(size=(n, d)))
    q = truncate(rng.normal(size=(n, d)))  # one query per passage, unrelated to it
    owner = np.arange(n)
    aug = augment_dense(p, q, owner, 0.5)
    ids = [f"doc-{i}" for i in range(n)]
    for kind, vectors in (("dense", p), ("dense_aug", aug)):
        loc = Location(str(tmp_path / kind / "part-00000.parquet"))
        schemas.write_table(loc, schemas.dense_table(ids, vectors))
    back = {k: schemas.dense_matrix(schemas.read_table(Location(str(tmp_path / k / "part-00000.parquet"))))
            for k in ("dense", "dense_aug")}
    params = dense_index.DenseIndexParams("flat", d)
    hits = {}
    for kind, m in back.items():
        index = dense_index.train(params, truncate(m))
        dense_index.add(index, truncate(m), 0)
        hits[kind] = dense_index.search(index, params, q[:10], 1)[1][:, 0]
    assert (hits["dense_aug"] == np.arange(10)).all()  # the query now finds its passage
    assert (hits["dense"] != np.arange(10)).sum() >= 5  # and mostly did not before

    tokens = [truncate(rng.normal(size=(int(rng.integers(3, 8)), d))) for _ in range(n)]
    q_tokens = [truncate(rng.normal(size=(4, d))) for _ in range(n)]
    aug_tokens = augment_tokens(tokens, q_tokens, owner, cap=4)
    codec = ResidualCodec.fit(np.concatenate(tokens + q_tokens), nbits=4, n_centroids=16)
    indexes = {}
    for kind, docs in (("tokens", tokens), ("tokens_aug", aug_tokens)):
        codes, residuals = zip(*(codec.compress(t) for t in docs))
        table = schemas.tokens_table(ids, list(codes), list(residuals), codec.code_dtype)
        loc = Location(str(tmp_path / kind / "part-00000.parquet"))
        schemas.write_table(loc, table)
        t = schemas.read_table(loc)
        lengths = np.array(t.column("n_vectors").to_pylist())
        flat_codes = np.concatenate([np.asarray(c, codec.code_dtype) for c in t.column("codes").to_pylist()])
        flat_res = np.frombuffer(b"".join(t.column("residuals").to_pylist()), np.uint8)
        indexes[kind] = CentroidIndex.from_flat(codec, flat_codes, flat_res.reshape(-1, codec.residual_bytes),
                                                lengths)
    assert indexes["tokens_aug"].n_tokens == indexes["tokens"].n_tokens + 4 * n
    Q = np.stack(q_tokens[:10])
    found = indexes["tokens_aug"].search(Q, 1)[1][:, 0]
    assert (found == np.arange(10)).all()
    assert (indexes["tokens"].exact_maxsim(Q, 1)[1][:, 0] != np.arange(10)).sum() >= 5
