"""Retrieval quality: nDCG@10, R@10, R@100 and MRR@10 through ir-measures.

The measures themselves come from ir-measures (pytrec_eval underneath); this module
only decides which queries count, turns ranked lists into a run, and averages
per query, per language and overall.

Which queries count:

* a query with no judgements (absent from the qrels, or with an empty judgement
  dict) is skipped and counted in ``unjudged_queries``;
* a judged query missing from the run scores 0 on every measure;
* a judgement naming a document absent from ``known_docs`` is counted in
  ``missing_docs`` (and logged) but still evaluated: it can never be retrieved,
  so it lowers recall, as it should.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ir_measures

logger = logging.getLogger(__name__)

#: The measures, in ir-measures syntax.
MEASURES = ("nDCG@10", "R@10", "R@100", "RR@10")
#: Output names where they differ from ir-measures' names.
OUTPUT_NAMES = {"RR@10": "MRR@10"}
#: Language bucket for queries without a language.
UNDETERMINED = "und"
_MAX_LISTED = 5


def output_name(measure: str) -> str:
    """The key a measure is reported under (``"RR@10"`` -> ``"MRR@10"``)."""
    return OUTPUT_NAMES.get(measure, measure)


#: Report keys, in order: ``("nDCG@10", "R@10", "R@100", "MRR@10")``.
METRIC_KEYS = tuple(output_name(m) for m in MEASURES)


@dataclass
class EvalResult:
    """Quality of one run against one set of judgements.

    Attributes
    ----------
    overall : dict
        Mean of each metric in :data:`METRIC_KEYS` over judged queries, plus
        ``"queries"`` (their number).
    per_language : dict
        ``{lang: {metric: mean, "queries": n}}``; queries without a language are
        grouped under ``"und"``.
    per_query : dict
        ``{query_id: {metric: value}}`` for every judged query.
    missing_docs : int
        Judgements naming documents absent from the corpus.
    unjudged_queries : int
        Queries (in the run or the language map) without judgements, skipped.
    """

    overall: dict[str, float]
    per_language: dict[str, dict[str, float]]
    per_query: dict[str, dict[str, float]] = field(repr=False)
    missing_docs: int = 0
    unjudged_queries: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict with the five attributes."""
        return {
            "overall": dict(self.overall),
            "per_language": {k: dict(v) for k, v in self.per_language.items()},
            "per_query": {k: dict(v) for k, v in self.per_query.items()},
            "missing_docs": self.missing_docs,
            "unjudged_queries": self.unjudged_queries,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        """Inverse of :meth:`to_dict`."""
        return cls(dict(d["overall"]), {k: dict(v) for k, v in d["per_language"].items()},
                   {k: dict(v) for k, v in d.get("per_query", {}).items()},
                   int(d.get("missing_docs", 0)), int(d.get("unjudged_queries", 0)))


def evaluate(run: dict[str, list[tuple[str, float]]], qrels: dict[str, dict[str, int]],
             query_lang: dict[str, str | None], *, known_docs: set[str] | None = None) -> EvalResult:
    """Score ranked lists against relevance judgements.

    Parameters
    ----------
    run : dict
        ``{query_id: [(doc_id, score), ...]}``, each list in rank order, best first.
        The list order is the ranking: scores are not re-sorted, so ties or
        distance-like scores (lower is better) cannot reorder it. A document
        repeated in one list counts at its first (best) rank.
    qrels : dict
        ``{query_id: {doc_id: grade}}``; grade > 0 is relevant, higher is better
        (nDCG uses the grades as gains, recall and MRR treat grade > 0 as relevant).
    query_lang : dict
        ``{query_id: lang or None}``; judged queries absent from it go to ``"und"``.
    known_docs : set of str, optional
        Ids of the documents in the corpus, for counting judgements that cannot be
        retrieved.

    Returns
    -------
    EvalResult

    Raises
    ------
    ValueError
        When no query has judgements.
    """
    judged = {str(q): docs for q, docs in qrels.items() if docs}
    if not judged:
        raise ValueError(f"no judged queries: qrels hold {len(qrels)} queries, none with judgements")
    unjudged = (set(run) | set(query_lang)) - set(judged)
    if unjudged:
        logger.info("skipping %d queries without judgements, e.g. %s", len(unjudged),
                    sorted(unjudged)[:_MAX_LISTED])
    unretrieved = [q for q in judged if not run.get(q)]
    if unretrieved:
        logger.warning("%d judged queries have no results in the run and score 0, e.g. %s",
                       len(unretrieved), unretrieved[:_MAX_LISTED])
    per_query = _per_query(run, judged)
    return EvalResult(
        overall=_mean(list(per_query.values())),
        per_language=_per_language(per_query, query_lang),
        per_query=per_query,
        missing_docs=count_missing_docs(qrels, known_docs),
        unjudged_queries=len(unjudged),
    )


def count_missing_docs(qrels: dict[str, dict[str, int]], known_docs: set[str] | None) -> int:
    """Number of judgements whose document is not in ``known_docs`` (0 when it is None)."""
    if known_docs is None:
        return 0
    missing = [(q, d) for q, docs in qrels.items() for d in docs if d not in known_docs]
    if missing:
        logger.warning("%d judgements name documents absent from the corpus, e.g. %s",
                       len(missing), missing[:_MAX_LISTED])
    return len(missing)


def _per_query(run: dict[str, list[tuple[str, float]]],
               judged: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """``{query_id: {metric: value}}`` for every judged query (0 when not retrieved)."""
    scores = {q: dict.fromkeys(METRIC_KEYS, 0.0) for q in judged}
    trec_run = {q: _rank_scores(run[q]) for q in judged if run.get(q)}
    if not trec_run:
        return scores
    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    names = {str(m): output_name(name) for m, name in zip(measures, MEASURES)}
    for metric in ir_measures.iter_calc(measures, judged, trec_run):
        if metric.query_id in scores:
            scores[metric.query_id][names[str(metric.measure)]] = float(metric.value)
    return scores


def _rank_scores(ranked: list[tuple[str, float]]) -> dict[str, float]:
    """Scores that encode list order exactly: ``n, n-1, ...`` (first occurrence wins)."""
    out: dict[str, float] = {}
    for doc, _score in ranked:
        if str(doc) not in out:
            out[str(doc)] = float(len(ranked) - len(out))
    return out


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {k: sum(r[k] for r in rows) / len(rows) for k in METRIC_KEYS}
    out["queries"] = len(rows)
    return out


def _per_language(per_query: dict[str, dict[str, float]],
                  query_lang: dict[str, str | None]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, float]]] = {}
    for q, row in per_query.items():
        groups.setdefault(query_lang.get(q) or UNDETERMINED, []).append(row)
    return {lang: _mean(groups[lang]) for lang in sorted(groups)}
