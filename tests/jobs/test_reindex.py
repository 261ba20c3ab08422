"""The nightly re-index end to end on a tiny model: diff, delta embedding, tombstones,
in-place index updates, atomic publishing, rollback, gc, run reports and exit codes."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import ensure_local_ray
from embedding.model import resolve_precision
from fixtures_models import MULTILINGUAL_TEXTS
from indexing.index_files import read_doc_ids, read_ids
from indexing.searcher import Searcher
from jobs import build_index
from jobs.cli import main as cli
from jobs.embed import EmbedConfig
from jobs.embed import run as embed
from jobs.reindex import NothingToDo, Refused, ReindexConfig, rollback
from jobs.reindex import run as reindex
from storage import catalog
from storage.fs import location
from storage.manifest import Artifact, NotFoundError

LANGS = ["en", "de", "fr", "es", "ru"]
QUERIES = ["the weather is nice today", "wie spät ist es", "le chat dort", "una casa grande", "книга на столе"]
KINDS = {"flat": {}, "ivf": {"nlist": 4, "nprobe": 4}, "hnsw": {}, "int8": {}, "plaid": {}}


def texts() -> list[str]:
    return [t for group in MULTILINGUAL_TEXTS.values() for t in group] \
        if isinstance(MULTILINGUAL_TEXTS, dict) else list(MULTILINGUAL_TEXTS)


def docs(n: int) -> list[dict]:
    t = texts()
    return [{"id": f"d{i:04d}", "text": f"{t[i % len(t)]} ({i})", "lang": LANGS[i % len(LANGS)],
             "year": 2000 + i % 7} for i in range(n)]


def write_jsonl(url: str, rows: list[dict]) -> str:
    location(url).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return url


def next_snapshot(rows: list[dict]) -> tuple[list[dict], dict]:
    """3 texts changed, 1 metadata-only change, 2 deleted, 4 new, 1 turned empty."""
    t = texts()
    out = [dict(r) for r in rows]
    for i in (3, 17, 40):
        out[i]["text"] = f"rewritten: {t[(i * 7) % len(t)]} [{i}]"
    out[25]["year"] = 1999
    out[30]["text"] = "  "
    deleted = {out[5]["id"], out[44]["id"]}
    out = [r for r in out if r["id"] not in deleted]
    out += [{"id": f"n{i}", "text": f"new document {t[i % len(t)]} <{i}>", "lang": LANGS[i % 5], "year": 2024}
            for i in range(4)]
    expect = {"new": 4, "changed": 5, "deleted": 2, "unchanged": len(rows) - 2 - 5}
    return out, expect


def setup_set(root, corpus_url: str, model, kinds=KINDS) -> dict:
    embed(EmbedConfig(corpus=(corpus_url,), model=str(model), set_name="t", root=str(root), rows_per_shard=16,
                      n_centroids=16, max_batch=8))
    for kind, extra in kinds.items():
        build_index.run(build_index.IndexConfig(set_name="t", kind=kind, root=str(root), **extra))
    return {kind: f"t-{kind}" for kind in kinds}


def top10(root, index: str, version=None) -> list[list[str]]:
    s = Searcher.open(str(root), index, version=version)
    return [[d for d, _ in hits] for hits in s.search(QUERIES, k=10)]


def current_ids(root) -> list[str]:
    con = catalog.connect(str(root))
    return [r[0] for r in con.execute("select id from documents where is_current order by id").fetchall()]


@pytest.fixture(scope="module")
def template(ray_session_tmp, s3_server, tiny_model_dir, tmp_path_factory):
    """The initial set (60 docs, every index kind), embedded and indexed once per module."""
    ensure_local_ray()
    base = tmp_path_factory.mktemp("reindex")
    rows = docs(60)
    corpus = write_jsonl(str(base / "snap1.jsonl"), rows)
    names = setup_set(base / "store", corpus, tiny_model_dir)
    return base / "store", rows, names


@pytest.fixture
def store(template, ray_local, tmp_path):
    """A fresh copy of the initial set for one test (the store holds only relative paths)."""
    src, rows, names = template
    root = tmp_path / "store"
    shutil.copytree(src, root)
    return root, rows, names


def test_reindex_end_to_end(store, tiny_model_dir, tmp_path):
    root, rows, names = store
    before = {k: top10(root, n) for k, n in names.items()}
    snap, expect = next_snapshot(rows)
    url = write_jsonl(str(tmp_path / "snap2.jsonl"), snap)
    report = reindex(ReindexConfig(set_name="t", corpus=(url,), root=str(root)))

    assert report["status"] == "published" and report["exit_code"] == 0
    assert report["version"] == "v000002" and report["parent"] == "v000001"
    c = report["counts"]
    assert {k: c[k] for k in expect} == expect
    assert report["decision"]["mode"] == "incremental"
    assert report["decision"]["encoded_in"] == "driver"   # a small delta: no actor pool to start
    assert report["bytes"]["reused"] > 0 and report["bytes"]["written"] > 0

    # DuckDB: exactly the snapshot's non-empty ids, once each; metadata and the empty doc follow the snapshot
    want = sorted(r["id"] for r in snap if r["text"].strip())
    assert current_ids(root) == want
    con = catalog.connect(str(root))
    assert con.execute("select year from documents where is_current and id = 'd0025'").fetchone()[0] == 1999
    assert con.execute("select id from skipped where is_current").fetchall() == [("d0030",)]
    assert con.execute("select count(*) from documents_all where version = 'v000001'").fetchone()[0] == 60
    assert con.execute("select count(*) from documents where version = 'v000001'").fetchone()[0] == 0  # not current
    graves = dict(con.execute("select reason, count(*) from tombstones where version = 'v000002' "
                              "group by reason").fetchall())
    assert graves == {"changed": 5, "deleted": 2}
    run_row = con.execute("select job, status, exit_code, new, changed, deleted, unchanged, decision "
                          "from runs where job = 'reindex'").fetchall()
    assert run_row == [("reindex", "published", 0, 4, 5, 2, expect["unchanged"], "incremental")]

    # unchanged shards are reused by reference, not copied
    m = Artifact(location(str(root)), "sets", "t").manifest("v000002")
    reused = [e for e in m["files"] if e.get("reused")]
    assert reused and all(e["path"].startswith("../v000001/") for e in reused)

    # every index moved with the set; updated in place where the kind allows it
    how = {n: r["how"] for n, r in report["indexes"].items()}
    assert how == {"t-flat": "updated", "t-ivf": "updated", "t-int8": "updated", "t-plaid": "updated",
                   "t-hnsw": "rebuilt"}
    after = {k: top10(root, n) for k, n in names.items()}
    for k, n in names.items():
        s = Searcher.open(str(root), n)
        assert s.manifest["source"]["version"] == "v000002"
        assert sorted(s.doc_ids) == want
        # the id arrays name the same labels as ids.parquet, holes (removed labels) included
        vdir = Artifact(location(str(root)), "indexes", n).version_dir(s.manifest["version"])
        assert read_doc_ids(vdir, s.manifest).to_pylist() == read_ids(vdir, s.manifest).to_pylist() == list(s.ids)
        assert (None in s.ids) == (how[n] == "updated")
        for hits in after[k]:
            assert not {"d0005", "d0044", "d0030"} & set(hits)
    # the in-place updates equal a full rebuild on the same set version
    for kind in ("flat", "ivf", "plaid", "int8"):
        fresh = build_index.run(build_index.IndexConfig(set_name="t", kind=kind, root=str(root),
                                                        name=f"fresh-{kind}", publish=True, **KINDS[kind]))
        assert top10(root, fresh["name"]) == after[kind], kind

    # an unchanged snapshot: nothing to do, no new version
    with pytest.raises(NothingToDo):
        reindex(ReindexConfig(set_name="t", corpus=(url,), root=str(root)))
    assert Artifact(location(str(root)), "sets", "t").versions() == ["v000001", "v000002"]
    assert cli(["reindex", "--set", "t", "--corpus", url, "--root", str(root)]) == 4

    # rollback restores the previous results exactly, indexes included
    rollback(str(root), "t", "v000001")
    assert current_ids(root) == sorted(r["id"] for r in rows)
    assert {k: top10(root, n) for k, n in names.items()} == before
    assert cli(["rollback", "--set", "t", "--to", "v000002", "--root", str(root)]) == 0
    assert {k: top10(root, n) for k, n in names.items()} == after

    # gc keeps what v000002 references (it reuses v000001's shards) and drops v000001
    assert cli(["gc", "--set", "t", "--keep", "1", "--root", str(root)]) == 0
    assert Artifact(location(str(root)), "sets", "t").versions() == ["v000002"]
    assert current_ids(root) == want
    assert {k: top10(root, n) for k, n in names.items()} == after
    assert cli(["rollback", "--set", "t", "--to", "v000001", "--root", str(root)]) == 2
    with pytest.raises(NotFoundError, match="garbage-collected"):
        rollback(str(root), "t", "v000001")


def test_chained_reindexes_keep_exact_contents(store, tmp_path):
    root, rows, names = store
    auto = resolve_precision("auto", "cpu")
    other = "float32" if auto == "bfloat16" else "bfloat16"
    snap = rows
    for step in range(3):
        snap, _ = next_snapshot(snap)
        for r in snap:  # ids must stay unique across steps
            if r["id"].startswith("n") and "-" not in r["id"]:
                r["id"] = f"{r['id']}-{step}"
        url = write_jsonl(str(tmp_path / f"chain{step}.jsonl"), snap)
        # the second step's new documents in the other precision: the set holds both from then on
        report = reindex(ReindexConfig(set_name="t", corpus=(url,), root=str(root),
                                       precision=other if step == 1 else "auto"))
        want = sorted(r["id"] for r in snap if r["text"].strip())
        assert current_ids(root) == want
        for n in names.values():
            assert sorted(Searcher.open(str(root), n).doc_ids) == want
        manifest = Artifact(location(str(root)), "sets", "t").manifest(report["version"])
        assert manifest["workers"]["precision"] == (auto if step == 0 else ",".join(sorted({auto, other})))
    con = catalog.connect(str(root))
    assert con.execute("select version, device, precision from embedding_sets order by version").fetchall() == [
        ("v000001", "cpu", auto), ("v000002", "cpu", auto), *[(f"v00000{i}", "cpu", ",".join(sorted({auto, other})))
                                                            for i in (3, 4)]]


def test_index_build_on_a_pinned_set_takes_the_set_lease(store, tmp_path):
    """After a re-index the set's CURRENT pins its indexes; `tessera index` moving a pin is a
    write to the set: it waits for no one, fails fast (exit 5) while a run holds the lease."""
    from storage.lease import Lease

    root, rows, names = store
    snap, _ = next_snapshot(rows)
    reindex(ReindexConfig(set_name="t", corpus=(write_jsonl(str(tmp_path / "s.jsonl"), snap),), root=str(root)))
    sets_art = Artifact(location(str(root)), "sets", "t")
    assert sets_art.pointer()["indexes"]["t-flat"] == "v000002"
    args = ["index", "--set", "t", "--kind", "flat", "--name", "t-flat", "--root", str(root)]
    held = Lease.acquire(sets_art.loc.join("_lease.json"), {"run_id": "nightly"}, ttl_s=60)
    try:
        assert cli(args) == 5
    finally:
        held.release()
    assert Artifact(location(str(root)), "indexes", "t-flat").versions() == ["v000001", "v000002"]
    assert cli(args) == 0
    ptr = sets_art.pointer()
    assert ptr["version"] == "v000002" and ptr["indexes"]["t-flat"] == "v000003"
    assert not sets_art.loc.join("_lease.json").exists()
    assert sorted(Searcher.open(str(root), "t-flat").doc_ids) == current_ids(root)


def test_other_model_is_refused_without_full(store, tiny_colbert_dir, tmp_path):
    root, rows, _ = store
    url = write_jsonl(str(tmp_path / "s.jsonl"), rows[:50])
    with pytest.raises(Refused, match="--full"):
        reindex(ReindexConfig(set_name="t", corpus=(url,), root=str(root), model=str(tiny_colbert_dir)))
    assert cli(["reindex", "--set", "t", "--corpus", url, "--root", str(root), "--model",
                str(tiny_colbert_dir)]) == 3
    assert Artifact(location(str(root)), "sets", "t").versions() == ["v000001"]


def test_full_reindex_rebuilds_everything(store, tmp_path):
    root, rows, names = store
    snap, _ = next_snapshot(rows)
    url = write_jsonl(str(tmp_path / "s.jsonl"), snap)
    report = reindex(ReindexConfig(set_name="t", corpus=(url,), root=str(root), full=True))
    assert report["decision"]["mode"] == "full"
    assert {r["how"] for r in report["indexes"].values()} == {"rebuilt"}
    m = Artifact(location(str(root)), "sets", "t").manifest(report["version"])
    assert not any(e.get("reused") for e in m["files"])
    assert current_ids(root) == sorted(r["id"] for r in snap if r["text"].strip())


def test_drift_thresholds_force_rebuilds(store, tmp_path):
    root, rows, names = store
    snap, _ = next_snapshot(rows)
    url = write_jsonl(str(tmp_path / "s.jsonl"), snap)
    # the default thresholds keep a small delta incremental
    base = reindex(ReindexConfig(set_name="t", corpus=(url,), root=str(root), publish=False))
    assert base["decision"]["mode"] == "incremental" and not base["decision"]["refit_codec"]
    report = reindex(ReindexConfig(set_name="t", corpus=(url,), root=str(root), max_added_share=0.01,
                                   max_residual_ratio=0.5, min_drift_values=1, min_refit_share=0.0))
    d = report["decision"]
    assert d["added_share"] > 0.01 and d["cumulative_ratio"] > 0.5
    assert d["mode"] == "full" and "codec drift" in d["reason"]
    assert {r["how"] for r in report["indexes"].values()} == {"rebuilt"}


def test_bad_input_publishes_nothing(store, tmp_path, capsys):
    root, rows, _ = store
    dup = write_jsonl(str(tmp_path / "dup.jsonl"), rows + [rows[3]])
    assert cli(["reindex", "--set", "t", "--corpus", dup, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "dup.jsonl" in err and repr(rows[3]["id"]) in err, err      # names the file and the id
    nocol = write_jsonl(str(tmp_path / "nocol.jsonl"), [{"id": "x", "body": "no text column"}])
    assert cli(["reindex", "--set", "t", "--corpus", nocol, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "nocol.jsonl" in err and "text" in err, err
    assert cli(["reindex", "--set", "nope", "--corpus", dup, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "tessera embed" in err, err
    art = Artifact(location(str(root)), "sets", "t")
    assert art.versions() == ["v000001"] and art.current() == "v000001"
    con = catalog.connect(str(root))
    statuses = [r[0] for r in con.execute("select status from runs order by started_at").fetchall()]
    assert statuses == ["bad_input"] * 3


def test_reindex_on_s3(ray_local, tiny_model_dir, s3_bucket):
    rows = docs(48)
    root = f"{s3_bucket}/store"
    corpus = write_jsonl(f"{s3_bucket}/snap1.jsonl", rows)
    names = setup_set(root, corpus, tiny_model_dir, kinds={"ivf": {"nlist": 4, "nprobe": 4}, "plaid": {}})
    before = {k: top10(root, n) for k, n in names.items()}
    snap, expect = next_snapshot(rows)
    url = write_jsonl(f"{s3_bucket}/snap2.jsonl", snap)
    assert cli(["reindex", "--set", "t", "--corpus", url, "--root", root, "--keep", "1"]) == 0
    want = sorted(r["id"] for r in snap if r["text"].strip())
    assert current_ids(root) == want
    con = catalog.connect(root)
    assert con.execute("select new, changed, deleted, status from runs where job = 'reindex'").fetchall() == \
        [(4, 5, 2, "published")]
    # --keep 1 dropped v000001's manifest but kept the shards v000002 reuses from it
    assert Artifact(location(root), "sets", "t").versions() == ["v000002"]
    after = {k: top10(root, n) for k, n in names.items()}
    for n in names.values():
        assert sorted(Searcher.open(root, n).doc_ids) == want
    with pytest.raises(NotFoundError, match="garbage-collected"):
        rollback(root, "t", "v000001")
    assert before.keys() == after.keys()


def test_snapshot_hashes_equal_in_driver_and_in_ray_tasks(ray_local, tmp_path, monkeypatch):
    """Small snapshots are hashed in the driver, large ones in Ray tasks: the same table either way."""
    from jobs import reindex_worker as reindex_mod
    from jobs.embed import scan_corpus

    rows, _ = next_snapshot(docs(60))
    corpus = write_jsonl(str(tmp_path / "snap.jsonl"), rows)
    ecfg = EmbedConfig(corpus=(corpus,), model="unused", set_name="t", root=str(tmp_path / "s"), rows_per_shard=16)
    files = scan_corpus(ecfg)[0]
    local = reindex_mod.hash_snapshot(ecfg, files)
    monkeypatch.setattr(reindex_mod, "LOCAL_HASH_ROWS", 0)
    remote = reindex_mod.hash_snapshot(ecfg, files)
    assert local.num_rows == len(rows) == remote.num_rows
    assert local.equals(remote)
    assert local.column("id").to_pylist() == [r["id"] for r in rows]
    assert local.column("empty").to_pylist() == [not r["text"].strip() for r in rows]
