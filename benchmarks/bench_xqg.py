"""xQG passage augmentation on XQuAD (X -> English), dense and ColBERT, unaugmented vs augmented.

The experiment (issue 16):

* corpus: the 240 English XQuAD paragraphs, encoded as the embed job encodes documents
  (``Encoder.encode_documents``, dense and ColBERT tokens from one pass, ``passage: ``);
* each paragraph's questions are split **by question index**, not by language: its last
  question is the evaluation question, the earlier ones are the augmentation part. The
  same question index is held out in every language, so no translation of an
  evaluation question is ever part of a passage's augmentation;
* augmentation: each English paragraph gets its augmentation questions in the 11 other
  languages. These are human questions about the paragraph, standing in for a
  **perfect query generator** (an upper bound on what xQG's generator gives). They are
  encoded as queries (``query: `` prefix, ``Encoder.encode_query_tokens``): the paper
  embeds generated queries with the query encoder, and a query's vector is what a
  test query's vector resembles, so that is what should be mixed into the passage;
* evaluation: the held-out question in each of the 12 languages against the English
  paragraphs (qrels: its paragraph), nDCG@10 by ``indexing.metrics.evaluate``;
  dense: exact inner product over the 240 vectors (a flat index), swept over the
  passage weight w and the queries per passage per language n (1, 2, 4, all);
  ColBERT: Tessera's PLAID index (``CentroidIndex``, codec fitted on the passages'
  tokens, ``--nbits``) with the query tokens appended (``--cap`` per passage, default
  none), swept over n, plus exact MaxSim over the same compressed vectors (reference)
  for the unaugmented and the all-queries index.

Every text is encoded once and cached under ``--work`` (chunked, so an interrupted run
resumes); the sweep only redoes arithmetic and indexing.

``--generator`` also runs the query-generator path end to end on tiny random models
(a T5 generator and a BERT encoder, built in ``--work``): generate -> encode as queries
-> augment -> PLAID index -> search. Its scores mean nothing; it shows the path runs.

Usage::

    .venv/bin/python benchmarks/bench_xqg.py --xquad ../shared/data/xquad \\
        --model ~/.cache/tessera/models/me5-small --work /tmp/xqg-work --generator

Writes ``benchmarks/results/xqg_xquad.json`` and ``.txt`` and prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

logger = logging.getLogger("bench_xqg")
LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
CHUNK = 512


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xquad", default=str(REPO.parent / "shared" / "data" / "xquad"))
    p.add_argument("--model", default=str(Path.home() / ".cache" / "tessera" / "models" / "me5-small"))
    p.add_argument("--work", default="/tmp/xqg-work", help="encoding cache and tiny models")
    p.add_argument("--weights", default="0.3,0.5,0.7", help="passage weights w of the dense sweep")
    p.add_argument("--per-lang", default="1,2,4,all", help="queries per passage per language (dense)")
    p.add_argument("--colbert-per-lang", default="1,all",
                   help="queries per passage per language (ColBERT: each point is a PLAID build and 2,880 searches)")
    p.add_argument("--nbits", type=int, default=2)
    p.add_argument("--cap", type=int, default=None, help="most query tokens appended per passage (ColBERT)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact", choices=("none", "both"), default="both",
                   help="exact MaxSim reference for the unaugmented index only, or also the last ColBERT point")
    p.add_argument("--generator", action="store_true", help="also run the tiny generator path end to end")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "xqg_xquad"))
    return p.parse_args(argv)


# ---- data -------------------------------------------------------------------------------
def build_split(xquad_dir: Path, langs=LANGS) -> dict:
    """English paragraphs; held-out (last) questions in every language; earlier ones as augmentation.

    Returns ``docs`` (ids, texts), ``eval`` (ids, texts, langs, qrels) and ``aug``
    (texts, langs, owner paragraph row, question index), aug ordered paragraph,
    language, question index.
    """
    from prepare_data import check_parallel, load_xquad, xquad_doc_id

    by_lang = {lang: load_xquad(xquad_dir, lang) for lang in langs}
    check_parallel(by_lang)
    doc_ids, doc_texts = [], []
    ev = {"ids": [], "texts": [], "langs": [], "qrels": {}}
    aug = {"texts": [], "langs": [], "owner": [], "index": []}
    for a_idx, article in enumerate(by_lang["en"]):
        for p_idx, para in enumerate(article["paragraphs"]):
            row = len(doc_ids)
            doc_ids.append(xquad_doc_id(a_idx, p_idx, "en"))
            doc_texts.append(para["context"].strip())
            n = len(para["qas"])
            for lang in langs:
                qas = by_lang[lang][a_idx]["paragraphs"][p_idx]["qas"]
                last = qas[n - 1]
                qid = f"q-{last['id']}-{lang}"
                ev["ids"].append(qid)
                ev["texts"].append(last["question"].strip())
                ev["langs"].append(lang)
                ev["qrels"][qid] = {doc_ids[-1]: 1}
                if lang == "en":
                    continue
                for k in range(n - 1):
                    aug["texts"].append(qas[k]["question"].strip())
                    aug["langs"].append(lang)
                    aug["owner"].append(row)
                    aug["index"].append(k)
    aug["owner"] = np.array(aug["owner"], np.int64)
    return {"docs": {"ids": doc_ids, "texts": doc_texts}, "eval": ev, "aug": aug}


# ---- encoding, cached -------------------------------------------------------------------
def _key(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, ensure_ascii=False).encode() + b"\0")
    return h.hexdigest()[:16]


def _pack_tokens(tokens: list[np.ndarray]) -> dict:
    return {"tokens": np.concatenate(tokens).astype(np.float16), "lengths": np.array([len(t) for t in tokens])}


def _unpack_tokens(z) -> list[np.ndarray]:
    return np.split(z["tokens"].astype(np.float32), np.cumsum(z["lengths"])[:-1])


def cached_chunks(work: Path, name: str, texts: list[str], encode) -> dict:
    """``encode(texts) -> dict of arrays`` run CHUNK texts at a time, each chunk saved (resumable)."""
    parts = []
    for start in range(0, len(texts), CHUNK):
        path = work / f"{name}-{start // CHUNK:04d}.npz"
        if not path.exists():
            t0 = time.perf_counter()
            arrays = encode(texts[start:start + CHUNK])
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
            logger.info("%s: texts %d-%d encoded in %.1f s", name, start, min(len(texts), start + CHUNK),
                        time.perf_counter() - t0)
        parts.append(dict(np.load(path)))
    return parts


def encode_all(args, split: dict) -> tuple[dict, dict]:
    import torch

    from embedding.encoder import Encoder
    from embedding.model import load_model

    torch.set_num_threads(args.threads)
    timings = {}
    t0 = time.perf_counter()
    lm = load_model(args.model, device="cpu")
    timings["model_load_s"] = time.perf_counter() - t0
    enc = Encoder(lm)
    work = Path(args.work) / _key(lm.fingerprint, split["docs"]["ids"], split["eval"]["ids"],
                                  len(split["aug"]["texts"]))
    work.mkdir(parents=True, exist_ok=True)

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
        return out

    def docs(texts):
        v = enc.encode_documents(texts, dense=True, colbert=True, langs=["en"] * len(texts))
        return {"dense": v.dense, **_pack_tokens(v.tokens)}

    def ev_dense(texts):
        return {"dense": enc.encode_queries(texts)}

    def ev_colbert(texts):
        return {"colbert": enc.encode_queries_colbert(texts).astype(np.float16)}

    aug_langs = split["aug"]["langs"]
    aug_texts = split["aug"]["texts"]

    def aug(texts):
        v = enc.encode_query_tokens(texts, dense=True, colbert=True)
        return {"dense": v.dense, **_pack_tokens(v.tokens)}

    d = timed("encode_docs", lambda: cached_chunks(work, "docs", split["docs"]["texts"], docs))
    e1 = timed("encode_eval_dense", lambda: cached_chunks(work, "eval-dense", split["eval"]["texts"], ev_dense))
    e2 = timed("encode_eval_colbert", lambda: cached_chunks(work, "eval-colbert", split["eval"]["texts"], ev_colbert))
    a = timed("encode_aug", lambda: cached_chunks(work, "aug", aug_texts, aug))
    assert len(aug_langs) == len(aug_texts)
    out = {
        "doc_dense": np.concatenate([c["dense"] for c in d]),
        "doc_tokens": [t for c in d for t in _unpack_tokens(c)],
        "eval_dense": np.concatenate([c["dense"] for c in e1]),
        "eval_colbert": np.concatenate([c["colbert"] for c in e2]).astype(np.float32),
        "aug_dense": np.concatenate([c["dense"] for c in a]),
        "aug_tokens": [t for c in a for t in _unpack_tokens(c)],
    }
    timings["cache"] = str(work)
    return out, timings


# ---- evaluation -------------------------------------------------------------------------
def ndcg_per_lang(split: dict, top_ids: np.ndarray, top_scores: np.ndarray) -> dict:
    from indexing.metrics import evaluate

    ids = split["docs"]["ids"]
    ev = split["eval"]
    run = {qid: [(ids[int(j)], float(s)) for j, s in zip(row_ids, row_s) if j >= 0]
           for qid, row_ids, row_s in zip(ev["ids"], top_ids, top_scores)}
    res = evaluate(run, ev["qrels"], dict(zip(ev["ids"], ev["langs"])))
    out = {lang: res.per_language[lang]["nDCG@10"] for lang in sorted(res.per_language)}
    out["mean"] = res.overall["nDCG@10"]
    out["mean_x"] = float(np.mean([v for k, v in out.items() if k not in ("en", "mean")]))
    return out


def dense_search(docs: np.ndarray, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    from embedding.mrl import truncate
    from indexing import dense as dense_index

    params = dense_index.DenseIndexParams("flat", docs.shape[1])
    index = dense_index.train(params, truncate(docs))
    dense_index.add(index, truncate(docs), 0)
    scores, ids = dense_index.search(index, params, truncate(queries), k)
    return ids, scores


def per_lang_values(value: str, aug: dict) -> list:
    out = []
    for v in value.split(","):
        out.append(None if v.strip() == "all" else int(v))
    return out


def run_sweep(args, split: dict, vec: dict) -> dict:
    from embedding.augment import augment_dense, augment_tokens, interleave, select_queries
    from embedding.codec import ResidualCodec
    from indexing.plaid import CentroidIndex

    aug = split["aug"]
    owner, langs = aug["owner"], aug["langs"]
    weights = [float(w) for w in args.weights.split(",")]
    per_lang = per_lang_values(args.per_lang, aug)
    results = {"dense": {}, "colbert": {}}
    t0 = time.perf_counter()
    ids, scores = dense_search(vec["doc_dense"], vec["eval_dense"])
    results["dense"]["none"] = ndcg_per_lang(split, ids, scores)
    for n in per_lang:
        sel = select_queries(owner, langs, n)
        for w in weights:
            mixed = augment_dense(vec["doc_dense"], vec["aug_dense"][sel], owner[sel], w)
            ids, scores = dense_search(mixed, vec["eval_dense"])
            key = f"w={w:g},n={n or 'all'}"
            results["dense"][key] = ndcg_per_lang(split, ids, scores)
            logger.info("dense %s: nDCG@10 %.3f (X->en %.3f)", key, results["dense"][key]["mean"],
                        results["dense"][key]["mean_x"])
    results["dense_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    codec = ResidualCodec.fit(np.concatenate(vec["doc_tokens"]), args.nbits, seed=0)
    results["codec"] = {"nbits": args.nbits, "n_centroids": codec.n_centroids,
                        "fit_tokens": int(sum(len(t) for t in vec["doc_tokens"]))}
    Q = vec["eval_colbert"]
    colbert_n = per_lang_values(args.colbert_per_lang, aug)
    configs = [("none", None)] + [(f"n={n or 'all'}", n) for n in colbert_n]
    exact_for = {"none", f"n={colbert_n[-1] or 'all'}"} if args.exact == "both" else {"none"}
    for name, n in configs:
        if n is None and name == "none":
            docs = vec["doc_tokens"]
        else:
            sel = select_queries(owner, langs, n)
            order = sel[interleave(owner[sel], [langs[j] for j in sel])]
            docs = augment_tokens(vec["doc_tokens"], [vec["aug_tokens"][j] for j in order], owner[order], args.cap)
        compressed = [codec.compress(t) for t in docs]
        index = CentroidIndex.build(codec, [c for c, _ in compressed], [r for _, r in compressed])
        t1 = time.perf_counter()
        scores, ids = index.search(Q, 10, threads=args.threads)
        entry = {"plaid": ndcg_per_lang(split, ids, scores), "tokens": index.n_tokens,
                 "plaid_ms_per_query": round(1000 * (time.perf_counter() - t1) / len(Q), 2)}
        if name in exact_for:
            scores, ids = index.exact_maxsim(Q, 10)
            entry["exact"] = ndcg_per_lang(split, ids, scores)
        results["colbert"][name] = entry
        logger.info("colbert %s: PLAID nDCG@10 %.3f (%d tokens)", name, entry["plaid"]["mean"], index.n_tokens)
    results["colbert_seconds"] = round(time.perf_counter() - t0, 1)
    return results


# ---- the tiny generator path ------------------------------------------------------------
def generator_path(args, split: dict) -> dict:
    """Tiny random T5 generator + tiny BERT encoder: generate, encode, augment, index, search."""
    import torch

    from embedding.augment import augment_dense, augment_tokens
    from embedding.codec import ResidualCodec
    from embedding.encoder import Encoder
    from embedding.model import load_model
    from embedding.querygen import GenerationSettings, QueryGenerator
    from fixtures_models import build_tiny_colbert, build_tiny_seq2seq
    from indexing.plaid import CentroidIndex

    torch.set_num_threads(1)  # tiny models: two threads on a loaded machine spend their time waiting
    work = Path(args.work) / "tiny"
    gen_dir = work / "t5" if (work / "t5" / "config.json").exists() else build_tiny_seq2seq(work / "t5")
    enc_dir = work / "colbert" if (work / "colbert" / "config.json").exists() else build_tiny_colbert(work / "colbert")
    texts = split["docs"]["texts"][:24]
    targets = [lang for lang in LANGS if lang != "en"]
    t0 = time.perf_counter()
    gen = QueryGenerator.load(gen_dir, GenerationSettings(queries_per_lang=2, max_new_tokens=12), device="cpu")
    qs = gen.generate(texts, targets, passage_langs=["en"] * len(texts))
    gen_s = time.perf_counter() - t0
    enc = Encoder(load_model(enc_dir, device="cpu"))
    docs = enc.encode_documents(texts, dense=True, colbert=True, langs=["en"] * len(texts))
    qv = enc.encode_query_tokens(qs.texts, qs.langs)
    dense = augment_dense(docs.dense, qv.dense, qs.passage, 0.5)
    tokens = augment_tokens(docs.tokens, qv.tokens, qs.passage, cap=64)
    codec = ResidualCodec.fit(np.concatenate(docs.tokens), 2, seed=0)
    compressed = [codec.compress(t) for t in tokens]
    index = CentroidIndex.build(codec, [c for c, _ in compressed], [r for _, r in compressed])
    Q = enc.encode_queries_colbert(qs.texts[:20])
    _, hits = index.search(Q, 10)
    return {"passages": len(texts), "targets": len(targets), "queries_per_lang": 2,
            "generated": len(qs), "empty_dropped": qs.empty, "generate_seconds": round(gen_s, 2),
            "example_queries": qs.texts[:3], "dense_shape": list(dense.shape),
            "tokens_before": int(sum(len(t) for t in docs.tokens)), "tokens_after": index.n_tokens,
            "searched": int((hits >= 0).any(axis=1).sum())}


# ---- report -----------------------------------------------------------------------------
def table(r: dict) -> list[str]:
    dense, colbert = r["results"]["dense"], r["results"]["colbert"]
    langs = [k for k in dense["none"] if k not in ("mean", "mean_x")]
    lines = [f"xQG on XQuAD, X -> English nDCG@10 ({r['counts']['eval_queries']} held-out questions, "
             f"{r['counts']['paragraphs']} English paragraphs, {r['counts']['aug_queries']} augmentation questions "
             f"in 11 languages = a perfect generator)", f"command: {r['command']}", ""]
    wbest = max((k for k in dense if k != "none"), key=lambda k: dense[k]["mean_x"])
    cols = ["none"] + [k for k in dense if k.startswith("w=0.5,")] + ([wbest] if not wbest.startswith("w=0.5,") else [])
    ccols = list(colbert)
    head = f"{'lang':6}" + "".join(f"{c:>16}" for c in cols) + " |" + "".join(
        f"{'C ' + c:>12}" for c in ccols) + f"{'C none ex':>12}{'C ' + ccols[-1] + ' ex':>12}"
    lines += ["dense (exact flat; w = passage weight, n = queries per passage per language) | ColBERT (PLAID; ex = "
              "exact MaxSim)", head]
    last = ccols[-1]
    for lang in langs + ["mean_x", "mean"]:
        row = f"{lang:6}" + "".join(f"{dense[c][lang]:16.3f}" for c in cols) + " |"
        row += "".join(f"{colbert[c]['plaid'][lang]:12.3f}" for c in ccols)
        row += f"{colbert['none']['exact'][lang]:12.3f}"
        row += f"{colbert[last]['exact'][lang]:12.3f}" if "exact" in colbert[last] else f"{'-':>12}"
        lines.append(row)
    lines += ["", "dense sweep, mean over the 11 non-English languages (mean_x) / all 12:",
              f"{'':10}" + "".join(f"{'n=' + str(n):>14}" for n in r["per_lang"])]
    for w in r["weights"]:
        row = f"w={w:<8g}"
        for n in r["per_lang"]:
            e = dense[f"w={w:g},n={n}"]
            row += f"{e['mean_x']:8.3f}/{e['mean']:.3f}"
        lines.append(row)
    lines.append(f"{'none':10}{dense['none']['mean_x']:8.3f}/{dense['none']['mean']:.3f}")
    lines += ["", "ColBERT tokens stored: " + ", ".join(f"{k} {v['tokens']:,}" for k, v in colbert.items())
              + "; PLAID ms/query: " + ", ".join(f"{k} {v['plaid_ms_per_query']}" for k, v in colbert.items())]
    lines.append(f"codec: {r['results']['codec']}; cap {r['cap']}")
    lines.append(f"timings: {r['timings']}")
    if r.get("generator"):
        lines += ["", f"tiny generator path (random T5 -> tiny ColBERT encoder -> augment -> PLAID): {r['generator']}"]
    lines.append(f"machine: {r['machine']}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    split = build_split(Path(args.xquad))
    vec, timings = encode_all(args, split)
    results = run_sweep(args, split, vec)
    per_lang = [v.strip() for v in args.per_lang.split(",")]
    r = {"command": " ".join([".venv/bin/python", "benchmarks/bench_xqg.py", *(argv or sys.argv[1:])]),
         "counts": {"paragraphs": len(split["docs"]["ids"]), "eval_queries": len(split["eval"]["ids"]),
                    "aug_queries": len(split["aug"]["texts"])},
         "split": "per paragraph: the last question (every language) is evaluated, the earlier ones augment",
         "weights": [float(w) for w in args.weights.split(",")], "per_lang": per_lang, "cap": args.cap,
         "results": results, "timings": timings,
         "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                     "load_avg_at_end": os.getloadavg()}}
    if args.generator:
        r["generator"] = generator_path(args, split)
    r["timings"]["total_s"] = round(time.perf_counter() - t0, 1)
    lines = table(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2, ensure_ascii=False))
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
