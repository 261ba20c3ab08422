"""The index job over a real (tiny-model) embedding set: every kind, merge exactness, s3."""
from __future__ import annotations

import numpy as np
import pytest

from indexing import dense
from indexing.index_files import read_doc_ids
from jobs.build_index import IndexConfig
from jobs.build_index import run as build
from jobs.embed import EmbedConfig
from jobs.embed import run as embed
from storage import schemas
from storage.fs import location
from storage.manifest import Artifact, NotFoundError
from tests.helpers import sample_docs, write_jsonl


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, tiny_model_dir):
    from conftest import ensure_local_ray

    ensure_local_ray()
    tmp = tmp_path_factory.mktemp("idx")
    corpus = write_jsonl(str(tmp / "c.jsonl"), sample_docs(300))
    root = str(tmp / "store")
    embed(EmbedConfig(corpus=(corpus,), model=str(tiny_model_dir), set_name="t", root=root, rows_per_shard=64,
                      n_centroids=32, mode="both", nbits=2))
    return root


def _all_vectors(root: str, dim: int) -> np.ndarray:
    from embedding.mrl import truncate

    m = Artifact(location(root), "sets", "t").manifest()
    vdir = location(root).join("sets", "t", m["version"])
    files = sorted((e for e in m["files"] if e["kind"] == "dense"), key=lambda e: e["shard"])
    return truncate(np.concatenate([schemas.dense_matrix(schemas.read_table(vdir.join(e["path"])))
                                    for e in files]), dim)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw", "int8", "binary", "plaid"])
def test_every_kind_builds_and_round_trips(ray_local, tiny_set, kind):
    m = build(IndexConfig(set_name="t", kind=kind, root=tiny_set, dim=16 if kind == "ivfpq" else None,
                          nlist=8, pq_m=4, pq_nbits=4, train_size=200))
    assert m["n_docs"] == 300 and m["source"]["set"] == "t" and m["source"]["version"] == "v000001"
    assert len(m["source"]["fingerprint"]) == 64
    art = Artifact(location(tiny_set), "indexes", m["name"])
    assert art.current() == m["version"]
    vdir = art.version_dir(m["version"])
    for e in m["files"]:
        assert vdir.join(e["path"]).sha256() == e["sha256"]
    ids = schemas.read_table(vdir.join("ids.parquet")).column("id").to_pylist()
    assert len(ids) == 300 and len(set(ids)) == 300
    assert read_doc_ids(vdir, m).to_pylist() == ids  # the same ids as arrays (what a serving process reads)
    assert sorted(e["path"] for e in m["files"] if e["kind"] == "id_arrays") == ["ids/offsets.npy", "ids/utf8.npy"]


def test_sharded_ivf_equals_one_piece(ray_local, tiny_set):
    m = build(IndexConfig(set_name="t", kind="ivf", root=tiny_set, nlist=8, name="t-ivf-sharded", train_size=300))
    vdir = Artifact(location(tiny_set), "indexes", m["name"]).version_dir(m["version"])
    merged = dense.from_bytes(vdir.join("index.faiss").read_bytes(), "ivf")
    params = dense.DenseIndexParams.from_dict(m["params"])
    x = _all_vectors(tiny_set, 32)
    # the same trained quantiser, everything added in one piece
    one = dense.from_bytes(vdir.join("index.faiss").read_bytes(), "ivf")
    one.reset()
    dense.add(one, x, 0)
    q = x[:20]
    s1, i1 = dense.search(merged, params, q, 10)
    s2, i2 = dense.search(one, params, q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)
    flat_ids = np.argsort(-(q @ x.T), axis=1)[:, 0]
    assert (i1[:, 0] == flat_ids).mean() >= 0.9    # a document finds itself


def test_bad_index_requests(ray_local, tiny_set):
    with pytest.raises(ValueError, match="index kind must be one of"):
        IndexConfig(set_name="t", kind="annoy")
    with pytest.raises(ValueError, match="dimension 64 is above the stored dimension 32"):
        build(IndexConfig(set_name="t", kind="flat", root=tiny_set, dim=64))
    with pytest.raises(NotFoundError, match="no published set 'nope'"):
        build(IndexConfig(set_name="nope", kind="flat", root=tiny_set))
    with pytest.raises(ValueError, match="does not divide"):
        build(IndexConfig(set_name="t", kind="ivfpq", root=tiny_set, pq_m=5, nlist=4))


def test_index_on_s3(ray_local, tiny_model_dir, s3_bucket):
    corpus = write_jsonl(f"{s3_bucket}/c.jsonl", sample_docs(80))
    root = f"{s3_bucket}/store"
    embed(EmbedConfig(corpus=(corpus,), model=str(tiny_model_dir), set_name="t", root=root, rows_per_shard=32,
                      n_centroids=16))
    for kind in ("ivf", "plaid"):
        m = build(IndexConfig(set_name="t", kind=kind, root=root, nlist=4))
        assert m["n_docs"] == 80
        assert Artifact(location(root), "indexes", m["name"]).current() == m["version"]


@pytest.mark.parametrize("kind", ["plaid", "ivfpq", "hnsw"])
def test_the_driver_holds_only_ids(ray_local, tiny_set, monkeypatch, kind):
    """Shards are read, merged and written in Ray tasks: the driver reads no vector column
    and never receives a vector, an index part or a merged index (it used to merge in memory)."""
    import ray

    from indexing.plaid import CentroidIndex
    from storage import sets

    columns, got = [], []
    read_live, get = sets.read_live, ray.get

    def spy_read(f, cols=None, *a, **kw):
        columns.append(tuple(cols or ()))
        return read_live(f, cols, *a, **kw)

    def spy_get(refs, *a, **kw):
        out = get(refs, *a, **kw)
        got.append(out)
        return out

    def refuse(*a, **kw):
        raise AssertionError("merged in the driver")

    from storage.fs import Location

    read_bytes, blobs = Location.read_bytes, []

    def spy_bytes(loc):
        data = read_bytes(loc)
        blobs.append((loc.url, len(data)))
        return data

    monkeypatch.setattr(Location, "read_bytes", spy_bytes)
    monkeypatch.setattr(sets, "read_live", spy_read)
    monkeypatch.setattr(ray, "get", spy_get)
    monkeypatch.setattr(CentroidIndex, "from_parts", refuse)
    monkeypatch.setattr(dense, "merge", refuse)
    m = build(IndexConfig(set_name="t", kind=kind, root=tiny_set, dim=16 if kind == "ivfpq" else None,
                          nlist=8, pq_m=4, pq_nbits=4, train_size=200, name=f"t-{kind}-lean"))
    assert m["n_docs"] == 300
    assert columns and set(columns) == {("id",)}
    # nor the codec: passed to every shard task it was put in the object store once per shard
    assert [u for u, _ in blobs if "codec" in u] == []

    def arrays(x):
        if isinstance(x, (np.ndarray, bytes)):
            return [type(x).__name__]
        if isinstance(x, dict):
            return [a for v in x.values() for a in arrays(v)]
        if isinstance(x, (list, tuple)):
            return [a for v in x for a in arrays(v)]
        return []
    assert [a for out in got for a in arrays(out)] == []
