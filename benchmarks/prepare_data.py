"""Turn XQuAD and Tatoeba into corpus / query / qrels files for Tessera benchmarks.

Usage::

    python benchmarks/prepare_data.py --xquad ../shared/data/xquad \\
        --tatoeba ../shared/data/tatoeba --out bench-out/data [--article-split 0.25]

Files written to ``--out``
--------------------------
XQuAD (paragraphs are parallel across languages, in the same order):

- ``corpus.jsonl``: one document per paragraph per language,
  ``{"id": "xq-{article:02d}-{paragraph:02d}-{lang}", "text", "lang", "title",
  "article": int, "paragraph": int}``.
- ``queries.jsonl``: one query per question per language,
  ``{"id": "q-{qa_id}-{lang}", "text", "lang", "article": int}``.
- ``qrels_same.tsv``: a question in language L -> its paragraph in L.
- ``qrels_x2en.tsv``: a question in any language -> its English paragraph.
- ``split.json`` (with ``--article-split``): train / test article indices.

XQuAD sentences (``--xquad-sentences``; short documents of ~40 tokens, near the ~33 of the
issue's news sentences, between Tatoeba's ~11 and the paragraphs' ~170):

- ``xqs_corpus.jsonl``: one document per sentence of every paragraph per language,
  ``{"id": "xs-{article:02d}-{paragraph:02d}-{sentence:02d}-{lang}", "text", "lang",
  "article", "paragraph", "sentence"}``; a paragraph is split after ``. ! ? ; ।  ؟`` (and
  ``。！？``) followed by white space, a piece under 20 characters joins the one before.
- ``xqs_queries.jsonl``: the XQuAD questions of those languages (``queries.jsonl``'s ids).
- ``xqs_qrels.tsv``: a question in language L -> the sentence in L holding its answer's
  first character.

Tatoeba (line-aligned ``tatoeba.xxx-eng.xxx`` / ``tatoeba.xxx-eng.eng``):

- ``tatoeba_corpus.jsonl``: the English sentences,
  ``{"id": "tt-{xxx}-{i}-en", "text", "lang": "en", "pair": "xxx-eng"}``.
- ``tatoeba_queries.jsonl``: their translations,
  ``{"id": "tt-{xxx}-{i}-{xxx}", "text", "lang", "pair": "xxx-eng"}``; ``lang``
  is the ISO 639-1 code where there is one, else the Tatoeba code.
- ``tatoeba_qrels.tsv``: each translation -> its English sentence only (the
  English side repeats across pairs, so evaluate each ``pair`` on its own).

``i`` is the 0-based line number in the Tatoeba files. Qrels are TREC qrels,
tab-separated: ``qid 0 docid 1``. ``prepare_summary.json`` holds the counts.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

#: languages of ``--xquad-sentences`` by default: those whose sentences end in punctuation
#: followed by white space (Thai separates sentences by spaces alone, Chinese by no space)
XQUAD_SENTENCE_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "tr", "vi")
XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
TATOEBA_LANGS = ("deu", "fra", "spa", "rus", "ara", "cmn", "hin", "tur", "ell", "vie",
                 "tha", "jpn")
# published XQuAD sizes, per language
XQUAD_PARAGRAPHS = 240
XQUAD_QUESTIONS = 1190

TATOEBA_ISO639_1 = {
    "afr": "af", "amh": "am", "ara": "ar", "aze": "az", "bel": "be", "ben": "bn",
    "bos": "bs", "bre": "br", "bul": "bg", "cat": "ca", "ces": "cs", "cmn": "zh",
    "cor": "kw", "cym": "cy", "dan": "da", "deu": "de", "ell": "el", "epo": "eo",
    "est": "et", "eus": "eu", "fao": "fo", "fin": "fi", "fra": "fr", "fry": "fy",
    "gla": "gd", "gle": "ga", "glg": "gl", "heb": "he", "hin": "hi", "hrv": "hr",
    "hun": "hu", "hye": "hy", "ido": "io", "ile": "ie", "ina": "ia", "ind": "id",
    "isl": "is", "ita": "it", "jav": "jv", "jpn": "ja", "kat": "ka", "kaz": "kk",
    "khm": "km", "kor": "ko", "kur": "ku", "lat": "la", "lit": "lt", "lvs": "lv",
    "mal": "ml", "mar": "mr", "mkd": "mk", "mon": "mn", "nld": "nl", "nno": "nn",
    "nob": "nb", "oci": "oc", "pes": "fa", "pol": "pl", "por": "pt", "ron": "ro",
    "rus": "ru", "slk": "sk", "slv": "sl", "spa": "es", "sqi": "sq", "srp": "sr",
    "swe": "sv", "swh": "sw", "tam": "ta", "tat": "tt", "tel": "te", "tgl": "tl",
    "tha": "th", "tuk": "tk", "tur": "tr", "uig": "ug", "ukr": "uk", "urd": "ur",
    "uzb": "uz", "vie": "vi", "xho": "xh", "yid": "yi", "zsm": "ms",
}

Qrel = tuple[str, str]  # (query id, document id), relevance 1


@dataclass
class Benchmark:
    """Documents, queries and named qrels of one prepared data set.

    Attributes
    ----------
    corpus : list of dict
        Documents; every one has ``id``, ``text`` and ``lang``.
    queries : list of dict
        Queries; every one has ``id``, ``text`` and ``lang``.
    qrels : dict
        Qrels name (e.g. ``"same"``) -> list of ``(query id, doc id)``.
    titles : list of str
        XQuAD article titles by article index (empty for Tatoeba).
    """

    corpus: list[dict] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    qrels: dict[str, list[Qrel]] = field(default_factory=dict)
    titles: list[str] = field(default_factory=list)


# --------------------------------------------------------------------- XQuAD

def xquad_doc_id(article: int, paragraph: int, lang: str) -> str:
    """Id of one XQuAD paragraph in one language, e.g. ``xq-03-01-de``."""
    return f"xq-{article:02d}-{paragraph:02d}-{lang}"


def load_xquad(xquad_dir: Path, lang: str) -> list[dict]:
    """Read the SQuAD-format articles of ``xquad.{lang}.json``.

    Raises
    ------
    FileNotFoundError
        The file is missing.
    ValueError
        The file is not SQuAD-format JSON.
    """
    path = Path(xquad_dir) / f"xquad.{lang}.json"
    if not path.is_file():
        raise FileNotFoundError(f"XQuAD file for language {lang!r} not found: {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path} is not SQuAD-format JSON (no top-level 'data' list)")
    return data["data"]


def _shape(articles: list[dict]) -> list[list[tuple[str, ...]]]:
    """Question ids per paragraph per article: what must match across languages."""
    return [[tuple(qa["id"] for qa in p["qas"]) for p in a["paragraphs"]] for a in articles]


def check_parallel(by_lang: dict[str, list[dict]], reference: str = "en") -> None:
    """Raise ValueError unless every language has the reference's articles,
    paragraphs and question ids, in the same order."""
    expected = _shape(by_lang[reference])
    for lang, articles in by_lang.items():
        if _shape(articles) != expected:
            raise ValueError(
                f"XQuAD {lang!r} is not parallel to {reference!r}: articles, paragraphs "
                "or question ids differ, so paragraph ids would not line up")


def _text(value: str, where: str) -> str:
    text = (value or "").strip()
    if not text:
        raise ValueError(f"empty text at {where}")
    return text


def xquad_docs(articles: list[dict], lang: str) -> list[dict]:
    """One document per paragraph of one language (see the module docstring)."""
    docs = []
    for a_idx, article in enumerate(articles):
        for p_idx, para in enumerate(article["paragraphs"]):
            doc_id = xquad_doc_id(a_idx, p_idx, lang)
            docs.append({"id": doc_id, "text": _text(para["context"], doc_id), "lang": lang,
                         "title": article["title"], "article": a_idx, "paragraph": p_idx})
    return docs


def xquad_questions(articles: list[dict], lang: str) -> tuple[list[dict], list[Qrel], list[Qrel]]:
    """Queries of one language with their same-language and English qrels.

    Returns
    -------
    queries : list of dict
    qrels_same : list of (query id, doc id in ``lang``)
    qrels_x2en : list of (query id, English doc id)
    """
    queries, same, x2en = [], [], []
    for a_idx, article in enumerate(articles):
        for p_idx, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                qid = f"q-{qa['id']}-{lang}"
                queries.append({"id": qid, "text": _text(qa["question"], qid),
                                "lang": lang, "article": a_idx})
                same.append((qid, xquad_doc_id(a_idx, p_idx, lang)))
                x2en.append((qid, xquad_doc_id(a_idx, p_idx, "en")))
    return queries, same, x2en


def build_xquad(xquad_dir: Path, langs: Sequence[str] = XQUAD_LANGS) -> Benchmark:
    """Corpus, queries and the ``same`` / ``x2en`` qrels for ``langs``.

    Raises
    ------
    ValueError
        ``langs`` lacks ``"en"`` (the cross-language qrels point at English
        paragraphs), or the languages are not parallel.
    """
    if "en" not in langs:
        raise ValueError("XQuAD languages must include 'en': qrels_x2en points at English paragraphs")
    by_lang = {lang: load_xquad(xquad_dir, lang) for lang in langs}
    check_parallel(by_lang)
    bench = Benchmark(qrels={"same": [], "x2en": []},
                      titles=[a["title"] for a in by_lang["en"]])
    for lang, articles in by_lang.items():
        bench.corpus += xquad_docs(articles, lang)
        queries, same, x2en = xquad_questions(articles, lang)
        bench.queries += queries
        bench.qrels["same"] += same
        bench.qrels["x2en"] += x2en
    _warn_unexpected_size(by_lang["en"])
    return bench


_SENTENCE_END = re.compile(r"(?<=[.!?;\u0964\u061f])\s+|(?<=[\u3002\uff01\uff1f])\s*")
#: a split piece shorter than this joins the sentence before it (abbreviations, list items)
MIN_SENTENCE_CHARS = 20


def split_sentences(text: str) -> list[tuple[int, str]]:
    """``(start offset, sentence)`` pieces of ``text`` (see the module docstring); the
    offsets index ``text``, so an answer's ``answer_start`` finds its sentence."""
    pieces: list[list] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() >= len(text):
            break
        pieces.append([start, text[start:m.start()]])
        start = m.end()
    pieces.append([start, text[start:]])
    out: list[list] = []
    for begin, piece in pieces:
        if out and len(piece.strip()) < MIN_SENTENCE_CHARS:
            out[-1][1] = text[out[-1][0]:begin + len(piece)]
        else:
            out.append([begin, piece])
    if len(out) > 1 and len(out[0][1].strip()) < MIN_SENTENCE_CHARS:
        out[1] = [out[0][0], text[out[0][0]:out[1][0] + len(out[1][1])]]
        del out[0]
    return [(begin + len(piece) - len(piece.lstrip()), piece.strip()) for begin, piece in out if piece.strip()]


def xquad_sentence_id(article: int, paragraph: int, sentence: int, lang: str) -> str:
    """Id of one sentence of one XQuAD paragraph, e.g. ``xs-03-01-02-de``."""
    return f"xs-{article:02d}-{paragraph:02d}-{sentence:02d}-{lang}"


def xquad_sentences(articles: list[dict], lang: str) -> tuple[list[dict], list[dict], list[Qrel]]:
    """Sentence documents, queries and same-language qrels (question -> the sentence that
    holds its answer's first character) of one language.

    Raises
    ------
    ValueError
        A question has no answer or its ``answer_start`` is outside its paragraph.
    """
    docs, queries, qrels = [], [], []
    for a_idx, article in enumerate(articles):
        for p_idx, para in enumerate(article["paragraphs"]):
            context = para["context"]
            pieces = split_sentences(context)
            starts = [begin for begin, _ in pieces]
            for s_idx, (_, sentence) in enumerate(pieces):
                doc_id = xquad_sentence_id(a_idx, p_idx, s_idx, lang)
                docs.append({"id": doc_id, "text": sentence, "lang": lang, "article": a_idx,
                             "paragraph": p_idx, "sentence": s_idx})
            for qa in para["qas"]:
                qid = f"q-{qa['id']}-{lang}"
                answers = qa.get("answers") or []
                at = answers[0].get("answer_start") if answers else None
                if not isinstance(at, int) or not 0 <= at < len(context):
                    raise ValueError(f"question {qid}: answer_start {at!r} is not inside its "
                                     f"paragraph ({len(context)} characters)")
                s_idx = max(0, bisect.bisect_right(starts, at) - 1)
                queries.append({"id": qid, "text": _text(qa["question"], qid), "lang": lang,
                                "article": a_idx})
                qrels.append((qid, xquad_sentence_id(a_idx, p_idx, s_idx, lang)))
    return docs, queries, qrels


def build_xquad_sentences(xquad_dir: Path, langs: Sequence[str] = XQUAD_SENTENCE_LANGS) -> Benchmark:
    """Sentence corpus, queries and the ``same`` qrels for ``langs``."""
    bench = Benchmark(qrels={"same": []})
    for lang in langs:
        docs, queries, qrels = xquad_sentences(load_xquad(xquad_dir, lang), lang)
        bench.corpus += docs
        bench.queries += queries
        bench.qrels["same"] += qrels
    return bench


def _warn_unexpected_size(articles: list[dict]) -> None:
    n_par = sum(len(a["paragraphs"]) for a in articles)
    n_q = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
    if (n_par, n_q) != (XQUAD_PARAGRAPHS, XQUAD_QUESTIONS):
        logger.warning("XQuAD has %d paragraphs and %d questions per language, expected %d and %d",
                       n_par, n_q, XQUAD_PARAGRAPHS, XQUAD_QUESTIONS)


# ------------------------------------------------------------------- Tatoeba

def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, split on ``\\n`` only.

    ``str.splitlines`` would also split on U+2028 or U+0085 inside a sentence
    and silently shift the alignment between the two sides of a pair.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"Tatoeba file not found: {path}")
    text = Path(path).read_bytes().decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def tatoeba_pairs(tatoeba_dir: Path, lang: str, max_pairs: int | None = None) -> list[tuple[int, str, str]]:
    """Aligned ``(line index, sentence in lang, English sentence)`` of one pair.

    Pairs with an empty side are skipped; at most ``max_pairs`` are returned,
    the first ones in file order.

    Raises
    ------
    ValueError
        The two files have different line counts.
    """
    base = Path(tatoeba_dir) / f"tatoeba.{lang}-eng"
    foreign, english = read_lines(Path(f"{base}.{lang}")), read_lines(Path(f"{base}.eng"))
    if len(foreign) != len(english):
        raise ValueError(f"{base}.{lang} has {len(foreign)} lines but {base}.eng has "
                         f"{len(english)}; the pair files must be line-aligned")
    pairs = [(i, f.strip(), e.strip()) for i, (f, e) in enumerate(zip(foreign, english))
             if f.strip() and e.strip()]
    if len(pairs) < len(foreign):
        logger.warning("tatoeba %s: skipped %d pairs with an empty side", lang, len(foreign) - len(pairs))
    return pairs if max_pairs is None else pairs[:max_pairs]


def build_tatoeba(tatoeba_dir: Path, langs: Sequence[str] = TATOEBA_LANGS,
                  max_pairs: int | None = 1000) -> Benchmark:
    """English corpus, translated queries and qrels for the ``langs``-eng pairs."""
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs}")
    bench = Benchmark(qrels={"tatoeba": []})
    for lang in langs:
        pair = f"{lang}-eng"
        iso = TATOEBA_ISO639_1.get(lang, lang)
        for i, foreign, english in tatoeba_pairs(tatoeba_dir, lang, max_pairs):
            doc_id, qid = f"tt-{lang}-{i}-en", f"tt-{lang}-{i}-{lang}"
            bench.corpus.append({"id": doc_id, "text": english, "lang": "en", "pair": pair})
            bench.queries.append({"id": qid, "text": foreign, "lang": iso, "pair": pair})
            bench.qrels["tatoeba"].append((qid, doc_id))
    return bench


# --------------------------------------------------------------------- split

def article_split(n_articles: int, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """Deterministic train / test split of article indices.

    Articles are ranked by ``sha256(f"{seed}:{index}")``, which gives the same
    split on every machine and Python / NumPy version; the first
    ``round(n_articles * test_fraction)`` (at least 1) go to test.

    Returns
    -------
    dict
        ``{"seed", "test_fraction", "n_articles", "train": [int], "test": [int]}``,
        index lists sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if n_articles < 2:
        raise ValueError(f"need at least 2 articles to split, got {n_articles}")
    n_test = min(max(1, round(n_articles * test_fraction)), n_articles - 1)
    ranked = sorted(range(n_articles),
                    key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    test = sorted(ranked[:n_test])
    train = sorted(ranked[n_test:])
    return {"seed": seed, "test_fraction": test_fraction, "n_articles": n_articles,
            "train": train, "test": test}


# -------------------------------------------------------------------- output

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write one JSON object per line (UTF-8, not ASCII-escaped); return the count."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    _atomic_write(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


def write_qrels(path: Path, qrels: Iterable[Qrel]) -> int:
    """Write TREC qrels ``qid<TAB>0<TAB>docid<TAB>1``; return the count."""
    lines = [f"{qid}\t0\t{doc_id}\t1\n" for qid, doc_id in qrels]
    _atomic_write(Path(path), "".join(lines))
    return len(lines)


def read_qrels(path: Path) -> list[Qrel]:
    """Read TREC qrels (any whitespace) back as ``(qid, docid)`` with relevance > 0."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            qid, _, doc_id, rel = line.split()
            if int(rel) > 0:
                out.append((qid, doc_id))
    return out


def write_benchmark(out_dir: Path, bench: Benchmark, prefix: str, qrels_names: dict[str, str]) -> dict:
    """Write ``{prefix}corpus.jsonl``, ``{prefix}queries.jsonl`` and the qrels.

    Parameters
    ----------
    qrels_names : dict
        ``bench.qrels`` key -> file name.

    Returns
    -------
    dict
        File name -> number of rows written.
    """
    out_dir = Path(out_dir)
    counts = {f"{prefix}corpus.jsonl": write_jsonl(out_dir / f"{prefix}corpus.jsonl", bench.corpus),
              f"{prefix}queries.jsonl": write_jsonl(out_dir / f"{prefix}queries.jsonl", bench.queries)}
    for key, name in qrels_names.items():
        counts[name] = write_qrels(out_dir / name, bench.qrels[key])
    return counts


# ----------------------------------------------------------------------- CLI

def _langs(value: str) -> tuple[str, ...]:
    langs = tuple(v.strip() for v in value.split(",") if v.strip())
    if not langs:
        raise argparse.ArgumentTypeError("expected a comma-separated list of language codes")
    return langs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xquad", type=Path, help="folder with xquad.<lang>.json")
    p.add_argument("--tatoeba", type=Path, help="folder with tatoeba.<xxx>-eng.<xxx|eng>")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--xquad-langs", type=_langs, default=XQUAD_LANGS,
                   help="comma-separated, must include en (default: all 12)")
    p.add_argument("--tatoeba-langs", type=_langs, default=TATOEBA_LANGS,
                   help=f"comma-separated Tatoeba codes (default: {','.join(TATOEBA_LANGS)})")
    p.add_argument("--xquad-sentences", type=_langs, nargs="?", const=XQUAD_SENTENCE_LANGS,
                   metavar="LANGS", help="also write the sentence corpus xqs_* (default languages: "
                   f"{','.join(XQUAD_SENTENCE_LANGS)})")
    p.add_argument("--max-pairs", type=int, default=1000, help="Tatoeba pairs per language")
    p.add_argument("--article-split", type=float, metavar="TEST_FRACTION",
                   help="also write split.json: this fraction of XQuAD articles is test")
    p.add_argument("--seed", type=int, default=0, help="seed of --article-split")
    return p


def _prepare(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    counts: dict = {}
    if args.xquad:
        xquad = build_xquad(args.xquad, args.xquad_langs)
        counts.update(write_benchmark(args.out, xquad, "",
                                      {"same": "qrels_same.tsv", "x2en": "qrels_x2en.tsv"}))
        if args.article_split is not None:
            split = article_split(len(xquad.titles), args.article_split, args.seed)
            split["titles"] = xquad.titles
            _atomic_write(args.out / "split.json", json.dumps(split, indent=2, ensure_ascii=False) + "\n")
            counts["split.json"] = {"train": len(split["train"]), "test": len(split["test"])}
        if args.xquad_sentences:
            sentences = build_xquad_sentences(args.xquad, args.xquad_sentences)
            counts.update(write_benchmark(args.out, sentences, "xqs_", {"same": "xqs_qrels.tsv"}))
    if args.tatoeba:
        tatoeba = build_tatoeba(args.tatoeba, args.tatoeba_langs, args.max_pairs)
        counts.update(write_benchmark(args.out, tatoeba, "tatoeba_", {"tatoeba": "tatoeba_qrels.tsv"}))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints a table of the files written."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.xquad and not args.tatoeba:
        parser.error("give --xquad, --tatoeba or both")
    if args.xquad_sentences and not args.xquad:
        parser.error("--xquad-sentences splits XQuAD paragraphs: give --xquad too")
    if args.article_split is not None and not args.xquad:
        parser.error("--article-split splits XQuAD articles: give --xquad too")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    counts = _prepare(args)
    summary = {"xquad": str(args.xquad) if args.xquad else None,
               "tatoeba": str(args.tatoeba) if args.tatoeba else None,
               "xquad_langs": list(args.xquad_langs) if args.xquad else [],
               "xquad_sentence_langs": list(args.xquad_sentences or ()),
               "tatoeba_langs": list(args.tatoeba_langs) if args.tatoeba else [],
               "max_pairs": args.max_pairs, "files": counts}
    _atomic_write(args.out / "prepare_summary.json", json.dumps(summary, indent=2) + "\n")
    for name, n in counts.items():
        print(f"{name:<24} {n}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
