"""The retune job: a better query encoder for a stored embedding set, without re-embedding a document.

Only the query side is tuned (Vasilyev et al., "adiabatic" learning rates); the
document side is the set's stored vectors, read and never written.

Flow:

1. everything that can be wrong is checked before training: the index and its set,
   stored vectors of the needed kind (dense, or ColBERT tokens + codec for a plaid
   index), the base encoder's fingerprint, training positives present in the set,
   dev queries with judgements, freeze patterns that match parameters;
2. sha256 of every file of the set version and of every committed index of it;
3. one Ray task (``num_gpus=1`` when the cluster has a GPU, else the CPU): mine hard
   negatives on the index with the base encoder (top ``mine_k`` minus positives,
   skipping the top ``skip_top`` ranks, which are too often unjudged positives), read
   the stored vectors shard by shard, evaluate the base on the dev queries, then for
   each run of the sweep: train from the base (:mod:`embedding.tuning`), evaluate,
   gate; the best run that passes is written as a Hugging Face folder into the
   claimed encoder version;
4. the checksums again: any change fails the job (nothing is committed);
5. the manifest (base and own fingerprints, the set it is compatible with, training
   config, negatives statistics, before/after evaluation, sweep table, checksums),
   then ``CURRENT``.

The gate compares nDCG@10 in points (100 × nDCG): the tuned encoder passes when the
overall score does not drop by more than ``tolerance`` and no language drops by more
than ``max_regression``. Evaluation is exact (inner product over the dense vectors at
the training dimension, or MaxSim over every decompressed token matrix), the same
for base and tuned: it measures the encoder, not the index's approximations. A
refused version is not written; the CLI exits with 3 and prints the table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.errors import Refused
from jobs.timing import Progress, Timings
from storage import layout, schemas, sets
from storage.catalog import check_filter
from storage.fs import Location, location
from storage.manifest import Artifact, NotFoundError, committed_manifests, file_entry, utcnow
from storage.queries import Query, QueryFileError, load_qrels, load_queries

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
#: Results per dev query (R@100 needs 100).
EVAL_K = 100
TEXT_COLUMNS = ("text", "query")
POSITIVE_COLUMNS = ("positives", "positive", "doc_ids", "doc_id", "pos")
ID_COLUMNS = ("id", "query_id", "qid")
_LISTED = 5


class GateRefused(Refused):
    """No run of the sweep passed the gate; ``report`` holds the evaluation and the runs."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


# ---- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class RetuneConfig:
    """One re-tuning job. Checked before anything is read or written.

    Attributes
    ----------
    set_name : the embedding set whose stored vectors are the document side.
    index : an index of that set, used to mine hard negatives with the base encoder.
    train : training pairs (Parquet/JSONL: ``text``/``query`` + ``doc_id``/``positives``
        (one id or a list), optional ``id``, ``lang``), or queries (``id``, ``text``)
        when ``train_qrels`` is given.
    dev_queries, dev_qrels : the gate's evaluation set (both or neither; neither needs ``force``).
    name : the encoder to write a version of (default ``<set>-query``).
    base : the encoder to start from: a folder or a registered ``NAME[@vN]`` (default the set's model).
    dim : training/evaluation dimension (default the index's; a Matryoshka prefix for dense).
    lr, freeze : one run; ``sweep_lr`` × ``sweep_freeze`` replace them with several runs.
    negatives, mine_k, skip_top : hard negatives per query, mined from the top ``mine_k``
        after skipping ranks 1..``skip_top``; ``negatives_lang`` / ``negatives_where``
        restrict the mined documents (Searcher filters).
    max_regression, tolerance : gate, in nDCG@10 points (see the module docstring).
    force : publish even when the gate refuses (recorded as ``forced`` in the manifest).
    """

    set_name: str
    index: str
    train: str
    root: "str | None" = None
    train_qrels: "str | None" = None
    dev_queries: "str | None" = None
    dev_qrels: "str | None" = None
    name: "str | None" = None
    base: "str | None" = None
    index_version: "str | None" = None
    dim: "int | None" = None
    lr: float = 5e-8
    sweep_lr: tuple[float, ...] = ()
    freeze: tuple[str, ...] = ()
    sweep_freeze: tuple[tuple[str, ...], ...] = ()
    epochs: int = 1
    steps: "int | None" = None
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    temperature: float = 0.05
    in_batch: bool = True
    negatives: int = 7
    mine_k: int = 50
    skip_top: int = 3
    negatives_lang: "str | None" = None
    negatives_where: "str | None" = None
    max_regression: float = 0.5
    tolerance: float = 0.0
    force: bool = False
    publish: bool = True
    device: str = "auto"
    threads: "int | None" = None
    query_batch: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep_lr", tuple(float(x) for x in self.sweep_lr))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        object.__setattr__(self, "sweep_freeze", tuple(tuple(f) for f in self.sweep_freeze))
        layout.check_name(self.set_name, "set name")
        layout.check_name(self.index, "index name")
        layout.check_name(self.encoder_name, "encoder name")
        for name in ("train",):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} must be a file path or URL, got {getattr(self, name)!r}")
        if (self.dev_queries is None) != (self.dev_qrels is None):
            raise ValueError("dev queries and dev qrels go together: the gate needs judgements for the "
                             "dev queries (give both --dev-queries and --dev-qrels)")
        if self.dev_queries is None and not self.force:
            raise ValueError("no dev set: the gate can't check the tuned encoder; give --dev-queries and "
                             "--dev-qrels, or --force to publish without a gate")
        for name in ("mine_k", "query_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("negatives", "skip_top"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.negatives == 0 and not self.in_batch:
            raise ValueError("no negatives at all (negatives 0 and no in-batch negatives): the loss would be 0")
        if self.skip_top >= self.mine_k:
            raise ValueError(f"skip_top {self.skip_top} leaves nothing of the top {self.mine_k} to mine")
        for name in ("max_regression", "tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be >= 0 (nDCG@10 points), got {value!r}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.negatives_where is not None:
            check_filter(self.negatives_where)  # its syntax now; its columns when the searcher mines
        self.runs()  # every learning rate > 0, every other training knob valid

    @property
    def encoder_name(self) -> str:
        return self.name or f"{self.set_name}-query"

    def runs(self) -> list:
        """The training runs, learning rate outer, freeze setting inner."""
        from embedding.tuning import TrainConfig

        common = dict(weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio, epochs=self.epochs,
                      steps=self.steps, batch_size=self.batch_size, clip=self.clip, seed=self.seed,
                      temperature=self.temperature, in_batch=self.in_batch)
        return [TrainConfig(lr=lr, freeze=freeze, **common)
                for lr in (self.sweep_lr or (self.lr,)) for freeze in (self.sweep_freeze or (self.freeze,))]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sweep_lr"], d["freeze"] = list(self.sweep_lr), list(self.freeze)
        d["sweep_freeze"] = [list(f) for f in self.sweep_freeze]
        return d


# ---- training and dev data ----------------------------------------------------------------
@dataclass(frozen=True)
class TrainQuery:
    """One training query and the ids of its relevant documents."""

    id: str
    text: str
    lang: "str | None"
    positives: tuple[str, ...]


def load_training(train: str, qrels: "str | None" = None) -> list[TrainQuery]:
    """Training queries with positives, from pairs or from queries + qrels.

    Raises
    ------
    QueryFileError
        Unreadable file, missing columns, empty text or no positive, naming the file and row.
    """
    if qrels is not None:
        judged = load_qrels(qrels)
        queries = load_queries(train)
        out = [TrainQuery(q.id, q.text, q.lang, tuple(sorted(d for d, g in judged.get(q.id, {}).items() if g > 0)))
               for q in queries]
        dropped = [q.id for q in out if not q.positives]
        if dropped:
            logger.warning("%d training queries have no positive judgement and are skipped, e.g. %s",
                           len(dropped), dropped[:_LISTED])
        out = [q for q in out if q.positives]
        if not out:
            raise QueryFileError(f"{location(qrels).url}: judges none of the {len(queries)} training queries "
                                 f"of {location(train).url} as relevant")
        return out
    return _group_pairs(location(train).url, _pair_rows(location(train)))


def _pair_rows(loc: Location) -> list[tuple[str, dict]]:
    low = loc.url.lower()
    if low.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(loc.read_bytes()))
        except FileNotFoundError as err:
            raise QueryFileError(f"{loc.url}: no such file") from err
        return [(f"row {i}", r) for i, r in enumerate(table.to_pylist())]
    if not low.endswith((".jsonl", ".json", ".ndjson")):
        raise QueryFileError(f"{loc.url}: training pairs must be Parquet or JSONL (or queries + --train-qrels)")
    try:
        raw = loc.read_bytes()
    except FileNotFoundError as err:
        raise QueryFileError(f"{loc.url}: no such file") from err
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="strict").splitlines(), start=1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise QueryFileError(f"{loc.url}: line {lineno}: invalid JSON: {err.msg}") from err
            if not isinstance(obj, dict):
                raise QueryFileError(f"{loc.url}: line {lineno}: expected a JSON object")
            rows.append((f"line {lineno}", obj))
    return rows


def _column(url: str, where: str, row: dict, names: tuple[str, ...], required: bool = True):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    if required:
        raise QueryFileError(f"{url}: {where}: no {names[0]!r} column (tried {list(names)}); "
                             f"keys: {sorted(row)[:10]}")
    return None


def _group_pairs(url: str, rows: list[tuple[str, dict]]) -> list[TrainQuery]:
    """Rows (one per pair, or one per query with a list of positives) grouped by query id or text."""
    if not rows:
        raise QueryFileError(f"{url}: no training pairs in file")
    groups: dict[str, dict] = {}
    for where, row in rows:
        text = _column(url, where, row, TEXT_COLUMNS)
        if not isinstance(text, str) or not text.strip():
            raise QueryFileError(f"{url}: {where}: empty or non-text query")
        pos = _column(url, where, row, POSITIVE_COLUMNS)
        pos = [pos] if isinstance(pos, (str, int)) else list(pos) if isinstance(pos, (list, tuple)) else None
        if not pos or any(not str(p).strip() for p in pos):
            raise QueryFileError(f"{url}: {where}: no positive document id")
        qid = _column(url, where, row, ID_COLUMNS, required=False)
        key = str(qid) if qid is not None else text
        g = groups.setdefault(key, {"text": text, "lang": row.get("lang"), "pos": []})
        if g["text"] != text:
            raise QueryFileError(f"{url}: {where}: query id {key!r} appears with two different texts")
        g["pos"].extend(str(p).strip() for p in pos)
    return [TrainQuery(k if k != g["text"] else f"train-{i}", g["text"], g["lang"], tuple(dict.fromkeys(g["pos"])))
            for i, (k, g) in enumerate(groups.items())]


def load_dev(cfg: RetuneConfig) -> tuple[list[Query], dict[str, dict[str, int]]]:
    """Dev queries that have judgements, and their qrels; ValueError when none has any."""
    if cfg.dev_queries is None:
        return [], {}
    queries, qrels = load_queries(cfg.dev_queries), load_qrels(cfg.dev_qrels)
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q.id, {}).values())]
    if not judged:
        raise QueryFileError(f"{location(cfg.dev_qrels).url} judges none of the {len(queries)} dev queries of "
                             f"{location(cfg.dev_queries).url} relevant: the gate has nothing to measure")
    if len(judged) < len(queries):
        logger.warning("%d of %d dev queries have no judgement and are left out", len(queries) - len(judged),
                       len(queries))
    return judged, {q.id: qrels[q.id] for q in judged}


# ---- pure planners: negatives and the gate --------------------------------------------------
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


def negatives_stats(mined: list[list[str]], infos: list[dict], cfg: RetuneConfig) -> dict:
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


def points(x: float) -> float:
    return 100.0 * x


def gate(before: dict, after: dict, tolerance: float, max_regression: float) -> dict:
    """Whether ``after`` may replace ``before`` (both ``{"overall", "per_language"}`` of nDCG@10 means).

    Returns
    -------
    ``{"passed", "overall_delta", "per_language_delta", "worst_language", "worst_delta", "reasons"}``,
    deltas in nDCG@10 points.
    """
    delta = points(after["overall"]["nDCG@10"] - before["overall"]["nDCG@10"])
    per = {lang: points(after["per_language"].get(lang, {}).get("nDCG@10", 0.0) - v["nDCG@10"])
           for lang, v in before["per_language"].items()}
    reasons = []
    if delta < -tolerance - 1e-9:
        reasons.append(f"overall nDCG@10 {delta:+.2f} points (tolerance {tolerance:.2f})")
    for lang, d in sorted(per.items()):
        if d < -max_regression - 1e-9:
            reasons.append(f"{lang} nDCG@10 {d:+.2f} points (max regression {max_regression:.2f})")
    worst = min(per, key=per.get) if per else None
    return {"passed": not reasons, "overall_delta": delta, "per_language_delta": per, "worst_language": worst,
            "worst_delta": per[worst] if worst else None, "reasons": reasons,
            "tolerance": tolerance, "max_regression": max_regression}


def choose_run(rows: list[dict], force: bool) -> "int | None":
    """Index of the run to publish: the best dev nDCG@10 among those that passed the gate;
    with ``force`` and none passing, the best overall (without dev: the lowest training loss)."""
    def key(i: int):
        r = rows[i]
        return (r["ndcg_after"] if r["ndcg_after"] is not None else -r["loss_after"], -i)
    passed = [i for i, r in enumerate(rows) if r["passed"]]
    if passed:
        return max(passed, key=key)
    return max(range(len(rows)), key=key) if force and rows else None


# ---- tables (the CLI prints them; the refusal message carries them) -------------------------
def runs_table(rows: list[dict]) -> str:
    lines = [f"{'run':>3}  {'lr':>8}  {'freeze':<24} {'steps':>5}  {'loss before→after':>19}  "
             f"{'nDCG@10 before→after':>20}  {'Δ pts':>6}  {'worst lang (Δ)':<16} gate"]
    for i, r in enumerate(rows, 1):
        freeze = "+".join(r["freeze"]) or "none"
        ndcg = (f"{r['ndcg_before']:.4f}→{r['ndcg_after']:.4f}" if r["ndcg_after"] is not None else "n/a")
        delta = f"{r['delta']:+.2f}" if r["delta"] is not None else "n/a"
        worst = f"{r['worst_language']} ({r['worst_delta']:+.2f})" if r["worst_language"] else "n/a"
        verdict = "pass" if r["passed"] else "no dev" if r["passed"] is None else "REFUSED"
        lines.append(f"{i:>3}  {r['lr']:>8.2g}  {freeze[:24]:<24} {r['steps']:>5}  "
                     f"{r['loss_before']:>8.4f}→{r['loss_after']:<9.4f}  {ndcg:>20}  {delta:>6}  {worst:<16} "
                     f"{verdict}")
    return "\n".join(lines)


def languages_table(before: dict, after: dict) -> str:
    lines = [f"{'lang':<8} {'queries':>7}  {'before':>7}  {'after':>7}  {'Δ pts':>6}"]
    rows = [(lang, v) for lang, v in sorted(before["per_language"].items())] + [("overall", before["overall"])]
    for lang, v in rows:
        a = after["overall"] if lang == "overall" else after["per_language"].get(lang, {"nDCG@10": 0.0})
        lines.append(f"{lang:<8} {int(v['queries']):>7}  {v['nDCG@10']:>7.4f}  {a['nDCG@10']:>7.4f}  "
                     f"{points(a['nDCG@10'] - v['nDCG@10']):>+6.2f}")
    return "\n".join(lines)


# ---- immutability ----------------------------------------------------------------------------
def set_file_urls(root: Location, set_name: str, set_version: str) -> list[str]:
    """Every file of the set version and of every committed index built on it (manifests included)."""
    art = Artifact(root, "sets", set_name)
    vdir = art.version_dir(set_version)
    m = art.manifest(set_version)
    urls = [vdir.join(layout.MANIFEST).url] + [_entry_url(vdir, e) for e in m["files"]]
    for im in committed_manifests(root, "indexes"):
        src = im.get("source", {})
        if src.get("set") == set_name and src.get("version") == set_version:
            idir = location(im["_dir"])
            urls += [idir.join(layout.MANIFEST).url] + [_entry_url(idir, e) for e in im.get("files", [])]
    return sorted(set(urls))


def checksums(urls: list[str]) -> dict[str, str]:
    """``{url: sha256}``, a few files at a time (object stores reward parallel reads)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(urls, pool.map(lambda u: location(u).sha256(), urls)))


def _entry_url(base: Location, entry: dict) -> str:
    return sets.entry_location(base, entry).url


# ---- the stored vectors (worker side) --------------------------------------------------------
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
        want = "dense" if kind == "dense" else "tokens"
        files = sets.set_files(set_dir, manifest, want)
        progress = Progress(f"read {want}", sum(f.live_rows for f in files))
        ids, parts = [], []
        for f in files:
            table = sets.read_live(f)
            ids.append(table.column("id").combine_chunks())
            parts.append(schemas.dense_matrix(table) if kind == "dense" else table)
            progress.update(table.num_rows)
        all_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
        if kind == "dense":
            return cls(kind, all_ids, dense=np.concatenate(parts))
        return cls._tokens(all_ids, parts, set_dir.join(manifest["codec"]["file"]).read_bytes())

    @classmethod
    def _tokens(cls, ids: pa.StringArray, tables: list[pa.Table], codec_bytes: bytes) -> "StoredVectors":
        from embedding.codec import ResidualCodec

        codec = ResidualCodec.from_bytes(codec_bytes)
        table = pa.concat_tables(tables)
        codes = table.column("codes").combine_chunks().values.to_numpy(zero_copy_only=False)
        residuals = np.frombuffer(b"".join(v.as_py() for v in table.column("residuals")), np.uint8)
        lengths = np.asarray(table.column("n_vectors").to_numpy(), np.int64)
        return cls("colbert", ids, codec=codec, codes=codes.astype(codec.code_dtype),
                   residuals=residuals.reshape(int(lengths.sum()), codec.residual_bytes), lengths=lengths)

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

    cfg: RetuneConfig
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
                             device=plan.device)
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


def _run_row(tc, stats: dict, changes: dict, before: "dict | None", after: "dict | None", verdict: "dict | None"):
    return {"lr": tc.lr, "freeze": list(tc.freeze), "steps": stats["steps"], "loss_before": stats["loss_before"],
            "loss_after": stats["loss_after"], "tensors_changed": changes["tensors_changed"],
            "max_abs_change": changes["max_abs_change"],
            "ndcg_before": before["overall"]["nDCG@10"] if before else None,
            "ndcg_after": after["overall"]["nDCG@10"] if after else None,
            "delta": verdict["overall_delta"] if verdict else None,
            "worst_language": verdict["worst_language"] if verdict else None,
            "worst_delta": verdict["worst_delta"] if verdict else None,
            "passed": verdict["passed"] if verdict else None, "reasons": verdict["reasons"] if verdict else [],
            "per_language_after": after["per_language"] if after else None}


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
    lm = load_model(base_path, settings, device=plan.device, half=False)
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
    row = _run_row(tc, stats, changes, before, after, verdict)
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


# ---- the driver ------------------------------------------------------------------------------
def run(cfg: RetuneConfig) -> dict:
    """Check, tune on one worker, gate, verify the set is untouched, commit; return the manifest.

    Raises
    ------
    ValueError (and subclasses: QueryFileError, ModelError, IncompatibleEncoderError)
        Bad input, before any training.
    GateRefused
        No run passed the gate (and no ``force``); nothing was committed.
    RuntimeError
        A file of the set or of its indexes changed while the job ran.
    """
    from jobs.runtime import init_ray

    timings = Timings()
    root = layout.resolve_root(cfg.root)
    with timings("check"):
        plan_parts = prepare(cfg, root)
    with timings("checksums"):
        urls = set_file_urls(root, cfg.set_name, plan_parts["set_version"])
        before_sums = checksums(urls)
    art = Artifact(root, "encoders", cfg.encoder_name)
    version, _ = art.claim(_run_key(cfg, plan_parts), {"host": socket.gethostname(), "pid": os.getpid()})
    init_ray()
    plan = _plan(cfg, root, plan_parts, art.version_dir(version).url)
    with timings("worker"):
        result = _remote_tune(plan)
    with timings("checksums"):
        after_sums = checksums(urls)
    changed = sorted(u for u in urls if before_sums[u] != after_sums.get(u))
    if changed:
        raise RuntimeError(f"{len(changed)} file(s) of set {cfg.set_name} or its indexes changed while re-tuning "
                           f"(first: {changed[:3]}); nothing was committed")
    report = _report(cfg, plan_parts, result)
    if result["chosen"] is None:
        art.version_dir(version).delete(recursive=True)
        raise GateRefused(_refusal_message(report), report)
    manifest = _manifest(cfg, plan_parts, result, report, before_sums, after_sums, timings)
    manifest = art.commit(version, manifest)
    if cfg.publish:
        art.publish(version)
    return manifest


def prepare(cfg: RetuneConfig, root: Location) -> dict:
    """Every check that can fail on input, before training; returns what the plan needs."""
    from embedding.tuning import match_freeze, parameter_names
    from indexing.searcher import choose_query_encoder

    index_art = Artifact(root, "indexes", cfg.index)
    im = index_art.manifest(cfg.index_version)
    src = im.get("source", {})
    if src.get("set") != cfg.set_name:
        raise ValueError(f"index {cfg.index!r} was built from set {src.get('set')!r}, not {cfg.set_name!r}")
    set_art = Artifact(root, "sets", cfg.set_name)
    set_version = set_art.resolve(src["version"])
    sm = set_art.manifest(set_version)
    kind = "colbert" if im["index_kind"] == "plaid" else "dense"
    dim = _check_vectors(cfg, sm, im, kind)
    choice = choose_query_encoder(root, cfg.index, src, sm["model"], cfg.base)
    names = parameter_names(choice.path)
    for tc in cfg.runs():
        match_freeze(names, tc.freeze)
    train = load_training(cfg.train, cfg.train_qrels)
    dev, dev_qrels = load_dev(cfg)
    _check_ids(set_art.version_dir(set_version), sm, kind, train, dev_qrels)
    logger.info("re-tuning %s's query encoder on %d training queries against set %s %s (%s, dim %d); "
                "%d run(s); %d dev queries", choice.path, len(train), cfg.set_name, set_version, kind, dim,
                len(cfg.runs()), len(dev))
    return {"index_manifest": im, "set_manifest": sm, "set_version": set_version, "kind": kind, "dim": dim,
            "choice": choice, "train": train, "dev": dev, "dev_qrels": dev_qrels,
            "set_dir": set_art.version_dir(set_version).url}


def _check_vectors(cfg: RetuneConfig, sm: dict, im: dict, kind: str) -> int:
    want = "dense" if kind == "dense" else "tokens"
    stored = sm["dims"].get(kind)
    if stored is None or not any(e["kind"] == want for e in sm["files"]) or (kind == "colbert" and not sm.get("codec")):
        raise NotFoundError(f"set {cfg.set_name} {sm['version']} has no stored {want} vectors (embedded with "
                            f"--mode {sm['config']['mode']}), which index {cfg.index!r} ({im['index_kind']}) needs")
    dim = cfg.dim or int(im["dim"])
    if dim > stored:
        raise ValueError(f"dim {dim} is above the stored {kind} dimension {stored} of set {cfg.set_name}")
    if dim != int(im["dim"]):
        logger.warning("training at dim %d, but index %s searches at dim %d: mining uses the index", dim,
                       cfg.index, im["dim"])
    return dim


def _check_ids(set_dir: Location, sm: dict, kind: str, train: list[TrainQuery], dev_qrels: dict) -> None:
    """Training positives must have stored vectors; dev judgements outside the set are only counted."""
    want = "dense" if kind == "dense" else "tokens"
    pos = pa.array(sorted({d for q in train for d in q.positives}), pa.string())
    judged = pa.array(sorted({d for docs in dev_qrels.values() for d, g in docs.items() if g > 0}), pa.string())
    found_pos = np.zeros(len(pos), bool)
    found_dev = np.zeros(len(judged), bool)
    for f in sets.set_files(set_dir, sm, want):
        ids = sets.read_live(f, ["id"]).column("id").combine_chunks()
        found_pos |= np.asarray(pc.is_in(pos, value_set=ids).to_numpy(zero_copy_only=False), bool)
        found_dev |= np.asarray(pc.is_in(judged, value_set=ids).to_numpy(zero_copy_only=False), bool)
    if not found_pos.all():
        missing = pos.filter(pa.array(~found_pos)).to_pylist()
        raise ValueError(f"{len(missing)} training positive id(s) are not documents of set {sm['name']} "
                         f"{sm['version']} with stored {want} vectors, e.g. {missing[:_LISTED]}")
    if len(judged) and not found_dev.all():
        logger.warning("%d dev judgement(s) name documents absent from the set: they can never be retrieved",
                       int((~found_dev).sum()))


def _run_key(cfg: RetuneConfig, parts: dict) -> str:
    key = {"cfg": {k: v for k, v in cfg.to_dict().items() if k not in ("root", "threads", "device", "publish")},
           "set": parts["set_manifest"]["model"]["fingerprint"], "base": parts["choice"].fingerprint,
           "train": [dataclasses.astuple(q) for q in parts["train"]]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _plan(cfg: RetuneConfig, root: Location, parts: dict, version_dir: str) -> Plan:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and gpus < 1:
        raise ValueError("device 'cuda' was asked for but the Ray cluster has no GPU")
    device = "cuda" if gpus >= 1 and cfg.device != "cpu" else "cpu"
    choice = parts["choice"]
    return Plan(cfg, root.url, parts["index_manifest"]["version"], parts["kind"], parts["dim"], parts["set_dir"],
                parts["set_manifest"], str(choice.path), choice.settings.to_dict(), choice.fingerprint,
                parts["train"], parts["dev"],
                parts["dev_qrels"], version_dir, device)


def _remote_tune(plan: Plan) -> dict:
    """One Ray task: a GPU worker when ``plan.device`` is cuda, else one CPU slot (threads: the node's)."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if plan.device == "cuda" else 0, max_retries=0)(tune)
    return ray.get(task.remote(plan))


# ---- reporting --------------------------------------------------------------------------------
def _report(cfg: RetuneConfig, parts: dict, result: dict) -> dict:
    chosen = result["chosen"]
    return {"runs": result["runs"], "chosen": chosen, "before": result["before"], "after": result.get("after"),
            "negatives": result["negatives"], "set": cfg.set_name, "set_version": parts["set_version"],
            "best_refused": _best_refused(result) if chosen is None else None}


def _best_refused(result: dict) -> "dict | None":
    rows = result["runs"]
    if not rows or rows[0]["ndcg_after"] is None:
        return None
    i = max(range(len(rows)), key=lambda j: rows[j]["ndcg_after"])
    return {"run": i + 1, "after": {"overall": {"nDCG@10": rows[i]["ndcg_after"]},
                                    "per_language": rows[i]["per_language_after"]}}


def _refusal_message(report: dict) -> str:
    text = [f"the gate refused every run ({len(report['runs'])}): nothing was published (use --force to "
            "publish anyway)", "", runs_table(report["runs"])]
    best = report.get("best_refused")
    if best and report["before"]:
        after = {"overall": {**report["before"]["overall"], **best["after"]["overall"]},
                 "per_language": best["after"]["per_language"]}
        text += ["", f"run {best['run']} per language:", languages_table(report["before"], after)]
        reasons = report["runs"][best["run"] - 1]["reasons"]
        text += ["", "reasons: " + "; ".join(reasons)]
    return "\n".join(text)


def _manifest(cfg: RetuneConfig, parts: dict, result: dict, report: dict, before_sums: dict,
              after_sums: dict, timings: Timings) -> dict:
    sm, im, choice = parts["set_manifest"], parts["index_manifest"], parts["choice"]
    compat = {"set": cfg.set_name, "version": parts["set_version"], "fingerprint": sm["model"]["fingerprint"]}
    verdict = result.get("gate")
    evaluation = None
    if result["before"] is not None:
        evaluation = {"method": "exact", "k": EVAL_K, "dim": parts["dim"], "before": result["before"],
                      "after": result["after"], "delta_points": {
                          "overall": verdict["overall_delta"], "per_language": verdict["per_language_delta"]},
                      "gate": verdict, "dev": {"queries": location(cfg.dev_queries).url,
                                               "qrels": location(cfg.dev_qrels).url,
                                               "judged_queries": len(parts["dev"])}}
    return {
        "fingerprint": result["fingerprint"], "base_fingerprint": choice.fingerprint,
        "base": {"path": str(choice.path), "registered": choice.registered, "ref": cfg.base},
        "settings": choice.settings.to_dict(), "compatible_with": compat, "source": dict(compat),
        "index": {"name": cfg.index, "version": im["version"], "kind": im["index_kind"], "dim": im["dim"]},
        "vectors": {"kind": parts["kind"], "dim": parts["dim"], "documents": result["documents"]},
        "training": {**result["train_config"], "stats": result["train_stats"],
                     "parameter_changes": {k: v for k, v in result["changes"].items() if k != "changed"},
                     "train": location(cfg.train).url,
                     "train_qrels": location(cfg.train_qrels).url if cfg.train_qrels else None,
                     "queries": len(parts["train"]),
                     "device": result["device"], "threads": result["threads"]},
        "negatives": result["negatives"], "evaluation": evaluation,
        "forced": not (verdict or {}).get("passed", False), "runs": result["runs"], "chosen_run": result["chosen"] + 1,
        "immutability": {"files": len(before_sums), "unchanged": before_sums == after_sums,
                         "before": before_sums, "after": after_sums},
        "files": result["files"], "config": cfg.to_dict(),
        "timings": {**timings.to_dict(), **{f"worker_{k}": v for k, v in result["timings"].items()}},
        "created_at": utcnow(),
    }
