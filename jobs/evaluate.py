"""The evaluate job: queries + relevance judgements → quality of one or more indexes, as a report.

For each index: open a :class:`~indexing.searcher.Searcher` (current version, query
encoder checked against the index's set), search every query in batches, score
the ranked lists with :func:`indexing.metrics.evaluate` (nDCG@10, R@10, R@100,
MRR@10, overall and per language), then write one report comparing the indexes
side by side (``report.json``, ``report.md``, plots) with
:func:`indexing.report.write_report`.

Judgements naming documents that are not in an index are counted (and logged),
not fatal: they can never be retrieved, so they lower recall, as they should.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from dataclasses import dataclass

from embedding.model import check_precision
from indexing.metrics import EvalResult, evaluate
from indexing.report import write_report
from indexing.searcher import Searcher
from jobs.runtime import DEVICES as RUNTIME_DEVICES
from jobs.timing import Progress, Timings
from storage import layout
from storage.catalog import check_filter
from storage.fs import Location, location
from storage.queries import Query, load_qrels, load_queries

logger = logging.getLogger(__name__)

DEVICES = tuple(d for d in RUNTIME_DEVICES if d != "auto")  # evaluation runs in this process
#: Depth that R@100 needs; a smaller ``k`` is allowed but warned about.
FULL_DEPTH = 100


@dataclass(frozen=True)
class EvalConfig:
    """Configuration of one evaluation run. Checked before anything is read or written.

    Attributes
    ----------
    index : one or more index names (a single string is accepted); their current versions are used.
    queries : a Parquet/JSONL query file (id, text, optional lang), local or s3://.
    qrels : relevance judgements (TREC text, Parquet or JSONL), local or s3://.
    root : the store root (None: $TESSERA_ROOT or ./tessera-data).
    k : results retrieved per query.
    out : report folder (None: ``<root>/reports/eval-<UTC timestamp>``).
    query_encoder : a local Hugging Face folder (None: each set's own model).
    batch_size : queries encoded and searched per call.
    device : torch device of the query encoder.
    precision : the query encoder's type (``Searcher.open``'s ``precision``).
    """

    index: tuple[str, ...]
    queries: str
    qrels: str
    root: "str | None" = None
    k: int = 100
    out: "str | None" = None
    query_encoder: "str | None" = None
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "auto"
    lang: "str | None" = None          # only documents in this language (e.g. "en" for X→English)
    where: "str | None" = None         # one boolean expression over the documents view (check_filter)
    same_language: bool = False        # each query searches the documents of its own language

    def __post_init__(self) -> None:
        names = (self.index,) if isinstance(self.index, str) else tuple(self.index)
        object.__setattr__(self, "index", names)
        if not names:
            raise ValueError("no index given")
        for name in names:
            layout.check_name(name, "index name")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"index given more than once: {dups}")
        for name in ("queries", "qrels"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a file path or URL, got {value!r}")
        for name in ("k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        check_precision(self.precision)
        if self.where is not None:
            check_filter(self.where)  # its syntax now; its columns against each index's set when searched

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["index"] = list(self.index)
        return d


def default_out(root: Location) -> Location:
    """``<root>/reports/eval-<UTC timestamp>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return root.join("reports", f"eval-{stamp}")


def run(cfg: EvalConfig) -> dict:
    """Evaluate every index of ``cfg`` and write one report.

    Returns
    -------
    dict
        ``{"report": {"json", "markdown", "plots"}, "results": {index: EvalResult.to_dict()},
        "meta": {index: {...}}, "timings": {...}}``.
    """
    root = layout.resolve_root(cfg.root)
    if cfg.k < FULL_DEPTH:
        logger.warning("k=%d < %d: R@100 is computed on %d results", cfg.k, FULL_DEPTH, cfg.k)
    timings = Timings()
    with timings("load"):
        queries, qrels = load_queries(cfg.queries), load_qrels(cfg.qrels)
        qrels, ignored = restrict_qrels(qrels, {q.id for q in queries})
    results: dict[str, EvalResult] = {}
    meta: dict[str, dict] = {}
    for name in cfg.index:
        with timings(f"index {name}"):
            results[name], meta[name] = evaluate_index(cfg, root, name, queries, qrels)
    out = location(cfg.out) if cfg.out else default_out(root)
    title = f"Retrieval quality: {', '.join(cfg.index)} on {location(cfg.queries).name}"
    paths = write_report(results, out, title=title, meta=meta)
    logger.info("report written to %s", paths["markdown"])
    return {"report": paths, "results": {name: r.to_dict() for name, r in results.items()},
            "meta": meta, "qrels_queries_not_in_queries_file": ignored, "timings": timings.to_dict()}


def restrict_qrels(qrels: dict[str, dict[str, int]], query_ids: set[str]) -> tuple[dict, int]:
    """Judgements of the queries being evaluated; the queries file defines the query set.

    Returns
    -------
    (qrels restricted to ``query_ids``, number of judged queries left out)
    """
    kept = {qid: rel for qid, rel in qrels.items() if qid in query_ids}
    ignored = len(qrels) - len(kept)
    if ignored:
        logger.info("%d judged queries are not in the queries file and are not evaluated", ignored)
    if not kept:
        raise ValueError("no query of the queries file has judgements in the qrels: do the ids match?")
    return kept, ignored


def evaluate_index(cfg: EvalConfig, root: Location, name: str, queries: list[Query],
                   qrels: dict[str, dict[str, int]]) -> tuple[EvalResult, dict]:
    """Search every query on one index and score the run; returns (result, report meta)."""
    searcher = Searcher.open(root, name, query_encoder=cfg.query_encoder, device=cfg.device,
                             precision=cfg.precision)
    ranked = search_all(searcher, queries, cfg.k, cfg.batch_size, lang=cfg.lang, where=cfg.where,
                        same_language=cfg.same_language)
    result = evaluate(ranked, qrels, {q.id: q.lang for q in queries}, known_docs=set(searcher.doc_ids))
    logger.info("%s %s: nDCG@10 %.4f over %d judged queries (%d judgements name missing documents)",
                name, searcher.version, result.overall["nDCG@10"], result.overall["queries"],
                result.missing_docs)
    return result, describe(searcher)


def search_all(searcher: Searcher, queries: list[Query], k: int, batch_size: int, *,
               lang: "str | None" = None, where: "str | None" = None,
               same_language: bool = False) -> dict[str, list[tuple[str, float]]]:
    """``{query_id: [(doc_id, score), ...]}`` for every query, searched ``batch_size`` at a time.

    ``same_language`` searches each query among the documents of its own language
    (queries without a language search everything). An X-MOD query encoder encodes each
    query with its language's adapter (the fallback's when it has none).
    """
    ranked: dict[str, list[tuple[str, float]]] = {}
    progress = Progress(f"search {searcher.name}", len(queries))
    groups: dict = {}
    for q in queries:
        groups.setdefault(q.lang if same_language else lang, []).append(q)
    for group_lang, group in groups.items():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            # ``lang`` filters documents; ``langs`` routes each query to its adapter (X-MOD encoders)
            hits = searcher.search([q.text for q in batch], k, lang=group_lang, where=where,
                                   langs=[q.lang for q in batch])
            ranked.update((q.id, h) for q, h in zip(batch, hits))
            progress.update(len(batch))
    return ranked


def describe(searcher: Searcher) -> dict:
    """Report meta of an index: kind, dim, nbits (plaid only) and version."""
    meta = {"kind": searcher.kind, "dim": searcher.dim, "version": searcher.version}
    if searcher.nbits is not None:
        meta["nbits"] = searcher.nbits
    return meta
