"""Augmentation queries from a file (Parquet/JSONL, local or s3://) or a corpus column."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.augment_queries import (
    AugmentQueries,
    AugmentQueryError,
    check_known,
    load_augment_queries,
    queries_from_column,
)

ROWS = [{"passage_id": "d1", "text": "Wo ist der Bahnhof?", "lang": "de"},
        {"passage_id": "d2", "text": "Où est la gare ?", "lang": "fr"},
        {"passage_id": "d1", "text": "Где вокзал?", "lang": "ru"},
        {"passage_id": 7, "text": "no language"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_and_parquet_read_alike(tmp_path):
    a = load_augment_queries(str(write_jsonl(tmp_path / "q.jsonl", ROWS)))
    pq.write_table(pa.Table.from_pylist([{**r, "passage_id": str(r["passage_id"])} for r in ROWS]),
                   tmp_path / "q.parquet")
    b = load_augment_queries(str(tmp_path / "q.parquet"))
    for got in (a, b):
        assert got.passage_ids == ["d1", "d2", "d1", "7"]
        assert got.langs == ["de", "fr", "ru", None]
    assert a.where[2].endswith("q.jsonl: line 3") and b.where[2].endswith("q.parquet: row 2")
    owner, texts, langs = a.for_passages(["d2", "d1"])
    assert owner.tolist() == [0, 1, 1] and texts == ["Où est la gare ?", "Wo ist der Bahnhof?", "Где вокзал?"]
    assert AugmentQueries.from_table(a.table()).texts == a.texts


def test_unknown_passage_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", ROWS)
    with pytest.raises(AugmentQueryError, match=r"2 augmentation queries name passages that are not in the "
                       r"corpus .*q\.jsonl: line 2: passage 'd2'; .*q\.jsonl: line 4: passage '7'"):
        load_augment_queries(str(path), known_ids={"d1", "d3"})
    pq.write_table(pa.table({"passage_id": ["d1", "zz"], "text": ["a", "b"]}), tmp_path / "q.parquet")
    with pytest.raises(AugmentQueryError, match=r"q\.parquet: row 1: passage 'zz'"):
        load_augment_queries(str(tmp_path / "q.parquet"), known_ids=["d1"])


@pytest.mark.parametrize("content,message", [
    ('{"passage_id": "d1", "text": "ok"}\n{"passage_id": "d1"\n', r"line 2: invalid JSON"),
    ('{"passage_id": "d1", "text": ""}\n', r"line 1: 'text' must be a non-empty string"),
    ('{"passage_id": null, "text": "x"}\n', r"line 1: 'passage_id' must be a non-empty"),
    ('{"passage_id": "d1", "text": "x", "lang": 3}\n', r"line 1: 'lang' must be a string"),
    ('{"pid": "d1", "text": "x"}\n', r"line 1: missing column\(s\) \['passage_id'\]"),
    ('[1, 2]\n', r"line 1: expected a JSON object"),
    ('\n\n', r"no queries in file"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(AugmentQueryError, match=message):
        load_augment_queries(str(path))


def test_other_formats_and_missing_files(tmp_path):
    (tmp_path / "q.csv").write_text("a,b\n")
    with pytest.raises(AugmentQueryError, match="unknown file format"):
        load_augment_queries(str(tmp_path / "q.csv"))
    with pytest.raises(AugmentQueryError, match="no such file"):
        load_augment_queries(str(tmp_path / "nope.jsonl"))


def test_custom_column_names(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"doc": "d1", "question": "q?", "language": "de"}])
    got = load_augment_queries(str(path), passage_column="doc", text_column="question", lang_column="language")
    assert (got.passage_ids, got.texts, got.langs) == (["d1"], ["q?"], ["de"])


def test_corpus_column():
    got = queries_from_column(
        ["d1", "d2", "d3", "d4"],
        [["plain one", {"text": "Wo?", "lang": "de"}], None, json.dumps([{"text": "Où ?", "lang": "fr"}]), []],
        column="xqg", where=[f"c.jsonl: line {i}" for i in range(1, 5)])
    assert got.passage_ids == ["d1", "d1", "d3"] and got.langs == [None, "de", "fr"]
    with pytest.raises(AugmentQueryError, match=r"c\.jsonl: line 1: xqg\[1\]: 'text' must be a non-empty"):
        queries_from_column(["d1"], [["ok", {"lang": "de"}]], column="xqg", where=["c.jsonl: line 1"])
    with pytest.raises(AugmentQueryError, match="must be a list of queries"):
        queries_from_column(["d1"], [5], column="xqg", where=["c.jsonl: line 1"])


def test_check_known_passes_known():
    q = queries_from_column(["a"], [["x"]], column="c", where=["w"])
    check_known(q, ["a"])


def test_s3(s3_bucket):
    from storage.fs import location

    loc = location(f"{s3_bucket}/aug/q.jsonl")
    loc.write_bytes("".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode())
    assert load_augment_queries(loc.url, known_ids={"d1", "d2"}).passage_ids == ["d1", "d2"]
