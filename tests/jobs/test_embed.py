"""End-to-end tests of the embed job on a tiny model: local root, s3:// root, bad input, resume."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.sample_cache as sample_cache
from embedding.codec import ResidualCodec
from fixtures_models import build_tiny_model
from jobs.embed import EmbedConfig, Unchanged, run
from storage import catalog, schemas
from storage.corpus import CorpusError
from storage.fs import location
from storage.manifest import Artifact
from tests.helpers import sample_docs, write_jsonl

LANGS = ["en", "de", "fr", "es", "ru"]


def write_parquet(loc_url: str, rows: list[dict]) -> str:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=7)
    location(loc_url).write_bytes(sink.getvalue().to_pybytes())
    return loc_url


def _cfg(corpus, model, root, **kw) -> EmbedConfig:
    base = dict(corpus=tuple(corpus) if isinstance(corpus, (list, tuple)) else (corpus,), model=str(model),
                set_name="t", root=str(root), rows_per_shard=16, n_centroids=16, max_batch=8)
    base.update(kw)
    return EmbedConfig(**base)


@pytest.fixture
def corpus_local(tmp_path):
    rows = sample_docs(50)
    rows[7]["text"] = "   "          # empty text: skipped and counted
    a = write_jsonl(str(tmp_path / "in" / "a.jsonl"), rows[:30])
    b = write_parquet(str(tmp_path / "in" / "b.parquet"), rows[30:])
    return [a, b], rows


def test_embed_local_end_to_end(ray_local, tiny_model_dir, corpus_local, tmp_path):
    corpus, rows = corpus_local
    root = tmp_path / "store"
    manifest = run(_cfg(corpus, tiny_model_dir, root, mode="both", nbits=2))

    assert manifest["version"] == "v000001"
    assert manifest["counts"]["documents"] == 49
    assert manifest["counts"]["skipped_empty"] == 1
    assert manifest["counts"]["input_rows"] == 50
    assert manifest["counts"]["shards"] == 4          # 30 rows → 16+14, 20 rows → 16+4
    assert manifest["dims"] == {"dense": 32, "colbert": 32}
    assert len(manifest["model"]["fingerprint"]) == 64

    con = catalog.connect(str(root))
    ids = [r[0] for r in con.execute("select id from documents order by id").fetchall()]
    assert ids == sorted(r["id"] for r in rows if r["text"].strip())
    assert con.execute("select id, reason from skipped").fetchall() == [("d0007", "empty_text")]
    # extra columns are kept as metadata, typed
    assert con.execute("select count(*) from documents where source = 'unit-test' and year >= 2000").fetchone()[0] == 49
    assert con.execute("select documents, nbits from embedding_sets").fetchall() == [(49, 2)]
    # the type the encoders ran in, resolved ("auto" is not a type); here every document came from the sample cache
    from embedding.model import resolve_precision
    assert manifest["workers"]["precision"] == resolve_precision("auto", "cpu")
    assert con.execute("select device, precision from embedding_sets").fetchall() == [
        ("cpu", resolve_precision("auto", "cpu"))]
    by_lang = dict(con.execute("select lang, count(*) from documents group by lang").fetchall())
    assert sum(by_lang.values()) == 49 and set(by_lang) == set(LANGS)

    # every listed file exists with the recorded size and hash
    vdir = Artifact(location(str(root)), "sets", "t").version_dir("v000001")
    for entry in manifest["files"]:
        loc = vdir.join(entry["path"])
        assert loc.size() == entry["bytes"] and loc.sha256() == entry["sha256"]

    # dense vectors: float16, unit norm, one per document
    dense = pa.concat_tables([schemas.read_table(vdir.join(e["path"]))
                              for e in manifest["files"] if e["kind"] == "dense"])
    mat = schemas.dense_matrix(dense).astype(np.float32)
    assert mat.shape == (49, 32)
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=2e-3)

    # ColBERT tokens decompress into unit vectors with the stored codec
    codec = ResidualCodec.from_bytes(vdir.join("codec.npz").read_bytes())
    tokens = pa.concat_tables([schemas.read_table(vdir.join(e["path"]))
                               for e in manifest["files"] if e["kind"] == "tokens"])
    row = tokens.slice(0, 1).to_pylist()[0]
    codes = np.array(row["codes"], dtype=codec.code_dtype)
    res = np.frombuffer(row["residuals"], np.uint8).reshape(len(codes), -1)
    vecs = codec.decompress(codes, res)
    assert vecs.shape == (row["n_vectors"], 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert sum(tokens.column("n_vectors").to_pylist()) == manifest["counts"]["tokens"]


def test_same_vectors_as_direct_encoding(ray_local, tiny_model_dir, tmp_path):
    """The job's stored dense vectors equal encoding the texts directly (up to float16)."""
    from embedding.encoder import Encoder
    from embedding.model import load_model

    rows = sample_docs(20)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    manifest = run(_cfg(corpus, tiny_model_dir, tmp_path / "s", mode="dense"))
    con = catalog.connect(str(tmp_path / "s"))
    files = [r[0] for r in con.execute("select path from shards where kind = 'dense' order by shard").fetchall()]
    table = pa.concat_tables([schemas.read_table(location(f)) for f in files])
    stored = dict(zip(table.column("id").to_pylist(), schemas.dense_matrix(table).astype(np.float32)))
    direct = Encoder(load_model(tiny_model_dir, device="cpu")).encode_documents([r["text"] for r in rows]).dense
    for r, vec in zip(rows, direct):
        np.testing.assert_allclose(stored[r["id"]], vec, atol=2e-3)
    assert manifest["codec"] is None and manifest["dims"]["colbert"] is None


def test_embed_s3_end_to_end(ray_local, tiny_model_dir, s3_bucket):
    rows = sample_docs(40)
    corpus = write_jsonl(f"{s3_bucket}/corpus/part-1.jsonl", rows[:25])
    write_parquet(f"{s3_bucket}/corpus/part-2.parquet", rows[25:])
    root = f"{s3_bucket}/store"
    manifest = run(_cfg([f"{s3_bucket}/corpus/"], tiny_model_dir, root, nbits=1))
    assert manifest["counts"]["documents"] == 40
    assert manifest["workers"]["calls"] == 2  # a remote store: reads and writes overlap the encoding
    assert corpus.startswith("s3://")
    cols, result = catalog.query(root, "select count(*), count(distinct id) from documents")
    assert result == [(40, 40)]
    sets_rows = catalog.query(root, "select set_name, version, is_current from embedding_sets")[1]
    assert sets_rows == [("t", "v000001", True)]
    # a second run makes a second version; documents shows the current one, documents_all both
    run(_cfg([f"{s3_bucket}/corpus/part-1.jsonl"], tiny_model_dir, root, nbits=1))
    rows_by_version = catalog.query(
        root, "select version, count(*) from documents_all group by version order by version")[1]
    assert rows_by_version == [("v000001", 40), ("v000002", 25)]
    assert catalog.query(root, "select version, count(*) from documents group by version")[1] == [("v000002", 25)]
    # the same run again: the objects' ETags match the current version's record; nothing is written
    with pytest.raises(Unchanged, match="'t' v000002 was embedded from the same 1 corpus file"):
        run(_cfg([f"{s3_bucket}/corpus/part-1.jsonl"], tiny_model_dir, root, nbits=1))
    assert Artifact(location(root), "sets", "t").versions() == ["v000001", "v000002"]
    write_jsonl(corpus, rows[:24] + [{**rows[24], "text": rows[24]["text"][:-1] + "!"}])   # same size, new bytes
    assert run(_cfg([f"{s3_bucket}/corpus/part-1.jsonl"], tiny_model_dir, root, nbits=1))["version"] == "v000003"


def test_rerun_on_an_unchanged_corpus_writes_nothing(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """Issue 14 item 7: the same set, corpus bytes, model and settings again is Unchanged (the
    CLI's exit 4), decided before Ray starts; any change of those, or force, embeds again."""
    import jobs.embed as embed_job

    rows = sample_docs(20)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    root = tmp_path / "s"
    first = run(_cfg(corpus, tiny_model_dir, root, mode="dense"))
    assert first["input"]["files"] == [{"url": corpus, "bytes": (tmp_path / "c.jsonl").stat().st_size,
                                        "sha256": location(corpus).sha256()}]

    def no_ray():
        raise AssertionError("Ray was started for an unchanged corpus")

    with monkeypatch.context() as m:
        m.setattr(embed_job, "init_ray", no_ray)
        for same in (_cfg(corpus, tiny_model_dir, root, mode="dense"),
                     _cfg(corpus, tiny_model_dir, root, mode="dense", actors=1, max_batch=4, publish=False)):
            with pytest.raises(Unchanged, match=r"set 't' v000001 was embedded from the same 1 corpus file .*--force"):
                run(same)
    art = Artifact(location(str(root)), "sets", "t")
    assert art.versions() == ["v000001"] and not (root / "sets" / "t" / "v000002").exists()

    forced = run(_cfg(corpus, tiny_model_dir, root, mode="dense", force=True))
    assert forced["version"] == "v000002" and forced["input"] == first["input"]
    # another setting, or the same file rewritten with other bytes of the same size: a new version
    assert run(_cfg(corpus, tiny_model_dir, root, mode="dense", rows_per_shard=8))["version"] == "v000003"
    rows[3]["text"] = rows[3]["text"].upper()
    write_jsonl(corpus, rows)
    assert (tmp_path / "c.jsonl").stat().st_size == first["input"]["files"][0]["bytes"]
    assert run(_cfg(corpus, tiny_model_dir, root, mode="dense", rows_per_shard=8))["version"] == "v000004"
    # documents counts the current version only; documents_all every version
    assert catalog.query(str(root), "select count(*) from documents")[1] == [(20,)]
    assert catalog.query(str(root), "select count(*) from documents_all")[1] == [(80,)]


def test_rows_per_shard_defaults_to_the_texts_lengths_and_is_recorded(ray_local, tiny_model_dir, tmp_path):
    """Unset, rows per shard is sized from the corpus's first rows (jobs.plan.auto_rows_per_shard)
    before the run is keyed: the manifest records the number the shards were cut with, and
    the same command again resolves the same number (Unchanged)."""
    from jobs.plan import auto_rows_per_shard

    rows = sample_docs(30)
    rows[0]["text"] = "long " * 400                   # one long text among short ones
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    root = tmp_path / "s"
    mean = sum(len(r["text"].encode()) for r in rows) / len(rows)
    expected = auto_rows_per_shard(mean)
    assert expected == 4096
    first = run(_cfg(corpus, tiny_model_dir, root, mode="dense", rows_per_shard=None))
    assert first["config"]["rows_per_shard"] == expected and first["counts"]["shards"] == 1
    with pytest.raises(Unchanged):
        run(_cfg(corpus, tiny_model_dir, root, mode="dense", rows_per_shard=None))
    # given explicitly, the number is taken as it is
    other = run(_cfg(corpus, tiny_model_dir, root, mode="dense", rows_per_shard=7))
    assert other["config"]["rows_per_shard"] == 7 and other["counts"]["shards"] == 5


def test_duplicate_ids_are_refused_before_writing(ray_local, tiny_model_dir, tmp_path):
    rows = sample_docs(12)
    rows[9]["id"] = rows[2]["id"]
    corpus = write_jsonl(str(tmp_path / "dup.jsonl"), rows)
    with pytest.raises(CorpusError) as err:
        run(_cfg(corpus, tiny_model_dir, tmp_path / "s"))
    assert "d0002" in str(err.value) and "dup.jsonl" in str(err.value) and "line" in str(err.value)
    assert not (tmp_path / "s" / "sets").exists()


@pytest.mark.parametrize("bad, needle", [
    (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', "line 2: not valid UTF-8"),
    (b'{"id": "a", "text": "ok"}\n{"id": "b" "text": 1}\n', "line 2: invalid JSON"),
    (b'{"id": "a", "body": "ok"}\n', "missing text column"),
    (b'{"text": "ok"}\n', "missing id column"),
    (b'{"id": null, "text": "ok"}\n', "null or empty id"),
])
def test_bad_jsonl_names_file_and_line(ray_local, tiny_model_dir, tmp_path, bad, needle):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(bad)
    with pytest.raises(CorpusError, match=needle) as err:
        run(_cfg(str(path), tiny_model_dir, tmp_path / "s"))
    assert "bad.jsonl" in str(err.value)
    assert not (tmp_path / "s" / "sets").exists()


def test_parquet_missing_columns_and_column_mapping(ray_local, tiny_model_dir, tmp_path):
    rows = [{"doc_id": f"x{i}", "body": f"text number {i}", "language": "en"} for i in range(10)]
    corpus = write_parquet(str(tmp_path / "c.parquet"), rows)
    with pytest.raises(CorpusError, match=r"missing required column\(s\) \['id', 'text'\]"):
        run(_cfg(corpus, tiny_model_dir, tmp_path / "s", mode="dense"))
    manifest = run(_cfg(corpus, tiny_model_dir, tmp_path / "s", mode="dense",
                        id_column="doc_id", text_column="body", lang_column="language"))
    assert manifest["counts"]["documents"] == 10
    langs = catalog.query(str(tmp_path / "s"), "select distinct lang from documents")[1]
    assert langs == [("en",)]


def test_bad_config_and_model(tiny_model_dir, tiny_model_no_weights_dir, tmp_path):
    from embedding.model import ModelError
    from jobs.embed import describe_model

    with pytest.raises(ValueError, match="nbits must be 1, 2 or 4"):
        _cfg("x.jsonl", tiny_model_dir, tmp_path, nbits=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        _cfg("x.jsonl", tiny_model_dir, tmp_path, mode="sparse")
    with pytest.raises(ValueError, match="invalid set name"):
        _cfg("x.jsonl", tiny_model_dir, tmp_path, set_name="../escape")
    with pytest.raises(ModelError, match="has no weights"):
        describe_model(_cfg("x.jsonl", tiny_model_no_weights_dir, tmp_path))
    odd = build_tiny_model(tmp_path / "odd", colbert_dim=12)
    with pytest.raises(ValueError, match="dimension 12 × nbits 1 is not a multiple of 8"):
        describe_model(_cfg("x.jsonl", odd, tmp_path, nbits=1))


def test_failed_run_publishes_nothing_and_rerun_resumes(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    rows = sample_docs(48)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    root = tmp_path / "s"
    monkeypatch.setenv("TESSERA_FAILPOINTS", "embed.shard=2")
    with pytest.raises(Exception, match="failpoint embed.shard=2"):
        run(_cfg(corpus, tiny_model_dir, root, actors=1))
    art = Artifact(location(str(root)), "sets", "t")
    assert art.versions() == [] and art.current() is None
    assert catalog.query(str(root), "select count(*) from documents")[1] == [(0,)]
    finished = {p.name for p in (root / "sets" / "t" / "v000001" / "_shards").glob("*.json")}
    assert "00002.json" not in finished

    monkeypatch.delenv("TESSERA_FAILPOINTS")
    manifest = run(_cfg(corpus, tiny_model_dir, root, actors=1))
    assert manifest["version"] == "v000001"          # the interrupted version was resumed
    assert catalog.query(str(root), "select count(*), count(distinct id) from documents")[1] == [(48, 48)]


def test_sampled_documents_are_encoded_once_and_match(ray_local, tiny_model_dir, tmp_path):
    """Pass 1 caches the sample's encodings; pass 2 reuses them: same vectors as a fresh encode."""
    from embedding.encoder import Encoder
    from embedding.model import load_model

    rows = sample_docs(40)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    root = tmp_path / "s"
    manifest = run(_cfg(corpus, tiny_model_dir, root, mode="both"))
    assert manifest["codec"]["sample_documents"] == 40          # PLAID's sample is the whole small corpus
    assert not (root / "sets" / "t" / "v000001" / "_sample").exists()   # cache removed after commit
    t = manifest["timings"]
    assert t["sample_load"] > 0 and t["worker_load"] == 0      # pass 2 compressed the cache, loaded no model
    assert t["sample_forward"] > 0 and "worker_forward" not in t and "worker_compress" in t
    con = catalog.connect(str(root))
    files = [r[0] for r in con.execute("select path from shards where kind = 'dense' order by shard").fetchall()]
    table = pa.concat_tables([schemas.read_table(location(f)) for f in files])
    stored = dict(zip(table.column("id").to_pylist(), schemas.dense_matrix(table).astype(np.float32)))
    enc = Encoder(load_model(tiny_model_dir, device="cpu")).encode_documents([r["text"] for r in rows],
                                                                            dense=True, colbert=True)
    for r, vec in zip(rows, enc.dense):
        np.testing.assert_allclose(stored[r["id"]], vec, atol=2e-3)
    n_tok = con.execute("select sum(n_tokens) from documents").fetchone()[0]
    assert n_tok == int(enc.n_tokens.sum())
    assert manifest["counts"]["tokens"] == sum(len(t) for t in enc.tokens)


def _stored_vectors(root, manifest: dict) -> tuple[dict, dict, ResidualCodec]:
    """{id: dense vector}, {id: decompressed token vectors} and the codec of the set version
    ``manifest`` describes (read the way the index builds read them: ``storage.vectors``)."""
    from storage import sets, vectors

    vdir = location(str(root / "sets" / "t" / manifest["version"]))
    codec = ResidualCodec.from_bytes(vdir.join("codec.npz").read_bytes())
    dense, tokens = {}, {}
    for f in sets.set_files(vdir, manifest, "dense"):
        ids, mat = vectors.dense_file(f)
        dense.update(zip(ids.to_pylist(), mat.astype(np.float32)))
    for f in sets.set_files(vdir, manifest, "tokens"):
        ids, codes, residuals, lengths = vectors.token_file(f, codec.residual_bytes, codec.code_dtype)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for i, doc in enumerate(ids.to_pylist()):
            part = slice(starts[i], starts[i + 1])
            tokens[doc] = codec.decompress(codes[part], residuals[part])
    return dense, tokens, codec


def test_pass_two_writes_cached_shards_as_tasks_and_encodes_the_rest(ray_local, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """A sample of half the corpus: shards it holds whole are compressed from the cache by plain
    tasks, the others encoded on the actor pool; every document ends up as a fresh encode."""
    from embedding.encoder import Encoder
    from embedding.model import load_model
    from jobs import plan as planner
    from jobs.embed_codec import fully_sampled, sample_plan
    from storage.corpus import scan_file

    rows = sample_docs(48)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    root = tmp_path / "s"
    cfg = _cfg(corpus, tiny_model_dir, root, mode="both", rows_per_shard=3)
    monkeypatch.setattr(planner, "sample_size", lambda total: total // 2)
    scanned, ids = scan_file(corpus, cfg.columns, cfg.rows_per_shard)
    pieces = planner.build_pieces([scanned.n_rows], cfg.rows_per_shard)
    full = fully_sampled(pieces, sample_plan(cfg, pieces, [ids]))
    assert 0 < len(full) < len(pieces)                            # a mix of both paths
    manifest = run(cfg)
    assert manifest["codec"]["sample_documents"] == 24
    t = manifest["timings"]
    assert t["worker_load"] > 0 and t["worker_forward"] > 0       # the pool encoded the other documents
    # both kinds of pass-2 process wrote their shards with Arrow on the system allocator
    # (jobs.runtime.arrow_pool; the actors' and the tasks' markers say which)
    from jobs.embed_pool import done_shards
    vdir = Artifact(location(str(root)), "sets", "t").version_dir(manifest["version"])
    markers = done_shards(vdir)
    assert len(markers) == len(pieces) and {m["arrow_pool"] for m in markers.values()} == {"system"}
    dense, tokens, codec = _stored_vectors(root, manifest)
    enc = Encoder(load_model(tiny_model_dir, device="cpu")).encode_documents([r["text"] for r in rows],
                                                                            dense=True, colbert=True)
    for r, vec, toks in zip(rows, enc.dense, enc.tokens):
        np.testing.assert_allclose(dense[r["id"]], vec, atol=2e-3)
        expected = codec.decompress(*codec.compress(toks))
        assert tokens[r["id"]].shape == expected.shape
        # the same codes and buckets but where the cache's float16 rounding crossed a bucket cutoff
        cos = np.sum(tokens[r["id"]] * expected, axis=1) / (
            np.linalg.norm(tokens[r["id"]], axis=1) * np.linalg.norm(expected, axis=1))
        assert cos.min() > 0.99, (r["id"], cos.min())


def test_a_failed_cached_shard_task_names_the_shard_and_the_rerun_resumes(ray_local, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    """Pass 2 of a small corpus runs as tasks: a shard failing there fails the job with the shard
    named, publishes nothing, and the same command resumes."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(48))   # 3 shards, all sampled
    root = tmp_path / "s"
    cfg = _cfg(corpus, tiny_model_dir, root, mode="both")
    monkeypatch.setenv("TESSERA_FAILPOINTS", "embed.shard=1")
    with pytest.raises(Exception, match=r"shard 1 \(.*c\.jsonl, records 17-32\): RuntimeError: failpoint"):
        run(cfg)
    art = Artifact(location(str(root)), "sets", "t")
    assert art.versions() == [] and art.current() is None
    assert (root / "sets" / "t" / "v000001" / "_sample").exists()       # the sample pass is kept
    monkeypatch.delenv("TESSERA_FAILPOINTS")
    manifest = run(cfg)
    assert manifest["version"] == "v000001"                               # resumed, the codec reused
    assert manifest["timings"]["worker_load"] == 0                       # still no model in pass 2
    assert catalog.query(str(root), "select count(*), count(distinct id) from documents")[1] == [(48, 48)]


@pytest.mark.parametrize("kmeans", ["two-level", "flat-bf16", "progressive", "auto"])
def test_other_kmeans_codec_through_the_job(ray_local, tiny_model_dir, tmp_path, kmeans):
    """The manifest's codec says which k-means ran (auto: flat for a sample this small, whose
    k-means costs less than importing torch for bfloat16 would)."""

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(160))
    manifest = run(_cfg(corpus, tiny_model_dir, tmp_path / "s", mode="colbert", n_centroids=256,
                        kmeans=kmeans, rows_per_shard=64))
    assert manifest["codec"]["kmeans"] == {"auto": "flat"}.get(kmeans, kmeans)
    assert manifest["codec"]["n_centroids"] == 256
    assert manifest["config"].get("kmeans") == (None if kmeans == "auto" else kmeans)
    t = manifest["timings"]  # the fit task's own stages, inside the driver's kmeans stage
    assert {"fit_wait", "fit_import", "fit_read", "fit_kmeans", "fit_task", "fit_return"} <= set(t)
    assert 0 < t["fit_kmeans"] <= t["fit_task"] <= t["kmeans"]
    codec = ResidualCodec.from_bytes((tmp_path / "s" / "sets" / "t" / "v000001" / "codec.npz").read_bytes())
    assert codec.n_centroids == 256 and manifest["counts"]["documents"] == 160


def test_kill_during_or_after_the_codec_sample_pass_encodes_the_sample_once(ray_local, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    """A run killed in the sample pass keeps the shards it cached; one killed in the fit keeps them
    all: the resumed runs read them back instead of encoding them, and fit the same codec."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(64))        # 4 shards, all sampled
    root = tmp_path / "s"
    cfg = _cfg(corpus, tiny_model_dir, root, mode="both", actors=1)
    monkeypatch.setenv("TESSERA_FAILPOINTS", "embed.sample=2")
    with pytest.raises(Exception, match="failpoint embed.sample=2"):
        run(cfg)
    cache = root / "sets" / "t" / "v000001" / "_sample"
    first = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.arrow")}
    assert {"part-00000.arrow", "part-00001.arrow"} <= set(first) and "part-00002.arrow" not in first

    monkeypatch.setenv("TESSERA_FAILPOINTS", "embed.codec_fit=1")     # dies after the sample pass
    with pytest.raises(Exception, match="failpoint embed.codec_fit=1"):
        run(cfg)
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.arrow")}
    assert len(after) == 4 and all(after[name] == t for name, t in first.items())  # not re-encoded

    monkeypatch.delenv("TESSERA_FAILPOINTS")
    manifest = run(cfg)
    assert manifest["codec"]["sample_shards"] == manifest["codec"]["sample_shards_reused"] == 4
    fresh = run(_cfg(corpus, tiny_model_dir, tmp_path / "fresh", mode="both", actors=1))
    assert manifest["codec"]["sha256"] == fresh["codec"]["sha256"]   # the same sample, the same codec
    con = catalog.connect(str(root))
    assert con.execute("select count(*), sum(n_tokens) from documents").fetchone() == \
        catalog.connect(str(tmp_path / "fresh")).execute("select count(*), sum(n_tokens) from documents").fetchone()


def test_colbert_checkpoint_with_projection(ray_local, tiny_colbert_dir, tmp_path):
    """A Stanford-ColBERT folder: tokens go through its linear layer (dim 16), markers inserted."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(20))
    manifest = run(_cfg(corpus, tiny_colbert_dir, tmp_path / "s", mode="colbert", nbits=4))
    assert manifest["dims"] == {"dense": None, "colbert": 16}
    assert manifest["model"]["projection"] is True and manifest["codec"]["dim"] == 16
    assert manifest["model"]["settings"]["doc_marker"] == "[unused1]"


def test_the_driver_never_reads_the_codec_sample(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """The sample's token vectors go from the actors' cache to the k-means worker: the
    driver holds ids and the codec bytes only (it used to gather the whole sample)."""
    read_in_driver = []

    def spying(original):
        def spy(loc, *args, **kwargs):
            if "_sample" in str(loc):
                read_in_driver.append(str(loc))
            return original(loc, *args, **kwargs)
        return spy

    # every read of a cache file: whole (read_cache_table, under read_cache, read_cache_tokens,
    # read_sample_tokens) or its footer (cache_schema); and any Parquet read
    for module, name in ((sample_cache, "read_cache_table"), (sample_cache, "cache_schema"),
                         (schemas, "read_table")):
        monkeypatch.setattr(module, name, spying(getattr(module, name)))
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(40))
    manifest = run(_cfg(corpus, tiny_model_dir, tmp_path / "s", mode="both"))
    assert read_in_driver == []
    codec = manifest["codec"]
    assert codec["sample_documents"] == 40 and codec["sample_tokens"] == manifest["counts"]["tokens"]
    assert codec["train_tokens"] == codec["sample_tokens"] and codec["n_centroids"] == 16


def test_the_actors_model_load_counts_the_torch_import(tiny_model_dir, tmp_path):
    """An actor's load_seconds (its pool's start-up, outside the steady state) include
    importing torch: the encoder is built after the model, so the import does not land
    in the first shard's encoding."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import dataclasses, json, sys
import jobs.embed_worker as w
from embedding.model import EncoderSettings, fingerprint
from storage.corpus import ColumnMap
before = "torch" in sys.modules
seen = []
load = w.EncoderActor.lm.fget
def lm(self):
    seen.append("torch" in sys.modules)
    return load(self)
w.EncoderActor.lm = property(lm)
settings = EncoderSettings()
spec = w.WorkerSpec({str(tiny_model_dir)!r}, settings.to_dict(), fingerprint({str(tiny_model_dir)!r}, settings),
                    [], dataclasses.asdict(ColumnMap()), {str(tmp_path)!r}, True, False, 1, "cpu", 8, 512)
actor = w.ShardEncoder(spec)
actor.encoder
print(json.dumps({{"before": before, "at_load": seen[0], "load_s": actor._load_s}}))
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] is False            # importing the worker module loads no torch
    assert got["at_load"] is False           # nor does anything before the timed load
    assert got["load_s"] > 0


def test_an_actor_runs_two_shards_at_once_with_one_encoding_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    """Two calls on one encoder actor (as Ray Data runs them): both shards are written
    as a lone call writes them, and the model never runs for both at once."""
    import dataclasses
    import threading
    import time as _time

    from embedding.encoder import Encoder
    from embedding.model import EncoderSettings, fingerprint
    from jobs.embed_worker import ShardEncoder, WorkerSpec
    from storage.corpus import ColumnMap, scan_file

    rows = sample_docs(40)
    url = write_jsonl(str(tmp_path / "a.jsonl"), rows)
    cf, _ = scan_file(url, ColumnMap(), 10)
    settings = EncoderSettings()

    def spec(out: str) -> WorkerSpec:
        return WorkerSpec(str(tiny_model_dir), settings.to_dict(), fingerprint(tiny_model_dir, settings),
                          [cf.to_dict()], dataclasses.asdict(ColumnMap()), str(tmp_path / out), True, False,
                          1, "cpu", 8, 512)

    pieces = [{"shard": i, "file": 0, "start": 10 * i, "end": 10 * (i + 1)} for i in range(4)]
    alone = ShardEncoder(spec("alone"))
    expected = [alone.write_shard(dict(p)) for p in pieces]

    running, most = [0], [0]
    lock = threading.Lock()
    encode = Encoder.encode_documents

    def counted(self, *args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        _time.sleep(0.05)  # widen the window in which a second encoding would show
        try:
            return encode(self, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Encoder, "encode_documents", counted)
    actor = ShardEncoder(spec("both"))
    got: dict = {}
    threads = [threading.Thread(target=lambda ps: [got.setdefault(p["shard"], actor.write_shard(dict(p)))
                                                   for p in ps], args=(pieces[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1                                   # one encoding at a time
    assert sorted(got) == [0, 1, 2, 3]
    for want in expected:                                  # the same files, byte for byte
        have = got[want["shard"]]
        assert [(e["path"], e["sha256"]) for e in have["files"]] == [(e["path"], e["sha256"]) for e in want["files"]]
        assert (tmp_path / "both" / "_shards" / f"{want['shard']:05d}.json").exists()


@pytest.mark.parametrize("calls", [2, 1])
def test_the_pool_overlaps_a_shards_io_with_another_shards_encoding(ray_local, tiny_model_dir, tmp_path, calls):
    """With calls_per_actor=2 one encoder actor holds two shards at a time: their calls
    overlap in time (the second reads while the first loads the model and encodes), yet
    every shard is written whole, with its marker. With 1 (a local store's default) they
    run one after the other."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(64))
    manifest = run(_cfg(corpus, tiny_model_dir, tmp_path / "root", mode="dense", actors=1, calls_per_actor=calls))
    assert manifest["workers"]["calls"] == calls
    vdir = tmp_path / "root" / "sets" / "t" / manifest["version"]
    stats = [json.loads(p.read_text()) for p in sorted((vdir / "_shards").glob("*.json"))]
    assert len(stats) == 4 and manifest["counts"]["documents"] == 64
    spans = sorted((s["started_at"], s["started_at"] + s["seconds"]) for s in stats)
    overlapping = any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert overlapping == (calls == 2)                          # two calls in flight on the one actor, or not
    assert sum(1 for s in stats if s["load_seconds"] > 0) == 1  # the model loaded once
    assert manifest["timings"]["actor_start"] > 0


def test_calls_per_actor_overlap_io_on_a_remote_store_only():
    """Default: two shards at a time per actor when the set goes to s3:// (waits worth
    overlapping) and in the codec sample's pass (its float16 cache writes), one otherwise
    on a local store (the second call slows the first one's forward); the setting wins
    either way, and must be >= 1."""
    from jobs.embed_pool import calls_per_actor

    assert calls_per_actor(_cfg("c.jsonl", "m", "/data/store")) == 1
    assert calls_per_actor(_cfg("c.jsonl", "m", "/data/store"), sample=True) == 2
    assert calls_per_actor(_cfg("c.jsonl", "m", "s3://bucket/store")) == 2
    assert calls_per_actor(_cfg("c.jsonl", "m", "s3://bucket/store"), sample=True) == 2
    assert calls_per_actor(_cfg("c.jsonl", "m", "/data/store", calls_per_actor=3)) == 3
    assert calls_per_actor(_cfg("c.jsonl", "m", "/data/store", calls_per_actor=1), sample=True) == 1
    assert calls_per_actor(_cfg("c.jsonl", "m", "s3://bucket/store", calls_per_actor=1)) == 1
    with pytest.raises(ValueError, match="calls_per_actor must be >= 1"):
        _cfg("c.jsonl", "m", "/data/store", calls_per_actor=0)


@pytest.mark.parametrize("calls", [None, 1])
def test_the_codec_sample_pass_overlaps_its_cache_writes_on_a_local_store(ray_local, tiny_model_dir, tmp_path,
                                                                          calls):
    """Both mode on a local store: by default the sample pass's actor holds two shards at
    a time (a second call waits on the compute lock while the first loads the model and
    encodes, then writes its cache while the other encodes), while pass 2 keeps one; with
    ``calls_per_actor=1`` the sample pass takes one shard at a time too."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(64))
    manifest = run(_cfg(corpus, tiny_model_dir, tmp_path / "root", mode="both", actors=1, calls_per_actor=calls))
    assert manifest["codec"]["sample_documents"] == 64 and manifest["counts"]["documents"] == 64
    assert manifest["workers"]["calls"] == 1                             # pass 2's pool
    waited = manifest["timings"].get("sample_wait", 0.0)
    assert (waited > 0) == (calls is None)                               # a second sample call in flight


# ---- precision -------------------------------------------------------------------------
def test_precision_is_checked_before_anything_runs(tmp_path, tiny_model_dir):
    from jobs.embed import describe_model
    from jobs.embed_pool import worker_spec
    from jobs.runtime import ActorPlan
    from storage.fs import Location

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(4))
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, float16, got 'half'"):
        EmbedConfig(corpus=(corpus,), model=str(tiny_model_dir), set_name="p", precision="half")
    cfg = EmbedConfig(corpus=(corpus,), model=str(tiny_model_dir), set_name="p", precision="float16")
    cpu = ActorPlan(actors=1, num_cpus=1, num_gpus=0, threads=1, device="cpu")
    with pytest.raises(ValueError, match="float16 runs on CUDA only, and this run's encoders are on cpu"):
        worker_spec(cfg, describe_model(cfg), [], Location(str(tmp_path / "v")), cpu, dense=True, colbert=False)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_actors_load_the_model_in_the_job_s_precision(tmp_path, tiny_model_dir, precision):
    """The job's precision reaches the actor's model, and its vectors stay within rounding of float32's."""
    import dataclasses

    from embedding.encoder import Encoder
    from embedding.model import EncoderSettings, fingerprint, load_model
    from jobs.embed_worker import ShardEncoder, WorkerSpec
    from storage.corpus import ColumnMap, scan_file

    rows = sample_docs(10)
    cf, _ = scan_file(write_jsonl(str(tmp_path / "a.jsonl"), rows), ColumnMap(), 10)
    settings = EncoderSettings()
    spec = WorkerSpec(str(tiny_model_dir), settings.to_dict(), fingerprint(tiny_model_dir, settings),
                      [cf.to_dict()], dataclasses.asdict(ColumnMap()), str(tmp_path / "v"), True, False,
                      1, "cpu", 8, 512, precision=precision)
    actor = ShardEncoder(spec)
    stats = actor.write_shard({"shard": 0, "file": 0, "start": 0, "end": 10})
    assert actor.lm.precision == precision and stats["precision"] == [precision]
    got = schemas.dense_matrix(pq.read_table(next((tmp_path / "v" / "dense").glob("*.parquet")))).astype(np.float32)
    full = Encoder(load_model(tiny_model_dir, device="cpu", precision="float32"))
    want = full.encode_documents([r["text"] for r in rows]).dense
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert np.all(cos > (0.9999 if precision == "float32" else 0.99))


def test_shards_record_the_precision_of_every_encoding_they_hold(tmp_path, tiny_model_dir):
    """Pass 2 takes the sampled rows from the cache, encoded in pass 1's precision, and
    encodes the others itself: the shard's statistics name both types."""
    import dataclasses

    from embedding.codec import ResidualCodec
    from embedding.model import EncoderSettings, fingerprint
    from jobs.embed_worker import SampleEncoder, ShardEncoder, WorkerSpec
    from storage.corpus import ColumnMap, scan_file

    rows = sample_docs(10)
    cf, _ = scan_file(write_jsonl(str(tmp_path / "a.jsonl"), rows), ColumnMap(), 10)
    settings = EncoderSettings()
    spec = WorkerSpec(str(tiny_model_dir), settings.to_dict(), fingerprint(tiny_model_dir, settings),
                      [cf.to_dict()], dataclasses.asdict(ColumnMap()), str(tmp_path / "v"), True, True,
                      1, "cpu", 8, 512, precision="float32")
    row = {"shard": 0, "file": 0, "start": 0, "end": 10}
    SampleEncoder(dataclasses.replace(spec, precision="bfloat16")).sample_shard(row, [0, 2, 4])
    codec = ResidualCodec.fit(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), 2, 4)
    (tmp_path / "codec.npz").write_bytes(codec.to_bytes())
    stats = ShardEncoder(spec, str(tmp_path / "codec.npz")).write_shard(row)
    assert stats["precision"] == ["bfloat16", "float32"] and stats["documents"] == 10

    from jobs.embed_pool import run_precision
    assert run_precision([stats, {"documents": 3, "precision": ["float32"]}]) == "bfloat16,float32"
    assert run_precision([{"documents": 3, "precision": ["float32"]}, {"documents": 0, "precision": []}]) == "float32"
    assert run_precision([{"documents": 3}]) == "unknown"  # a marker written before precisions were recorded
    assert run_precision([{"documents": 0, "precision": []}]) is None
    assert run_precision([{"documents": 2, "precision": ["float32"]}], inherited="bfloat16") == "bfloat16,float32"
