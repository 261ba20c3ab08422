"""The codec's fit and compression in several source trees, interleaved, on the same tokens.

For a change to ``embedding/codec.py`` that must keep its outputs: each tree (a checkout, e.g.
a ``git worktree`` of the commit before) fits a codec on the same float16 token vectors (the
type the embed job's sample cache holds) and compresses every one of them, round after
round, tree after tree, each in a fresh process that imports only that tree. Printed and
written: each tree's fit and compression seconds (median and range) and one SHA-256 over the
codec's bytes and every compressed token, which must be the same for every tree.

The tokens come from ``--tokens`` (an ``.npy`` of ``(n, dim)`` float16 rows), or are encoded
first, in this process, from XQuAD sentences with ``--model`` (``--save-tokens`` keeps them).

Usage::

    git worktree add /tmp/bench-before <commit>
    python benchmarks/bench_codec_trees.py --xquad-sentences ../shared/data/xquad \\
        --model ~/.cache/tessera/models/me5-small --save-tokens /tmp/xqs_tokens.npy \\
        --trees /tmp/bench-before . --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

#: what each tree's process runs: argv = tokens, nbits, k, niter, kmeans, threads, batch
CHILD = r"""
import hashlib, json, sys, time
import numpy as np
import torch
from embedding.codec import ResidualCodec
tokens, nbits, k, niter, kmeans, threads, batch = sys.argv[1:]
torch.set_num_threads(int(threads))
x = np.load(tokens)
t = time.perf_counter()
codec = ResidualCodec.fit(x, int(nbits), int(k), seed=0, niter=int(niter), kmeans=kmeans)
fit = time.perf_counter() - t
digest = hashlib.sha256(codec.to_bytes())
t = time.perf_counter()
for s in range(0, len(x), int(batch)):
    codes, packed, abs_sum = codec.compress_with_residual_sum(x[s:s + int(batch)])
    digest.update(codes.tobytes()); digest.update(packed.tobytes()); digest.update(np.float64(abs_sum).tobytes())
compress = time.perf_counter() - t
print(json.dumps({"fit_s": fit, "compress_s": compress, "sha256": digest.hexdigest(), "k": codec.n_centroids}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help=".npy of (n, dim) float16 token vectors")
    src.add_argument("--xquad-sentences", help="XQuAD folder: encode its sentences first (needs --model)")
    p.add_argument("--model", help="model folder for --xquad-sentences")
    p.add_argument("--docs", type=int, default=None, help="first N sentences (default: all)")
    p.add_argument("--save-tokens", help="keep the encoded tokens here (.npy) for later runs")
    p.add_argument("--trees", nargs="+", required=True, help="source trees (checkouts) to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nbits", type=int, default=2)
    p.add_argument("--k", type=int, default=0, help="centroids (default: PLAID's for the token count)")
    p.add_argument("--niter", type=int, default=4)
    p.add_argument("--kmeans", default="flat-bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=131072, help="rows per compress call")
    p.add_argument("--small-pages", action="store_true",
                   help="every tree without numpy's huge pages (NUMPY_MADVISE_HUGEPAGE=0), as the embed "
                        "job's fit task runs since the twenty-fourth session")
    p.add_argument("--out", default=str(HERE / "results" / "codec_trees.json"))
    args = p.parse_args(argv)
    if args.xquad_sentences and not args.model:
        p.error("--xquad-sentences needs --model")
    for tree in args.trees:
        if not (Path(tree) / "embedding" / "codec.py").is_file():
            p.error(f"{tree}: not a Tessera source tree (no embedding/codec.py)")
    return args


def encode_sentences(xquad: str, model: str, docs: "int | None", threads: int) -> np.ndarray:
    """ColBERT token vectors of XQuAD's sentences as the embed job caches them (float16)."""
    import torch
    from prepare_data import build_xquad_sentences

    from embedding.encoder import Encoder
    from embedding.model import load_model

    torch.set_num_threads(threads)
    texts = [d["text"] for d in build_xquad_sentences(Path(xquad)).corpus][:docs]
    enc = Encoder(load_model(model, device="cpu", precision="auto"))
    out = enc.encode_documents(texts, dense=False, colbert=True)
    return np.concatenate(out.tokens).astype(np.float16)


def run_tree(tree: str, tokens: str, args: argparse.Namespace, k: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    if args.small_pages:
        env["NUMPY_MADVISE_HUGEPAGE"] = "0"
    cmd = [sys.executable, "-c", CHILD, tokens, str(args.nbits), str(k), str(args.niter), args.kmeans,
           str(args.threads), str(args.batch)]
    done = subprocess.run(cmd, env=env, cwd=str(Path(tree).resolve()), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokens
        if path is None:
            x = encode_sentences(args.xquad_sentences, args.model, args.docs, args.threads)
            path = args.save_tokens or str(Path(tmp) / "tokens.npy")
            np.save(path, x)
        n = len(np.load(path, mmap_mode="r"))
        from embedding.codec import default_n_centroids

        k = args.k or min(default_n_centroids(n), n)
        runs: dict[str, list[dict]] = {t: [] for t in args.trees}
        for r in range(args.rounds):
            for tree in args.trees:
                runs[tree].append(run_tree(tree, path, args, k))
                print(f"round {r + 1} {tree}: fit {runs[tree][-1]['fit_s']:.2f} s, "
                      f"compress {runs[tree][-1]['compress_s']:.2f} s", flush=True)
    digests = {run["sha256"] for rs in runs.values() for run in rs}
    summary = {t: {"fit_s": statistics.median(x["fit_s"] for x in rs),
                   "fit_range": [min(x["fit_s"] for x in rs), max(x["fit_s"] for x in rs)],
                   "compress_s": statistics.median(x["compress_s"] for x in rs),
                   "compress_range": [min(x["compress_s"] for x in rs), max(x["compress_s"] for x in rs)]}
               for t, rs in runs.items()}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "tokens": n, "k": k,
              "nbits": args.nbits, "niter": args.niter, "kmeans": args.kmeans, "threads": args.threads,
              "small_pages": args.small_pages, "rounds": args.rounds, "runs": runs, "summary": summary,
              "same_outputs": len(digests) == 1}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    lines = [f"codec fit + compression of {n} tokens (k={k}, {args.nbits} bits, {args.niter} iterations, "
             f"{args.kmeans}, {args.threads} threads{', small pages' if args.small_pages else ''}), "
             f"{args.rounds} rounds interleaved",
             f"{'tree':<40}{'fit s':>10}{'range':>16}{'compress s':>12}{'range':>16}"]
    for t, s in summary.items():
        lines.append(f"{t:<40}{s['fit_s']:>10.2f}{'%.2f-%.2f' % tuple(s['fit_range']):>16}"
                     f"{s['compress_s']:>12.2f}{'%.2f-%.2f' % tuple(s['compress_range']):>16}")
    lines.append("outputs: " + ("the same in every tree and round (" + digests.pop()[:16] + ")"
                                if len(digests) == 1 else f"DIFFER ({len(digests)} digests)"))
    text = "\n".join(lines)
    print(text)
    Path(args.out).with_suffix(".txt").write_text(text + "\n")
    return 0 if result["same_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
