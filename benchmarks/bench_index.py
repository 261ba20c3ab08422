"""Index benchmark on XQuAD: quality per language for every index kind, PLAID vs exact MaxSim.

Reads a committed embedding set (``tessera embed --mode both`` over the XQuAD corpus
from ``prepare_data.py``), never re-embeds its stored vectors, and measures:

* nDCG@10 per language, same-language (a question retrieves among its language's
  paragraphs) and X→English (among the English paragraphs), for exact dense at the
  full dim and at MRL 256/128/64, IVF-PQ, HNSW, binary+rescore, exact ColBERT MaxSim
  over uncompressed token vectors, and the centroid index at nbits 1/2/4;
* the centroid index's nDCG@10 as a share of uncompressed MaxSim, and its top-10
  overlap with exact MaxSim over the same compressed vectors;
* per-query latency (median, p95) of the centroid index and brute-force MaxSim, side by
  side, over the whole corpus;
* index bytes per document for each kind.

The uncompressed ColBERT vectors are not in the store (only their compressed form is),
so this script encodes the paragraphs' token vectors once in-process for that reference.

Usage::

    python benchmarks/bench_index.py --root tessera-data --set xquad --data bench-data \
        --model ~/.cache/tessera/models/me5-small [--queries-per-lang 200]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedding.codec import ResidualCodec  # noqa: E402
from embedding.mrl import truncate  # noqa: E402
from indexing import dense  # noqa: E402
from indexing.metrics import evaluate  # noqa: E402
from indexing.plaid import CentroidIndex, SearchParams  # noqa: E402
from storage import catalog, schemas  # noqa: E402
from storage.fs import location  # noqa: E402
from storage.manifest import Artifact  # noqa: E402
from storage.queries import load_qrels, load_queries  # noqa: E402

logger = logging.getLogger("bench_index")
K = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--set", default="xquad")
    p.add_argument("--data", required=True, help="output folder of prepare_data.py")
    p.add_argument("--model", required=True)
    p.add_argument("--queries-per-lang", type=int, default=200)
    p.add_argument("--latency-queries", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/index.json")
    return p.parse_args(argv)


# ---- loading ----------------------------------------------------------------------------
def load_set(root: str, name: str):
    art = Artifact(location(root), "sets", name)
    m = art.manifest()
    vdir = art.version_dir(m["version"])
    files = lambda kind: sorted((e for e in m["files"] if e["kind"] == kind), key=lambda e: e["shard"])  # noqa: E731
    tables = [schemas.read_table(vdir.join(e["path"])) for e in files("dense")]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    vectors = np.concatenate([schemas.dense_matrix(t) for t in tables])
    con = catalog.connect(root)
    lang = dict(con.execute("select id, lang from documents where set_name = ? and is_current", [name]).fetchall())
    return m, vdir, ids, vectors, lang


def pick_queries(data: str, per_lang: int, seed: int):
    queries = load_queries(os.path.join(data, "queries.jsonl"))
    rng = np.random.default_rng(seed)
    by_lang: dict[str, list] = {}
    for q in queries:
        by_lang.setdefault(q.lang, []).append(q)
    chosen = []
    for lang in sorted(by_lang):
        group = by_lang[lang]
        idx = np.sort(rng.choice(len(group), min(per_lang, len(group)), replace=False))
        chosen.extend(group[i] for i in idx)
    return chosen


# ---- search helpers ---------------------------------------------------------------------
def groups(queries, lang_of_doc: list[str], setting: str):
    """(query positions, allowed doc positions) per language group for a setting."""
    doc_lang = np.array(lang_of_doc)
    out = []
    for lang in sorted({q.lang for q in queries}):
        qpos = np.array([i for i, q in enumerate(queries) if q.lang == lang])
        target = lang if setting == "same" else "en"
        out.append((qpos, np.flatnonzero(doc_lang == target).astype(np.int64)))
    return out


def run_dict(queries, ids: list[str], scores: np.ndarray, pos: np.ndarray) -> dict:
    return {q.id: [(ids[p], float(s)) for s, p in zip(scores[i], pos[i]) if p >= 0] for i, q in enumerate(queries)}


def dense_search(index, params, qv: np.ndarray, gs, k: int, vectors=None):
    scores = np.full((len(qv), k), -np.inf, np.float32)
    pos = np.full((len(qv), k), -1, np.int64)
    for qpos, allowed in gs:
        s, p = dense.search(index, params, qv[qpos], k, vectors=vectors, allowed=allowed)
        scores[qpos], pos[qpos] = s, p
    return scores, pos


def maxsim_exact(Q: np.ndarray, tokens: list[np.ndarray], allowed: np.ndarray, k: int):
    """Exact MaxSim over uncompressed token vectors of the allowed documents."""
    docs = [tokens[a] for a in allowed]
    lengths = np.array([len(d) for d in docs])
    T = np.concatenate(docs).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    scores = np.zeros((len(Q), len(docs)), np.float32)
    for i, q in enumerate(Q):
        sim = q.astype(np.float32) @ T.T                     # (Lq, tokens)
        scores[i] = np.maximum.reduceat(sim, starts, axis=1).sum(0)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), allowed[top]


# ---- main -------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from embedding.encoder import Encoder
    from embedding.model import EncoderSettings, load_model

    torch.set_num_threads(os.cpu_count() or 1)
    m, vdir, ids, vectors, lang_map = load_set(args.root, args.set)
    lang_of_doc = [lang_map[i] for i in ids]
    queries = pick_queries(args.data, args.queries_per_lang, args.seed)
    chosen = {q.id for q in queries}  # judged queries outside the sample would count as zeros
    qrels = {s: {qid: rel for qid, rel in load_qrels(os.path.join(args.data, f"qrels_{s}.tsv")).items()
                 if qid in chosen} for s in ("same", "x2en")}
    qlang = {q.id: q.lang for q in queries}
    lm = load_model(args.model, EncoderSettings(**m["model"]["settings"]), device="cpu")
    if lm.fingerprint != m["model"]["fingerprint"]:
        raise SystemExit("the model does not match the set's fingerprint")
    enc = Encoder(lm)
    t0 = time.perf_counter()
    qdense = enc.encode_queries([q.text for q in queries])
    qcol = enc.encode_queries_colbert([q.text for q in queries])
    logger.info("encoded %d queries in %.0fs", len(queries), time.perf_counter() - t0)

    results: dict[str, dict] = {"same": {}, "x2en": {}}
    bytes_per_doc: dict[str, float] = {}
    n = len(ids)

    def record(label: str, setting: str, scores, pos) -> None:
        results[setting][label] = evaluate(run_dict(queries, ids, scores, pos), qrels[setting], qlang,
                                           known_docs=set(ids))

    # dense indexes, built in-process with the same functions the index job uses
    full = vectors.shape[1]
    configs = [("dense-exact-%d" % d, "flat", d) for d in dict.fromkeys((full, 256, 128, 64)) if d <= full] + \
        [("ivfpq", "ivfpq", full), ("hnsw", "hnsw", full), ("binary+rescore", "binary", full)]
    for label, kind, dim in configs:
        x = truncate(vectors, dim)
        params = dense.DenseIndexParams(kind=kind, dim=dim, pq_nbits=8 if n >= 1024 else 4).resolved(n, n_train=n)
        index = dense.train(params, x)
        dense.add(index, x, 0)
        bytes_per_doc[label] = dense.index_bytes(index) / n
        qv = truncate(qdense, dim)
        for setting in ("same", "x2en"):
            s, p = dense_search(index, params, qv, groups(queries, lang_of_doc, setting), K,
                                vectors=vectors if kind in dense.RESCORED_KINDS else None)
            record(label, setting, s, p)
        logger.info("%s done", label)

    # ColBERT: uncompressed reference (encoded here) and the centroid index at nbits 1/2/4
    corpus = {json.loads(line)["id"]: json.loads(line)["text"]
              for line in open(os.path.join(args.data, "corpus.jsonl"), encoding="utf-8")}
    t0 = time.perf_counter()
    tokens = enc.encode_documents([corpus[i] for i in ids], dense=False, colbert=True).tokens
    logger.info("encoded %d documents' token vectors in %.0fs", n, time.perf_counter() - t0)
    for setting in ("same", "x2en"):
        s = np.full((len(queries), K), -np.inf, np.float32)
        p = np.full((len(queries), K), -1, np.int64)
        for qpos, allowed in groups(queries, lang_of_doc, setting):
            s[qpos], p[qpos] = maxsim_exact(qcol[qpos], tokens, allowed, K)
        record("maxsim-uncompressed", setting, s, p)
    stored = ResidualCodec.from_bytes(vdir.join(m["codec"]["file"]).read_bytes())
    allv = np.concatenate(tokens)
    sample = allv[np.random.default_rng(0).choice(len(allv), min(len(allv), 200_000), replace=False)]
    overlap: dict[str, dict] = {}
    latency: dict[str, dict] = {}
    for nbits in (1, 2, 4):
        codec = stored if nbits == stored.nbits else stored.with_nbits(nbits, sample)
        codes, residuals = codec.compress(allv)
        lengths = np.array([len(t) for t in tokens])
        index = CentroidIndex.from_flat(codec, codes, residuals, lengths)
        label = f"plaid-nbits{nbits}"
        bytes_per_doc[label] = index.nbytes() / n
        overlap[label] = {}
        for setting in ("same", "x2en"):
            s = np.full((len(queries), K), -np.inf, np.float32)
            p = np.full((len(queries), K), -1, np.int64)
            hits = []
            for qpos, allowed in groups(queries, lang_of_doc, setting):
                for qi in qpos:
                    s[qi], p[qi] = index.search(qcol[qi:qi + 1], K, allowed=allowed)
                    _, ex = index.exact_maxsim(qcol[qi:qi + 1], K, allowed=allowed)
                    hits.append(len(set(p[qi]) & set(ex[0])) / K)
            record(label, setting, s, p)
            overlap[label][setting] = float(np.mean(hits))
        if nbits == 2:
            latency = measure_latency(index, qcol[: args.latency_queries])
        logger.info("%s done", label)

    summary = summarise(results, overlap, latency, bytes_per_doc, queries, n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print_tables(summary)
    print(f"written to {args.out}")
    return 0


def measure_latency(index: CentroidIndex, Q: np.ndarray) -> dict:
    plaid_t, brute_t = [], []
    for i in range(len(Q)):  # interleaved, so both see the same machine load
        t = time.perf_counter()
        index.search(Q[i:i + 1], K, SearchParams())
        plaid_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.exact_maxsim(Q[i:i + 1], K)
        brute_t.append(time.perf_counter() - t)
    med = lambda v: float(np.median(v) * 1000)  # noqa: E731
    p95 = lambda v: float(np.percentile(v, 95) * 1000)  # noqa: E731
    return {"queries": len(Q), "plaid_ms_median": med(plaid_t), "plaid_ms_p95": p95(plaid_t),
            "brute_ms_median": med(brute_t), "brute_ms_p95": p95(brute_t),
            "speedup_median": med(brute_t) / med(plaid_t), "speedup_p95": p95(brute_t) / p95(plaid_t)}


def summarise(results, overlap, latency, bytes_per_doc, queries, n) -> dict:
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "documents": n,
           "queries": len(queries), "ndcg10": {}, "overlap_top10_vs_exact_compressed": overlap,
           "latency": latency, "bytes_per_document": bytes_per_doc}
    for setting, by_label in results.items():
        out["ndcg10"][setting] = {label: {"overall": r.overall["nDCG@10"],
                                          **{lg: v["nDCG@10"] for lg, v in r.per_language.items()}}
                                  for label, r in by_label.items()}
        ref = by_label["maxsim-uncompressed"].overall["nDCG@10"]
        out.setdefault("plaid_share_of_uncompressed", {})[setting] = {
            label: by_label[label].overall["nDCG@10"] / ref for label in by_label if label.startswith("plaid")}
    return out


def print_tables(summary: dict) -> None:
    for setting, title in (("same", "same-language"), ("x2en", "X -> English")):
        table = summary["ndcg10"][setting]
        labels = list(table)
        langs = sorted(k for k in next(iter(table.values())) if k != "overall") + ["overall"]
        print(f"\nnDCG@10, {title} ({summary['queries']} queries, {summary['documents']} documents)")
        print(f"{'lang':<8}" + "".join(f"{lb[:14]:>15}" for lb in labels))
        for lg in langs:
            print(f"{lg:<8}" + "".join(f"{table[lb][lg]:>15.4f}" for lb in labels))
        print("centroid index nDCG@10 / uncompressed MaxSim: " + ", ".join(
            f"{k} {v:.3f}" for k, v in summary["plaid_share_of_uncompressed"][setting].items()))
        print("top-10 overlap with exact MaxSim over the same compressed vectors: " + ", ".join(
            f"{k} {v[setting]:.3f}" for k, v in summary["overlap_top10_vs_exact_compressed"].items()))
    lat = summary["latency"]
    if lat:
        print(f"\nlatency over {lat['queries']} queries, whole corpus, k=10, nbits 2: centroid index "
              f"{lat['plaid_ms_median']:.1f} ms median / {lat['plaid_ms_p95']:.1f} ms p95; brute-force MaxSim "
              f"{lat['brute_ms_median']:.1f} / {lat['brute_ms_p95']:.1f} ms; speed-up {lat['speedup_median']:.2f}x "
              f"median, {lat['speedup_p95']:.2f}x p95")
    print("\nindex bytes per document: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["bytes_per_document"].items()))


if __name__ == "__main__":
    sys.exit(main())
