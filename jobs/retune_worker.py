"""The retune job's Ray task: mine, read the stored vectors, evaluate, train and gate every run, write the chosen one.

:func:`tune` runs once, in one task (a GPU when the cluster has one), on the
:class:`Plan` the driver (:mod:`jobs.retune`) checked:

1. hard negatives of every training query, mined on the index with the base
   encoder (:func:`mine`, :func:`select_negatives`);
2. the set's stored vectors, read shard by shard and kept compact (:class:`StoredVectors`);
3. the base evaluated on the dev queries by exact search (inner product at the
   training dimension, or MaxSim over every decompressed token matrix: the
   encoder is measured, not the index's approximations);
4. per run of the sweep: train from the base (:mod:`embedding.tuning`), evaluate,
   gate (:mod:`jobs.retune_gate`);
5. the chosen run written as a Hugging Face folder into the claimed encoder version.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.retune_gate import choose_run, gate, run_row
from jobs.timing import Progress, Timings
from storage import sets
from storage.fs import Location, location
from storage.manifest import file_entry
from storage.vectors import dense_file, token_file

if TYPE_CHECKING:
    from jobs.retune import RetuneConfig

logger = logging.getLogger(__name__)

#: Results per dev query (R@100 needs 100).
EVAL_K = 100


# ---- pure planners: hard negatives ----------------------------------------------------------
def select_negatives(ranked: list[str], positives: "set[str]", n: int, skip_top: int) -> tuple[list[str], dict]:
    """Hard negatives from one ranked list: ranks after ``skip_top`` that are not positives.

    Returns
    -------
    (negatives, info): at most ``n`` ids, best first; info = ``{"best_positive_rank"
    (1-based, None if absent), "skipped_non_positive"}``.
    """
    ranks = [r for r, d in enumerate(ranked, 1) if d in positives]
    negatives = [d for r, d in enumerate(ranked, 1) if r > skip_top and d not in positives][:n]
    skipped = sum(1 for d in ranked[:skip_top] if d not in positives)
    return negatives, {"best_positive_rank": ranks[0] if ranks else None, "skipped_non_positive": skipped}


def negatives_stats(mined: list[list[str]], infos: list[dict], cfg: "RetuneConfig") -> dict:
    """What mining found, for the manifest."""
    counts = np.array([len(m) for m in mined])
    ranks = [i["best_positive_rank"] for i in infos if i["best_positive_rank"] is not None]
    return {"queries": len(mined), "per_query": cfg.negatives, "mine_k": cfg.mine_k, "skip_top": cfg.skip_top,
            "filters": {"lang": cfg.negatives_lang, "where": cfg.negatives_where},
            "mined_mean": float(counts.mean()), "mined_min": int(counts.min()), "mined_total": int(counts.sum()),
            "queries_short": int((counts < cfg.negatives).sum()),
            "unique_documents": len({d for m in mined for d in m}),
            "positive_in_top_k_share": len(ranks) / len(mined),
            "positive_at_rank_1_share": sum(r == 1 for r in ranks) / len(mined),
            "positive_in_skipped_ranks_share": sum(r <= cfg.skip_top for r in ranks) / len(mined),
            "mean_best_positive_rank": float(np.mean(ranks)) if ranks else None,
            "skipped_non_positive": int(sum(i["skipped_non_positive"] for i in infos)),
            "in_batch": cfg.in_batch}


# ---- the stored vectors --------------------------------------------------------------------
@dataclass
class StoredVectors:
    """A set's vectors of one kind, read shard by shard and kept compact.

    Attributes
    ----------
    ids : (n,) document ids in positional order.
    dense : (n, D) float16 as stored (kind "dense").
    codec, codes (T,), residuals (T, bytes), lengths (n,) : compressed tokens (kind "colbert").
    """

    kind: str
    ids: pa.StringArray
    dense: "np.ndarray | None" = None
    codec: object = None
    codes: "np.ndarray | None" = None
    residuals: "np.ndarray | None" = None
    lengths: "np.ndarray | None" = None
    _index: object = field(default=None, repr=False)

    @classmethod
    def read(cls, set_dir: Location, manifest: dict, kind: str) -> "StoredVectors":
        """The set's live vectors of ``kind`` (``dense`` or ``colbert``), shard by shard (:mod:`storage.vectors`)."""
        want = "dense" if kind == "dense" else "tokens"
        files = sets.set_files(set_dir, manifest, want)
        progress = Progress(f"read {want}", sum(f.live_rows for f in files))
        if kind == "dense":
            ids, mats = [], []
            for f in files:
                file_ids, mat = dense_file(f)
                ids.append(file_ids)
                mats.append(mat)
                progress.update(len(file_ids))
            return cls(kind, _concat_ids(ids), dense=np.concatenate(mats))
        from indexing.index_files import read_codec

        codec = read_codec(set_dir, manifest)
        parts = []
        for f in files:
            parts.append(token_file(f, codec.residual_bytes, codec.code_dtype))
            progress.update(len(parts[-1][0]))
        ids, codes, residuals, lengths = zip(*parts)
        return cls("colbert", _concat_ids(list(ids)), codec=codec, codes=np.concatenate(codes),
                   residuals=np.concatenate(residuals), lengths=np.concatenate(lengths))

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, doc_ids: list[str]) -> np.ndarray:
        """Positions of ``doc_ids`` (int64, -1 where absent)."""
        found = pc.index_in(pa.array(doc_ids, pa.string()), value_set=self.ids)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)

    def lookup(self, rows: np.ndarray, dim: int, device: str):
        """The training-side lookup over ``rows`` (its own row i = ``rows[i]``)."""
        from embedding.mrl import truncate
        from embedding.tuning import DenseDocs, TokenDocs

        if self.kind == "dense":
            return DenseDocs(truncate(self.dense[rows], dim), device)
        offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        tokens = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
        return TokenDocs(self.codec, self.codes[tokens], self.residuals[tokens], self.lengths[rows], dim, device)

    def search(self, queries: np.ndarray, k: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` (scores, positions), best first: inner product or MaxSim."""
        if self.kind == "dense":
            return _dense_topk(self.dense, queries, k, dim)
        if self._index is None:
            from indexing.plaid import CentroidIndex

            self._index = CentroidIndex.from_flat(self.codec, self.codes, self.residuals, self.lengths)
        return self._index.exact_maxsim(queries, k, dim=dim)


def _concat_ids(parts: list) -> pa.StringArray:
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def _dense_topk(stored: np.ndarray, q: np.ndarray, k: int, dim: int,
                chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    from embedding.mrl import truncate

    best_s = np.zeros((len(q), 0), np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(stored), chunk):
        block = q @ truncate(stored[start:start + chunk], dim).T
        s = np.concatenate([best_s, block], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + block.shape[1]), block.shape)], axis=1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :k]   # ties: the lower position first
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_s, best_i


# ---- the worker -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What the driver checked and the worker needs (sent to the Ray task)."""

    cfg: "RetuneConfig"
    root: str
    index_version: str
    kind: str
    dim: int
    set_dir: str
    set_manifest: dict
    base_path: str
    base_settings: dict
    base_fingerprint: str
    train: list
    dev: list
    dev_qrels: dict
    version_dir: str
    device: str


def evaluate_encoder(lm, vectors: StoredVectors, plan: Plan) -> dict:
    """Exact retrieval of the dev queries; ``{"overall", "per_language"}`` (EvalResult, no per-query)."""
    from embedding.encoder import Encoder
    from embedding.mrl import truncate
    from indexing.metrics import evaluate

    enc = Encoder(lm, max_batch=plan.cfg.query_batch)
    texts = [q.text for q in plan.dev]
    if plan.kind == "dense":
        q = truncate(enc.encode_queries(texts), plan.dim)
    else:
        q = enc.encode_queries_colbert(texts)
    scores, pos = vectors.search(q, min(EVAL_K, len(vectors)), plan.dim)
    ids = vectors.ids
    run = {d.id: [(ids[int(p)].as_py(), float(s)) for s, p in zip(srow, prow) if p >= 0]
           for d, srow, prow in zip(plan.dev, scores, pos)}
    result = evaluate(run, plan.dev_qrels, {d.id: d.lang for d in plan.dev}).to_dict()
    return {"overall": result["overall"], "per_language": result["per_language"]}


def mine(plan: Plan) -> tuple[list[list[str]], dict]:
    """Hard negatives of every training query from the index, with the base encoder."""
    from indexing.searcher import Searcher

    cfg = plan.cfg
    searcher = Searcher.open(plan.root, cfg.index, version=plan.index_version, query_encoder=cfg.base,
                             device=plan.device, precision="float32")  # as the encoders it trains and scores
    mined, infos = [], []
    progress = Progress("mine negatives", len(plan.train))
    for start in range(0, len(plan.train), cfg.query_batch):
        batch = plan.train[start:start + cfg.query_batch]
        hits = searcher.search([q.text for q in batch], cfg.mine_k, lang=cfg.negatives_lang,
                               where=cfg.negatives_where)
        for q, h in zip(batch, hits):
            negs, info = select_negatives([d for d, _ in h], set(q.positives), cfg.negatives, cfg.skip_top)
            mined.append(negs)
            infos.append(info)
        progress.update(len(batch))
    return mined, negatives_stats(mined, infos, cfg)


def training_data(plan: Plan, vectors: StoredVectors, mined: list[list[str]]):
    """(TrainingData over compact rows, the lookup of those rows)."""
    from embedding.tuning import TrainingData

    wanted = sorted({d for q in plan.train for d in q.positives} | {d for m in mined for d in m})
    rows = vectors.rows(wanted)
    assert (rows >= 0).all(), "positives were checked; negatives come from the index of this set"
    local = {d: i for i, d in enumerate(wanted)}
    data = TrainingData([q.text for q in plan.train],
                        [np.array([local[d] for d in q.positives], np.int64) for q in plan.train],
                        [np.array([local[d] for d in m], np.int64) for m in mined])
    return data, vectors.lookup(rows, plan.dim, plan.device)


def tune(plan: Plan) -> dict:
    """The Ray task: mine, read, evaluate the base, train and gate every run, write the chosen one."""
    import torch

    from embedding.model import EncoderSettings, default_threads, load_model

    torch.set_num_threads(plan.cfg.threads or default_threads())
    _quiet_transformers()
    timings = Timings()
    with timings("mine"):
        mined, neg_stats = mine(plan)
    with timings("read_vectors"):
        vectors = StoredVectors.read(location(plan.set_dir), plan.set_manifest, plan.kind)
        data, docs = training_data(plan, vectors, mined)
    settings = EncoderSettings(**plan.base_settings)
    base_path = _worker_base(plan)
    lm = load_model(base_path, settings, device=plan.device, precision="float32")
    if lm.fingerprint != plan.base_fingerprint:
        raise RuntimeError(f"the base encoder at {base_path} on this worker has fingerprint {lm.fingerprint[:16]}, "
                           f"the driver checked {plan.base_fingerprint[:16]}")
    with timings("evaluate"):
        before = evaluate_encoder(lm, vectors, plan) if plan.dev else None
    base = {n: p.detach().to("cpu", copy=True) for n, p in lm.model.named_parameters()}
    rows, results, best_state = [], [], None
    for i, tc in enumerate(plan.cfg.runs()):
        logger.info("run %d: lr %.3g, freeze %s", i + 1, tc.lr, list(tc.freeze) or "none")
        row, state, result = _one_run(plan, lm, base, data, docs, vectors, tc, before, timings)
        rows.append(row)
        results.append(result)
        chosen = choose_run(rows, plan.cfg.force)
        if chosen == i:
            best_state = state
    chosen = choose_run(rows, plan.cfg.force)
    out = {"negatives": neg_stats, "runs": rows, "chosen": chosen, "before": before,
           "device": plan.device, "threads": torch.get_num_threads(), "documents": len(vectors)}
    if chosen is not None:
        with timings("save"):
            lm.model.load_state_dict(best_state, strict=False)
            out.update(results[chosen])
            out.update(write_encoder(plan, base_path, lm.model, settings,
                                     set(results[chosen]["changes"]["changed"])))
    out["timings"] = timings.to_dict()
    return out


def _worker_base(plan: Plan) -> str:
    """The base folder on this worker: a registered base is fetched here (the driver's cache may be elsewhere)."""
    if plan.cfg.base is None:
        return plan.base_path
    from indexing.searcher import query_encoder_dir

    return str(query_encoder_dir(plan.root, plan.cfg.base)[0])


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no weight-loading bars in the worker's output


def _one_run(plan: Plan, lm, base: dict, data, docs, vectors: StoredVectors, tc, before, timings: Timings):
    import torch

    from embedding.tuning import parameter_changes, train_query_encoder

    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            p.copy_(base[n])
    with timings("train"):
        model, stats = train_query_encoder(lm, data, docs, tc, n_negatives=plan.cfg.negatives, dim=plan.dim)
    changes = parameter_changes(model, base)
    after = verdict = None
    if before is not None:
        with timings("evaluate"):
            after = evaluate_encoder(lm, vectors, plan)
        verdict = gate(before, after, plan.cfg.tolerance, plan.cfg.max_regression)
    row = run_row(tc, stats, changes, before, after, verdict)
    logger.info("run: loss %.4f -> %.4f; dev nDCG@10 %s; gate %s", stats["loss_before"], stats["loss_after"],
                row["ndcg_after"], row["passed"])
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    return row, state, {"train_config": tc.to_dict(), "train_stats": stats, "changes": changes,
                        "after": after, "gate": verdict}


def write_encoder(plan: Plan, base_path: str, model, settings, changed: set[str]) -> dict:
    """Save the folder locally, fingerprint it, copy every file into the claimed version."""
    from embedding.model import fingerprint
    from embedding.tuning import save_query_encoder

    vdir = location(plan.version_dir)
    with tempfile.TemporaryDirectory(prefix="tessera-retune-") as tmp:
        folder = save_query_encoder(base_path, model, settings, Path(tmp) / "encoder", required=changed)
        fp = fingerprint(folder, settings)
        entries = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            loc = vdir.join(path.relative_to(folder).as_posix())
            loc.write_bytes(data)
            entries.append(file_entry(loc, vdir, kind="model", rows=0, nbytes=len(data),
                                      sha256=hashlib.sha256(data).hexdigest()))
    logger.info("wrote %d files of the tuned encoder (fingerprint %s) to %s", len(entries), fp[:12], vdir.url)
    return {"fingerprint": fp, "files": entries}

