"""``tessera search --queries FILE`` end to end (issue 17): JSONL hits, timings, bad files.

Uses the searcher tests' store (tiny model, set ``t``, indexes ``t-flat`` and ``t-plaid``).
"""
from __future__ import annotations

import json
import re

import pytest

from tests.indexing.test_searcher import store  # noqa: F401  (the module-scoped fixture)
from tests.jobs.test_cli import tessera

TIMINGS = re.compile(r"search: index loaded in [\d.]+ s, query encoder in [\d.]+ s; (\d+) quer(y|ies) in [\d.]+ s "
                     r"\([\d.]+ ms/query: encoding [\d.]+, retrieval [\d.]+; [\d.]+ queries/s; (\d+) threads")


def _hits(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("index", ["t-flat", "t-plaid"])
def test_queries_file_answers_every_query_as_jsonl(store, index, tmp_path):  # noqa: F811
    rows = store["rows"][:6]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"q{i}", "text": r["text"], "lang": r["lang"]}) + "\n"
                             for i, r in enumerate(rows)))
    root = store["root"].url
    out = tessera("search", "--index", index, "--root", root, "--queries", str(qfile), "-k", "3",
                  "--batch-size", "4", "--threads", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    hits = _hits(out.stdout)
    assert len(hits) == 6 * 3 and set(hits[0]) == {"query_id", "rank", "doc_id", "score"}
    assert [h["query_id"] for h in hits] == [f"q{i}" for i in range(6) for _ in range(3)]
    assert [h["rank"] for h in hits[:3]] == [1, 2, 3]
    if index == "t-flat":  # a document's own text finds it first
        assert [h["doc_id"] for h in hits if h["rank"] == 1] == [r["id"] for r in rows]
    m = TIMINGS.search(out.stderr)
    assert m and m.group(1) == "6" and m.group(3) == "1", out.stderr[-2000:]

    # the same through --out, and per language with --same-language
    dest = tmp_path / "hits.jsonl"
    again = tessera("-q", "search", "--index", index, "--root", root, "--queries", str(qfile), "-k", "3",
                    "--out", str(dest), "--same-language", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == "", again.stderr[-2000:]
    lang = {r["id"]: r["lang"] for r in store["rows"]}
    same = _hits(dest.read_text())
    assert len(same) == 18
    assert all(lang[h["doc_id"]] == rows[int(h["query_id"][1:])]["lang"] for h in same)


def test_plain_text_queries_and_positional_timings(store, tmp_path):  # noqa: F811
    qfile = tmp_path / "q.txt"
    qfile.write_text(f"{store['rows'][0]['text']}\n\n{store['rows'][1]['text']}\n")
    root = store["root"].url
    out = tessera("search", "--index", "t-flat", "--root", root, "--queries", str(qfile), "-k", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    hits = _hits(out.stdout)
    assert [(h["query_id"], h["doc_id"]) for h in hits] == [("1", store["rows"][0]["id"]),
                                                           ("3", store["rows"][1]["id"])]
    one = tessera("search", "--index", "t-flat", "--root", root, "--json", "-k", "2", "hello", cwd=tmp_path)
    assert one.returncode == 0 and len(json.loads(one.stdout)[0]["results"]) == 2
    m = TIMINGS.search(one.stderr)
    assert m and m.group(1) == "1"


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", '{"id": "a", "text": "x"}\n{oops\n', "bad.jsonl: line 2: invalid JSON"),
    ("notext.jsonl", '{"id": "a", "text": "x"}\n{"id": "b"}\n', "notext.jsonl: line 2: missing column(s) ['text']"),
    ("dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "dup.jsonl: 1 duplicate query id(s)"),
    ("empty.txt", "\n\n", "empty.txt: no queries in file"),
    ("latin1.txt", b"ok\n\xe9t\xe9\n", "latin1.txt: line 2: not valid UTF-8"),
    ("missing.jsonl", None, "missing.jsonl: no such file"),
])
def test_bad_queries_file_is_one_line_exit_2(store, tmp_path, name, content, expected):  # noqa: F811
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tessera("search", "--index", "t-flat", "--root", store["root"].url, "--queries", str(path),
                  cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("tessera: error: ") and expected in lines[-1], lines[-1]


@pytest.mark.parametrize("argv, expected", [
    (["q", "--queries", "x.jsonl"], "not both"),
    ([], "give query texts or --queries FILE"),
    (["q", "--out", "o.jsonl"], "--out goes with --queries FILE"),
    (["q", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["q", "--threads", "0"], "threads must be an integer >= 1"),
])
def test_bad_search_arguments(store, tmp_path, argv, expected):  # noqa: F811
    out = tessera("search", "--index", "t-flat", "--root", store["root"].url, *argv, cwd=tmp_path)
    assert out.returncode == 2 and expected in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


def test_plaid_params_from_the_cli_early_termination_off(store, tmp_path):  # noqa: F811
    """``--param exact_margin=inf`` (no early termination), ``merge_tokens=inf`` (no query
    tokens merged), ``exact_gap_quantile`` and ``exact_tokens`` reach the index."""
    from jobs.commands.search import parse_params

    assert parse_params(["exact_margin=inf", "exact_tokens=64", "ndocs=8", "centroid_score_threshold=-inf",
                         "products=int8"]) == {
        "exact_margin": float("inf"), "exact_tokens": 64, "ndocs": 8, "centroid_score_threshold": float("-inf"),
        "products": "int8"}
    qfile = tmp_path / "q.txt"
    qfile.write_text("".join(r["text"] + "\n" for r in store["rows"][:4]))
    root = store["root"].url
    outs = [tessera("-q", "search", "--index", "t-plaid", "--root", root, "--queries", str(qfile), "-k", "3",
                    *extra, cwd=tmp_path)
            for extra in ([], ["--param", "exact_margin=inf"], ["--param", "merge_tokens=inf"],
                          ["--param", "exact_gap_quantile=1"],   # the default's largest gap
                          ["--param", "products=float32"])]      # numpy's float32 products (auto: int8 with AMX)
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]
    assert _hits(outs[0].stdout) and all([h["doc_id"] for h in _hits(o.stdout)] == [h["doc_id"] for h in _hits(
        outs[0].stdout)] for o in outs[1:])
    for param in ("exact_margin=-1", "merge_tokens=nan", "exact_gap_quantile=1.5", "products=fp8"):
        bad = tessera("search", "--index", "t-plaid", "--root", root, "--param", param, "q", cwd=tmp_path)
        assert bad.returncode == 2 and param.split("=")[0] in bad.stderr.strip().splitlines()[-1], bad.stderr[-2000:]
