"""Tests for benchmarks/prepare_data.py on the real XQuAD and Tatoeba files.

They read ``<repo>/../shared/data`` and are skipped when it is absent (a user's
checkout); the synthetic tests at the end always run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.prepare_data import (
    TATOEBA_LANGS,
    XQUAD_LANGS,
    article_split,
    build_tatoeba,
    build_xquad,
    build_xquad_sentences,
    main,
    read_lines,
    read_qrels,
    split_sentences,
    tatoeba_pairs,
    xquad_sentences,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "xquad").is_dir() or not (DATA / "tatoeba").is_dir(),
    reason=f"shared benchmark data not found at {DATA} (only present on the dev machines)")


@pytest.fixture(scope="module")
def xquad():
    return build_xquad(DATA / "xquad")


def _assert_consistent(bench, qrels):
    doc_ids = {d["id"] for d in bench.corpus}
    query_ids = {q["id"] for q in bench.queries}
    assert len(doc_ids) == len(bench.corpus)
    assert len(query_ids) == len(bench.queries)
    assert all(d["text"].strip() for d in bench.corpus + bench.queries)
    assert {doc for _, doc in qrels} <= doc_ids
    assert {qid for qid, _ in qrels} == query_ids  # every query has a relevant doc


@needs_data
@pytest.mark.slow
def test_xquad_counts_and_ids(xquad):
    assert len(xquad.corpus) == 240 * 12 == 2880
    per_lang = Counter(q["lang"] for q in xquad.queries)
    assert per_lang == {lang: 1190 for lang in XQUAD_LANGS}
    assert len(xquad.titles) == 48
    for name in ("same", "x2en"):
        _assert_consistent(xquad, xquad.qrels[name])
        assert len(xquad.qrels[name]) == 1190 * 12


@needs_data
@pytest.mark.slow
def test_xquad_qrels_point_at_the_right_paragraphs(xquad):
    docs = {d["id"]: d for d in xquad.corpus}
    queries = {q["id"]: q for q in xquad.queries}
    for qid, doc_id in xquad.qrels["same"]:
        assert docs[doc_id]["lang"] == queries[qid]["lang"]
        assert docs[doc_id]["article"] == queries[qid]["article"]
    for qid, doc_id in xquad.qrels["x2en"]:
        assert docs[doc_id]["lang"] == "en"
        assert docs[doc_id]["article"] == queries[qid]["article"]
    # parallel paragraphs share article, paragraph and title
    de, en = docs["xq-05-03-de"], docs["xq-05-03-en"]
    assert (de["article"], de["paragraph"], de["title"]) == (en["article"], en["paragraph"], en["title"])
    # the answer of an English question lies in the paragraph its qrels name
    en_q = next(q for q in xquad.queries if q["lang"] == "en")
    same = dict(xquad.qrels["same"])
    assert same[en_q["id"]] == dict(xquad.qrels["x2en"])[en_q["id"]]


@needs_data
def test_tatoeba(tmp_path):
    bench = build_tatoeba(DATA / "tatoeba", TATOEBA_LANGS, max_pairs=1000)
    pairs = Counter(q["pair"] for q in bench.queries)
    assert pairs["deu-eng"] == 1000 and pairs["tha-eng"] == 548  # tha has only 548 lines
    assert len(bench.corpus) == len(bench.queries) == sum(pairs.values())
    _assert_consistent(bench, bench.qrels["tatoeba"])
    assert {d["lang"] for d in bench.corpus} == {"en"}
    assert {q["lang"] for q in bench.queries} >= {"de", "zh", "ja", "ar", "hi"}
    # line alignment: id number = line index in both files
    eng = read_lines(DATA / "tatoeba" / "tatoeba.jpn-eng.eng")
    jpn = read_lines(DATA / "tatoeba" / "tatoeba.jpn-eng.jpn")
    docs = {d["id"]: d["text"] for d in bench.corpus}
    queries = {q["id"]: q["text"] for q in bench.queries}
    assert docs["tt-jpn-17-en"] == eng[17].strip() and queries["tt-jpn-17-jpn"] == jpn[17].strip()


@needs_data
def test_tatoeba_max_pairs():
    assert len(tatoeba_pairs(DATA / "tatoeba", "fra", max_pairs=10)) == 10


@needs_data
@pytest.mark.slow
def test_script_writes_all_files(tmp_path):
    out = tmp_path / "out"
    argv = ["--xquad", str(DATA / "xquad"), "--tatoeba", str(DATA / "tatoeba"), "--out", str(out),
            "--tatoeba-langs", "deu,cmn", "--max-pairs", "50", "--article-split", "0.25"]
    assert main(argv) == 0
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").open(encoding="utf-8")]
    assert len(corpus) == 2880
    doc_ids = {d["id"] for d in corpus}
    for name in ("qrels_same.tsv", "qrels_x2en.tsv"):
        qrels = read_qrels(out / name)
        assert len(qrels) == 1190 * 12 and {d for _, d in qrels} <= doc_ids
    tt_docs = {json.loads(line)["id"] for line in (out / "tatoeba_corpus.jsonl").open(encoding="utf-8")}
    assert len(tt_docs) == 100 and {d for _, d in read_qrels(out / "tatoeba_qrels.tsv")} == tt_docs
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert len(split["test"]) == 12 and len(split["train"]) == 36 and len(split["titles"]) == 48
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["files"]["corpus.jsonl"] == 2880
    line = (out / "qrels_same.tsv").read_text().splitlines()[0]
    assert line.split("\t")[1::2] == ["0", "1"]


@needs_data
@pytest.mark.slow
def test_xquad_sentences_point_at_the_sentence_holding_the_answer():
    bench = build_xquad_sentences(DATA / "xquad", ("en", "de"))
    _assert_consistent(bench, bench.qrels["same"])
    assert len(bench.queries) == 1190 * 2
    assert 2400 < len(bench.corpus) < 3000  # ~5.5 sentences a paragraph
    docs = {d["id"]: d for d in bench.corpus}
    en = json.loads((DATA / "xquad" / "xquad.en.json").read_text(encoding="utf-8"))["data"]
    answers = {f"q-{qa['id']}-en": qa["answers"][0]["text"]
               for a in en for para in a["paragraphs"] for qa in para["qas"]}
    qrels = [(q, d) for q, d in bench.qrels["same"] if q.endswith("-en")]
    # the answer starts in the sentence; it ends there too unless the split cut it
    held = sum(answers[q] in docs[d]["text"] for q, d in qrels)
    assert held / len(qrels) > 0.97


# ------------------------------------------------------------- synthetic

def test_split_sentences_keeps_offsets_and_joins_short_pieces():
    text = "First sentence is here. Dr. Who? Second one follows now!  Third one ends the text here。第四句。"
    pieces = split_sentences(text)
    assert [s for _, s in pieces] == ["First sentence is here. Dr. Who?", "Second one follows now!",
                                      "Third one ends the text here。第四句。"]
    assert all(text[begin:begin + len(s)] == s for begin, s in pieces)
    assert split_sentences("One piece only") == [(0, "One piece only")]
    assert split_sentences("  Leading space is here. And a second sentence.") == [
        (2, "Leading space is here."), (25, "And a second sentence.")]
    assert [s for _, s in split_sentences("Hi. This one is long enough to stand.")] == [
        "Hi. This one is long enough to stand."]


def test_xquad_sentences_qrels_follow_answer_start():
    context = "The first sentence is about cats. The second sentence is about dogs."
    articles = [{"title": "T", "paragraphs": [{"context": context, "qas": [
        {"id": "a", "question": "Cats?", "answers": [{"answer_start": 28, "text": "cats"}]},
        {"id": "b", "question": "Dogs?", "answers": [{"answer_start": 63, "text": "dogs"}]}]}]}]
    docs, queries, qrels = xquad_sentences(articles, "en")
    assert [d["id"] for d in docs] == ["xs-00-00-00-en", "xs-00-00-01-en"]
    assert qrels == [("q-a-en", "xs-00-00-00-en"), ("q-b-en", "xs-00-00-01-en")]
    articles[0]["paragraphs"][0]["qas"][0]["answers"] = []
    with pytest.raises(ValueError, match="q-a-en: answer_start None"):
        xquad_sentences(articles, "en")


def test_article_split_is_deterministic_and_disjoint():
    a = article_split(48, 0.25, seed=7)
    assert a == article_split(48, 0.25, seed=7)
    assert a != article_split(48, 0.25, seed=8)
    assert sorted(a["train"] + a["test"]) == list(range(48))
    assert len(a["test"]) == 12
    assert article_split(48, 0.25, seed=0)["test"] == [4, 7, 15, 18, 20, 25, 33, 36, 37, 44, 45, 46]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_article_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        article_split(48, fraction)


def _write_xquad(folder: Path, lang: str, n_paragraphs: int = 2) -> None:
    paragraphs = [{"context": f"{lang} paragraph {i}",
                   "qas": [{"id": f"qa{i}", "question": f"{lang} question {i}?", "answers": []}]}
                  for i in range(n_paragraphs)]
    data = {"version": "1.1", "data": [{"title": "T", "paragraphs": paragraphs}]}
    (folder / f"xquad.{lang}.json").write_text(json.dumps(data), encoding="utf-8")


def test_xquad_small_synthetic(tmp_path):
    for lang in ("en", "de"):
        _write_xquad(tmp_path, lang)
    bench = build_xquad(tmp_path, ("en", "de"))
    assert [d["id"] for d in bench.corpus] == ["xq-00-00-en", "xq-00-01-en", "xq-00-00-de", "xq-00-01-de"]
    assert ("q-qa1-de", "xq-00-01-de") in bench.qrels["same"]
    assert ("q-qa1-de", "xq-00-01-en") in bench.qrels["x2en"]


def test_xquad_rejects_non_parallel_and_missing_english(tmp_path):
    _write_xquad(tmp_path, "en", 2)
    _write_xquad(tmp_path, "de", 3)
    with pytest.raises(ValueError, match="not parallel"):
        build_xquad(tmp_path, ("en", "de"))
    with pytest.raises(ValueError, match="include 'en'"):
        build_xquad(tmp_path, ("de",))
    with pytest.raises(FileNotFoundError, match="xquad.fr.json"):
        build_xquad(tmp_path, ("en", "fr"))


def test_tatoeba_rejects_misaligned_files(tmp_path):
    (tmp_path / "tatoeba.deu-eng.deu").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "tatoeba.deu-eng.eng").write_text("A\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line-aligned"):
        build_tatoeba(tmp_path, ("deu",))


def test_read_lines_keeps_unicode_line_separators(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("one\u2028still one\r\ntwo\n", encoding="utf-8", newline="")
    assert read_lines(path) == ["one\u2028still one", "two"]


def test_packaged_sample_set_is_consistent():
    """jobs/data ships a small corpus in the same formats as the prepared files."""
    folder = REPO / "jobs" / "data"
    corpus = [json.loads(line) for line in (folder / "sample_corpus.jsonl").open(encoding="utf-8")]
    queries = [json.loads(line) for line in (folder / "sample_queries.jsonl").open(encoding="utf-8")]
    qrels = read_qrels(folder / "sample_qrels.tsv")
    assert len(corpus) == 48 and len({d["id"] for d in corpus}) == 48
    assert all(set(d) == {"id", "text", "lang", "title", "topic"} for d in corpus)
    assert len({d["lang"] for d in corpus}) >= 8 and len({d["topic"] for d in corpus}) == 8
    assert len({q["lang"] for q in queries}) >= 5
    assert all(r["text"].strip() for r in corpus + queries)
    topic = {d["id"]: d["topic"] for d in corpus}
    assert {d for _, d in qrels} <= set(topic)
    assert {q for q, _ in qrels} == {q["id"] for q in queries}
    # each query's relevant docs are exactly one topic's docs, in several languages
    for qid in {q["id"] for q in queries}:
        rel = [d for q, d in qrels if q == qid]
        assert len({topic[d] for d in rel}) == 1
        assert sorted(rel) == sorted(d for d, t in topic.items() if t == topic[rel[0]])
