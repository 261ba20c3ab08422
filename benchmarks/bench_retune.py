"""Re-tuning experiment on XQuAD: English-only query tuning, multilingual effect, stored set untouched.

After Vasilyev et al. ("Preserving Multilingual Quality While Tuning Query Encoder on
English Only"): the paragraphs of all 12 XQuAD languages are embedded once (a set and a
flat index built by the CLI); the articles are split into train / test (``prepare_data.py
--article-split``); the query encoder is tuned on the English questions of the train
articles only, against the stored English paragraphs, with hard negatives mined among
English paragraphs (the other languages' paragraphs are translations of the positive:
pushing them away would be teaching the model to unlearn alignment); then every tuned
version is evaluated on the test articles' questions in all 12 languages:

* same-language: a question retrieves among the paragraphs of its own language;
* X→English: a question in any language retrieves among the English paragraphs;

per-language nDCG@10 deltas (points, 100 × nDCG) against the untuned encoder. Each
configuration is one ``jobs.retune`` run (``force``, not published: the gate's verdict
on the test questions is reported, not used to select), evaluated through ``Searcher``
with the registered version, exactly as ``tessera search --query-encoder`` would.
The sha256 of every file of the set and its indexes is taken before the first run and
after the last and reported (each run also checks its own).

Default sweep: lr 2e-8, 6e-8, 1.3e-7 (with and without freezing ``*output.dense.weight``),
1e-6, 1e-5. Note ``*output.dense.weight`` matches both the FFN output projections
(``encoder.layer.N.output.dense.weight``) and the attention output projections
(``encoder.layer.N.attention.output.dense.weight``); ``--freeze-pattern`` changes it.

Usage::

    python benchmarks/prepare_data.py --xquad ../shared/data/xquad --out bench-data --article-split 0.25
    tessera embed --corpus bench-data/corpus.jsonl --model me5-small --set xquad --mode dense
    tessera index --set xquad --kind flat
    python benchmarks/bench_retune.py --root tessera-data --set xquad --index xquad-flat --data bench-data
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexing.metrics import evaluate  # noqa: E402
from indexing.searcher import Searcher  # noqa: E402
from storage import catalog  # noqa: E402
from storage.fs import location  # noqa: E402
from storage.manifest import Artifact  # noqa: E402
from storage.queries import Query, load_qrels, load_queries  # noqa: E402

logger = logging.getLogger("bench_retune")
K = 10
SETTINGS = (("same", "same-language"), ("x2en", "X -> English"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--set", default="xquad")
    p.add_argument("--index", default=None, help="a dense index of the set (default SET-flat)")
    p.add_argument("--data", required=True, help="output folder of prepare_data.py (with split.json)")
    p.add_argument("--lrs", default="2e-8,6e-8,1.3e-7,1e-6,1e-5")
    p.add_argument("--freeze-lrs", default="1.3e-7", help="learning rates also run with --freeze-pattern frozen")
    p.add_argument("--freeze-pattern", default="*output.dense.weight",
                   help="glob(s) over parameter names, several joined with '+'")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--negatives", type=int, default=7)
    p.add_argument("--negatives-lang", default="en", help="mine hard negatives among these paragraphs only")
    p.add_argument("--max-train", type=int, default=None, help="cap on training questions (default: all)")
    p.add_argument("--max-test-per-lang", type=int, default=None, help="cap on test questions per language")
    p.add_argument("--name", default=None, help="encoder name for the runs (default SET-query-bench)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="bench-out/retune-work", help="folder for the generated train/dev files")
    p.add_argument("--out", default="bench-out/retune.json")
    return p.parse_args(argv)


# ---- data -------------------------------------------------------------------------------
def split_queries(data: Path, doc_ids: set[str], max_train, max_test_per_lang):
    """(train questions: English, train articles; test questions: all languages, test articles).

    Only questions whose same-language and English paragraphs are in the set are kept
    (the set may be a subset of XQuAD).
    """
    split = json.loads((data / "split.json").read_text())
    article = {json.loads(line)["id"]: json.loads(line)["article"]
               for line in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()}
    queries = load_queries(data / "queries.jsonl")
    qrels = {s: load_qrels(data / f"qrels_{s}.tsv") for s, _ in SETTINGS}
    usable = [q for q in queries if all(set(qrels[s].get(q.id, {})) <= doc_ids and qrels[s].get(q.id)
                                        for s, _ in SETTINGS)]
    train = [q for q in usable if q.lang == "en" and article[q.id] in set(split["train"])][:max_train]
    test: list[Query] = []
    for lang in sorted({q.lang for q in usable}):
        group = [q for q in usable if q.lang == lang and article[q.id] in set(split["test"])]
        test += group[:max_test_per_lang]
    if not train or not test:
        raise SystemExit(f"no usable train ({len(train)}) or test ({len(test)}) questions: does the set hold "
                         "the paragraphs of prepare_data.py's corpus.jsonl, and does split.json exist?")
    return train, test, {s: {q.id: qrels[s][q.id] for q in test} for s, _ in SETTINGS}, qrels["same"]


def write_inputs(work: Path, train: list[Query], test: list[Query], qrels_same: dict, test_qrels: dict) -> dict:
    """The job's inputs: training pairs (question → its English paragraph) and the gate's dev files."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.jsonl").write_text("".join(
        json.dumps({"id": q.id, "text": q.text, "lang": q.lang, "positives": sorted(qrels_same[q.id])},
                   ensure_ascii=False) + "\n" for q in train), encoding="utf-8")
    (work / "dev_queries.jsonl").write_text("".join(
        json.dumps({"id": q.id, "text": q.text, "lang": q.lang}, ensure_ascii=False) + "\n" for q in test),
        encoding="utf-8")
    (work / "dev_qrels.tsv").write_text("".join(f"{qid}\t0\t{d}\t{g}\n" for qid, docs in test_qrels["same"].items()
                                                for d, g in docs.items()))
    return {"train": str(work / "train.jsonl"), "dev_queries": str(work / "dev_queries.jsonl"),
            "dev_qrels": str(work / "dev_qrels.tsv")}


# ---- evaluation ----------------------------------------------------------------------------
def evaluate_searcher(searcher: Searcher, test: list[Query], test_qrels: dict) -> dict:
    """``{setting: {"overall": nDCG@10, lang: nDCG@10, ...}}`` with language-restricted retrieval."""
    out = {}
    qlang = {q.id: q.lang for q in test}
    for setting, _ in SETTINGS:
        run: dict = {}
        for lang in sorted(set(qlang.values())):
            group = [q for q in test if q.lang == lang]
            target = lang if setting == "same" else "en"
            for start in range(0, len(group), 64):
                batch = group[start:start + 64]
                for q, hits in zip(batch, searcher.search([q.text for q in batch], K, lang=target)):
                    run[q.id] = hits
        r = evaluate(run, test_qrels[setting], qlang)
        out[setting] = {"overall": r.overall["nDCG@10"], **{lg: v["nDCG@10"] for lg, v in r.per_language.items()}}
    return out


def deltas(after: dict, before: dict) -> dict:
    return {s: {k: 100.0 * (after[s][k] - before[s][k]) for k in before[s]} for s in before}


# ---- main ------------------------------------------------------------------------------------
def configs(args) -> list[tuple[float, tuple[str, ...]]]:
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    frozen = {float(x) for x in args.freeze_lrs.split(",") if x.strip()}
    out = []
    for lr in lrs:
        out.append((lr, ()))
        if lr in frozen:
            out.append((lr, tuple(args.freeze_pattern.split("+"))))
    return out


def set_documents(root: str, name: str) -> tuple[dict, set[str]]:
    m = Artifact(location(root), "sets", name).manifest()
    con = catalog.connect(root)
    ids = {r[0] for r in con.execute("select id from documents where set_name = ? and version = ?",
                                     [name, m["version"]]).fetchall()}
    return m, ids


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from jobs import retune

    index = args.index or f"{args.set}-flat"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    set_manifest, doc_ids = set_documents(args.root, args.set)
    train, test, test_qrels, qrels_same = split_queries(Path(args.data), doc_ids, args.max_train,
                                                        args.max_test_per_lang)
    files = write_inputs(Path(args.work), train, test, qrels_same, test_qrels)
    logger.info("%d English training questions, %d test questions in %d languages", len(train), len(test),
                len({q.lang for q in test}))
    urls = retune.set_file_urls(location(args.root), args.set, set_manifest["version"])
    sums_before = retune.checksums(urls)
    baseline = evaluate_searcher(Searcher.open(args.root, index, device=device), test, test_qrels)
    runs = []
    for lr, freeze in configs(args):
        cfg = retune.RetuneConfig(set_name=args.set, index=index, root=args.root, name=args.name or
                                  f"{args.set}-query-bench", lr=lr, freeze=freeze, epochs=args.epochs,
                                  steps=args.steps, batch_size=args.batch_size, negatives=args.negatives,
                                  negatives_lang=args.negatives_lang, force=True, publish=False,
                                  threads=args.threads, **files)
        t0 = time.perf_counter()
        m = retune.run(cfg)
        seconds = time.perf_counter() - t0
        searcher = Searcher.open(args.root, index, query_encoder=f"{m['name']}@{m['version']}", device=device)
        scores = evaluate_searcher(searcher, test, test_qrels)
        runs.append({"lr": lr, "freeze": list(freeze), "version": m["version"], "seconds": seconds,
                     "ndcg10": scores, "delta_points": deltas(scores, baseline),
                     "gate_passed": m["evaluation"]["gate"]["passed"],
                     "gate_reasons": m["evaluation"]["gate"]["reasons"],
                     "loss_before": m["training"]["stats"]["loss_before"],
                     "loss_after": m["training"]["stats"]["loss_after"], "steps": m["training"]["stats"]["steps"],
                     "tensors_changed": m["training"]["parameter_changes"]["tensors_changed"],
                     "frozen_tensors": len(m["training"]["stats"]["frozen"]), "negatives": m["negatives"],
                     "immutability_unchanged": m["immutability"]["unchanged"], "device": m["training"]["device"]})
        logger.info("lr %.3g freeze %s: same-language %+.2f, X->EN %+.2f points", lr, list(freeze) or "none",
                    runs[-1]["delta_points"]["same"]["overall"], runs[-1]["delta_points"]["x2en"]["overall"])
    sums_after = retune.checksums(urls)
    summary = summarise(args, set_manifest, train, test, baseline, runs, sums_before, sums_after)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print_tables(summary)
    print(f"written to {args.out}")
    return 0 if summary["checksums"]["unchanged"] else 1


def summarise(args, set_manifest, train, test, baseline, runs, before, after) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu},
            "set": {"name": args.set, "version": set_manifest["version"],
                    "model": set_manifest["model"]["path"], "fingerprint": set_manifest["model"]["fingerprint"]},
            "train_questions": len(train), "test_questions": len(test),
            "test_languages": sorted({q.lang for q in test}), "baseline": baseline, "runs": runs,
            "checksums": {"files": len(before), "unchanged": before == after, "before": before, "after": after}}


def print_tables(summary: dict) -> None:
    runs, base = summary["runs"], summary["baseline"]
    labels = [f"{r['lr']:.2g}{'+frz' if r['freeze'] else ''}" for r in runs]
    for setting, title in SETTINGS:
        langs = sorted(k for k in base[setting] if k != "overall") + ["overall"]
        print(f"\nnDCG@10 {title}: untuned, then delta in points per run "
              f"({summary['test_questions']} test questions, {summary['train_questions']} English training questions)")
        print(f"{'lang':<8}{'untuned':>9}" + "".join(f"{lb:>12}" for lb in labels))
        for lg in langs:
            print(f"{lg:<8}{base[setting][lg]:>9.4f}" + "".join(f"{r['delta_points'][setting][lg]:>+12.2f}"
                                                                  for r in runs))
    print("\nrun           loss before -> after   steps  tensors changed  gate (on the test questions)  seconds")
    for lb, r in zip(labels, runs):
        print(f"{lb:<12}  {r['loss_before']:>8.4f} -> {r['loss_after']:<8.4f}  {r['steps']:>5}  "
              f"{r['tensors_changed']:>15}  {'pass' if r['gate_passed'] else 'refuse':<28}  {r['seconds']:>7.1f}")
    c = summary["checksums"]
    print(f"\nstored set and indexes: {c['files']} files, sha256 before == after: {c['unchanged']}")


if __name__ == "__main__":
    sys.exit(main())
