"""Comparing runs: per-question scores side by side, honest statistics between runs, and what differs.

Runs are compared only when their numbers mean the same thing: one scorer stamp, one dataset,
one split version and part, the same question and reference texts (each run froze them when it was
made), and at least one question in common (`check_comparable`). Differences
between runs are paired on the questions both answered, with a bootstrap interval, a Wilcoxon
signed-rank test and an effect size. This module reads the store and never writes it, never draws.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from core import runs, scoring, sweep
from core.decoding import DecodingParams
from core.errors import BadInput
from core.stats import bootstrap_ci, summarize
from core.store import Store

METRICS = {
    "f1": "BERTScore F1",
    "precision": "BERTScore precision",
    "recall": "BERTScore recall",
    "f1_rescaled": "rescaled F1",
    "rouge_l": "ROUGE-L",
}
_DIFF_COLUMNS = ["n_shared", "mean_diff", "diff_ci_low", "diff_ci_high", "p_wilcoxon", "effect_size", "rank_biserial"]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise BadInput(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def _stamp(store: Store, run: runs.Run) -> str:
    """The scorer stamp a run's numbers come from: its own, else the only one its scores carry."""
    if run.scorer:
        return run.scorer
    stamps = scoring.run_stamps(store, run.id)
    if len(stamps) > 1:
        raise BadInput(f"run {run.id} has scores from {len(stamps)} scorers and names none of them")
    return stamps[0] if stamps else ""


def _scores(store: Store, run_id: int) -> pd.DataFrame:
    return scoring.run_scores(store, run_id, _stamp(store, runs.get_run(store, run_id)))


def per_question(store: Store, run_ids: Sequence[int], metric: str = "f1") -> pd.DataFrame:
    """One row per question any run answered: pair_id, question, reference, then per run its score
    averaged over repeats (column = the run id; NaN where it has none) and its first answer (`answer_<id>`).
    """
    _check_metric(metric)
    frame = pd.DataFrame(columns=["pair_id", "question", "reference"])
    for run_id in run_ids:
        rows = _scores(store, run_id).sort_values(["pair_id", "repeat"])
        by_pair = rows.groupby("pair_id", sort=True)
        own = by_pair[["question", "reference", "answer"]].first()
        own[run_id] = by_pair[metric].mean()  # NaN scores are skipped; all-NaN stays NaN
        own = own.rename(columns={"answer": f"answer_{run_id}"}).reset_index()
        frame = frame.merge(own, on=["pair_id", "question", "reference"], how="outer")
    return frame.sort_values("pair_id").reset_index(drop=True)


def check_comparable(store: Store, run_ids: Sequence[int]) -> None:
    """Raise BadInput with the reason when these runs' numbers cannot be set side by side."""
    if not run_ids:
        raise BadInput("choose at least one run")
    if len(set(run_ids)) != len(run_ids):
        raise BadInput("a run is chosen twice")
    chosen = [runs.get_run(store, i) for i in run_ids]
    stamps = {run.id: _stamp(store, run) for run in chosen}
    for run in chosen:
        if not stamps[run.id]:
            raise BadInput(f"run {run.id} has no scores yet")
    for what, value in (
        ("scorer stamps", lambda r: stamps[r.id]),
        ("datasets", lambda r: r.dataset),
        ("split versions", lambda r: r.split_version),
        ("parts", lambda r: r.part),
    ):
        values = {r.id: value(r) for r in chosen}
        if len(set(values.values())) > 1:
            listed = "; ".join(f"run {i}: {v if v is not None else 'none'}" for i, v in values.items())
            raise BadInput(f"the runs have different {what} ({listed})")
    if edited := _edited_between(store, run_ids):
        first = edited[0]
        raise BadInput(
            f"the runs were asked or scored on different texts of {len(edited)} question(s): pair"
            f" {first['pair_id']} was edited between runs {first['run_ids']}; compare runs made on the same texts"
        )
    shared: set[int] | None = None
    for run_id in run_ids:
        scored = _scores(store, run_id).dropna(subset=["f1"])
        shared = set(scored["pair_id"]) if shared is None else shared & set(scored["pair_id"])
    if not shared:
        raise BadInput("the runs have no scored question in common")


def _edited_between(store: Store, run_ids: Sequence[int]) -> list:
    """The questions these runs share whose frozen question or reference text differs between them."""
    return store.query(
        "SELECT pair_id, GROUP_CONCAT(run_id, ', ') AS run_ids FROM run_pairs"
        f" WHERE run_id IN ({','.join('?' * len(run_ids))}) GROUP BY pair_id"
        " HAVING COUNT(DISTINCT question) > 1 OR COUNT(DISTINCT reference) > 1 ORDER BY pair_id",
        tuple(run_ids),
    )


@dataclass(frozen=True)
class PairedResult:
    n: int
    mean_diff: float  # mean of b - a
    ci_low: float  # 95 % percentile-bootstrap interval of the mean difference
    ci_high: float
    p_wilcoxon: float  # two-sided Wilcoxon signed-rank test; 1.0 when every difference is 0
    effect_size: float  # Cohen's d_z: mean difference / sd of differences (0 when the sd is 0)
    rank_biserial: float  # matched-pairs rank-biserial correlation, -1..1 (share of rank mass b wins minus a wins)


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0
) -> PairedResult:
    """How much b beats a on the same items (b - a); pairs with a NaN on either side are left out."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise BadInput(f"paired values must be two flat lists of one length, got shapes {x.shape} and {y.shape}")
    d = (y - x)[~(np.isnan(x) | np.isnan(y))]
    if d.size == 0:
        nan = float("nan")
        return PairedResult(0, nan, nan, nan, nan, nan, nan)
    low, high = bootstrap_ci(d, np.mean, n_boot=n_boot, seed=seed)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return PairedResult(int(d.size), 0.0, low, high, 1.0, 0.0, 0.0)
    # zsplit: zero differences count half for each side instead of being dropped.
    p = float(sps.wilcoxon(d, zero_method="zsplit").pvalue)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    ranks = sps.rankdata(np.abs(nonzero))
    rank_biserial = float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())
    return PairedResult(int(d.size), float(d.mean()), low, high, p, float(d.mean()) / sd if sd else 0.0, rank_biserial)


@dataclass(frozen=True)
class SummaryRow:
    run: int
    n: int  # scored answers (every repeat)
    mean: float
    median: float
    std: float
    ci_low: float  # 95 % bootstrap interval of the mean
    ci_high: float
    share_above: float  # share of answers scoring at least the threshold
    # Against the baseline run, per-question means on the questions both answered (NaN on its own row).
    n_shared: float = float("nan")
    mean_diff: float = float("nan")
    diff_ci_low: float = float("nan")
    diff_ci_high: float = float("nan")
    p_wilcoxon: float = float("nan")
    effect_size: float = float("nan")
    rank_biserial: float = float("nan")


def summary_table(
    store: Store,
    run_ids: Sequence[int],
    metric: str = "f1",
    baseline_run: int | None = None,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """One SummaryRow per run; the difference columns only when a baseline run is given."""
    _check_metric(metric)
    check_comparable(store, run_ids)
    if baseline_run is not None and baseline_run not in run_ids:
        raise BadInput(f"the baseline run {baseline_run} is not one of the compared runs")
    questions = per_question(store, run_ids, metric) if baseline_run is not None else None
    rows = []
    for run_id in run_ids:
        values = _scores(store, run_id)[metric].dropna().to_numpy()
        s = summarize(values)
        share = float((values >= threshold).mean()) if values.size else float("nan")
        row = SummaryRow(run_id, s.n, s.mean, s.median, s.std, s.ci_low, s.ci_high, share)
        if questions is not None and run_id != baseline_run:
            both = questions[[baseline_run, run_id]].dropna()
            d = paired_difference(both[baseline_run].to_numpy(), both[run_id].to_numpy())
            row = replace(
                row,
                n_shared=d.n,
                mean_diff=d.mean_diff,
                diff_ci_low=d.ci_low,
                diff_ci_high=d.ci_high,
                p_wilcoxon=d.p_wilcoxon,
                effect_size=d.effect_size,
                rank_biserial=d.rank_biserial,
            )
        rows.append(asdict(row))
    table = pd.DataFrame(rows, columns=[f.name for f in fields(SummaryRow)])
    return table if baseline_run is not None else table.drop(columns=_DIFF_COLUMNS)


def _settings(run: runs.Run) -> dict[str, object]:
    """Everything that can make two runs' answers differ, flat, one value per setting."""
    return {
        "kind": run.kind,
        "label": run.label,
        "backend": run.backend,
        "model": Path(run.model).name,
        "model_hash": run.model_hash,
        "adapter": run.adapter,
        **run.params.to_dict(),
        "prompt_template": run.prompt_template,
        "dataset": run.dataset,
        "split_version": run.split_version,
        "part": run.part,
        "scorer": run.scorer,
        "repeats": run.config.get("repeats"),
        "limit": run.config.get("limit"),
        "backend_options": json.dumps(run.config.get("backend_options") or {}, sort_keys=True),
        "engine": runs.engine_mode(run),
    }


def config_diff(store: Store, run_ids: Sequence[int]) -> pd.DataFrame:
    """One row per run: its id, then only the settings whose values differ between the runs."""
    table = pd.DataFrame([{"run": i, **_settings(runs.get_run(store, i))} for i in run_ids])
    differing = [c for c in table.columns[1:] if len({repr(v) for v in table[c]}) > 1]
    return table[["run", *differing]]


def _chosen_on(store: Store, run: runs.Run, choices: dict[int, sweep.Choice]) -> tuple[str, set[int]] | None:
    """How a run was chosen among other candidates, and the questions it was chosen on; None if it was not.

    Either it says so itself (`Run.selection`), or it is the best of its sweep (`sweep.choose`, cached in
    `choices`): sweeps made before runs recorded their selection chose on the questions they were scored on.
    """
    if run.selection.get("candidates", 0) > 1:
        return run.selection["how"], set(run.selection["pair_ids"])
    if run.sweep_id is None:
        return None
    if run.sweep_id not in choices:
        choices[run.sweep_id] = sweep.choose(store, run.sweep_id)
    choice = choices[run.sweep_id]
    if len(choice.ranked) > 1 and choice.best == run.id:
        return choice.how, set(choice.pair_ids)
    return None


def selection_notes(store: Store, run_ids: Sequence[int]) -> list[str]:
    """One line per run compared on questions its settings were chosen on, among other candidates: its score
    there is the best of several noisy estimates on the same questions, so it is biased upward."""
    notes: list[str] = []
    choices: dict[int, sweep.Choice] = {}
    for run_id in run_ids:
        run = runs.get_run(store, run_id)
        chosen = _chosen_on(store, run, choices)
        if chosen is None:
            continue
        how, pair_ids = chosen
        asked = {p.id for p in runs.run_pairs(store, run)}
        if shared := asked & pair_ids:
            notes.append(
                f"run {run.id}: {how}, chosen on {len(shared)} of the {len(asked)} questions it is scored on:"
                " optimistic"
            )
    return notes


@dataclass(frozen=True)
class Preset:
    """The usual question, "baseline vs best decoding vs fine-tuned", as scored run ids (None: no such run)."""

    baseline: int | None
    best_decoding: int | None  # the test run of the best configuration chosen on validation
    fine_tuned: int | None
    note: str = ""  # why best_decoding is missing, and what to do
    to_confirm: int | None = None  # the sweep whose best is chosen but not yet run on test

    @property
    def run_ids(self) -> list[int]:
        """The runs found, each once (the baseline may be the best configuration too)."""
        return list(dict.fromkeys(i for i in (self.baseline, self.best_decoding, self.fine_tuned) if i is not None))


def preset_runs(store: Store, dataset: str | None = None) -> Preset:
    """Baseline, best decoding and fine-tuned runs to compare on the test part.

    best_decoding: the test run (`sweep.confirm_best`) of the best configuration of the latest sweep with
    validation scores, chosen on those (`sweep.choose`); never a best of N on the questions it is compared
    on. baseline: the most recent run without an adapter at the default decoding parameters, else the first
    run of the most recent sweep; fine_tuned: the most recent run with an adapter. Both are taken from the
    test part of the confirmed run's split where such runs exist.
    """
    scored = [s.run for s in runs.list_runs(store) if s.mean_f1 is not None and dataset in (None, s.run.dataset)]
    best, note, to_confirm = None, "", None
    chosen = _latest_validation_choice(store, dataset)
    if chosen is None:
        note = "no sweep has validation scores yet: sweep the validation part to choose a decoding configuration"
    elif (made := sweep.confirmation(store, chosen.sweep_id)) is None:
        note = f"sweep {chosen.sweep_id}'s best (run {chosen.best}) is chosen on validation: confirm it on test first"
        to_confirm = chosen.sweep_id
    elif not any(r.id == made[0] for r in scored):
        note = f"the test run {made[0]} of sweep {chosen.sweep_id}'s best has no scores yet (job {made[1]})"
    else:
        best = runs.get_run(store, made[0])

    def on_test(candidates: list[runs.Run]) -> list[runs.Run]:
        """The candidates comparable with the best configuration's test run, if any are; else all of them."""
        same = [r for r in candidates if best and (r.split_id, r.part) == (best.split_id, best.part)]
        return same or candidates

    plain = [r for r in scored if not r.adapter and r != best]  # a baseline other than what it is the baseline of
    defaults = on_test([r for r in plain if r.params == DecodingParams()])
    latest_sweep = max((r.sweep_id for r in plain if r.sweep_id is not None), default=None)
    swept = on_test([r for r in plain if latest_sweep is not None and r.sweep_id == latest_sweep])
    baseline = defaults[-1] if defaults else swept[0] if swept else None
    tuned = on_test([r for r in scored if r.adapter])
    return Preset(
        baseline=baseline.id if baseline else None,
        best_decoding=best.id if best else None,
        fine_tuned=tuned[-1].id if tuned else None,
        note=note,
        to_confirm=to_confirm,
    )


def _latest_validation_choice(store: Store, dataset: str | None) -> sweep.Choice | None:
    """The choice of the most recent sweep whose best is chosen on validation scores (confirmations left out)."""
    for made in sweep.list_sweeps(store, dataset):
        if made.config.confirms is None:
            choice = sweep.choose(store, made.id)
            if choice.part == "validation" and choice.best is not None:
                return choice
    return None
