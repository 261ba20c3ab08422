"""The retune gate: whether a tuned query encoder may replace its base, and the tables that say why.

Pure functions over evaluation results (``{"overall", "per_language"}`` of nDCG@10
means, :func:`indexing.metrics.evaluate`), so they are tested without a model:

* :func:`gate` compares in points (100 × nDCG@10): a run passes when the overall
  score drops by no more than ``tolerance`` and no language by more than
  ``max_regression``;
* :func:`choose_run` picks the run of a sweep to publish;
* :func:`run_row` is a run's row of the sweep table, :func:`runs_table` and
  :func:`languages_table` print them (the CLI shows them; a refusal's message,
  :func:`refusal_message`, carries them).
"""
from __future__ import annotations


# ---- the gate -------------------------------------------------------------------------------
def points(x: float) -> float:
    """An nDCG value (0..1) in points (0..100)."""
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


# ---- a sweep's rows and the refusal --------------------------------------------------------
def run_row(tc, stats: dict, changes: dict, before: "dict | None", after: "dict | None",
            verdict: "dict | None") -> dict:
    """One run's row of the sweep table: its ``TrainConfig`` ``tc``, training stats, parameter
    changes, and (with a dev set) its evaluation and :func:`gate` verdict."""
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


def best_refused(result: dict) -> "dict | None":
    """The refused run with the best dev nDCG@10, for the refusal message (None without a dev set)."""
    rows = result["runs"]
    if not rows or rows[0]["ndcg_after"] is None:
        return None
    i = max(range(len(rows)), key=lambda j: rows[j]["ndcg_after"])
    return {"run": i + 1, "after": {"overall": {"nDCG@10": rows[i]["ndcg_after"]},
                                    "per_language": rows[i]["per_language_after"]}}


def refusal_message(report: dict) -> str:
    """Why nothing was published: the sweep table, the best run's languages and its reasons."""
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

