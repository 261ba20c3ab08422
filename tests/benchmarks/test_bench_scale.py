"""Tests for the corpus builder of benchmarks/bench_scale.py (no model, no Ray).

Synthetic Tatoeba-layout files always; the real files in ``../shared/data/tatoeba`` when
present.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.bench_scale import corpus, document_order, pick_queries, read_pairs, write_corpus

REPO = Path(__file__).resolve().parents[2]
TATOEBA = REPO.parent / "shared" / "data" / "tatoeba"


def _write_pair(folder: Path, lang: str, src: list[str], eng: list[str]) -> None:
    (folder / f"tatoeba.{lang}-eng.{lang}").write_text("\n".join(src) + "\n", encoding="utf-8")
    (folder / f"tatoeba.{lang}-eng.eng").write_text("\n".join(eng) + "\n", encoding="utf-8")


@pytest.fixture()
def tiny(tmp_path):
    _write_pair(tmp_path, "deu", ["Hallo.", "Wie geht's?", "Hallo.", "Danke."],
                ["Hello.", "How are you?", "Hi.", "Thanks."])
    _write_pair(tmp_path, "fra", ["Bonjour.", "Merci.", " "], ["Hello.", "Thanks.", "Nothing."])
    (tmp_path / "README.md").write_text("not a pair")
    return read_pairs(tmp_path)


def test_order_non_english_first_round_robin_dedup(tiny):
    order = document_order(tiny)
    assert [d["id"] for d in order] == [
        "tat-deu-0", "tat-fra-0", "tat-deu-1", "tat-fra-1", "tat-deu-3",  # deu-2 repeats deu-0; fra-2 is blank
        # English round robin too: eng-fra-0 repeats eng-deu-0, eng-deu-3 repeats eng-fra-1
        "tat-eng-deu-0", "tat-eng-deu-1", "tat-eng-fra-1", "tat-eng-deu-2", "tat-eng-fra-2"]
    texts = [d["text"] for d in order]
    assert len(set(texts)) == len(texts) and all(t.strip() == t and t for t in texts)
    assert [d["lang"] for d in order[:5]] == ["deu", "fra", "deu", "fra", "deu"]
    assert {d["lang"] for d in order[5:]} == {"eng"}


def test_corpora_nested_and_written_as_shards(tiny, tmp_path):
    order = document_order(tiny)
    small, large = corpus(order, 3), corpus(order, 7)
    assert large[:3] == small
    with pytest.raises(ValueError, match="fewer than"):
        corpus(order, len(order) + 1)
    paths = write_corpus(large, tmp_path / "c", n_files=3)
    assert len(paths) == 3
    back = [json.loads(line) for p in paths for line in Path(p).read_text(encoding="utf-8").splitlines()]
    assert back == large


def test_queries_are_translations_of_documents(tiny):
    order = document_order(tiny)
    texts, gold = pick_queries(tiny, corpus(order, 5), 3)
    ids = {d["id"] for d in order[:5]}
    assert set(gold) <= ids and len(set(gold)) == 3
    by_id = {f"tat-{lang}-{i}": tiny[lang][1][i] for lang in tiny for i in range(len(tiny[lang][1]))}
    assert texts == [by_id[g] for g in gold]


@pytest.mark.skipif(not TATOEBA.is_dir(), reason=f"{TATOEBA} not found")
def test_real_tatoeba_holds_100k_distinct_documents():
    pairs = read_pairs(TATOEBA)
    order = document_order(pairs)
    assert len(pairs) == 112 and len(order) >= 100_000
    ids = [d["id"] for d in order]
    assert len(set(ids)) == len(ids)
    assert len({d["text"] for d in order}) == len(order)
    first = Counter(d["lang"] for d in order[:10_000])
    assert len(first) >= 100 and "eng" not in first  # every prefix spans the languages
    assert Counter(d["lang"] for d in order[:100_000])["eng"] > 0  # English fills up to 100k
