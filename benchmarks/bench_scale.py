"""Scale benchmark on Tatoeba: how every stage grows from 10k to 100k documents.

For each corpus size N (nested corpora: the smaller one is a prefix of the larger one),
the real jobs run the way a user runs them, through the CLI in a subprocess:

1. ``tessera embed --mode both`` (Ray Data, one local Ray per run): wall seconds, the
   manifest's stage timings (codec fit, encode, commit), documents, tokens, bytes of the
   dense, token and codec files, and the peak RSS of the driver process (``VmHWM`` of
   the CLI process, polled; Ray's workers are other processes). The driver must hold
   only ids, so its peak should not grow like the vectors;
2. ``tessera index --kind plaid`` and a dense kind (``--dense-kind``, default ivfpq):
   wall seconds, build timings and index bytes from the index manifests;
3. search: ~200 English Tatoeba sentences are encoded once with the set's query encoder
   (``Searcher``) and saved as ``.npy``; a fresh subprocess (this script with
   ``--serve``) loads only the PLAID index and answers them one at a time
   (``CentroidIndex.search(Q, 10)``): median/p95 ms per query, RSS after imports,
   after loading the index and its peak. Hit@10 of each query's translation (its
   gold document, present at every size) is kept as a sanity check. End-to-end
   ``Searcher.search`` latency for text queries (encoder included) is measured in this
   process for PLAID and the dense index.

Every timed step holds ``/tmp/bench.lock`` (``flock``; the machine is shared): the
embed of one size, then the index builds and searches of that size. Results are
written after each size, so a partial run keeps what it finished. Growth factors from
the smallest to the largest size are printed next to the document-count factor; a
figure that grows more than ``--superlinear`` times faster than the documents is
flagged.

Usage::

    python benchmarks/bench_scale.py --tatoeba ../shared/data/tatoeba \
        --model ~/.cache/tessera/models/me5-small --work /tmp/bench-scale \
        --sizes 10000 30000 100000

``--serving-only WORK...`` re-measures step 3 alone on indexes an earlier run left (each
WORK folder's ``root`` and ``queries_s<N>.npy``, for every size found there), ``--rounds``
times with the sizes interleaved (reversed every other round), e.g. on a quieter machine::

    python benchmarks/bench_scale.py --work /tmp/bscale --serving-only /tmp/bscale /tmp/bscale100 \
        --out benchmarks/results/scale_tatoeba_serving_quiet
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_scale")
K = 10
LOCK = "/tmp/bench.lock"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tatoeba", default=str(ROOT.parent / "shared" / "data" / "tatoeba"))
    p.add_argument("--model", default=str(Path.home() / ".cache" / "tessera" / "models" / "me5-small"))
    p.add_argument("--work", required=True, help="scratch folder (corpora, store, query matrices)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000],
                   help="corpus sizes, run in this order (the table sorts them)")
    p.add_argument("--files", type=int, default=8, help="corpus files per size (Ray shards them)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--text-queries", type=int, default=50, help="end-to-end Searcher.search queries")
    p.add_argument("--dense-kind", default="ivfpq")
    p.add_argument("--threads", type=int, default=1, help="threads of the serving subprocess")
    p.add_argument("--superlinear", type=float, default=1.5,
                   help="flag a figure whose growth exceeds this many times the document growth")
    p.add_argument("--lock", default=LOCK)
    p.add_argument("--finish-by", help="UTC HH:MM: skip a size that, extrapolated linearly from the "
                   "largest size done, would not finish by then (checked once the lock is held)")
    p.add_argument("--out", default="benchmarks/results/scale_tatoeba")
    p.add_argument("--serving-only", nargs="+", metavar="WORK",
                   help="only re-measure serving of the PLAID indexes these earlier --work folders hold")
    p.add_argument("--rounds", type=int, default=2, help="--serving-only: passes over the sizes")
    p.add_argument("--merge", action="store_true",
                   help="start from the sizes already in --out's JSON (a later run adds a size to the table)")
    p.add_argument("--serve", help=argparse.SUPPRESS)  # internal: index name to serve
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--serve-queries", help=argparse.SUPPRESS)
    p.add_argument("--serve-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the corpus ----------------------------------------------------------------------
def read_pairs(tatoeba: Path) -> dict[str, tuple[list[str], list[str]]]:
    """``{lang: (sentences, english translations)}`` of every ``tatoeba.<lang>-eng.*`` pair."""
    pairs = {}
    for src in sorted(tatoeba.glob("tatoeba.*-eng.*")):
        lang = src.name.split(".")[1].split("-")[0]
        if src.suffix[1:] != lang:
            continue
        eng = src.with_suffix(".eng")
        a = src.read_text(encoding="utf-8").splitlines()
        b = eng.read_text(encoding="utf-8").splitlines()
        if len(a) != len(b):
            raise ValueError(f"{src} has {len(a)} lines, {eng} {len(b)}")
        pairs[lang] = (a, b)
    if not pairs:
        raise ValueError(f"no tatoeba.<lang>-eng.<lang> files in {tatoeba}")
    return pairs


def _round_robin(pairs: dict, side: int) -> list[tuple[str, int, str]]:
    """``(lang, line, text)`` taking line 0 of every language, then line 1, ..."""
    langs = sorted(pairs)
    longest = max(len(pairs[lang][side]) for lang in langs)
    return [(lang, i, pairs[lang][side][i]) for i in range(longest) for lang in langs
            if i < len(pairs[lang][side])]


def document_order(pairs: dict) -> list[dict]:
    """Every distinct sentence once, as corpus rows in the order corpora take them.

    Non-English sides first (round robin over languages, so every prefix spans all of
    them), then the English sides; a text seen before (stripped) is skipped; empty lines
    too. Corpus N is the first N rows: corpora are nested by construction.
    Ids: ``tat-<lang>-<line>``, English ``tat-eng-<pair lang>-<line>``.
    """
    seen: set[str] = set()
    rows = []
    for side in (0, 1):
        for lang, line, text in _round_robin(pairs, side):
            text = text.strip()
            if not text or text in seen:
                continue
            seen.add(text)
            doc_id = f"tat-{lang}-{line}" if side == 0 else f"tat-eng-{lang}-{line}"
            rows.append({"id": doc_id, "text": text, "lang": lang if side == 0 else "eng"})
    return rows


def corpus(order: list[dict], n: int) -> list[dict]:
    if n > len(order):
        raise ValueError(f"Tatoeba has {len(order)} distinct sentences, fewer than {n}")
    return order[:n]


def write_corpus(rows: list[dict], folder: Path, n_files: int) -> list[str]:
    """JSONL files ``part-XXXXX.jsonl`` of consecutive row ranges; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), min(n_files, len(rows)) + 1).astype(int)
    paths = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = folder / f"part-{i:05d}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[lo:hi]),
                        encoding="utf-8")
        paths.append(str(path))
    return paths


def pick_queries(pairs: dict, docs: list[dict], n: int) -> tuple[list[str], list[str]]:
    """English translations of ``n`` non-English documents spread over ``docs``, and those
    documents' ids (each query's gold)."""
    cand = [d for d in docs if d["lang"] != "eng"]
    picked = [cand[int(i)] for i in np.linspace(0, len(cand) - 1, min(n, len(cand))).astype(int)]
    texts = []
    for d in picked:
        _, lang, line = d["id"].split("-")
        texts.append(pairs[lang][1][int(line)].strip())
    return texts, [d["id"] for d in picked]


# ---- measuring processes --------------------------------------------------------------
@contextlib.contextmanager
def bench_lock(path: str):
    """``flock(1)``-compatible exclusive lock: timed runs of different people don't overlap."""
    with open(path, "a") as fh:
        t0 = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        if waited > 1:
            logger.info("waited %.0f s for %s", waited, path)
        try:
            yield {"lock_wait_s": waited, "loadavg_at_start": os.getloadavg()[0]}
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _status_mb(pid: "int | str", key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_cli(args: list[str]) -> tuple[dict, float, float]:
    """Run ``tessera <args> --json``; return its JSON, wall seconds and the driver's peak RSS
    (MiB, ``VmHWM`` polled until the process exits: a high-water mark, so the last read is
    the peak up to a few ms before exit)."""
    cmd = [str(Path(sys.executable).with_name("tessera")), *args, "--json"]
    logger.info("%s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    peak = [0.0]

    def poll() -> None:
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                peak[0] = max(peak[0], _status_mb(proc.pid, "VmHWM"))
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    t.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    logger.info("tessera %s: %.1f s, driver peak RSS %.0f MiB", args[0], wall, peak[0])
    return json.loads(out), wall, peak[0]


def file_bytes(manifest: dict) -> dict[str, int]:
    """Bytes per file kind (``dense``, ``tokens``, ``docs``, ``codec``, ...) of a manifest."""
    out: dict[str, int] = {}
    for e in manifest["files"]:
        kind = e.get("kind") or Path(e["path"]).parts[0]
        out[kind] = out.get(kind, 0) + int(e["bytes"])
    return out


# ---- the serving subprocess -----------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """Load only the PLAID index; answer every query one at a time; write figures as JSON."""
    from indexing.index_files import open_centroid_index, read_doc_ids
    from indexing.plaid import SearchParams
    from storage import layout
    from storage.manifest import Artifact

    Q = np.load(args.serve_queries)
    after_import = _status_mb("self", "VmRSS")
    t0 = time.perf_counter()
    # What a process serving pre-encoded queries does: the index memory-mapped, no torch.
    index, manifest = open_centroid_index(args.root, args.serve)
    ids = read_doc_ids(Artifact(layout.resolve_root(args.root), "indexes", args.serve).version_dir(manifest["version"]),
                   manifest)
    load_s = time.perf_counter() - t0
    after_load = _status_mb("self", "VmRSS")
    params = SearchParams()
    index.search(Q[:1], K, params, threads=args.threads)  # warm-up
    times, tops = [], []
    for q in Q:
        t = time.perf_counter()
        _, pos = index.search(q[None], K, params, threads=args.threads)
        times.append(time.perf_counter() - t)
        tops.append([ids[int(p)] for p in pos[0] if p >= 0])
    ms = np.array(times) * 1000
    out = {"queries": int(len(Q)), "load_seconds": load_s, "median_ms": float(np.median(ms)),
           "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
           "rss_after_import_mb": after_import, "rss_after_load_mb": after_load,
           "rss_after_queries_mb": _status_mb("self", "VmRSS"), "peak_rss_mb": _status_mb("self", "VmHWM"),
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "top10": tops}
    Path(args.serve_out).write_text(json.dumps(out))
    return 0


def measure_serving(root: Path, index: str, queries: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ)
    env.update({v: str(threads) for v in THREAD_VARS})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(out.parent), "--root", str(root),
           "--serve", index, "--serve-queries", str(queries), "--serve-out", str(out),
           "--threads", str(threads)]
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
    return json.loads(out.read_text())


def serving_only(args: argparse.Namespace) -> int:
    """Step 3 alone, on the PLAID indexes and query matrices of earlier runs' --work folders."""
    sizes = []
    for work in map(Path, args.serving_only):
        for q in sorted(work.glob("queries_s*.npy")):
            n = int(q.stem[len("queries_s"):])
            if (work / "root" / "indexes" / f"s{n}-plaid").is_dir():
                sizes.append((n, work, q))
    if not sizes:
        raise SystemExit(f"no s<N>-plaid index with its queries_s<N>.npy under {args.serving_only}")
    sizes.sort()
    runs: dict[str, list] = {}
    for r in range(args.rounds):
        for n, work, q in sizes if r % 2 == 0 else sizes[::-1]:
            with bench_lock(args.lock):
                d = measure_serving(work / "root", f"s{n}-plaid", q, Path(args.work) / f"serve_only_s{n}.json",
                                    args.threads)
            d.pop("top10")
            runs.setdefault(str(n), []).append(d)
            logger.info("s%d round %d: median %.1f ms, p95 %.1f ms, peak RSS %.0f MB", n, r + 1, d["median_ms"],
                        d["p95_ms"], d["peak_rss_mb"])
    lines = ["docs      median ms   p95 ms  peak RSS MB  load s   (median over rounds)"]
    for n in sorted(runs, key=int):
        med = {k: float(np.median([d[k] for d in runs[n]])) for k in ("median_ms", "p95_ms", "peak_rss_mb",
                                                                      "load_seconds")}
        lines.append(f"{int(n):>7,}  {med['median_ms']:10.1f} {med['p95_ms']:8.1f} {med['peak_rss_mb']:12.0f} "
                     f"{med['load_seconds']:7.2f}")
    text = "\n".join(lines)
    print(text)
    Path(args.out + ".json").write_text(json.dumps({"host": platform.node(), "load": os.getloadavg(),
                                                     "threads": args.threads, "runs": runs}, indent=1))
    Path(args.out + ".txt").write_text(text + "\n")
    return 0


def text_latency(root: Path, index: str, texts: list[str]) -> dict:
    """Median/p95 ms of ``Searcher.search([text])`` (query encoding included)."""
    from indexing.searcher import Searcher

    s = Searcher.open(str(root), index)
    s.search(texts[:1], k=K)
    ms = []
    for t in texts:
        t0 = time.perf_counter()
        s.search([t], k=K)
        ms.append((time.perf_counter() - t0) * 1000)
    return {"queries": len(texts), "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95))}


def encode_queries(root: Path, index: str, texts: list[str]) -> np.ndarray:
    """``(nq, Lq, dim)`` float32 query matrices from the set's own query encoder."""
    from indexing.searcher import Searcher

    s = Searcher.open(str(root), index)
    return s.encode_queries(texts)


# ---- one size -------------------------------------------------------------------------
class Skipped(Exception):
    pass


def estimate_seconds(results: dict, n: int) -> float:
    """Seconds for size ``n`` extrapolated linearly per document from the largest size done."""
    if not results:
        return 0.0
    m = max(results, key=int)
    r = results[m]
    done = r["embed"]["wall_s"] + r["plaid"]["wall_s"] + r["dense"]["wall_s"] + 60
    return done * n / int(m)


def seconds_left(finish_by: "str | None") -> float:
    if not finish_by:
        return float("inf")
    now = time.gmtime()
    hh, mm = (int(x) for x in finish_by.split(":"))
    return (hh * 3600 + mm * 60) - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)


def run_size(args: argparse.Namespace, n: int, rows: list[dict], queries: list[str], gold: list[str],
             results: dict) -> dict:
    work = Path(args.work)
    root = work / "root"
    name = f"s{n}"
    paths = write_corpus(rows, work / "corpora" / name, args.files)
    with bench_lock(args.lock) as lock_embed:
        need, left = estimate_seconds(results, n), seconds_left(args.finish_by)
        if need > left:
            raise Skipped(f"estimated {need:.0f} s (linear from the largest size done), {left:.0f} s left "
                          f"before --finish-by {args.finish_by}")
        emb, emb_wall, emb_rss = run_cli(["embed", "--corpus", *paths, "--set", name, "--root", str(root),
                                          "--model", args.model, "--mode", "both", "--force"])  # timed even if done
    out = {"documents": emb["counts"]["documents"], "tokens": emb["counts"]["tokens"],
           "embed": {"wall_s": emb_wall, "driver_peak_rss_mb": emb_rss, "timings": emb["timings"],
                     "bytes": file_bytes(emb), "workers": emb.get("workers"),
                     "codec_centroids": (emb.get("codec") or {}).get("n_centroids"),
                     "loadavg_after": os.getloadavg()[0], **lock_embed}}
    with bench_lock(args.lock) as lock_index:
        out["index_lock"] = lock_index
        for kind in ("plaid", args.dense_kind):
            man, wall, rss = run_cli(["index", "--set", name, "--kind", kind, "--root", str(root)])
            out["dense" if kind != "plaid" else kind] = {
                "kind": kind, "name": f"{name}-{kind}", "wall_s": wall, "driver_peak_rss_mb": rss,
                "timings": man["timings"], "index_bytes": int(man["index_bytes"]),
                "bytes_per_document": float(man["bytes_per_document"]), "params": man.get("params")}
        plaid_name = f"{name}-plaid"
        dense_name = f"{name}-{args.dense_kind}"
        qpath = work / f"queries_{name}.npy"
        np.save(qpath, encode_queries(root, plaid_name, queries))
        srv = measure_serving(root, plaid_name, qpath, work / f"serve_{name}.json", args.threads)
        tops = srv.pop("top10")
        srv["hit_at_10"] = float(np.mean([g in t for g, t in zip(gold, tops)]))
        out["plaid"]["serve"] = srv
        for kind, idx in (("plaid", plaid_name), ("dense", dense_name)):
            out[kind]["text_search"] = text_latency(root, idx, queries[:args.text_queries])
    return out


# ---- the table ------------------------------------------------------------------------
COLUMNS = [  # (header, width, format, getter)
    ("docs", 8, "d", lambda r: r["documents"]),
    ("tokens", 9, "d", lambda r: r["tokens"]),
    ("embed s", 8, ".1f", lambda r: r["embed"]["wall_s"]),
    ("docs/s", 7, ".1f", lambda r: r["documents"] / r["embed"]["wall_s"]),
    ("fit s", 7, ".1f", lambda r: r["embed"]["timings"].get("fit_codec", float("nan"))),
    ("kmeans s", 8, ".1f", lambda r: r["embed"]["timings"].get("kmeans", float("nan"))),
    ("encode s", 8, ".1f", lambda r: r["embed"]["timings"].get("encode", float("nan"))),
    ("plaid s", 8, ".1f", lambda r: r["plaid"]["wall_s"]),
    ("plaid bld", 9, ".1f", lambda r: r["plaid"]["timings"].get("build", float("nan"))),
    ("plaid MB", 8, ".1f", lambda r: r["plaid"]["index_bytes"] / 2**20),
    ("B/doc", 7, ".0f", lambda r: r["plaid"]["bytes_per_document"]),
    ("dense s", 8, ".1f", lambda r: r["dense"]["wall_s"]),
    ("dense MB", 8, ".2f", lambda r: r["dense"]["index_bytes"] / 2**20),
    ("tok MB", 7, ".1f", lambda r: r["embed"]["bytes"].get("tokens", 0) / 2**20),
    ("q med ms", 8, ".2f", lambda r: r["plaid"]["serve"]["median_ms"]),
    ("q p95 ms", 8, ".2f", lambda r: r["plaid"]["serve"]["p95_ms"]),
    ("hit@10", 6, ".2f", lambda r: r["plaid"]["serve"]["hit_at_10"]),
    ("srv idx MB", 10, ".0f",
     lambda r: r["plaid"]["serve"]["peak_rss_mb"] - r["plaid"]["serve"]["rss_after_import_mb"]),
    ("srv RSS MB", 10, ".0f", lambda r: r["plaid"]["serve"]["peak_rss_mb"]),
    ("drv RSS MB", 10, ".0f", lambda r: r["embed"]["driver_peak_rss_mb"]),
]
# figures expected to stay flat or grow at most linearly; a per-query latency may grow sub-linearly
GROWTH = ["tokens", "embed s", "fit s", "kmeans s", "encode s", "plaid s", "plaid bld", "plaid MB", "dense s",
          "dense MB", "tok MB", "q med ms", "q p95 ms", "srv idx MB", "drv RSS MB"]


def _row(r: dict) -> dict:
    return {h: g(r) for h, _, _, g in COLUMNS}


def table(results: dict, args: argparse.Namespace) -> str:
    sizes = sorted(results, key=int)
    rows = {n: _row(results[n]) for n in sizes}
    lines = [f"scale benchmark: Tatoeba, me5-small, embed --mode both (nbits default), plaid + {args.dense_kind}, "
             f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
             " ".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS)]
    for n in sizes:
        lines.append(" ".join(f"{rows[n][h]:>{w}{f}}" for h, w, f, _ in COLUMNS))
    if len(sizes) > 1:
        a, b = rows[sizes[0]], rows[sizes[-1]]
        doc_f = b["docs"] / a["docs"]
        lines.append(f"growth {sizes[0]} -> {sizes[-1]} (documents x{doc_f:.2f}; flagged: more than "
                     f"x{args.superlinear} the document growth):")
        for h in GROWTH:
            f = b[h] / a[h] if a[h] else float("nan")
            flag = "  <-- super-linear" if f > args.superlinear * doc_f else ""
            lines.append(f"  {h:<12} x{f:7.2f}  (per doc x{f / doc_f:5.2f}){flag}")
    lines.append("srv idx MB: peak RSS of the serving subprocess minus its RSS after imports "
                 "(index arrays are memory-mapped: pages touched by the queries)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.serve:
        return serve(args)
    if args.serving_only:
        return serving_only(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pairs = read_pairs(Path(args.tatoeba))
    order = document_order(pairs)
    sizes = args.sizes  # run in the given order (e.g. 10000 100000 30000 when time is short)
    logger.info("%d distinct sentences in %d languages; sizes %s", len(order), len(pairs), sizes)
    out_json, out_txt = Path(args.out + ".json"), Path(args.out + ".txt")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    if args.merge and out_json.exists():
        results = {k: v for k, v in json.loads(out_json.read_text())["sizes"].items() if int(k) not in sizes}
        logger.info("kept sizes %s from %s", sorted(results, key=int), out_json)
    # the same queries at every size: picked from the smallest corpus, merged sizes included
    queries, gold = pick_queries(pairs, corpus(order, min([*sizes, *map(int, results)])), args.queries)
    work = Path(args.work)
    shutil.rmtree(work / "root", ignore_errors=True)
    for n in sizes:
        t0 = time.perf_counter()
        try:
            results[str(n)] = run_size(args, n, corpus(order, n), queries, gold, results)
        except Skipped as err:
            logger.warning("size %d skipped: %s", n, err)
            skipped[str(n)] = str(err)
            continue
        logger.info("size %d done in %.0f s", n, time.perf_counter() - t0)
        out_json.write_text(json.dumps({"sizes": results, "skipped": skipped, "machine": {"cpus": os.cpu_count(),
                                        "platform": platform.platform()},
                                        "args": {k: v for k, v in vars(args).items()
                                                 if not k.startswith("serve") and k != "root"}},
                                       indent=1))
        text = table(results, args) + "".join(f"\nskipped {k}: {v}" for k, v in skipped.items())
        out_txt.write_text(text + "\n")
        print(text, flush=True)
    print(f"written to {out_json} and {out_txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
