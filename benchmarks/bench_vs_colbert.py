"""Tessera's PLAID index against colbert-ai's, over the same compressed token vectors, side by side.

The reference is Stanford's ``colbert-ai`` (PLAID, ``IndexScorer.rank``). Both engines
index exactly the float token vectors Tessera stores for a set:

1. Tessera's plaid index ``--index`` (built by ``tessera index --kind plaid`` from a set
   embedded with mode colbert or both) is loaded, and every stored token is decompressed
   with the set's codec (unit float32 vectors, in document position order);
2. colbert-ai builds its own index from those vectors with its ``CollectionIndexer``
   pipeline (sample -> k-means -> residual compression at the set's nbits -> IVF), the
   checkpoint encoder replaced by a lookup of the precomputed vectors; it is cached
   under ``--work`` (``--rebuild`` rebuilds it);
3. the XQuAD questions (``--queries-per-lang`` per language whose gold paragraph is in the
   set) are encoded once with the set's query encoder, and the same query matrices go to
   both engines: Tessera ``CentroidIndex.search`` at its k=10 defaults (products ``auto``:
   int8 on a CPU with AMX; ``TESSERA_PLAID_PRODUCTS=float32`` in the environment measures
   the float32 engine, the serving subprocess included), colbert-ai
   ``IndexScorer.rank`` at the k=10 defaults of its ``Searcher.dense_search`` (ncells=1,
   centroid_score_threshold=0.5, ndocs=256), padding rows dropped;
4. latency: the two engines alternate query by query (which goes first alternates too;
   ``--alternate pass``: a whole pass over the queries at a time, so that neither runs right
   after the other, e.g. after colbert-ai's torch leaves OpenMP workers spinning at 2 threads),
   ``--rounds`` times, at ``--threads`` threads (torch, BLAS/OpenMP, faiss; above 1 Tessera's
   search is given ``threads=N``: with float32 products it splits each query over them, with
   int8 ones a query runs whole, which measured faster); median and
   p95 ms per query and the ratio Tessera / colbert-ai;
5. quality: nDCG@10 against the qrels, and top-10 overlap of each engine with exact
   MaxSim over its own compressed vectors (Tessera ``CentroidIndex.exact_maxsim``;
   colbert-ai: every residual decompressed with its ``ResidualCodec``, brute force);
6. memory: each engine serves in a fresh subprocess (this script with ``--serve``): RSS
   after the imports (torch, faiss, the engine), then the index is loaded and every query
   answered once; the peak (``VmHWM``) minus the post-import RSS is the index's own share.

7. ``--curve``: Tessera's speed/quality trade-off, every ``SearchParams`` setting given
   (default a grid over ``ndocs`` and ``exact_tokens``) in a pass of its own interleaved
   query by query with colbert-ai at its defaults (its ratio against that pass's colbert-ai);
   the table names the fastest setting whose overlap and nDCG@10 are at least colbert-ai's
   (equal quality) and the fastest at overlap >= 0.95.

Writes ``benchmarks/results/vs_colbert_<nbits>bit.json`` and ``.txt`` and prints the table.
Goals of the engine: Tessera median <= 0.5x colbert-ai, peak RSS <= colbert-ai's, top-10
overlap with exact MaxSim >= 0.95.

It installs nothing itself. colbert-ai needs its own venv (it compiles C++ extensions
with ``torch.utils.cpp_extension`` on first use: ``ninja`` and ``g++``; the first run
spends ~3 min compiling, cached in ``~/.cache/torch_extensions``)::

    python3 -m venv /work/colbert-venv
    /work/colbert-venv/bin/pip install torch==2.13.0       # first: the CPU wheel, not a CUDA build
    /work/colbert-venv/bin/pip install -c scripts/constraints.txt colbert-ai==0.2.22 ninja faiss-cpu \\
        threadpoolctl -e '.[cpu]'

Usage (the machine is shared: hold the benchmark lock while timing)::

    python benchmarks/prepare_data.py --xquad ../shared/data/xquad --out bench-data
    tessera embed --corpus bench-data/corpus.jsonl --set xq2 --mode colbert --nbits 2 --root /tmp/vs-root ...
    tessera index --set xq2 --kind plaid --root /tmp/vs-root
    flock /tmp/bench.lock /work/colbert-venv/bin/python benchmarks/bench_vs_colbert.py --root /tmp/vs-root \\
        --index xq2-plaid --queries bench-data/queries.jsonl --qrels bench-data/qrels_same.tsv \\
        --work /tmp/vs-work [--threads 1] [--rounds 3] [--queries-per-lang 25]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Nothing else at module level: a --serve process imports only its own engine (and torch).

logger = logging.getLogger("bench_vs_colbert")
K = 10
# colbert-ai's Searcher.dense_search defaults for k <= 10 (colbert/searcher.py).
COLBERT_K10 = {"ncells": 1, "centroid_score_threshold": 0.5, "ndocs": 256}
GOALS = {"latency_ratio_max": 0.5, "overlap_min": 0.95}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="Tessera store root")
    p.add_argument("--index", required=True, help="Tessera plaid index name (built on --set)")
    p.add_argument("--set", dest="set_name", help="the index's source set (checked; default: the index's)")
    p.add_argument("--queries", required=True, help="queries.jsonl of prepare_data.py")
    p.add_argument("--qrels", required=True, help="qrels TSV (qrels_same.tsv of prepare_data.py)")
    p.add_argument("--queries-per-lang", type=int, default=25)
    p.add_argument("--work", required=True, help="scratch folder: colbert-ai index, query matrices")
    p.add_argument("--rebuild", action="store_true", help="rebuild colbert-ai's index even if cached")
    p.add_argument("--kmeans-iters", type=int, default=4, help="colbert-ai k-means iterations (its default: 4)")
    p.add_argument("--colbert-ncells", type=int, default=COLBERT_K10["ncells"],
                   help="colbert-ai cells probed per query token (its k=10 default: 1; Tessera's: 4)")
    p.add_argument("--threads", type=int, default=1, help="threads of both engines (torch, BLAS, OpenMP, faiss)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the queries")
    p.add_argument("--alternate", choices=("query", "pass"), default="query",
                   help="the engines take turns query by query (default) or a whole pass over the queries "
                        "at a time (neither runs right after the other)")
    p.add_argument("--seed", type=int, default=12345, help="colbert-ai's sampling and k-means seed")
    p.add_argument("--out", help="output stem (default benchmarks/results/vs_colbert_<nbits>bit)")
    p.add_argument("--curve", nargs="*", metavar="NAME=V[,NAME=V]",
                   help="also sweep Tessera's speed/quality curve: SearchParams settings (e.g. "
                        "'ndocs=128,exact_tokens=4096'; none given: a default grid over ndocs and "
                        "exact_tokens), interleaved query by query with colbert-ai at its defaults; reports "
                        "the fastest setting at colbert-ai's quality and at overlap >= 0.95")
    p.add_argument("--serve", choices=("tessera", "colbert"), help=argparse.SUPPRESS)
    p.add_argument("--serve-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- pure helpers (tested in tests/benchmarks/test_bench_vs_colbert.py) ---------------
def pick_queries(rows: list[dict], qrels: dict[str, set[str]], doc_ids: set[str],
                 per_lang: int) -> tuple[list[str], list[str], list[set[str]]]:
    """The first ``per_lang`` queries of each language whose gold documents are all indexed.

    Returns query ids, texts and gold sets, in file order.
    """
    qids, texts, gold = [], [], []
    per: dict[str, int] = {}
    for q in rows:
        g = qrels.get(q["id"])
        lang = q.get("lang", "")
        if not g or not g <= doc_ids or per.get(lang, 0) >= per_lang:
            continue
        per[lang] = per.get(lang, 0) + 1
        qids.append(q["id"])
        texts.append(q["text"])
        gold.append(g)
    return qids, texts, gold


def ndcg_at_k(tops: list[list[str]], gold: list[set[str]], k: int = K) -> float:
    """Mean nDCG@k with binary relevance (each gold document gain 1)."""
    out = []
    for top, g in zip(tops, gold):
        dcg = sum(1 / np.log2(r + 2) for r, d in enumerate(top[:k]) if d in g)
        idcg = sum(1 / np.log2(r + 2) for r in range(min(k, len(g))))
        out.append(dcg / idcg if idcg else 0.0)
    return float(np.mean(out)) if out else 0.0


def to_ids(rows, ids) -> list[list[str]]:
    """Positions (``-1`` padded) to document ids."""
    return [[ids[int(p)] for p in row if p >= 0] for row in rows]


def trim_padding(q: np.ndarray) -> np.ndarray:
    """``(Lq, dim)`` query matrix without its trailing all-zero (padding) rows (at least one row)."""
    nonzero = np.flatnonzero(np.any(q != 0, axis=1))
    return q[: max(1, int(nonzero[-1]) + 1 if nonzero.size else 1)]


def maxsim_topk(q: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, k: int = K) -> np.ndarray:
    """Exact MaxSim top-``k`` positions of one query over concatenated documents.

    ``q`` ``(Lq, dim)``, ``vectors`` ``(n_tokens, dim)``, ``offsets`` ``(n_docs + 1,)``;
    rows past ``offsets[-1]`` (colbert-ai pads its embeddings) are ignored; documents
    without tokens are never returned. Ties rank the lower position first.
    """
    lengths = np.diff(offsets)
    live = np.flatnonzero(lengths > 0)
    sims = vectors[: offsets[-1]] @ q.T                    # (n_tokens, Lq)
    best = np.maximum.reduceat(sims, offsets[live], axis=0).sum(axis=1)
    order = np.lexsort((live, -best))[:k]
    return live[order]


def latency_summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "n": int(ms.size)}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_now_mb() -> float:
    """Resident set size now (``VmRSS``), MiB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process image (``VmHWM``), MiB.

    Not ``ru_maxrss``: Linux carries that across fork and exec, so a child of a large
    parent reports the parent's peak (kept in the JSON as ``ru_maxrss_mb``).
    """
    return _status_mb("VmHWM")


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def pin_threads(n: int) -> None:
    """Same thread count for torch, BLAS/OpenMP (threadpoolctl) and faiss, where loaded (a
    serving process imports neither for this: Tessera's imports torch at its first int8
    search, with the thread count of the environment, :func:`thread_env`)."""
    from threadpoolctl import threadpool_limits

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(n)
    threadpool_limits(n)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- Tessera ---------------------------------------------------------------------------
def load_tessera(root: str, index: str):
    """The plaid index (a ``CentroidIndex``, memory-mapped), ids by position (``read_doc_ids``:
    memory-mapped arrays, no pyarrow) and the manifest.

    ``indexing.index_files.open_centroid_index``: what a process serving pre-encoded
    queries uses (no query encoder, no torch).
    """
    from indexing.index_files import open_centroid_index, read_doc_ids
    from storage import layout
    from storage.manifest import Artifact

    cindex, manifest = open_centroid_index(root, index)
    vdir = Artifact(layout.resolve_root(root), "indexes", index).version_dir(manifest["version"])
    return cindex, read_doc_ids(vdir, manifest), manifest


def encode_queries(root: str, index: str, texts: list[str]) -> np.ndarray:
    """``(nq, Lq, dim)`` float32 query matrices from the set's own query encoder."""
    from indexing.searcher import Searcher

    s = Searcher.open(root, index)
    return s.encode_queries(texts)


#: ``threads`` of Tessera's searches: ``--threads`` when above 1, so that a single pre-encoded
#: query uses them as ``Searcher.retrieve`` does (float32 products: its stages split over them;
#: int8: its torch products on them); None at 1 (BLAS is pinned to one thread, as before the
#: split existed).
SEARCH_THREADS: "int | None" = None


def tessera_search(cindex, q: np.ndarray) -> np.ndarray:
    from indexing.plaid import SearchParams

    return cindex.search(q[None], K, SearchParams(), threads=SEARCH_THREADS)[1][0]


# ---- colbert-ai ------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_stdout():
    """colbert-ai (and faiss, from C) print progress on stdout; send file descriptor 1 to
    stderr meanwhile (stdout is the table's)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def build_colbert(vectors: np.ndarray, offsets: np.ndarray, nbits: int, path: Path,
                  kmeans_iters: int, seed: int) -> float:
    """colbert-ai's index over ``vectors`` (document ``i`` = tokens ``offsets[i]:offsets[i+1]``).

    Runs ``CollectionIndexer`` (setup: sample pids and their embeddings, partitions
    ``2^floor(log2(16 sqrt(n_embeddings)))``; train: faiss k-means, bucket cutoffs and
    weights on a held-out 5%; index: residual compression; finalize: IVF) with its
    checkpoint encoder replaced by a lookup of the precomputed vectors. Returns seconds.
    """
    import random

    import torch
    from colbert.data.collection import Collection
    from colbert.indexing.collection_indexer import CollectionIndexer
    from colbert.indexing.index_saver import IndexSaver
    from colbert.infra.config import ColBERTConfig, RunConfig
    from colbert.infra.run import Run

    class LookupEncoder:
        """Stands for ``CollectionEncoder``: a passage is its position, as a string."""

        def encode_passages(self, passages):
            if not passages:
                return None, None
            pids = [int(p) for p in passages]
            embs = torch.from_numpy(np.concatenate([vectors[offsets[i]:offsets[i + 1]] for i in pids]))
            return embs.float(), [int(offsets[i + 1] - offsets[i]) for i in pids]

    class LookupIndexer(CollectionIndexer):
        def __init__(self, config, collection, verbose=1):  # no Checkpoint: nothing to encode
            self.verbose, self.config = verbose, config
            self.rank, self.nranks = config.rank, config.nranks
            self.use_gpu = False
            self.collection = Collection(data=collection)
            self.encoder = LookupEncoder()
            self.saver = IndexSaver(config)

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    config = ColBERTConfig(nbits=nbits, dim=int(vectors.shape[1]), kmeans_niters=kmeans_iters,
                           index_path=str(path), doc_maxlen=int(np.diff(offsets).max()), gpus=0)
    t0 = time.perf_counter()
    with quiet_stdout(), Run().context(RunConfig(nranks=1, gpus=0)):
        LookupIndexer(config, [str(i) for i in range(len(offsets) - 1)]).run([[None]])
    return time.perf_counter() - t0


def load_colbert(path: Path, query_maxlen: int, ncells: int = COLBERT_K10["ncells"]):
    """colbert-ai's ``IndexScorer`` (CPU) and the search config at its k=10 defaults
    (``ncells`` may be overridden)."""
    from colbert.infra.config import ColBERTConfig
    from colbert.modeling.colbert import ColBERT
    from colbert.search.index_storage import IndexScorer

    with quiet_stdout():
        ColBERT.try_load_torch_extensions(False)  # segmented MaxSim, loaded by colbert-ai's Checkpoint
        scorer = IndexScorer(str(path), use_gpu=False)
    config = ColBERTConfig.load_from_index(str(path))
    config.configure(query_maxlen=query_maxlen, gpus=0, **{**COLBERT_K10, "ncells": ncells})
    return scorer, config


def colbert_search(scorer, config, q) -> list[int]:
    pids, _ = scorer.rank(config, q)
    return pids[:K]


def colbert_queries(Q: np.ndarray) -> list:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(trim_padding(q)))[None] for q in Q]


def colbert_exact(scorer, Q: np.ndarray) -> list[list[int]]:
    """Exact MaxSim top-10 over every vector colbert-ai stores (decompressed, unit)."""
    offsets = np.concatenate([[0], np.cumsum(scorer.doclens.numpy())]).astype(np.int64)
    n = int(offsets[-1])  # colbert-ai pads its loaded embeddings with uninitialised rows
    stored = type(scorer.embeddings)(scorer.embeddings.codes[:n], scorer.embeddings.residuals[:n])
    vectors = scorer.codec.decompress(stored).float().numpy()
    return [maxsim_topk(trim_padding(q), vectors, offsets).tolist() for q in Q]


# ---- serving subprocess (memory) -------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """Load one engine's index and answer every query once; write RSS figures as JSON."""
    # Each engine imports what it needs to serve pre-encoded queries: colbert-ai its
    # torch-based scorer, Tessera its index (and torch at its first search where its
    # products are int8, the default on a CPU with AMX: that is counted here too).
    if args.serve == "colbert":
        import torch  # noqa: F401
        from colbert.search.index_storage import IndexScorer  # noqa: F401
    else:
        from indexing import index_files, plaid  # noqa: F401
    pin_threads(args.threads)
    work = Path(args.work)
    Q = np.load(work / "queries.npy")
    after_import = rss_now_mb()
    t0 = time.perf_counter()
    if args.serve == "colbert":
        scorer, config = load_colbert(work / "colbert_index", Q.shape[1], args.colbert_ncells)
        loaded = time.perf_counter() - t0
        for q in colbert_queries(Q):
            colbert_search(scorer, config, q)
    else:
        cindex, _, _ = load_tessera(args.root, args.index)
        loaded = time.perf_counter() - t0
        for q in Q:
            tessera_search(cindex, q)
    out = {"rss_after_import_mb": after_import, "rss_after_queries_mb": rss_now_mb(),
           "peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb(), "load_seconds": loaded,
           "queries": int(len(Q))}
    out["index_share_mb"] = out["peak_rss_mb"] - after_import
    Path(args.serve_out).write_text(json.dumps(out))
    return 0


def measure_memory(args: argparse.Namespace, engine: str) -> dict:
    out = Path(args.work) / f"serve_{engine}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--root", args.root, "--index", args.index,
           "--queries", args.queries, "--qrels", args.qrels, "--work", args.work,
           "--threads", str(args.threads), "--colbert-ncells", str(args.colbert_ncells),
           "--serve", engine, "--serve-out", str(out)]
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=thread_env(args.threads))
    return json.loads(out.read_text())


def thread_env(n: int) -> dict:
    env = dict(os.environ)
    env.update({v: str(n) for v in THREAD_VARS})
    return env


# ---- the comparison ------------------------------------------------------------------
def interleaved_latency(cindex, scorer, config, Q: np.ndarray, rounds: int, by: str = "query"):
    """Per-query seconds of each engine ("tessera", "colbert") and the first round's top-10
    positions of each, the engines taking turns as :func:`interleaved` says (``by``)."""
    cq = colbert_queries(Q)
    return interleaved({"tessera": lambda i: tessera_search(cindex, Q[i]),
                        "colbert": lambda i: colbert_search(scorer, config, cq[i])}, len(Q), rounds, by)


CURVE_GRID = [f"ndocs={n},exact_tokens={t}" for n in (256, 128, 96, 64) for t in (8192, 4096, 2048)]


#: SearchParams fields that take a float (``exact_margin=inf`` too); the others take integers
FLOAT_PARAMS = ("centroid_score_threshold", "exact_margin", "exact_gap_quantile", "merge_tokens")


def parse_point(text: str) -> dict:
    """``"ndocs=128,exact_tokens=4096"`` -> ``{"ndocs": 128, "exact_tokens": 4096}`` (SearchParams fields)."""
    from indexing.plaid import SearchParams

    fields = {f.name: f for f in dataclasses.fields(SearchParams)}
    out = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in fields:
            raise ValueError(f"--curve: unknown search parameter {name!r} in {text!r}; known: {sorted(fields)}")
        out[name] = float(value) if name in FLOAT_PARAMS else int(value)
    SearchParams(**out)  # checks the values
    return out


def interleaved(engines: dict, n: int, rounds: int, by: str = "query") -> tuple[dict, dict]:
    """Seconds per query of each engine (``name -> fn(i) -> top ids``) and the first round's tops.

    ``by="query"``: the engines' order rotates query by query (and round by round).
    ``by="pass"``: each engine runs a whole pass over the queries in turn, the first engine
    rotating round by round, so that no engine's query runs right after another's: at more
    than one thread colbert-ai's torch leaves its OpenMP workers spinning after each query,
    on the CPUs the other engine's next query then shares (one process, query by query).
    """
    names = list(engines)
    times = {e: [] for e in names}
    tops = {e: [] for e in names}

    def run(e: str, i: int, r: int) -> None:
        t0 = time.perf_counter()
        top = engines[e](i)
        times[e].append(time.perf_counter() - t0)
        if r == 0:
            tops[e].append(list(top))

    for e in names:
        engines[e](0)  # warm-up
    for r in range(rounds):
        if by == "pass":
            shift = r % len(names)
            for e in names[shift:] + names[:shift]:
                for i in range(n):
                    run(e, i, r)
        else:
            for i in range(n):
                shift = (i + r) % len(names)
                for e in names[shift:] + names[:shift]:
                    run(e, i, r)
        logger.info("round %d: %s (median ms so far)", r + 1,
                    ", ".join(f"{e} {np.median(times[e]) * 1e3:.1f}" for e in names))
    return times, tops


def speed_quality_curve(cindex, scorer, config, Q: np.ndarray, points: list[str], rounds: int, ids: list,
                        gold: list, t_exact: list, c_exact: list) -> dict:
    """Tessera at each SearchParams point next to colbert-ai at its defaults: each point in a
    pass of its own, interleaved query by query with colbert-ai (one colbert-ai query between
    two of the point's, as in the main comparison), its ratio against that pass's colbert-ai.

    (All points in one rotation would run each Tessera query right after another point's
    query of the same index, its arrays in cache, and colbert-ai's always after a Tessera
    one: the thirty-third session measured colbert-ai 7.3 ms a query one to one and 8.8 in
    such a rotation.)"""
    from bench_reindex import overlap
    from indexing.plaid import SearchParams

    cq = colbert_queries(Q)
    params = {p: SearchParams(**parse_point(p)) for p in points}
    colbert_ms, rows, colbert_tops = [], {}, None
    for p, sp in params.items():
        engines = {"colbert-ai": lambda i: colbert_search(scorer, config, cq[i]),
                   p: (lambda sp: lambda i: cindex.search(Q[i][None], K, sp, threads=SEARCH_THREADS)[1][0])(sp)}
        times, tops = interleaved(engines, len(Q), rounds)
        colbert_tops = tops["colbert-ai"]
        reference = float(np.median(times["colbert-ai"]) * 1e3)
        colbert_ms.append(reference)
        top_ids = to_ids(tops[p], ids)
        median = float(np.median(times[p]) * 1e3)
        rows[p] = {"median_ms": median, "colbert_median_ms": reference, "ratio": median / reference,
                   "ndcg10": ndcg_at_k(top_ids, gold), "overlap_exact": overlap(top_ids, t_exact)}
    c_ids = to_ids(colbert_tops, ids)
    ref = {"median_ms": float(np.median(colbert_ms)), "ndcg10": ndcg_at_k(c_ids, gold),
           "overlap_exact": overlap(c_ids, c_exact)}
    rows = {"colbert-ai": ref, **rows}

    def fastest(ok):
        good = [e for e in params if ok(rows[e])]
        return min(good, key=lambda e: rows[e]["ratio"]) if good else None

    same = fastest(lambda r: r["overlap_exact"] >= ref["overlap_exact"] and r["ndcg10"] >= ref["ndcg10"])
    goal = fastest(lambda r: r["overlap_exact"] >= GOALS["overlap_min"])
    return {"rounds": rounds, "pairs": True, "points": rows, "at_colbert_quality": same, "at_overlap_goal": goal}


def curve_table(curve: dict) -> list[str]:
    lines = ["", f"speed/quality curve ({curve['rounds']} round(s), each point in its own pass interleaved one to "
             "one with colbert-ai at its defaults; colbert-ai: the median of its passes):",
             f"{'setting':<34} {'ms':>7} {'ratio':>6} {'nDCG@10':>8} {'overlap':>8} {'colbert ms':>10}"]
    for name, r in curve["points"].items():
        ratio = f"{r['ratio']:>6.2f}" if "ratio" in r else f"{'':>6}"
        mine = f"{r['colbert_median_ms']:>10.1f}" if "colbert_median_ms" in r else ""
        lines.append(f"{name:<34} {r['median_ms']:>7.1f} {ratio} {r['ndcg10']:>8.4f} {r['overlap_exact']:>8.4f} "
                     f"{mine}".rstrip())
    for key, what in (("at_colbert_quality", "at colbert-ai's quality (overlap and nDCG@10 >= its own)"),
                      ("at_overlap_goal", "at overlap with exact >= 0.95")):
        best = curve[key]
        lines.append(f"fastest {what}: " + (f"{best}, ratio {curve['points'][best]['ratio']:.2f}" if best
                                            else "none"))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.update({v: str(args.threads) for v in THREAD_VARS})
    global SEARCH_THREADS
    SEARCH_THREADS = args.threads if args.threads > 1 else None
    if args.serve:
        return serve(args)
    from bench_reindex import overlap, read_jsonl, read_qrels, write_results

    pin_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    cindex, ids, manifest = load_tessera(args.root, args.index)
    source = manifest["source"]
    if args.set_name and args.set_name != source["set"]:
        raise ValueError(f"index {args.index!r} was built on set {source['set']!r}, not {args.set_name!r}")
    nbits = cindex.codec.nbits
    qids, texts, gold = pick_queries(read_jsonl(Path(args.queries)), read_qrels(Path(args.qrels)),
                                     {d for d in ids if d is not None}, args.queries_per_lang)
    Q = encode_queries(args.root, args.index, texts)
    np.save(work / "queries.npy", Q)
    logger.info("%d queries, (%d, %d, %d); Tessera index: %d docs, %d tokens, %d centroids, nbits %d",
                len(qids), *Q.shape, cindex.n_docs, cindex.n_tokens, cindex.codec.n_centroids, nbits)

    cpath, build_s = work / "colbert_index", None
    marker = work / "colbert_index.source.json"  # what the cached colbert-ai index was built from
    built_from = {"root": args.root, "index": args.index, "source": source, "kmeans_iters": args.kmeans_iters,
                  "seed": args.seed}
    cached = marker.exists() and json.loads(marker.read_text()) == built_from and (cpath / "metadata.json").exists()
    if args.rebuild or not cached:
        marker.unlink(missing_ok=True)
        vectors = cindex.codec.decompress(cindex.codes, cindex.residuals)  # (n_tokens, dim) unit float32
        build_s = build_colbert(vectors, cindex.doc_offsets, nbits, cpath, args.kmeans_iters, args.seed)
        marker.write_text(json.dumps(built_from))
        del vectors
        logger.info("colbert-ai index built in %.1f s", build_s)
    cmeta = json.loads((cpath / "metadata.json").read_text())
    scorer, config = load_colbert(cpath, Q.shape[1], args.colbert_ncells)

    times, tops = interleaved_latency(cindex, scorer, config, Q, args.rounds, args.alternate)
    t_ids = to_ids(tops["tessera"], ids)
    c_ids = to_ids(tops["colbert"], ids)
    t_exact = to_ids(cindex.exact_maxsim(Q, K)[1], ids)
    c_exact = to_ids(colbert_exact(scorer, Q), ids)
    curve = None
    if args.curve is not None:
        curve = speed_quality_curve(cindex, scorer, config, Q, args.curve or CURVE_GRID, args.rounds, ids,
                                    gold, t_exact, c_exact)
    del scorer
    memory = {e: measure_memory(args, e) for e in ("tessera", "colbert")}

    lat = {e: latency_summary(times[e]) for e in times}
    from indexing import kernels
    from indexing.plaid import SearchParams

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False,
                    "threads": args.threads},
        "tessera_commit": tessera_commit(), "index": args.index, "set": source, "nbits": nbits,
        "queries": len(qids), "rounds": args.rounds, "alternate": args.alternate,
        "query_shape": list(Q.shape),
        "tessera": {"n_docs": cindex.n_docs, "n_tokens": cindex.n_tokens, "n_centroids": cindex.codec.n_centroids,
                    "params": dataclasses.asdict(SearchParams().resolved(K)), "index_bytes": cindex.nbytes(),
                    # the engine's stages: compiled (indexing.kernels) or numpy's (TESSERA_KERNELS=numpy)
                    "stages": "compiled" if kernels.ENABLED else "numpy",
                    "latency": lat["tessera"], "ndcg10": ndcg_at_k(t_ids, gold),
                    "overlap_exact": overlap(t_ids, t_exact), "memory": memory["tessera"]},
        "colbert": {"version": colbert_version(), "n_tokens": cmeta["num_embeddings"],
                    "n_centroids": cmeta["num_partitions"],
                    "params": {**COLBERT_K10, "ncells": args.colbert_ncells},
                    "kmeans_iters": args.kmeans_iters, "index_bytes": dir_bytes(cpath), "build_seconds": build_s,
                    "latency": lat["colbert"], "ndcg10": ndcg_at_k(c_ids, gold),
                    "overlap_exact": overlap(c_ids, c_exact), "memory": memory["colbert"]},
        "overlap_tessera_colbert": overlap(t_ids, c_ids),
        "exact_ndcg10": {"tessera": ndcg_at_k(t_exact, gold), "colbert": ndcg_at_k(c_exact, gold)},
    }
    t, c = result["tessera"], result["colbert"]
    result["ratios"] = {"median_ms": t["latency"]["median_ms"] / c["latency"]["median_ms"],
                        "p95_ms": t["latency"]["p95_ms"] / c["latency"]["p95_ms"],
                        "peak_rss": t["memory"]["peak_rss_mb"] / c["memory"]["peak_rss_mb"],
                        "index_rss_share": t["memory"]["index_share_mb"] / c["memory"]["index_share_mb"]}
    result["goals"] = {"latency": result["ratios"]["median_ms"] <= GOALS["latency_ratio_max"],
                       "peak_rss": result["ratios"]["peak_rss"] <= 1.0,
                       "overlap": t["overlap_exact"] >= GOALS["overlap_min"]}
    if curve is not None:
        result["curve"] = curve
    write_results(args.out or f"benchmarks/results/vs_colbert_{nbits}bit", result,
                  table(result) + (curve_table(curve) if curve else []))
    return 0


def tessera_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes to indexing/ or embedding/)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "indexing", "embedding"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def colbert_version() -> str:
    from importlib.metadata import version

    return version("colbert-ai")


def table(r: dict) -> list[str]:
    t, c, ratio = r["tessera"], r["colbert"], r["ratios"]
    lines = [f"Tessera vs colbert-ai {c['version']} (IndexScorer.rank) at nbits {r['nbits']}: index {r['index']}, "
             f"{t['n_docs']} docs, {t['n_tokens']} tokens; {r['queries']} queries x {r['rounds']} rounds, "
             f"interleaved {'pass by pass' if r.get('alternate') == 'pass' else 'query by query'}; "
             f"{r['machine']['threads']} thread(s) of {r['machine']['cpus']} CPUs, no GPU",
             f"{'':<22} {'Tessera':>10} {'colbert-ai':>10} {'ratio':>7}"]

    def row(name, a, b, fmt=".1f", ratio_value=None):
        rv = f"{ratio_value:>7.2f}" if ratio_value is not None else ""
        lines.append(f"{name:<22} {a:>10{fmt}} {b:>10{fmt}} {rv}")

    row("median ms/query", t["latency"]["median_ms"], c["latency"]["median_ms"], ratio_value=ratio["median_ms"])
    row("p95 ms/query", t["latency"]["p95_ms"], c["latency"]["p95_ms"], ratio_value=ratio["p95_ms"])
    row("peak RSS MiB", t["memory"]["peak_rss_mb"], c["memory"]["peak_rss_mb"], ratio_value=ratio["peak_rss"])
    row("RSS after import MiB", t["memory"]["rss_after_import_mb"], c["memory"]["rss_after_import_mb"])
    row("index share MiB", t["memory"]["index_share_mb"], c["memory"]["index_share_mb"],
        ratio_value=ratio["index_rss_share"])
    row("index load s", t["memory"]["load_seconds"], c["memory"]["load_seconds"], fmt=".2f")
    row("index MiB (arrays/disk)", t["index_bytes"] / 2**20, c["index_bytes"] / 2**20)
    row("centroids", t["n_centroids"], c["n_centroids"], fmt="d")
    row("nDCG@10", t["ndcg10"], c["ndcg10"], fmt=".4f")
    row("nDCG@10 exact MaxSim", r["exact_ndcg10"]["tessera"], r["exact_ndcg10"]["colbert"], fmt=".4f")
    row("top-10 overlap exact", t["overlap_exact"], c["overlap_exact"], fmt=".4f")
    lines.append(f"top-10 overlap Tessera vs colbert-ai: {r['overlap_tessera_colbert']:.4f}; "
                 f"params Tessera {t['params']}, colbert-ai {c['params']}; Tessera's stages "
                 f"{t.get('stages', 'numpy')}")
    goals = r["goals"]
    lines.append("goals: median ratio <= 0.5 " + ("met" if goals["latency"] else "NOT met")
                 + "; peak RSS <= colbert-ai " + ("met" if goals["peak_rss"] else "NOT met")
                 + "; overlap with exact >= 0.95 " + ("met" if goals["overlap"] else "NOT met"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
