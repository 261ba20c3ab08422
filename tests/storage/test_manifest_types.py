"""The manifest records of ``storage.manifest`` match what the jobs write.

One tiny store (embed, a flat and a plaid index, an incremental re-index that updates
both, a rollback, a retune with a dev set) and every JSON document it holds checked
against its TypedDict, recursively: no key the type does not declare, every required
key present, values of the declared shape. A key added to (or dropped from) a writer
fails here until the record documents it.
"""
from __future__ import annotations

import json
import types
from typing import Any, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest

from jobs.build_index import IndexConfig
from jobs.build_index import run as build
from jobs.embed import EmbedConfig
from jobs.embed import run as embed
from jobs.reindex import ReindexConfig, rollback
from jobs.reindex import run as reindex
from jobs.retune import RetuneConfig
from jobs.retune import run as retune
from storage import manifest as mf
from storage.fs import location
from tests.helpers import sample_docs, write_jsonl

_PRIMITIVES = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def mismatches(value: Any, tp: Any, where: str = "$") -> list[str]:
    """Where ``value`` (parsed JSON) does not fit the type ``tp``; empty when it does."""
    if tp is Any:
        return []
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{where}: expected an object ({tp.__name__}), got {type(value).__name__}"]
        hints = get_type_hints(tp)
        out = [f"{where}.{k}: not declared in {tp.__name__}" for k in sorted(set(value) - set(hints))]
        out += [f"{where}.{k}: required by {tp.__name__}, missing" for k in sorted(tp.__required_keys__ - set(value))]
        for k in sorted(set(value) & set(hints)):
            out += mismatches(value[k], hints[k], f"{where}.{k}")
        return out
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        tries = [mismatches(value, a, where) for a in args if a is not type(None)]
        return [] if any(not t for t in tries) else min(tries, key=len)
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [m for i, v in enumerate(value) for m in mismatches(v, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        return [m for k, v in value.items() for m in mismatches(v, args[1], f"{where}[{k!r}]")]
    if tp in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[tp]) and (tp is bool or not isinstance(value, bool))
        return [] if ok else [f"{where}: expected {tp.__name__}, got {value!r}"]
    if tp is type(None):
        return [] if value is None else [f"{where}: expected null, got {value!r}"]
    raise TypeError(f"{where}: the checker does not know the type {tp!r}")


# ---- the checker itself --------------------------------------------------------------------
def test_the_checker_flags_unknown_missing_and_misshapen_keys():
    entry = {"path": "a", "kind": "docs", "rows": 1, "bytes": 2, "sha256": "x"}
    assert mismatches(entry, mf.FileEntry) == []
    assert mismatches({**entry, "shard": 3, "reused": True}, mf.FileEntry) == []
    assert mismatches({**entry, "extra": 1}, mf.FileEntry) == ["$.extra: not declared in FileEntry"]
    assert mismatches({k: v for k, v in entry.items() if k != "sha256"}, mf.FileEntry) == \
        ["$.sha256: required by FileEntry, missing"]
    assert mismatches({**entry, "rows": "1"}, mf.FileEntry) == ["$.rows: expected int, got '1'"]
    assert mismatches({"overall": 1.0, "per_language": {"en": "x"}}, mf.DeltaPoints) == \
        ["$.per_language['en']: expected float, got 'x'"]
    assert mismatches({"dense": None, "colbert": 16}, mf.Dims) == []


def test_every_record_is_fully_typed():
    """Every annotation resolves and the checker understands it (``Any`` only for open blobs: configs,
    timings, statistics)."""
    records = [v for v in vars(mf).values() if is_typeddict(v) and v.__module__ == mf.__name__]
    assert len(records) > 30
    for record in records:
        for name, tp in get_type_hints(record).items():
            _walk(tp, f"{record.__name__}.{name}")


def _walk(tp: Any, where: str) -> None:
    if tp is Any or is_typeddict(tp) or tp in _PRIMITIVES or tp is type(None):
        return
    origin = get_origin(tp)
    assert origin in (Union, types.UnionType, list, dict), f"{where}: unexpected type {tp!r}"
    for arg in get_args(tp):
        _walk(arg, where)


# ---- what the jobs write ------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, ray_session_tmp, s3_server):
    from conftest import ensure_local_ray

    ensure_local_ray()
    tmp = tmp_path_factory.mktemp("manifests")
    root = str(tmp / "store")
    rows = sample_docs(48)
    embed(EmbedConfig(corpus=(write_jsonl(str(tmp / "c1.jsonl"), rows),), model=str(tiny_model_dir), set_name="t",
                      root=root, rows_per_shard=16, n_centroids=16, max_batch=8))
    for kind in ("flat", "plaid"):
        build(IndexConfig(set_name="t", kind=kind, root=root, name=f"t-{kind}"))
    snapshot = [dict(r) for r in rows if r["id"] not in ("d0005", "d0030")]
    snapshot[3]["text"] = "rewritten: " + snapshot[3]["text"]
    snapshot[10]["year"] = 1999
    snapshot[20]["text"] = "  "
    snapshot += sample_docs(4, prefix="n")
    reindex(ReindexConfig(set_name="t", corpus=(write_jsonl(str(tmp / "c2.jsonl"), snapshot),), root=root,
                          max_added_share=10.0))
    rollback(root, "t", "v000001")
    train = write_jsonl(str(tmp / "train.jsonl"), [{"text": r["text"][:24], "doc_id": r["id"]} for r in rows[:16]])
    dev = write_jsonl(str(tmp / "dev.jsonl"), [{"id": f"q-{r['id']}", "text": r["text"][-24:], "lang": r["lang"]}
                                               for r in rows[16:32]])
    (tmp / "dev.tsv").write_text("".join(f"q-{r['id']}\t0\t{r['id']}\t1\n" for r in rows[16:32]))
    retune(RetuneConfig(set_name="t", index="t-flat", train=train, root=root, dev_queries=dev,
                        dev_qrels=str(tmp / "dev.tsv"), steps=2, batch_size=8, negatives=2, mine_k=10, skip_top=1,
                        threads=1, force=True))
    return location(root)


def _documents(root, pattern: str) -> list[tuple[str, dict]]:
    return [(p, json.loads(location(p).read_text())) for p in sorted(root.fs.glob(f"{root.path}/{pattern}"))]


@pytest.mark.parametrize("pattern, record, expected", [
    ("sets/*/v*/manifest.json", mf.SetManifest, 2),            # embed, incremental re-index
    ("indexes/*/v*/manifest.json", mf.IndexManifest, 4),       # 2 builds, 2 in-place updates
    ("encoders/*/v*/manifest.json", mf.EncoderManifest, 1),    # retune with a dev set
    ("runs/*.json", mf.RunReportRecord, 2),                    # reindex, rollback
    ("*/*/CURRENT", mf.CurrentPointer, 4),
    ("*/*/v*/_claim.json", mf.ClaimRecord, 7),
])
def test_written_documents_match_their_records(store, pattern, record, expected):
    docs = _documents(store, pattern)
    assert len(docs) == expected, [p for p, _ in docs]
    problems = [f"{path}: {m}" for path, doc in docs for m in mismatches(doc, record)]
    assert not problems, "\n".join(problems)


def test_every_optional_part_was_seen(store):
    """The store exercises the optional keys, so the records above were really checked."""
    sets = dict(_documents(store, "sets/*/v*/manifest.json"))
    delta = next(m for m in sets.values() if m["version"] == "v000002")
    assert {"lineage", "drift", "bytes"} <= set(delta) and "input" in next(iter(sets.values()))
    assert any(e.get("reused") for e in delta["files"])
    updated = [m for _, m in _documents(store, "indexes/*/v*/manifest.json") if "update" in m]
    assert {m["index_kind"] for m in updated} == {"flat", "plaid"}
    (_, encoder), = _documents(store, "encoders/*/v*/manifest.json")
    assert encoder["evaluation"] is not None
    reports = {r["job"]: r for _, r in _documents(store, "runs/*.json")}
    assert reports["reindex"]["decision"]["mode"] == "incremental"
    assert all(isinstance(v, dict) for v in reports["reindex"]["indexes"].values())
    assert all(isinstance(v, str) for v in reports["rollback"]["indexes"].values())
