"""The comparison of runs as files: fetches their scores through core.compare, draws them with
workbench.figures and hands both to core.html_report to render; writes the CSV tables too. The CLI's
`compare` and the Compare page share it.

Nothing is written until every table and figure is built, so bad input leaves no half a report, and
each file is written beside and renamed into place (core.files), so a reader never sees half of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core import compare, files, formats, html_report, judging, runs
from core.store import Store
from workbench import figures


def run_names(store: Store, run_ids: Sequence[int]) -> dict[int, str]:
    """How the report names each run: "run 7", or "run 7 (label)" when it has a label."""
    out = {}
    for run_id in run_ids:
        label = runs.get_run(store, run_id).label
        out[run_id] = f"run {run_id} ({label})" if label else f"run {run_id}"
    return out


def differing_answers(per_question: pd.DataFrame, names: dict[int, str], metric_label: str, top: int) -> pd.DataFrame:
    """The `top` questions whose scores spread most across runs (max - min), with each run's score and answer."""
    scores = per_question[list(names)]
    picked = per_question.assign(_spread=scores.max(axis=1) - scores.min(axis=1)).nlargest(top, "_spread")
    out = picked[["question", "reference"]].assign(**{f"{metric_label} spread": picked["_spread"]})
    for run_id, name in names.items():
        out[f"{name} {metric_label}"] = picked[run_id]
        out[f"{name} answer"] = picked[f"answer_{run_id}"]
    return out


def build_report(
    store: Store, run_ids: Sequence[int], metric: str = "f1", baseline_run: int | None = None, top: int = 10
) -> str:
    """The HTML report comparing `run_ids` on `metric` (refuses incomparable runs with BadInput)."""
    summary = compare.summary_table(store, run_ids, metric=metric, baseline_run=baseline_run)  # checks first
    label = compare.METRICS[metric]
    names = run_names(store, run_ids)
    configs = compare.config_diff(store, run_ids)
    per_question = compare.per_question(store, run_ids, metric=metric)
    scores = {name: per_question[run_id].tolist() for run_id, name in names.items()}  # per-question means
    side_by_side = figures.score_histograms(scores, label)
    side_by_side.update_layout(title=f"{label} per run", margin={"t": 90})
    overlaid = figures.overlaid_histograms(scores, label)
    overlaid.update_layout(title=f"{label} of all runs, overlaid")
    tables = {"Summary": summary, "Run configurations": configs}
    judged = judging.results_table(store, run_ids)
    if not judged.empty:  # every judge's result beside the humans' verdicts and its agreement with them
        tables["LLM judges beside the blind human ratings"] = judged
    return html_report.render_report(
        f"Comparison of {', '.join(names.values())}: {label}",
        [side_by_side, overlaid],
        tables,
        differing_answers(per_question, names, label, top),
        compare.selection_notes(store, run_ids),
    )


def write_report(
    store: Store,
    run_ids: Sequence[int],
    path: str | Path,
    metric: str = "f1",
    baseline_run: int | None = None,
    top: int = 10,
) -> Path:
    """Build the report, then write it to `path` (nothing is written when building fails)."""
    html = build_report(store, run_ids, metric=metric, baseline_run=baseline_run, top=top)
    return files.write_bytes(path, html.encode("utf-8"))


def tables_csv(
    store: Store, run_ids: Sequence[int], metric: str = "f1", baseline_run: int | None = None
) -> dict[str, bytes]:
    """summary.csv and per_question.csv of the comparison, by file name; text cells are spreadsheet-safe (see
    core.formats), since they hold model answers."""
    frames = {
        "summary.csv": compare.summary_table(store, run_ids, metric=metric, baseline_run=baseline_run),
        "per_question.csv": compare.per_question(store, run_ids, metric=metric),
    }
    return {
        name: frame.map(formats.spreadsheet_safe).to_csv(index=False).encode("utf-8") for name, frame in frames.items()
    }


def write_tables_csv(
    store: Store, run_ids: Sequence[int], folder: str | Path, metric: str = "f1", baseline_run: int | None = None
) -> list[Path]:
    """The tables of `tables_csv` written into `folder` (created if missing)."""
    tables = tables_csv(store, run_ids, metric, baseline_run)  # all built before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [files.write_bytes(folder / name, data) for name, data in tables.items()]
