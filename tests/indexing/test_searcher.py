"""Searcher and evaluate job, on index versions written by hand in the build_index layout.

One embedding set (tiny model, 36 documents in 4 languages, two shards) is embedded
once per module with ``jobs.embed.run``; flat, int8 (MRL dim 16, rescored) and
plaid indexes are built from its files with ``indexing.dense`` / ``indexing.plaid``
and committed like ``jobs/build_index`` does.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ensure_local_ray
from embedding.codec import ResidualCodec
from embedding.mrl import truncate
from fixtures_models import MULTILINGUAL_TEXTS
from indexing import dense, int8, kernels
from indexing.index_files import ID_ARRAYS, DocIds, open_centroid_index, read_doc_ids, read_ids, write_ids
from indexing.plaid import CentroidIndex, SearchParams
from indexing.searcher import IncompatibleEncoderError, Searcher, is_registered
from jobs.embed import EmbedConfig
from jobs.embed import run as embed
from jobs.evaluate import EvalConfig
from jobs.evaluate import run as evaluate_run
from storage import schemas
from storage.fs import Location
from storage.manifest import Artifact, NotFoundError

LANGS = ("en", "de", "fr", "es")
PER_LANG = 9


def _corpus() -> list[dict]:
    rows = []
    for lang in LANGS:
        for i, text in enumerate(MULTILINGUAL_TEXTS[lang][:PER_LANG]):
            rows.append({"id": f"{lang}-{i}", "text": text, "lang": lang, "year": 2000 + i})
    return rows


# ---- building a store by hand ----------------------------------------------------------
def _set_files(set_dir: Location, manifest: dict, kind: str) -> list[pa.Table]:
    entries = sorted((e for e in manifest["files"] if e["kind"] == kind), key=lambda e: e["shard"])
    return [schemas.read_table(set_dir.join(e["path"])) for e in entries]


def _commit_index(root: Location, name: str, set_manifest: dict, set_dir: Location, *, kind: str,
                  dim: int, params: dict, files: dict[str, tuple[str, bytes]], ids: list[str]) -> dict:
    """Write files + ids (parquet and arrays) + manifest in the jobs/build_index layout; publish."""
    art = Artifact(root, "indexes", name)
    version, _ = art.claim(f"test-{name}", {"test": True})
    vdir = art.version_dir(version)
    entries = []
    for path, (fkind, data) in files.items():
        vdir.join(path).write_bytes(data)
        entries.append({"path": path, "kind": fkind, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "rows": len(ids)})
    entries.extend(write_ids(pa.array(ids, pa.string()), vdir))
    manifest = {"index_kind": kind, "dim": dim, "params": params, "n_docs": len(ids), "files": entries,
                "source": {"set": set_manifest["name"], "version": set_manifest["version"],
                           "fingerprint": set_manifest["model"]["fingerprint"], "dir": set_dir.url}}
    art.commit(version, manifest)
    art.publish(version)
    return manifest


def _build_dense(root: Location, name: str, set_manifest: dict, set_dir: Location, kind: str,
                 dim: int, pq_nbits: int = 8) -> None:
    tables = _set_files(set_dir, set_manifest, "dense")
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    vectors = truncate(np.concatenate([schemas.dense_matrix(t) for t in tables]), dim)
    params = dense.DenseIndexParams(kind, dim, pq_nbits=pq_nbits).resolved(len(ids))
    index = dense.train(params, vectors)
    dense.add(index, vectors, 0)
    _commit_index(root, name, set_manifest, set_dir, kind=kind, dim=dim, params=params.to_dict(),
                  files={"index.faiss": ("index", dense.to_bytes(index))}, ids=ids)


def _build_plaid(root: Location, name: str, set_manifest: dict, set_dir: Location) -> None:
    codec = ResidualCodec.from_bytes(set_dir.join("codec.npz").read_bytes())
    table = pa.concat_tables(_set_files(set_dir, set_manifest, "tokens"))
    codes, residuals = [], []
    for row in table.to_pylist():
        codes.append(np.array(row["codes"], dtype=codec.code_dtype))
        residuals.append(np.frombuffer(row["residuals"], np.uint8).reshape(len(row["codes"]), -1))
    index = CentroidIndex.build(codec, codes, residuals)
    files = {}
    for key, array in index.to_arrays().items():
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        files[f"plaid/{key}.npy"] = ("plaid", buf.getvalue())
    _commit_index(root, name, set_manifest, set_dir, kind="plaid", dim=codec.dim,
                  params={"nbits": codec.nbits}, files=files, ids=table.column("id").to_pylist())


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, ray_session_tmp, s3_server) -> dict:
    """A root with set ``t`` and indexes ``t-flat``, ``t-int8`` (dim 16) and ``t-plaid``."""
    ensure_local_ray()
    tmp = tmp_path_factory.mktemp("searcher")
    rows = _corpus()
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    root = Location(str(tmp / "store"))
    set_manifest = embed(EmbedConfig(corpus=(str(corpus),), model=str(tiny_model_dir), set_name="t",
                                     root=root.url, rows_per_shard=20, n_centroids=16, max_batch=8))
    set_dir = Artifact(root, "sets", "t").version_dir(set_manifest["version"])
    _build_dense(root, "t-flat", set_manifest, set_dir, "flat", 32)
    _build_dense(root, "t-int8", set_manifest, set_dir, "int8", 16)
    _build_plaid(root, "t-plaid", set_manifest, set_dir)
    return {"root": root, "rows": rows, "set": set_manifest, "tmp": tmp}


@pytest.fixture(scope="module")
def flat(store) -> Searcher:
    return Searcher.open(store["root"], "t-flat")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_model_dir):
    """A copy of the tiny model with one weight changed: a different fingerprint."""
    out = tmp_path_factory.mktemp("other-model") / "m"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = weights[key] + np.float32(0.01)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---- search ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["t-flat", "t-int8"])
def test_own_text_is_top1_for_dense_indexes(store, name):
    searcher = Searcher.open(store["root"], name)
    rows = store["rows"]
    hits = searcher.search([r["text"] for r in rows], k=5)
    assert [h[0][0] for h in hits] == [r["id"] for r in rows]
    for h in hits:
        assert len(h) == 5
        scores = [s for _, s in h]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(1.0, abs=5e-3)
    expected = ("flat", 32) if name == "t-flat" else ("int8", 16)
    assert (searcher.kind, searcher.dim, searcher.nbits) == (*expected, None)


def test_plaid_search_ranks_by_maxsim(store):
    searcher = Searcher.open(store["root"], "t-plaid")
    rows = store["rows"]
    no_pruning = {"ncells": 16, "centroid_score_threshold": -math.inf, "ndocs": 1000}
    hits = searcher.search([r["text"] for r in rows], k=len(rows), params=no_pruning)
    known = {r["id"] for r in rows}
    for h in hits:
        assert len(h) == len(rows) and {d for d, _ in h} == known
        scores = [s for _, s in h]
        assert scores == sorted(scores, reverse=True)
    # with every candidate scored exactly, a document's own text finds it near the top
    ranks = [[d for d, _ in h].index(r["id"]) for h, r in zip(hits, rows)]
    assert np.mean(np.array(ranks) < 3) >= 0.8
    assert searcher.nbits == store["set"]["codec"]["nbits"]


def test_lang_filter_restricts_results(store, flat):
    de = {r["id"] for r in store["rows"] if r["lang"] == "de"}
    hits = flat.search([store["rows"][0]["text"], "Bahnhof"], k=20, lang="de")
    for h in hits:
        assert {d for d, _ in h} == de  # all 9 German documents, nothing else
    plaid = Searcher.open(store["root"], "t-plaid").search(["Bahnhof"], k=20, lang="de")
    assert {d for d, _ in plaid[0]} <= de and plaid[0]


def test_where_filter(store, flat):
    rows = store["rows"]
    recent = {r["id"] for r in rows if r["year"] > 2005}
    hits = flat.search([rows[0]["text"]], k=50, where="year > 2005")
    assert {d for d, _ in hits[0]} == recent
    both = flat.search([rows[0]["text"]], k=50, lang="fr", where="year > 2005 AND n_chars > 0")
    assert {d for d, _ in both[0]} == {i for i in recent if i.startswith("fr-")}
    assert flat.search(["x y z"], k=5, where="year > 3000") == [[]]


def test_invalid_filter_and_params(flat):
    with pytest.raises(ValueError, match="invalid filter"):
        flat.search(["question"], where="no_such_column > 1")
    with pytest.raises(ValueError, match="invalid filter"):
        flat.search(["question"], where="year >")
    with pytest.raises(ValueError, match="unknown search params"):
        flat.search(["question"], params={"ndocs": 3})
    with pytest.raises(ValueError, match="k must be"):
        flat.search(["question"], k=0)


@pytest.mark.parametrize("where, named", [
    ("cast((select content from read_text('/etc/hostname')) as int) = 1", "a subquery is not allowed"),
    ("1=1) union select 1 --", 'syntax error at or near ")"'),
    ("year > 0; select 1", "';'"),
    ("year > 0 -- comment", "comments are not allowed"),
    ("id in (select id from documents_all)", "a subquery is not allowed"),
    ("exists (from read_csv('/etc/passwd'))", "a subquery is not allowed"),
    ("no_such_column > 1", "unknown column 'no_such_column'"),
])
def test_filter_injection_is_refused_before_it_runs(flat, where, named):
    """Issue 14 item 2: a filter is one expression over the documents columns, named when refused."""
    from storage.catalog import CatalogError

    with pytest.raises(CatalogError) as err:
        flat.search(["question"], where=where)
    message = str(err.value)
    assert named in message and "\n" not in message, message
    assert open("/etc/hostname").read().strip() not in message.replace("/etc/hostname", "")


def test_filter_runs_on_the_locked_catalog_of_the_index_set_version(flat):
    con = flat.catalog()
    with pytest.raises(Exception, match="disabled by configuration"):
        con.execute("select * from read_text('/etc/hostname')").fetchall()
    # documents_all: an index built on a set version that is no longer current still filters its own rows
    assert flat.allowed_positions(where="documents.year >= 2000").size == flat.n_docs


def test_empty_query_is_refused_with_its_position(flat):
    with pytest.raises(ValueError, match="query 1 is empty"):
        flat.search(["a real question", "   "])
    with pytest.raises(ValueError, match="list of strings"):
        flat.search("a single string")
    assert flat.search([]) == []


def test_unknown_index_and_version(store):
    with pytest.raises(NotFoundError, match="t-flat"):  # the known names are listed
        Searcher.open(store["root"], "nope")
    with pytest.raises(NotFoundError, match="v000009"):
        Searcher.open(store["root"], "t-flat", version="v000009")


def test_search_from_an_s3_root(store, s3_bucket):
    root = Location(f"{s3_bucket}/store")
    root.fs.put(store["root"].path + "/", root.path, recursive=True)
    searcher = Searcher.open(root, "t-int8")
    rows = store["rows"]
    hits = searcher.search([rows[10]["text"]], k=3, where="lang = 'de'")
    assert hits[0][0][0] == rows[10]["id"] and all(d.startswith("de-") for d, _ in hits[0])


def _plaid_index(searcher: Searcher) -> CentroidIndex:
    return searcher.backend.index


def test_opening_a_plaid_index_loads_its_compiled_stages_beside_the_encoder(store, caplog):
    searcher = Searcher.open(store["root"], "t-plaid")
    assert set(searcher.load_seconds) == {"index", "model", "kernels"}
    if kernels.ENABLED:  # loaded in open(), not in the first query
        assert searcher.load_seconds["kernels"] > 0
        mode = SearchParams().resolved(10).products  # int8 on a CPU with AMX (and torch), else float32
        int8_stages = () if mode == "float32" else ("decode_words", "exact_layout", "early_rest", "refine_int8")
        loaded = kernels.loaded_variants()
        assert all(loaded[k] for k in ("probe_documents", "cell_maxsum", "token_maxsum", "top_k", *int8_stages)), loaded
    assert "compiled stages" not in caplog.text  # the warm-up did not fail


def test_plaid_index_is_memory_mapped_and_searches_like_in_memory(store):
    searcher = Searcher.open(store["root"], "t-plaid", threads=2)
    index = _plaid_index(searcher)
    for key in ("codes", "residuals", "ivf_docs", "doc_cells", "token_inv_norms"):
        array = getattr(index, key)
        assert isinstance(array, np.memmap) or isinstance(array.base, np.memmap), key
    in_memory = CentroidIndex.from_arrays(index.codec, {k: np.array(v) for k, v in index.to_arrays().items()})
    q = np.random.default_rng(0).standard_normal((3, 8, index.codec.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    got, want = index.search(q, 5, threads=2), in_memory.search(q, 5)
    np.testing.assert_array_equal(got[1], want[1])
    texts = [r["text"] for r in store["rows"][:6]]
    assert searcher.search(texts, k=5) == Searcher.open(store["root"], "t-plaid").search(texts, k=5)
    with pytest.raises(ValueError, match="threads"):
        Searcher.open(store["root"], "t-plaid", threads=0)


@pytest.mark.parametrize("products", ["float32", "int8"])
def test_open_centroid_index_serves_without_torch(store, products):
    """A process serving pre-encoded queries maps the index and names its results; with float32
    products (``TESSERA_PLAID_PRODUCTS``) it never imports torch, nor faiss, pandas or pyarrow
    (none serves a query: ~15, ~40 and ~30 MB resident); int8 products import torch on the
    first search."""
    code = (
        "import sys, numpy as np\n"
        "from indexing.index_files import open_centroid_index, read_doc_ids\n"
        "from storage import layout\n"
        "from storage.manifest import Artifact\n"
        f"index, manifest = open_centroid_index({store['root'].url!r}, 't-plaid')\n"
        f"vdir = Artifact(layout.resolve_root({store['root'].url!r}), 'indexes', 't-plaid')"
        ".version_dir(manifest['version'])\n"
        "names = read_doc_ids(vdir, manifest)\n"
        "assert len(names) == index.n_docs\n"
        "q = np.ones((1, 4, index.codec.dim), np.float32) / np.sqrt(index.codec.dim)\n"
        "scores, ids = index.search(q, 3)\n"
        "assert (ids >= 0).all() and manifest['index_kind'] == 'plaid'\n"
        "assert isinstance(index.residuals.base, np.memmap) or isinstance(index.residuals, np.memmap)\n"
        "print([names[int(p)] for p in ids[0]])\n"
        "print(sorted(m for m in ('torch', 'faiss', 'pandas', 'pyarrow') if m in sys.modules))\n"
    )
    if products == "int8" and not (kernels.ENABLED and int8.installed()):
        pytest.skip("int8 products need numba and torch")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]), env={**os.environ, int8.ENV: products})
    named, imported = out.stdout.strip().splitlines()
    assert imported == ("[]" if products == "float32" else "['torch']")
    index, manifest = open_centroid_index(store["root"], "t-plaid")
    vdir = Artifact(store["root"], "indexes", "t-plaid").version_dir(manifest["version"])
    q = np.ones((1, 4, index.codec.dim), np.float32) / np.sqrt(index.codec.dim)
    assert named == str([read_ids(vdir, manifest)[int(p)].as_py() for p in index.search(q, 3)[1][0]])
    with pytest.raises(ValueError, match="not plaid"):
        open_centroid_index(store["root"], "t-flat")


def test_a_corrupt_plaid_file_is_refused(store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(store["root"].path, root)
    (path,) = root.glob("indexes/t-plaid/v*/plaid/residuals.npy")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="residuals.npy: sha256 does not match"):
        Searcher.open(str(root), "t-plaid")


def test_doc_ids_are_the_parquet_ids_from_memory_mapped_arrays(store):
    """read_doc_ids: ids.parquet's ids from the two ids/*.npy arrays, memory-mapped; from the
    Parquet file for a version written before the arrays existed."""
    art = Artifact(store["root"], "indexes", "t-plaid")
    version = art.current()
    manifest, vdir = art.manifest(version), art.version_dir(version)
    want = read_ids(vdir, manifest).to_pylist()
    got = read_doc_ids(vdir, manifest)
    assert isinstance(got.offsets, np.memmap) and isinstance(got.utf8, np.memmap)
    assert got.to_pylist() == want == list(got) and len(got) == len(want) == 36
    assert [got[0], got[-1], got[np.int64(5)]] == [want[0], want[-1], want[5]]
    with pytest.raises(IndexError, match="label 36 out of range"):
        got[36]
    assert got.to_arrow().equals(read_ids(vdir, manifest)) and got.n_ids() == 36
    legacy = {**manifest, "files": [e for e in manifest["files"] if e["kind"] != ID_ARRAYS]}
    assert read_doc_ids(vdir, legacy).to_pylist() == want


def test_plaid_searcher_names_results_from_the_id_arrays_or_the_parquet_ids(store, tmp_path):
    """A plaid Searcher takes its ids from the version's id arrays (memory-mapped); a version
    without them (written before they existed) from ids.parquet: the same ids, results and filters."""
    root = tmp_path / "store"
    shutil.copytree(store["root"].path, root)
    (path,) = root.glob("indexes/t-plaid/v*/manifest.json")
    manifest = json.loads(path.read_text())
    manifest["files"] = [e for e in manifest["files"] if e["kind"] != ID_ARRAYS]
    path.write_text(json.dumps(manifest))
    new, old = Searcher.open(store["root"], "t-plaid"), Searcher.open(str(root), "t-plaid")
    assert isinstance(new._names, DocIds) and isinstance(old._names, tuple)
    art = Artifact(store["root"], "indexes", "t-plaid")
    want = tuple(read_ids(art.version_dir(art.current()), art.manifest(art.current())).to_pylist())
    assert new.ids == old.ids == want and new.n_docs == old.n_docs == 36
    assert new.doc_ids == old.doc_ids == list(want)
    texts = [r["text"] for r in store["rows"][:5]] + ["Bahnhof"]
    assert new.search(texts, k=5) == old.search(texts, k=5)
    assert new.search(texts, k=20, lang="fr") == old.search(texts, k=20, lang="fr")
    assert new._id_array.equals(old._id_array)


def test_write_ids_holes_and_refusals(tmp_path):
    vdir = Location(str(tmp_path / "v"))
    files = write_ids(pa.array(["a", "bé", "c"], pa.string()), vdir, labels=np.array([0, 2, 3]), n_labels=5)
    assert [e["kind"] for e in files] == ["ids", ID_ARRAYS, ID_ARRAYS]
    manifest = {"files": files, "n_docs": 3, "n_labels": 5}
    assert read_doc_ids(vdir, manifest).to_pylist() == ["a", None, "bé", "c", None]
    assert read_doc_ids(vdir, manifest).to_arrow().equals(read_ids(vdir, manifest))
    assert read_ids(vdir, manifest).to_pylist() == ["a", None, "bé", "c", None]
    assert read_doc_ids(vdir, manifest).n_ids() == 3
    sliced = Location(str(tmp_path / "s"))  # an Arrow slice: its offsets do not start at 0
    entries = write_ids(pa.chunked_array([pa.array(["x", "yy", "zzz"]).slice(1)]), sliced)
    assert read_doc_ids(sliced, {"files": entries, "n_docs": 2}).to_pylist() == ["yy", "zzz"]
    empty = Location(str(tmp_path / "e"))
    assert read_doc_ids(empty, {"files": write_ids(pa.array([], pa.string()), empty), "n_docs": 0}).to_pylist() == []
    for ids, labels, match in ((["a", ""], None, "empty id at label 1"), (["a", None], None, "null id at label 1"),
                               (["a", "b"], [1, 0], "ascending labels"), (["a"], [0, 1], "1 ids need 1")):
        bad = Location(str(tmp_path / "bad"))
        with pytest.raises(ValueError, match=match):
            write_ids(pa.array(ids, pa.string()), bad, labels=labels)
        assert not os.path.exists(bad.path)  # refused before anything is written
    # a manifest that disagrees with the arrays, and a changed file, are refused
    with pytest.raises(ValueError, match="the manifest says 4 documents"):
        read_doc_ids(vdir, {**manifest, "n_docs": 4})
    with pytest.raises(ValueError, match="not the offsets of 6 ids"):
        read_doc_ids(vdir, {**manifest, "n_labels": 6})
    path = tmp_path / "v" / "ids" / "utf8.npy"
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    with pytest.raises(ValueError, match="utf8.npy: sha256 does not match"):
        read_doc_ids(vdir, manifest)


def test_plaid_index_on_s3_is_cached_locally_once(store, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    root = Location(f"{s3_bucket}/store")
    root.fs.put(store["root"].path + "/", root.path, recursive=True)
    texts = [r["text"] for r in store["rows"][:4]]
    expected = Searcher.open(store["root"], "t-plaid").search(texts, k=3)
    assert Searcher.open(root, "t-plaid").search(texts, k=3) == expected
    cached = sorted((tmp_path / "cache" / "indexes").glob("*.npy"))
    index_files = [e for e in Searcher.open(root, "t-plaid").manifest["files"] if e["kind"] in ("plaid", ID_ARRAYS)]
    assert {p.stem for p in cached} == {e["sha256"] for e in index_files}  # the plaid arrays and the ids
    # The second open maps the cached copies; reading the store's copy again would fail.
    opened = []
    real_open = Location.open
    monkeypatch.setattr(Location, "open", lambda self, mode="rb": opened.append(self.url) or real_open(self, mode))
    assert Searcher.open(root, "t-plaid").search(texts, k=3) == expected
    assert not [u for u in opened if "/plaid/" in u or "/ids/" in u]
    # A damaged cached copy is noticed and replaced.
    cached[0].write_bytes(b"garbage")
    assert Searcher.open(root, "t-plaid").search(texts, k=3) == expected
    assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == cached[0].stem
    # a process serving pre-encoded queries reads the same cached copies
    opened.clear()
    index, manifest = open_centroid_index(root, "t-plaid")
    vdir = Artifact(root, "indexes", "t-plaid").version_dir(manifest["version"])
    assert read_doc_ids(vdir, manifest).to_pylist() == list(Searcher.open(store["root"], "t-plaid").ids)
    assert len([e for e in index_files if e["kind"] == ID_ARRAYS]) == 2
    assert not [u for u in opened if u.startswith("s3://") and ("/plaid/" in u or "/ids/" in u)]


# ---- query encoder compatibility -------------------------------------------------------
def test_wrong_query_encoder_is_refused(store, other_model_dir):
    with pytest.raises(IncompatibleEncoderError, match="refusing") as err:
        Searcher.open(store["root"], "t-flat", query_encoder=str(other_model_dir))
    assert "t-flat" in str(err.value) and str(other_model_dir) in str(err.value)


def test_same_model_given_explicitly_is_accepted(store, tiny_model_dir, flat):
    searcher = Searcher.open(store["root"], "t-flat", query_encoder=str(tiny_model_dir))
    assert searcher.encoder.fingerprint == store["set"]["model"]["fingerprint"]
    assert not searcher.encoder.registered
    half = Searcher.open(store["root"], "t-flat", query_encoder=str(tiny_model_dir), precision="bfloat16")
    assert half.precision == "bfloat16"          # the set's own model: as asked
    assert half.search(["Bahnhof"], k=3)[0][0][0] == searcher.search(["Bahnhof"], k=3)[0][0][0]


def test_registered_query_encoder_is_accepted(store, other_model_dir, tmp_path):
    from embedding.model import fingerprint, read_settings

    root = Location(str(tmp_path / "store"))
    shutil.copytree(store["root"].path, root.path)
    set_fp = store["set"]["model"]["fingerprint"]
    enc_fp = fingerprint(other_model_dir, read_settings(other_model_dir))
    assert not is_registered(root, enc_fp, set_fp)
    Artifact(root, "encoders", "tuned").commit("v000001", {"fingerprint": enc_fp, "compatible_with":
                                                           {"set": "t", "fingerprint": set_fp}})
    assert is_registered(root, enc_fp, set_fp) and not is_registered(root, enc_fp, "0" * 64)
    searcher = Searcher.open(root, "t-flat", query_encoder=str(other_model_dir))
    assert searcher.encoder.registered and searcher.encoder.fingerprint == enc_fp
    assert len(searcher.search(["Bahnhof"], k=3)[0]) == 3
    # A re-tuned encoder's adiabatic changes are below bfloat16's resolution: float32 on auto, half refused.
    assert searcher.precision == "float32"
    with pytest.raises(ValueError, match="re-tuned encoder.*below bfloat16's resolution.*float32"):
        Searcher.open(root, "t-flat", query_encoder=str(other_model_dir), precision="bfloat16")


# ---- evaluate --------------------------------------------------------------------------
def _eval_inputs(tmp, rows) -> tuple[str, str]:
    queries = tmp / "queries.jsonl"
    picked = rows[::3]
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": r["text"], "lang": r["lang"]}) + "\n"
                               for i, r in enumerate(picked)))
    qrels = tmp / "qrels.tsv"
    lines = [f"q{i}\t0\t{r['id']}\t1" for i, r in enumerate(picked)] + ["q0\t0\tnot-in-corpus\t1"]
    qrels.write_text("\n".join(lines) + "\n")
    return str(queries), str(qrels)


def test_evaluate_writes_a_report(store, tmp_path):
    queries, qrels = _eval_inputs(tmp_path, store["rows"])
    out = tmp_path / "report"
    result = evaluate_run(EvalConfig(index=("t-flat", "t-plaid"), queries=queries, qrels=qrels,
                                     root=store["root"].url, k=20, out=str(out), batch_size=5))
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert result["report"]["json"] == str(out / "report.json")
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["t-flat", "t-plaid"]
    for label in ("t-flat", "t-plaid"):
        r = result["results"][label]
        assert 0.0 <= r["overall"]["nDCG@10"] <= 1.0
        assert r["overall"]["queries"] == 12 and r["missing_docs"] == 1
        assert set(r["per_language"]) == set(LANGS)
    assert result["results"]["t-flat"]["overall"]["MRR@10"] == pytest.approx(1.0)
    assert report["results"]["t-plaid"]["meta"]["nbits"] == store["set"]["codec"]["nbits"]
    assert report["results"]["t-flat"]["meta"] == {"kind": "flat", "dim": 32, "version": "v000001"}


def test_evaluate_default_out_is_under_the_root(store, tmp_path):
    queries, qrels = _eval_inputs(tmp_path, store["rows"])
    root = Location(str(tmp_path / "store"))
    shutil.copytree(store["root"].path, root.path)
    result = evaluate_run(EvalConfig(index="t-int8", queries=queries, qrels=qrels, root=root.url))
    assert result["report"]["markdown"].startswith(root.join("reports", "eval-").url)


@pytest.mark.parametrize("bad, match", [
    ({"index": ()}, "no index"),
    ({"index": ("a", "a")}, "more than once"),
    ({"index": ("bad name",)}, "invalid index name"),
    ({"k": 0}, "k must be"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"queries": ""}, "queries must be"),
    ({"device": "tpu"}, "device must be"),
])
def test_eval_config_checks(bad, match):
    cfg = {"index": ("a",), "queries": "q.jsonl", "qrels": "qrels.tsv", **bad}
    with pytest.raises(ValueError, match=match):
        EvalConfig(**cfg)


def test_restrict_qrels_to_the_queries_file():
    from jobs.evaluate import restrict_qrels

    kept, ignored = restrict_qrels({"a": {"d1": 1}, "b": {"d2": 1}, "c": {"d3": 1}}, {"a", "c", "x"})
    assert kept == {"a": {"d1": 1}, "c": {"d3": 1}} and ignored == 1
    with pytest.raises(ValueError, match="no query of the queries file has judgements"):
        restrict_qrels({"a": {"d1": 1}}, {"z"})


# ---- thread budget and batches (issue 17) -----------------------------------------------
_KINDS = ("flat", "ivf", "ivfpq", "hnsw", "int8", "binary", "plaid")


def _index_of_kind(store, kind: str) -> str:
    """``t-<kind>``: the store's own for flat/int8/plaid, built here (dim 32) for the others."""
    name = {"flat": "t-flat", "int8": "t-int8", "plaid": "t-plaid"}.get(kind, f"t-{kind}")
    if not Artifact(store["root"], "indexes", name).exists():
        set_dir = Artifact(store["root"], "sets", "t").version_dir(store["set"]["version"])
        _build_dense(store["root"], name, store["set"], set_dir, kind, 32, pq_nbits=4)  # 16 <= 36 documents
    return name


def _pool_threads(user_api: str, layer: "str | None" = None) -> set[int]:
    from threadpoolctl import threadpool_info

    return {p["num_threads"] for p in threadpool_info()
            if p["user_api"] == user_api and layer in (None, p.get("threading_layer"))}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "plaid"])
def test_thread_budget_is_applied_in_each_phase(store, kind, monkeypatch):
    import torch

    searcher = Searcher.open(store["root"], _index_of_kind(store, kind), threads=3)
    assert searcher.budget.threads == 3
    backend, seen = searcher.backend, {}
    encode, search = backend.encode, backend.search

    def spy_encode(*args):
        seen["encode"] = torch.get_num_threads()
        return encode(*args)

    def spy_search(q, *args, **kwargs):
        # numpy's OpenBLAS (pthreads) at one thread; faiss's (OpenMP layer) follows OpenMP
        seen["search"] = (len(q), _pool_threads("blas", "pthreads"), _pool_threads("openmp"),
                          max(_pool_threads("blas")))
        seen["split"] = kwargs.get("split")
        return search(q, *args, **kwargs)

    monkeypatch.setattr(backend, "encode", spy_encode)
    monkeypatch.setattr(backend, "search", spy_search)
    torch.set_num_threads(1)
    try:
        searcher.search(["one query"], k=3)
        assert seen["encode"] == 3                                  # torch's pool: the budget
        assert seen["search"] == (1, {1}, {1}, 1)                   # BLAS 1, OpenMP min(3, nq)
        assert seen["split"] is False    # right after encoding, one query is searched whole
        searcher.search([r["text"] for r in store["rows"][:5]], k=3)
        assert seen["search"] == (5, {1}, {3}, 3)
        assert torch.get_num_threads() == 1                         # the caller's setting is put back
    finally:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    if kind == "plaid":
        assert backend.index is not None and searcher.backend.threads == 3   # the query pool's size


def test_plaid_splits_a_single_pre_encoded_query_over_the_budget(store, monkeypatch):
    searcher = Searcher.open(store["root"], _index_of_kind(store, "plaid"), threads=3)
    index = searcher.backend.index
    q = searcher.encode_queries(["one query", "two queries"])
    asked = []
    search = type(index).search

    def spy(self, Q, k, params=None, **kwargs):
        asked.append((len(Q), kwargs["threads"]))
        return search(self, Q, k, params, **kwargs)

    monkeypatch.setattr(type(index), "search", spy)
    whole = searcher.retrieve(q[:1], 3, split=False)
    split = searcher.retrieve(q[:1], 3)
    batch = searcher.retrieve(q, 3, split=False)
    searcher.search(["one query"], k=3)
    # a pre-encoded query over the 3 threads; whole (1 thread) when asked and in search(),
    # right after encoding; a batch over its queries either way
    assert asked == [(1, 1), (1, 3), (2, 3), (1, 1)]
    np.testing.assert_array_equal(whole[1], split[1])
    np.testing.assert_array_equal(whole[0], split[0])
    np.testing.assert_array_equal(batch[1][:1], whole[1])


def test_default_thread_budget_is_the_available_cpus(flat):
    assert flat.budget.threads == len(os.sched_getaffinity(0))
    assert flat.batch_size == 64
    assert set(flat.load_seconds) == {"index", "model"} and all(v > 0 for v in flat.load_seconds.values())
    with pytest.raises(ValueError, match="threads"):
        Searcher.open(flat.root, "t-flat", threads=0)
    with pytest.raises(ValueError, match="batch_size"):
        Searcher.open(flat.root, "t-flat", batch_size=0)


@pytest.mark.parametrize("kind", _KINDS)
def test_batched_search_returns_what_one_at_a_time_returns(store, kind):
    name = _index_of_kind(store, kind)
    texts = [r["text"] for r in store["rows"]]
    batched = Searcher.open(store["root"], name, batch_size=8)   # 36 queries: 5 forward batches, the last short
    many = batched.search(texts, k=5)
    assert batched.search_seconds["encode"] > 0 and batched.search_seconds["retrieve"] > 0
    single = Searcher.open(store["root"], name, batch_size=1)
    one = [single.search([t], k=5)[0] for t in texts]
    assert len(many) == len(one) == len(texts)
    for got, want in zip(many, one):
        assert [d for d, _ in got] == [d for d, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-4, abs=1e-4)
