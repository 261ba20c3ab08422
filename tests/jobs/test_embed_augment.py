"""xQG passage augmentation through the CLI: queries from a file, a corpus column or a tiny T5
generator; the stored augmented vectors are embedding.augment's arithmetic on the plain ones and
the separately encoded queries; both kinds index (flat, int8, PLAID) and search; bad input is
refused before anything is published; local root and s3://."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from embedding.augment import augment_dense, interleave
from embedding.codec import ResidualCodec
from fixtures_models import MULTILINGUAL_TEXTS, build_tiny_seq2seq
from jobs.embed_augment import AugmentConfig
from storage import manifest as mf
from storage import schemas
from storage.fs import location
from storage.manifest import Artifact
from tests.helpers import cli, sample_docs, write_jsonl
from tests.storage.test_manifest_types import mismatches

QUERY_TEXTS = {"de": MULTILINGUAL_TEXTS["de"], "fr": MULTILINGUAL_TEXTS["fr"], "es": MULTILINGUAL_TEXTS["es"]}
FAST = ("--nbits", "2", "--n-centroids", "8", "--rows-per-shard", "8")
WEIGHT = AugmentConfig.weight  # the default passage weight


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny-t5"))


def augment_rows(n_passages: int = 5) -> list[dict]:
    """Two queries (de, fr) for each of the first passages, one (es) more for passage 0."""
    rows = []
    for i in range(n_passages):
        for lang in ("de", "fr"):
            rows.append({"passage_id": f"d{i:04d}", "text": QUERY_TEXTS[lang][i], "lang": lang})
    rows.append({"passage_id": "d0000", "text": QUERY_TEXTS["es"][0], "lang": "es"})
    return rows


# ---- reading back -----------------------------------------------------------------------------
def version(root: str, set_name: str) -> tuple[dict, object]:
    art = Artifact(location(root), "sets", set_name)
    m = art.manifest(art.current())
    return m, art.version_dir(m["version"])


def read_kind(m: dict, vdir, kind: str) -> pa.Table:
    return pa.concat_tables([schemas.read_table(vdir.join(e["path"])) for e in m["files"] if e["kind"] == kind])


def dense_by_id(m: dict, vdir, kind: str) -> dict:
    t = read_kind(m, vdir, kind)
    return dict(zip(t.column("id").to_pylist(), schemas.dense_matrix(t).astype(np.float32)))


def tokens_by_id(m: dict, vdir, kind: str, codec: ResidualCodec) -> dict:
    out = {}
    for row in read_kind(m, vdir, kind).to_pylist():
        codes = np.array(row["codes"], codec.code_dtype)
        res = np.frombuffer(row["residuals"], np.uint8).reshape(len(codes), -1)
        out[row["id"]] = (codes, codec.decompress(codes, res))
    return out


def encoded_queries(model_dir, owner_ids: list[str], texts: list[str], langs: list):
    """The queries as the job encodes them: query side of the set's model."""
    from embedding.encoder import Encoder
    from embedding.model import load_model

    return Encoder(load_model(model_dir, device="cpu")).encode_query_tokens(texts, langs)


def check_dense(m, vdir, model_dir, owners: list[str], texts, langs, weight: float, alone: bool = True) -> None:
    plain, aug = dense_by_id(m, vdir, "dense"), dense_by_id(m, vdir, "dense_aug")
    assert set(plain) == set(aug)
    ids = sorted(plain)
    q = encoded_queries(model_dir, owners, texts, langs)
    owner = np.array([ids.index(o) for o in owners], np.int64)
    want = augment_dense(np.stack([plain[i] for i in ids]), q.dense, owner, weight)
    np.testing.assert_allclose(np.stack([aug[i] for i in ids]), want, atol=4e-3)
    if alone:  # a passage without queries keeps its vector
        rest = [i for i in ids if i not in owners]
        assert rest and all(np.allclose(aug[i], plain[i], atol=2e-3) for i in rest)


def check_tokens(m, vdir, model_dir, owners: list[str], texts, langs, cap: int) -> None:
    codec = ResidualCodec.from_bytes(vdir.join("codec.npz").read_bytes())
    plain, aug = tokens_by_id(m, vdir, "tokens", codec), tokens_by_id(m, vdir, "tokens_aug", codec)
    q = encoded_queries(model_dir, owners, texts, langs)
    ids = sorted(plain)
    owner = np.array([ids.index(o) for o in owners], np.int64)
    order = interleave(owner, langs)
    added = 0
    for i, pid in enumerate(ids):
        codes, vecs = plain[pid]
        acodes, avecs = aug[pid]
        np.testing.assert_array_equal(acodes[:len(codes)], codes)  # the passage's own tokens first, unchanged
        want = [q.tokens[j] for j in order if owner[j] == i]
        want = np.concatenate(want)[:cap] if want else np.zeros((0, vecs.shape[1]), np.float32)
        assert len(acodes) == len(codes) + len(want), pid
        if len(want):  # then its queries' tokens, as the set's codec compresses them
            qcodes, qres = codec.compress(want)
            assert (acodes[len(codes):] == qcodes).mean() >= 0.8, pid
            cos = (avecs[len(codes):] * codec.decompress(qcodes, qres)).sum(1)
            assert np.median(cos) > 0.98, (pid, cos)
        added += len(want)
    assert m["augment"]["counts"]["tokens"] == added > 0


def scores_of(capsys, root: str, index: str, text: str, doc: str) -> float:
    code, out, err = cli(capsys, "search", "--index", index, "--root", root, "--json", "-k", "1",
                         "--where", f"id = '{doc}'", text)
    assert code == 0, err[-2000:]
    hit = json.loads(out)[0]["results"][0]
    assert hit["id"] == doc
    return hit["score"]


def index_both(capsys, root: str, set_name: str, kinds=("flat", "plaid")) -> None:
    for kind in kinds:
        for vectors in ("plain", "augmented"):
            code, out, err = cli(capsys, "index", "--set", set_name, "--kind", kind, "--root", root, "--json",
                                 "--vectors", vectors, "--name", f"{set_name}-{kind}-{vectors}")
            assert code == 0, err[-2000:]
            assert json.loads(out).get("vectors", "plain") == vectors
            assert mismatches(json.loads(out), mf.IndexManifest) == []


# ---- the tests --------------------------------------------------------------------------------
def test_augmented_from_a_queries_file(ray_local, tiny_model_dir, tmp_path, capsys, monkeypatch):
    docs = sample_docs(14)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    qrows = augment_rows()
    queries = write_jsonl(str(tmp_path / "q.jsonl"), qrows)
    root = str(tmp_path / "store")
    args = ("embed", "--corpus", corpus, "--model", str(tiny_model_dir), "--set", "a", "--root", root, *FAST,
            "--augment-queries", queries, "--augment-weight", "0.6", "--augment-max-tokens", "10", "--json")
    # a run killed on its second shard resumes: same version, finished shards kept
    monkeypatch.setenv("TESSERA_FAILPOINTS", "embed.shard=1")
    code, _, err = cli(capsys, *args)
    assert code == 1, err[-2000:]
    monkeypatch.delenv("TESSERA_FAILPOINTS")
    code, out, err = cli(capsys, *args)
    assert code == 0, err[-3000:]
    m = json.loads(out)
    assert m["version"] == "v000001" and m["augment"]["source"] == "queries"
    assert m["augment"]["file"]["sha256"] and m["input"]["augment"] == {k: m["augment"][k] for k in ("source", "file")}
    assert m["augment"]["counts"] == {"queries": 11, "passages": 5, "tokens": m["augment"]["counts"]["tokens"],
                                      "generated_empty": 0}
    assert {e["kind"] for e in m["files"]} >= {"dense", "dense_aug", "tokens", "tokens_aug"}
    assert mismatches(m, mf.SetManifest) == []  # the typed record declares the new keys
    assert m["timings"]["worker_augment"] > 0  # generation and query encoding apart from the passages'
    m, vdir = version(root, "a")
    assert not vdir.join("_augment").exists()
    owners, texts, langs = [r["passage_id"] for r in qrows], [r["text"] for r in qrows], [r["lang"] for r in qrows]
    order = sorted(range(len(owners)), key=lambda j: (owners[j], j))  # grouped by passage, input order within
    owners, texts, langs = [owners[j] for j in order], [texts[j] for j in order], [langs[j] for j in order]
    check_dense(m, vdir, tiny_model_dir, owners, texts, langs, 0.6)
    check_tokens(m, vdir, tiny_model_dir, owners, texts, langs, 10)

    # unchanged input: nothing to do; another queries file is another input
    code, _, err = cli(capsys, *args)
    assert code == 4, err[-2000:]

    # both kinds index and search; a query about passage 3 scores it higher on the augmented index
    index_both(capsys, root, "a", kinds=("flat", "int8", "plaid"))
    q = QUERY_TEXTS["de"][3]
    assert scores_of(capsys, root, "a-flat-augmented", q, "d0003") > scores_of(capsys, root, "a-flat-plain", q, "d0003")
    assert scores_of(capsys, root, "a-plaid-augmented", q, "d0003") >= \
        scores_of(capsys, root, "a-plaid-plain", q, "d0003") - 1e-3
    from indexing.searcher import Searcher
    from storage.vectors import read_dense

    s = Searcher.open(root, "a-int8-augmented")  # rescored with the augmented vectors
    np.testing.assert_array_equal(s.backend.vectors, read_dense(vdir, m, None, "augmented"))

    # a re-index would not carry the augmented files over: refused, nothing written
    code, _, err = cli(capsys, "reindex", "--set", "a", "--corpus", corpus, "--root", root)
    assert code == 3 and "passage augmentation" in err, err[-2000:]
    assert Artifact(location(root), "sets", "a").current() == "v000001"


def test_augmented_from_a_corpus_column_dense(ray_local, tiny_model_dir, tmp_path, capsys):
    docs = sample_docs(10)
    docs[0]["queries"] = [{"text": QUERY_TEXTS["de"][0], "lang": "de"}, {"text": QUERY_TEXTS["fr"][0], "lang": "fr"},
                          {"text": QUERY_TEXTS["de"][5], "lang": "de"}]
    docs[4]["queries"] = [{"text": QUERY_TEXTS["de"][4], "lang": "de"}, {"text": QUERY_TEXTS["es"][4], "lang": None}]
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    root = str(tmp_path / "store")
    code, out, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(tiny_model_dir), "--set", "col",
                         "--root", root, *FAST, "--mode", "dense", "--augment-column", "queries",
                         "--augment-langs", "de", "--augment-per-lang", "1", "--json")
    assert code == 0, err[-3000:]
    m = json.loads(out)
    assert m["augment"]["counts"]["queries"] == 2 and m["augment"]["column"] == "queries"
    m, vdir = version(root, "col")
    assert "queries" not in read_kind(m, vdir, "docs").column_names  # the queries, not metadata
    check_dense(m, vdir, tiny_model_dir, ["d0000", "d0004"], [QUERY_TEXTS["de"][0], QUERY_TEXTS["de"][4]],
                ["de", "de"], WEIGHT)
    index_both(capsys, root, "col", kinds=("flat",))
    q = QUERY_TEXTS["de"][4]
    assert scores_of(capsys, root, "col-flat-augmented", q, "d0004") > scores_of(capsys, root, "col-flat-plain", q,
                                                                                 "d0004")


def test_augmented_by_a_query_generator(ray_local, tiny_model_dir, t5_dir, tmp_path, capsys):
    from embedding.querygen import GenerationSettings, QueryGenerator

    docs = sample_docs(6)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    root = str(tmp_path / "store")
    code, out, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(tiny_model_dir), "--set", "gen",
                         "--root", root, "--nbits", "2", "--n-centroids", "8", "--augment-generator", str(t5_dir),
                         "--augment-langs", "de,fr", "--augment-per-lang", "2", "--gen-max-new-tokens", "6",
                         "--augment-max-tokens", "8", "--json")
    assert code == 0, err[-3000:]
    m = json.loads(out)
    gen = m["augment"]["generator"]
    assert m["augment"]["source"] == "generator" and len(gen["fingerprint"]) == 64
    assert gen["settings"]["queries_per_lang"] == 2 and gen["settings"]["max_new_tokens"] == 6
    assert mismatches(m, mf.SetManifest) == []
    # the same generator settings give the same queries (one shard: one generate call)
    g = QueryGenerator.load(t5_dir, GenerationSettings(**gen["settings"]), device="cpu")
    made = g.generate([d["text"] for d in docs], ["de", "fr"], passage_langs=[d["lang"] for d in docs])
    own = sum(d["lang"] in ("de", "fr") for d in docs)  # a passage's own language is skipped
    assert m["augment"]["counts"]["queries"] == len(made) == (2 * len(docs) - own) * 2 - made.empty
    m, vdir = version(root, "gen")
    owners = [docs[i]["id"] for i in made.passage]
    check_dense(m, vdir, tiny_model_dir, owners, made.texts, made.langs, WEIGHT, alone=False)
    check_tokens(m, vdir, tiny_model_dir, owners, made.texts, made.langs, 8)
    index_both(capsys, root, "gen", kinds=("plaid",))
    code, out, err = cli(capsys, "search", "--index", "gen-plaid-augmented", "--root", root, "--json", "-k", "3",
                         made.texts[0])
    assert code == 0 and len(json.loads(out)[0]["results"]) == 3, err[-2000:]


def test_bad_augmentation_input_is_refused_before_anything_is_written(ray_local, tiny_model_dir, tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(6))
    root = tmp_path / "store"
    root.mkdir()
    unknown = {"passage_id": "nope", "text": "q", "lang": "de"}
    queries = write_jsonl(str(tmp_path / "q.jsonl"), [*augment_rows(2), unknown])
    base = ("embed", "--corpus", corpus, "--model", str(tiny_model_dir), "--set", "bad", "--root", str(root))
    for extra, named in ((("--augment-queries", queries), "'nope'"),
                         (("--augment-generator", str(tiny_model_dir), "--augment-langs", "de"), "not a seq2seq"),
                         (("--augment-generator", str(tiny_model_dir)), "target languages"),
                         (("--augment-queries", queries, "--augment-column", "q"), "exactly one source"),
                         (("--augment-queries", str(tmp_path / "missing.jsonl")), "missing.jsonl"),
                         (("--augment-column", "q", "--augment-weight", "1.5"), "weight")):
        code, _, err = cli(capsys, *base, *extra)
        assert code == 2, (extra, err[-2000:])
        assert named in err, (extra, err[-2000:])
        assert list(root.iterdir()) == [], extra  # no set, no version, no claim
    # a bad value in the queries column is found by the actor reading it: exit 2, the version discarded
    docs = [{**d, "queries": None} for d in sample_docs(6)]  # JSONL pieces take their first row's keys
    docs[2]["queries"] = [{"text": " ", "lang": "de"}]
    corpus = write_jsonl(str(tmp_path / "c2.jsonl"), docs)
    code, _, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(tiny_model_dir), "--set", "bad",
                       "--root", str(root), "--mode", "dense", "--augment-column", "queries")
    assert code == 2 and "c2.jsonl: record 3: queries[0]" in err, err[-2000:]
    assert not (root / "sets" / "bad").exists()
    code, _, err = cli(capsys, "index", "--set", "bad", "--kind", "flat", "--vectors", "other", "--root", str(root))
    assert code == 2 and "vectors must be one of plain, augmented" in err


def test_plain_set_has_no_augmented_vectors_to_index(ray_local, tiny_model_dir, tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), sample_docs(6))
    root = str(tmp_path / "store")
    code, out, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(tiny_model_dir), "--set", "p",
                         "--root", root, "--mode", "dense", "--json")
    assert code == 0, err[-2000:]
    m = json.loads(out)
    assert "augment" not in m and "augment" not in m["config"] and "adapter_fallback" not in m["config"]
    code, _, err = cli(capsys, "index", "--set", "p", "--kind", "flat", "--vectors", "augmented", "--root", root)
    assert code == 2 and "dense_aug" in err and "augmentation" in err


def test_augmented_on_s3(ray_local, tiny_model_dir, s3_bucket, capsys):
    docs = sample_docs(10)
    corpus = write_jsonl(f"{s3_bucket}/corpus/c.jsonl", docs)
    qrows = augment_rows(3)
    queries = write_jsonl(f"{s3_bucket}/queries/q.jsonl", qrows)
    root = f"{s3_bucket}/store"
    code, out, err = cli(capsys, "embed", "--corpus", corpus, "--model", str(tiny_model_dir), "--set", "s3a",
                         "--root", root, *FAST, "--augment-queries", queries, "--json")
    assert code == 0, err[-3000:]
    m = json.loads(out)
    assert m["augment"]["counts"]["queries"] == len(qrows) and m["augment"]["file"]["etag"]
    m, vdir = version(root, "s3a")
    assert {e["kind"] for e in m["files"]} >= {"dense_aug", "tokens_aug"}
    index_both(capsys, root, "s3a")
    q = QUERY_TEXTS["fr"][2]
    assert scores_of(capsys, root, "s3a-flat-augmented", q, "d0002") > scores_of(capsys, root, "s3a-flat-plain", q,
                                                                                 "d0002")
    code, out, err = cli(capsys, "search", "--index", "s3a-plaid-augmented", "--root", root, "--json", "-k", "2", q)
    assert code == 0 and len(json.loads(out)[0]["results"]) == 2, err[-2000:]
