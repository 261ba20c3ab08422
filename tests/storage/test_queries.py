"""Query and qrels loading: formats, column mapping and the errors users will hit."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.queries import Query, QueryFileError, load_qrels, load_queries


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _parquet(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


# ---- queries ------------------------------------------------------------------------
def test_load_queries_jsonl(tmp_path):
    url = _jsonl(tmp_path / "q.jsonl", [{"id": "q1", "text": "wer?", "lang": "de"},
                                        {"id": 2, "text": "qui ?"},
                                        {"id": "q3", "text": "什么", "lang": None}])
    assert load_queries(url) == [Query("q1", "wer?", "de"), Query("2", "qui ?", None),
                                 Query("q3", "什么", None)]


@pytest.mark.parametrize("ext", [".parquet", ".pq"])
def test_load_queries_parquet_with_mapped_columns(tmp_path, ext):
    url = _parquet(tmp_path / f"q{ext}", {"qid": [1, 2], "question": ["a", "b"],
                                          "language": ["en", "fr"]})
    got = load_queries(url, id_column="qid", text_column="question", lang_column="language")
    assert got == [Query("1", "a", "en"), Query("2", "b", "fr")]


def test_load_queries_parquet_without_lang_column(tmp_path):
    url = _parquet(tmp_path / "q.parquet", {"id": ["a"], "text": ["x"]})
    assert load_queries(url) == [Query("a", "x", None)]


def test_missing_columns_name_file_and_columns_found(tmp_path):
    url = _parquet(tmp_path / "q.parquet", {"qid": ["a"], "text": ["x"]})
    with pytest.raises(QueryFileError, match=r"q\.parquet.*\['id'\].*columns found: \['qid', 'text'\]"):
        load_queries(url)


def test_missing_text_in_jsonl_names_line(tmp_path):
    url = _jsonl(tmp_path / "q.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "body": "y"}])
    with pytest.raises(QueryFileError, match=r"q\.jsonl: line 2: missing column\(s\) \['text'\]"):
        load_queries(url)


def test_duplicate_ids_are_listed(tmp_path):
    url = _jsonl(tmp_path / "q.jsonl", [{"id": i, "text": "t"} for i in ["a", "b", "a", "c", "b"]])
    with pytest.raises(QueryFileError, match=r"2 duplicate query id\(s\), e.g. \['a', 'b'\]"):
        load_queries(url)


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text_names_row(tmp_path, text):
    url = _parquet(tmp_path / "q.parquet", {"id": ["a", "b"], "text": ["ok", text]})
    with pytest.raises(QueryFileError, match=r"q\.parquet: row 1: (empty|null) query text for query 'b'"):
        load_queries(url)


def test_empty_text_names_jsonl_line(tmp_path):
    url = _jsonl(tmp_path / "q.jsonl", [{"id": "a", "text": "ok"}, {"id": "b", "text": " "}])
    with pytest.raises(QueryFileError, match=r"line 2: empty query text"):
        load_queries(url)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(QueryFileError, match=r"q\.jsonl: line 2: not valid UTF-8"):
        load_queries(str(path))


def test_invalid_utf8_in_parquet_binary_column(tmp_path):
    url = _parquet(tmp_path / "q.parquet", {"id": ["a"], "text": pa.array([b"caf\xe9"], pa.binary())})
    with pytest.raises(QueryFileError, match=r"row 0: column 'text' is not valid UTF-8"):
        load_queries(url)


def test_invalid_json_and_unknown_extension(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n{"id": \n')
    with pytest.raises(QueryFileError, match=r"line 2: invalid JSON"):
        load_queries(str(path))
    with pytest.raises(QueryFileError, match="unknown file format"):
        load_queries(str(tmp_path / "q.csv"))


def test_empty_and_absent_files(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n")
    with pytest.raises(QueryFileError, match="no queries"):
        load_queries(str(path))
    with pytest.raises(QueryFileError, match="no such file"):
        load_queries(str(tmp_path / "absent.jsonl"))


# ---- qrels --------------------------------------------------------------------------
def test_load_qrels_trec_four_columns(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_text("q1 0 d1 1\nq1 0 d2 0\n\nq2  Q0  d3  2\n")
    assert load_qrels(str(path)) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}


def test_load_qrels_three_columns_tab_separated_with_header(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\tdoc one\t1\nq2\td2\t1\n")
    assert load_qrels(str(path)) == {"q1": {"doc one": 1}, "q2": {"d2": 1}}


@pytest.mark.parametrize("names", [("query_id", "doc_id", "relevance"), ("qid", "docid", "rel")])
def test_load_qrels_parquet_and_jsonl(tmp_path, names):
    q, d, r = names
    want = {"q1": {"d1": 1, "d2": 2}, "q2": {"d1": 1}}
    url = _parquet(tmp_path / "qrels.parquet", {q: ["q1", "q1", "q2"], d: ["d1", "d2", "d1"],
                                                r: [1, 2, 1]})
    assert load_qrels(url) == want
    url = _jsonl(tmp_path / "qrels.jsonl", [{q: "q1", d: "d1", r: 1}, {q: "q1", d: "d2", r: 2.0},
                                            {q: "q2", d: "d1", r: "1"}])
    assert load_qrels(url) == want


@pytest.mark.parametrize("line, match", [
    ("q2 d9\n", r"qrels\.txt: line 2: expected .* got 2 field"),
    ("q2 0 d9 1 extra\n", r"line 2: .*got 5 field"),
    ("q2 0 d9 high\n", r"line 2: relevance must be an integer grade, got 'high'"),
    ("q2 0 d9 0.5\n", r"line 2: relevance must be an integer grade, got '0.5'"),
    ("q1 0 d1 2\n", r"line 2: query 'q1' doc 'd1' judged twice"),
])
def test_malformed_trec_lines_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "qrels.txt"
    path.write_text("q1 0 d1 1\n" + line)
    with pytest.raises(QueryFileError, match=match):
        load_qrels(str(path))


def test_qrels_missing_columns_name_columns_found(tmp_path):
    url = _parquet(tmp_path / "qrels.parquet", {"qid": ["q1"], "doc": ["d1"], "rel": [1]})
    with pytest.raises(QueryFileError, match=r"no doc_id column .*columns found: \['qid', 'doc', 'rel'\]"):
        load_qrels(url)


def test_qrels_invalid_utf8_and_empty(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_bytes(b"q1 0 d1 1\nq\xff 0 d2 1\n")
    with pytest.raises(QueryFileError, match=r"line 2: not valid UTF-8"):
        load_qrels(str(path))
    path.write_text("\n\n")
    with pytest.raises(QueryFileError, match="no relevance judgements"):
        load_qrels(str(path))


@pytest.mark.parametrize("header", ["query-id\tcorpus-id\tscore", "qid docid rel", "query_id 0 doc_id relevance",
                                    "Query-ID\tCorpus-ID\tScore"])
def test_qrels_header_naming_the_columns_is_skipped(tmp_path, header):
    path = tmp_path / "qrels.tsv"
    path.write_text(header + "\nq1\td1\t1\nq2\td2\t2\n")
    assert load_qrels(str(path)) == {"q1": {"d1": 1}, "q2": {"d2": 2}}


@pytest.mark.parametrize("first, match", [
    ("q1 0 d1 high", r"qrels\.txt: line 1: relevance must be an integer grade, got 'high'"),
    ("q1\td1\tyes", r"line 1: relevance must be an integer grade, got 'yes'"),
    ("query-id corpus-id relevant", r"line 1: relevance must be an integer grade, got 'relevant'"),
])
def test_malformed_first_qrels_line_is_an_error_not_a_header(tmp_path, first, match):
    """A first line was skipped as a "header" whenever its relevance was not a number: eval then
    scored fewer queries and exited 0."""
    path = tmp_path / "qrels.txt"
    path.write_text(first + "\nq2 0 d2 1\n")
    with pytest.raises(QueryFileError, match=match):
        load_qrels(str(path))


def test_invalid_json_message_has_no_doubled_at(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "open\n')
    with pytest.raises(QueryFileError, match=r"line 2: invalid JSON: Unterminated string starting at column 21$") \
            as err:
        load_queries(str(path))
    assert "at at" not in str(err.value)
