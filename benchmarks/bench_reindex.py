"""Re-index benchmark on XQuAD paragraphs: a 1% change against a full rebuild, side by side.

One process, one local Ray, the same model and corpus size for both sides:

1. snapshot A (``--docs-per-lang`` paragraphs of each language) is embedded
   (``tessera embed``, mode both) and indexed (flat, ivf, plaid) in store 1;
2. snapshot B changes ``--change`` of A's documents (half rewritten, a quarter
   deleted, a quarter new paragraphs);
3. ``tessera reindex`` takes store 1 from A to B (timed: diff, delta embedding,
   index updates, publish);
4. B is embedded and indexed from scratch in store 2 (timed: the full rebuild);
5. the top-10 of every index in store 1 (updated in place) is compared over the XQuAD
   questions with store 2 (full rebuild) and with a fresh index built on store 1's
   re-indexed set version (same codec: isolates the in-place update from the codec
   re-fit). For PLAID the comparisons also run on exact MaxSim over each store's
   compressed vectors: the floor that the codec re-fit alone sets, whatever the search.

Prints a table and writes JSON. Usage::

    python benchmarks/prepare_data.py --xquad ../shared/data/xquad --out bench-data
    python benchmarks/bench_reindex.py --data bench-data --model ~/.cache/tessera/models/me5-small \
        --work /tmp/bench-reindex [--docs-per-lang 100] [--change 0.01] [--nbits 4]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexing.searcher import Searcher  # noqa: E402
from jobs import build_index, reindex  # noqa: E402
from jobs.embed import DEFAULT_NBITS, EmbedConfig  # noqa: E402
from jobs.embed import run as embed  # noqa: E402
from storage import catalog  # noqa: E402

logger = logging.getLogger("bench_reindex")
KINDS = {"flat": {}, "ivf": {}, "plaid": {}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="output folder of prepare_data.py")
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True, help="scratch folder (two stores, two snapshots)")
    p.add_argument("--docs-per-lang", type=int, default=100)
    p.add_argument("--change", type=float, default=0.01, help="share of documents changed")
    p.add_argument("--queries-per-lang", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nbits", type=int, default=DEFAULT_NBITS,
                   help="ColBERT residual bits of the set (default: tessera's)")
    p.add_argument("--out", default="benchmarks/results/reindex_xquad")
    return p.parse_args(argv)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def snapshots(corpus: list[dict], per_lang: int, change: float, seed: int) -> tuple[list[dict], list[dict], dict]:
    """A: the first ``per_lang`` paragraphs of each language; B: A with ``change`` of it changed."""
    by_lang: dict[str, list[dict]] = {}
    for d in corpus:
        by_lang.setdefault(d["lang"], []).append(d)
    a = [d for lang in sorted(by_lang) for d in by_lang[lang][:per_lang]]
    spare = [d for lang in sorted(by_lang) for d in by_lang[lang][per_lang:]]
    rng = np.random.default_rng(seed)
    n = max(4, int(round(change * len(a))))
    n_new = n_del = n // 4
    n_mod = n - n_new - n_del
    picked = rng.choice(len(a), size=n_mod + n_del, replace=False)
    modified, deleted = set(picked[:n_mod].tolist()), set(picked[n_mod:].tolist())
    b = []
    for i, d in enumerate(a):
        if i in deleted:
            continue
        if i in modified:
            sentences = d["text"].split(". ")
            d = {**d, "text": ". ".join(sentences[1:] + sentences[:1]) + " (revised)"}
        b.append(d)
    if len(spare) < n_new:
        raise ValueError(f"only {len(spare)} paragraphs left for {n_new} new documents: lower --docs-per-lang")
    b += [spare[int(i)] for i in rng.choice(len(spare), size=n_new, replace=False)]
    return a, b, {"documents": len(a), "changed": n_mod, "deleted": n_del, "new": n_new}


def build_store(root: Path, corpus_url: str, model: str, nbits: int) -> dict:
    """Full embed + index builds; returns stage seconds."""
    t0 = time.perf_counter()
    embed(EmbedConfig(corpus=(corpus_url,), model=model, set_name="xq", root=str(root), nbits=nbits))
    t1 = time.perf_counter()
    for kind, extra in KINDS.items():
        build_index.run(build_index.IndexConfig(set_name="xq", kind=kind, root=str(root), **extra))
    t2 = time.perf_counter()
    return {"embed": t1 - t0, "indexes": t2 - t1, "total": t2 - t0}


def top10(root: Path, index: str, queries: list[str], exact: bool = False) -> list[list[str]]:
    """Top-10 ids of each query; ``exact``: brute-force MaxSim over the index's compressed
    vectors instead of the PLAID search (plaid only)."""
    s = Searcher.open(str(root), index)
    if exact:
        q = s.encode_queries(queries)
        _, pos = s.backend.index.exact_maxsim(q, 10)
        return [[s.ids[p] for p in row if p >= 0] for row in pos]
    out = []
    for lo in range(0, len(queries), 64):
        out += [[d for d, _ in hits] for hits in s.search(queries[lo:lo + 64], k=10)]
    return out


def pick_queries(data: Path, per_lang: int) -> tuple[list[str], list[set[str]]]:
    """The first ``per_lang`` XQuAD questions of each language and their same-language gold paragraphs."""
    queries, qids = [], []
    per: dict[str, int] = {}
    for q in read_jsonl(data / "queries.jsonl"):
        if per.get(q["lang"], 0) < per_lang:
            per[q["lang"]] = per.get(q["lang"], 0) + 1
            queries.append(q["text"])
            qids.append(q["id"])
    gold = read_qrels(data / "qrels_same.tsv")
    return queries, [gold.get(q, set()) for q in qids]


def read_qrels(path: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, _, doc, rel = line.split("\t")
        if int(rel) > 0:
            out.setdefault(qid, set()).add(doc)
    return out


def mrr10(tops: list[list[str]], gold: list[set[str]]) -> float:
    """MRR@10 against the same-language gold paragraph (a query whose gold is not in the
    corpus counts 0 on both sides alike)."""
    return float(np.mean([next((1 / (r + 1) for r, d in enumerate(t[:10]) if d in g), 0.0)
                          for t, g in zip(tops, gold)]))


def overlap(a: list[list[str]], b: list[list[str]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / max(1, len(y)) for x, y in zip(a, b)]))


def write_results(out: "str | Path", result: dict, lines: list[str]) -> None:
    """``out``.json (the figures) and ``out``.txt (the table), and the table on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    text = "\n".join(lines)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    data, work = Path(args.data), Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    a, b, plan = snapshots(read_jsonl(data / "corpus.jsonl"), args.docs_per_lang, args.change, args.seed)
    url_a, url_b = write_jsonl(work / "snap_a.jsonl", a), write_jsonl(work / "snap_b.jsonl", b)
    queries, gold = pick_queries(data, args.queries_per_lang)
    mrr = lambda tops: mrr10(tops, gold)  # noqa: E731

    store1, store2 = work / "incremental", work / "full"
    logger.info("store 1: full build of snapshot A (%d documents)", len(a))
    build_a = build_store(store1, url_a, args.model, args.nbits)
    logger.info("store 1: re-index A → B (%s)", plan)
    t0 = time.perf_counter()
    report = reindex.run(reindex.ReindexConfig(set_name="xq", corpus=(url_b,), root=str(store1)))
    t_re = time.perf_counter() - t0
    logger.info("store 2: full build of snapshot B (%d documents)", len(b))
    build_b = build_store(store2, url_b, args.model, args.nbits)

    rows = {}
    for kind in KINDS:
        fresh = build_index.run(build_index.IndexConfig(set_name="xq", kind=kind, root=str(store1),
                                                        name=f"fresh-{kind}", **KINDS[kind]))
        for exact in ([False, True] if kind == "plaid" else [False]):
            inc, full = top10(store1, f"xq-{kind}", queries, exact), top10(store2, f"xq-{kind}", queries, exact)
            rows[kind + ("-exact" if exact else "")] = {
                "overlap_vs_full_rebuild": overlap(inc, full),
                "mrr10_incremental": mrr(inc), "mrr10_full_rebuild": mrr(full),
                "overlap_vs_rebuild_same_set": overlap(inc, top10(store1, fresh["name"], queries, exact)),
                "how": report["indexes"][f"xq-{kind}"]["how"]}
    con = catalog.connect(str(store1))
    n_current = con.execute("select count(*), count(distinct id) from documents where is_current").fetchone()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False},
        "model": args.model, "nbits": args.nbits, "snapshot": plan, "queries": len(queries),
        "full_build_A": build_a, "full_build_B": build_b, "reindex_seconds": t_re,
        "reindex_stages": report.get("timings"), "reindex_counts": report["counts"],
        "reindex_bytes": report["bytes"], "decision": report["decision"],
        "ratio_reindex_vs_full_embed": t_re / build_b["embed"],
        "ratio_reindex_vs_full_embed_and_index": t_re / build_b["total"],
        "current_documents": list(n_current), "indexes": rows,
    }
    lines = [
        f"re-index of {plan['documents']} XQuAD paragraphs, {args.change:.0%} changed "
        f"({plan['changed']} rewritten, {plan['deleted']} deleted, {plan['new']} new); "
        f"{os.cpu_count()} CPUs, no GPU; nbits {args.nbits}; {len(queries)} XQuAD questions; delta encoded in: "
        f"{report['decision'].get('encoded_in')}",
        f"full embed of B: {build_b['embed']:.1f} s (+ {build_b['indexes']:.1f} s indexes); "
        f"re-index A→B: {t_re:.1f} s (stages {report.get('timings')})",
        f"re-index / full embed = {result['ratio_reindex_vs_full_embed']:.3f}   "
        f"re-index / (full embed + index builds) = {result['ratio_reindex_vs_full_embed_and_index']:.3f}",
        f"bytes written {report['bytes']['written'] / 1e6:.2f} MB, reused by reference "
        f"{report['bytes']['reused'] / 1e6:.2f} MB; current documents {n_current[0]} ({n_current[1]} distinct)",
        "",
        f"{'index':<12} {'update':<9} {'top-10 overlap vs full rebuild':>31} {'vs rebuild on same set':>24}"
        f" {'MRR@10 incremental':>19} {'full rebuild':>13}",
    ]
    for kind, r in rows.items():
        lines.append(f"{kind:<12} {r['how']:<9} {r['overlap_vs_full_rebuild']:>31.4f} "
                     f"{r['overlap_vs_rebuild_same_set']:>24.4f} {r['mrr10_incremental']:>19.4f} "
                     f"{r['mrr10_full_rebuild']:>13.4f}")
    lines.append("(plaid-exact: brute-force MaxSim over each index's compressed vectors instead of the PLAID search)")
    write_results(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
