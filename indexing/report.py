"""Evaluation reports: JSON, a Markdown summary and quality plots.

:func:`write_report` compares several runs (one per index, codec setting or MRL
dimension) side by side. Everything is written through :class:`storage.fs.Location`
so a report can live next to the index on s3://.

Plots are drawn along the "axes" :data:`AXES` (``nbits`` and ``dim`` in each
label's meta). For one axis, labels are grouped by every *other* setting in
:data:`SETTING_KEYS` (e.g. ``kind`` and ``dim`` for the nbits plot), and the group
covering the most distinct values of the axis is drawn, so a line never mixes
two index kinds or two dimensions. Other meta entries (paths, timings) are
reported but ignored for grouping.
"""
from __future__ import annotations

import io
import json
import logging
from typing import Iterable

from indexing.metrics import METRIC_KEYS, EvalResult
from storage.fs import Location, location

logger = logging.getLogger(__name__)

#: Settings a plot can run along, and the plot file for each.
AXES = {"nbits": "quality_vs_nbits.png", "dim": "quality_vs_dim.png"}
#: Meta keys that define a configuration when grouping labels for a plot.
SETTING_KEYS = ("kind", "nbits", "dim")
#: Axis labels for the plots.
_AXIS_TITLES = {"nbits": "bits per residual dimension (nbits)", "dim": "MRL dimension"}
PLOT_METRIC = "nDCG@10"


def write_report(results: dict[str, EvalResult], out: "Location | str", *, title: str,
                 meta: dict[str, dict] | None = None) -> dict:
    """Write ``report.json``, ``report.md`` and plots comparing labelled results.

    Parameters
    ----------
    results : dict
        ``{label: EvalResult}``, e.g. ``{"plaid-nbits2": ..., "xq-ivfpq": ...}``;
        the order is kept in tables.
    out : Location or str
        Folder to write into (local or s3://).
    title : str
        Report heading.
    meta : dict, optional
        ``{label: {"kind": "plaid", "nbits": 2, "dim": 384, ...}}``. ``nbits`` and
        ``dim`` must be numbers; when labels differ in them,
        ``quality_vs_nbits.png`` / ``quality_vs_dim.png`` plot nDCG@10 (one line
        per language plus overall).

    Returns
    -------
    dict
        ``{"json": url, "markdown": url, "plots": [url, ...]}``.

    Raises
    ------
    ValueError
        No results, meta for unknown labels, or a non-numeric ``nbits``/``dim``.
    """
    meta = _check_inputs(results, meta or {})
    folder = location(out)
    plots = _write_plots(results, meta, folder)
    json_loc = folder.join("report.json")
    json_loc.write_text(json.dumps(_report_json(results, meta, title, plots), indent=2,
                                   ensure_ascii=False) + "\n")
    md_loc = folder.join("report.md")
    md_loc.write_text(render_markdown(results, meta, title=title, plots=[p.name for p in plots]))
    logger.info("wrote report for %d result(s) to %s", len(results), folder.url)
    return {"json": json_loc.url, "markdown": md_loc.url, "plots": [p.url for p in plots]}


def _check_inputs(results: dict[str, EvalResult], meta: dict[str, dict]) -> dict[str, dict]:
    if not results:
        raise ValueError("write_report: no results to report")
    unknown = sorted(set(meta) - set(results))
    if unknown:
        raise ValueError(f"write_report: meta given for labels without results: {unknown}; "
                         f"labels: {list(results)}")
    for label, desc in meta.items():
        for key in AXES:
            value = desc.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"write_report: meta[{label!r}][{key!r}] must be a number, got {value!r}")
    return {label: dict(meta.get(label, {})) for label in results}


def _report_json(results: dict[str, EvalResult], meta: dict[str, dict], title: str,
                 plots: list[Location]) -> dict:
    return {
        "title": title,
        "metrics": list(METRIC_KEYS),
        "labels": list(results),
        "results": {label: {"meta": meta[label], **r.to_dict()} for label, r in results.items()},
        "plots": [p.name for p in plots],
    }


# ---- markdown -----------------------------------------------------------------------
def render_markdown(results: dict[str, EvalResult], meta: dict[str, dict], *, title: str,
                    plots: Iterable[str] = ()) -> str:
    """The Markdown report: overall table, per-language nDCG@10, notes, plots."""
    parts = [f"# {title}", "", "## Overall", "", *_overall_table(results, meta), "",
             f"## {PLOT_METRIC} by language", "", *_language_table(results), "",
             "## Notes", "", *_notes(results), ""]
    plots = list(plots)
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{name.rsplit('.', 1)[0].replace('_', ' ')}]({name})\n" for name in plots]
    return "\n".join(parts)


def _overall_table(results: dict[str, EvalResult], meta: dict[str, dict]) -> list[str]:
    meta_keys = _meta_columns(meta)
    header = ["label", *meta_keys, *METRIC_KEYS, "queries"]
    rows = [[label, *(_cell(meta[label].get(k)) for k in meta_keys),
             *(_fmt(r.overall.get(k)) for k in METRIC_KEYS), str(r.overall.get("queries", ""))]
            for label, r in results.items()]
    return _table(header, rows, left=1 + len(meta_keys))


def _language_table(results: dict[str, EvalResult]) -> list[str]:
    langs = sorted({lang for r in results.values() for lang in r.per_language})
    rows = [[lang, *(_fmt(r.per_language.get(lang, {}).get(PLOT_METRIC)) for r in results.values())]
            for lang in langs]
    rows.append(["**overall**", *(_fmt(r.overall.get(PLOT_METRIC)) for r in results.values())])
    return _table(["lang", *results], rows)


def _notes(results: dict[str, EvalResult]) -> list[str]:
    notes = []
    for label, r in results.items():
        if r.missing_docs:
            notes.append(f"- `{label}`: {_plural(r.missing_docs, 'judgement', 'judgements')} "
                         "naming documents absent from the corpus (counted as not retrieved).")
        if r.unjudged_queries:
            notes.append(f"- `{label}`: {_plural(r.unjudged_queries, 'query', 'queries')} "
                         "without judgements skipped.")
    return notes or ["- No judgements name missing documents; every query was judged."]


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _meta_columns(meta: dict[str, dict]) -> list[str]:
    """Scalar meta keys present for any label: settings first, then the rest sorted."""
    keys = {k for desc in meta.values() for k, v in desc.items()
            if v is None or isinstance(v, (str, int, float, bool))}
    return [k for k in SETTING_KEYS if k in keys] + sorted(keys - set(SETTING_KEYS))


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Markdown table lines; the first ``left`` columns left-aligned, numbers right-aligned."""
    aligns = ["---"] * left + ["--:"] * (len(header) - left)
    return ["| " + " | ".join(map(_escape, line)) + " |" for line in [header]] + \
        ["|" + "|".join(aligns) + "|"] + ["| " + " | ".join(map(_escape, row)) + " |" for row in rows]


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _cell(value: object) -> str:
    return "" if value is None else str(value)


# ---- plots --------------------------------------------------------------------------
def _write_plots(results: dict[str, EvalResult], meta: dict[str, dict],
                 folder: Location) -> list[Location]:
    written = []
    for axis, filename in AXES.items():
        labels, fixed = plot_series(meta, axis)
        if not labels:
            continue
        loc = folder.join(filename)
        loc.write_bytes(_plot_png({lab: results[lab] for lab in labels}, meta, axis, fixed))
        written.append(loc)
    return written


def plot_series(meta: dict[str, dict], axis: str) -> tuple[list[str], dict]:
    """Labels to plot along ``axis`` and the settings held fixed for them.

    Labels are grouped by their other :data:`SETTING_KEYS`; the group with the
    most distinct ``axis`` values wins (the first in label order on ties), keeping
    the first label for each value. Returns ``([], {})`` when no group has two
    distinct values.

    Returns
    -------
    (labels, fixed)
        Labels sorted by their ``axis`` value; ``fixed`` maps the other settings
        to their shared values.
    """
    groups: dict[tuple, dict[float, str]] = {}
    for label, desc in meta.items():
        if desc.get(axis) is None:
            continue
        key = tuple((k, desc.get(k)) for k in SETTING_KEYS if k != axis and desc.get(k) is not None)
        groups.setdefault(key, {}).setdefault(desc[axis], label)
    best = max(groups.items(), key=lambda kv: len(kv[1]), default=(None, {}))
    if len(best[1]) < 2:
        return [], {}
    return [best[1][v] for v in sorted(best[1])], dict(best[0])


def _plot_png(results: dict[str, EvalResult], meta: dict[str, dict], axis: str, fixed: dict) -> bytes:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch or state.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    xs = [meta[label][axis] for label in results]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    langs = sorted({lang for r in results.values() for lang in r.per_language})
    colors = colormaps["tab20" if len(langs) > 10 else "tab10"]
    for i, lang in enumerate(langs):
        ys = [r.per_language.get(lang, {}).get(PLOT_METRIC, float("nan")) for r in results.values()]
        ax.plot(xs, ys, marker="o", linewidth=1, alpha=0.8, color=colors(i % colors.N), label=lang)
    ax.plot(xs, [r.overall[PLOT_METRIC] for r in results.values()], marker="s", linewidth=2.5,
            color="black", label="overall")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(_AXIS_TITLES.get(axis, axis))
    ax.set_ylabel(PLOT_METRIC)
    held = ", ".join(f"{k}={v}" for k, v in fixed.items())
    ax.set_title(f"{PLOT_METRIC} vs {axis}" + (f" ({held})" if held else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()
