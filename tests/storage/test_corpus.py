"""Corpus input errors: what they say (file, 1-based line), without Ray or a model."""
from __future__ import annotations

import json
import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.corpus import (
    ColumnMap,
    CorpusError,
    check_first_file,
    expand,
    file_format,
    find_duplicates,
    read_rows,
    scan_file,
)
from storage.input_files import json_error

COLS = ColumnMap()


def _lines(path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_duplicate_ids_name_one_based_jsonl_lines_despite_blank_lines(tmp_path):
    url = _lines(tmp_path / "d.jsonl", '{"id": "a", "text": "x"}', "", '{"id": "b", "text": "y"}',
                 '{"id": "a", "text": "z"}')
    f, ids = scan_file(url, COLS, stride=2)
    dups = find_duplicates([f], [ids], cols=COLS)
    assert dups == [f"'a' ({url} line 1; {url} line 4)"]


def test_duplicate_ids_across_files_name_parquet_rows(tmp_path):
    a = _lines(tmp_path / "a.jsonl", '{"id": "x", "text": "1"}')
    b = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": ["y", "x"], "text": ["2", "3"]}), b)
    scans = [scan_file(u, COLS, stride=4) for u in (a, b)]
    dups = find_duplicates([s[0] for s in scans], [s[1] for s in scans], cols=COLS)
    assert dups == [f"'x' ({a} line 1; {b} row 1)"]


@pytest.mark.parametrize("name", ["c.csv", "c.tsv", "corpus"])
def test_unsupported_format_is_named(tmp_path, name):
    (tmp_path / name).write_text("id,text\na,b\n")
    ext = "." + name.split(".")[1] if "." in name else "(no extension)"
    with pytest.raises(CorpusError, match=re.escape(f"{name}: unsupported format {ext}")):
        expand(str(tmp_path / name))
    with pytest.raises(CorpusError, match=re.escape(f"unsupported format {ext}: no Parquet or JSONL")):
        expand(str(tmp_path))                         # a directory holding only that file
    with pytest.raises(CorpusError, match="unsupported format"):
        file_format(str(tmp_path / name))


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match="nope.jsonl: no such file or directory"):
        expand(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no Parquet or JSONL files found$"):
        expand(str(tmp_path / "empty"))


def test_json_error_has_no_doubled_at():
    for text in ('{"id": "a', '{"id": }', '{"id": "a"} x'):
        with pytest.raises(json.JSONDecodeError) as err:
            json.loads(text)
        msg = json_error(err.value)
        assert " at at " not in msg and msg.endswith(f"column {err.value.colno}"), msg
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads('{"id": "a')
    assert json_error(err.value) == "Unterminated string starting at column 8"


def test_scan_errors_name_file_and_one_based_line(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "unterminated}')   # no final newline
    with pytest.raises(CorpusError, match=r"b\.jsonl: line 2: invalid JSON: Unterminated string starting at "
                                          r"column 21$"):
        scan_file(str(bad), COLS, 4)


@pytest.mark.parametrize("lines, needle", [
    (['{"id": "a", "body": "x"}'], r"line 1: missing text column 'text' .*--text-column"),
    (['', '{"text": "x"}'], r"line 2: missing id column 'id' .*--id-column"),
    (['{"id": null, "text": "x"}'], r"line 1: null or empty id"),
    (['[1, 2]'], r"line 1: expected a JSON object, got list"),
    ([''], r"empty file \(no JSON lines\)"),
])
def test_first_file_check_names_file_and_line(tmp_path, lines, needle):
    url = _lines(tmp_path / "f.jsonl", *lines)
    with pytest.raises(CorpusError, match=needle) as err:
        check_first_file(url, COLS)
    assert url in str(err.value)


def test_first_file_check_reads_parquet_schema_and_one_line(tmp_path):
    url = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"doc": ["a"], "body": ["x"]}), url)
    with pytest.raises(CorpusError, match=r"missing required column\(s\) \['id', 'text'\]"):
        check_first_file(url, COLS)
    check_first_file(url, ColumnMap(id="doc", text="body"))
    good = _lines(tmp_path / "g.jsonl", '{"id": "a", "text": "x"}', "not json at all")
    check_first_file(good, COLS)                      # only the first line: scan_file checks the rest


def test_read_error_after_the_scan_names_the_real_line(tmp_path):
    path = tmp_path / "r.jsonl"
    url = _lines(path, *[json.dumps({"id": f"d{i}", "text": "t"}) for i in range(6)])
    f, _ = scan_file(url, COLS, stride=2)
    lines = path.read_text().splitlines()
    lines.insert(4, "")                               # the file changes after the scan
    lines[5] = '{"id": "d4", "text": '               # line 6 of the file, row 4 of the scan
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"r\.jsonl: line 6: invalid JSON"):
        read_rows(f, 4, 6, COLS)


def test_corpus_error_pickles_with_its_message():
    err = pickle.loads(pickle.dumps(CorpusError("/x.jsonl: line 3: null or empty id")))
    assert type(err) is CorpusError and str(err) == "/x.jsonl: line 3: null or empty id"


def test_text_bytes_per_row_reads_the_first_rows_of_jsonl_and_parquet_footers(tmp_path):
    from storage.corpus import text_bytes_per_row

    a = _lines(tmp_path / "a.jsonl", '{"id": "1", "text": "ab"}', "", '{"id": "2", "text": "héé", "title": "t"}',
               'not json', '{"id": "3", "text": 5}')
    assert text_bytes_per_row([a], COLS) == (2 + 5 + 1) / 4          # blank lines skipped, bad rows count 0
    assert text_bytes_per_row([a], COLS, max_rows=1) == 2.0
    assert text_bytes_per_row([a], ColumnMap(text="body"), max_rows=2) == 0.5   # only the title
    texts = ["x" * 100, "y" * 300] * 50
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(100)], "text": texts}), b, row_group_size=30,
                   use_dictionary=False)
    est = text_bytes_per_row([str(b)], COLS)
    assert 190 <= est <= 230                                          # 200 bytes a row, from the footer
    assert text_bytes_per_row([a, str(b)], COLS) == pytest.approx((8 + est * 100) / 104)
    empty = _lines(tmp_path / "e.jsonl", "")
    assert text_bytes_per_row([empty], COLS) is None
    assert text_bytes_per_row([str(tmp_path / "missing.jsonl")], COLS) is None
