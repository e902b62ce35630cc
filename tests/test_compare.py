"""Comparing runs: statistics pinned on constructed scores, refusals of runs that cannot be compared,
and the tables the Compare page and the report show, built on real run rows with chosen scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from core import compare, dataset, jobs, runs, sweep
from core.decoding import DecodingParams
from core.errors import BadInput
from core.formats import PairRow
from core.scoring import ScorerConfig, scorer_stamp
from core.store import Store
from tests.test_sweep import A, B, scored_sweep, store_scores

STAMP = scorer_stamp(ScorerConfig())


def make_run(
    store: Store,
    f1s: list[float | tuple[float, ...]],
    *,
    offset: int = 0,
    scorer: str = STAMP,
    data: str = "starter",
    part: str = "all",
    params: DecodingParams | None = None,
    **spec,
) -> int:
    """A run over pairs offset.. of `data` whose answers score the given F1s (a tuple: one per repeat)."""
    repeats = max(len(f) if isinstance(f, tuple) else 1 for f in f1s)
    run_id = runs.create_run(
        store,
        runs.RunSpec(
            dataset=data,
            backend="echo",
            part=part,
            limit=offset + len(f1s),
            repeats=repeats,
            params=params or DecodingParams(),
            scorer=scorer,
            **spec,
        ),
    )
    pairs = runs.run_pairs(store, runs.get_run(store, run_id))[offset:]
    store_scores(store, run_id, {pair.id: values for pair, values in zip(pairs, f1s)}, scorer)
    return run_id


# ---- paired differences on plain arrays ----------------------------------------------------


def test_a_known_paired_difference_is_recovered_within_its_interval():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.3, 0.45, 96)
    b = a + 0.1 + rng.normal(0, 0.01, 96)
    result = compare.paired_difference(a, b)
    assert result.n == 96
    assert result.mean_diff == pytest.approx(0.1, abs=0.005)
    assert result.ci_low < 0.1 < result.ci_high
    assert result.ci_high - result.ci_low < 0.01
    assert result.p_wilcoxon < 1e-10
    assert result.effect_size == pytest.approx(result.mean_diff / np.std(b - a, ddof=1))
    assert result.rank_biserial == 1.0  # b wins every pair


def test_the_difference_is_b_minus_a():
    result = compare.paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
    assert result.mean_diff == pytest.approx(-0.4 / 3)
    assert result.rank_biserial == -1.0


def test_identical_runs_differ_by_nothing():
    a = np.linspace(0.2, 0.6, 30)
    result = compare.paired_difference(a, a.copy())
    assert (result.n, result.mean_diff, result.ci_low, result.ci_high) == (30, 0.0, 0.0, 0.0)
    assert result.p_wilcoxon == 1.0
    assert result.effect_size == 0.0


def test_pairs_with_a_missing_side_are_left_out():
    result = compare.paired_difference([0.1, np.nan, 0.3], [0.2, 0.5, np.nan])
    assert result.n == 1
    assert result.mean_diff == pytest.approx(0.1)
    assert np.isnan(compare.paired_difference([np.nan], [0.1]).mean_diff)
    with pytest.raises(BadInput, match="one length"):
        compare.paired_difference([0.1, 0.2], [0.1])


# ---- what may be compared ------------------------------------------------------------------


def test_runs_of_one_scorer_dataset_and_split_with_shared_questions_are_comparable(store):
    compare.check_comparable(store, [make_run(store, [0.4, 0.5]), make_run(store, [0.5, 0.6, 0.7])])


def test_runs_scored_with_different_scorers_are_refused(store):
    one, other = make_run(store, [0.4]), make_run(store, [0.4], scorer=STAMP + "-rescaled")
    with pytest.raises(BadInput, match="different scorer stamps"):
        compare.check_comparable(store, [one, other])


def test_runs_on_different_datasets_are_refused(store):
    dataset.add_pairs(store, "other", [PairRow("What is a p-value?", "A probability.")], "accepted")
    with pytest.raises(BadInput, match="different datasets"):
        compare.check_comparable(store, [make_run(store, [0.4]), make_run(store, [0.4], data="other")])


def test_runs_on_different_split_versions_or_parts_are_refused(store):
    dataset.make_split(store, "starter")
    first = make_run(store, [0.4], part="test")
    dataset.make_split(store, "starter", seed=7)
    second = make_run(store, [0.4], part="test")
    with pytest.raises(BadInput, match="different split versions"):
        compare.check_comparable(store, [first, second])
    with pytest.raises(BadInput, match="different parts"):
        compare.check_comparable(store, [second, make_run(store, [0.4], part="train")])


def test_runs_without_a_shared_question_are_refused(store):
    with pytest.raises(BadInput, match="no scored question in common"):
        compare.check_comparable(store, [make_run(store, [0.4, 0.5]), make_run(store, [0.4], offset=2)])


def test_a_run_without_scores_is_refused(store):
    unscored = runs.create_run(store, runs.RunSpec(dataset="starter", backend="echo", part="all", limit=2))
    with pytest.raises(BadInput, match=f"run {unscored} has no scores"):
        compare.check_comparable(store, [make_run(store, [0.4]), unscored])


# ---- tables --------------------------------------------------------------------------------


def test_per_question_averages_repeats_and_shows_the_first_answer(store):
    one = make_run(store, [(0.2, 0.4), (0.6, 0.8)])
    other = make_run(store, [0.5], offset=1)
    frame = compare.per_question(store, [one, other])
    assert list(frame.columns) == ["pair_id", "question", "reference", f"answer_{one}", one, f"answer_{other}", other]
    assert frame[one].tolist() == pytest.approx([0.3, 0.7])
    assert np.isnan(frame[other][0]) and frame[other][1] == 0.5  # the other run skipped the first question
    assert frame[f"answer_{one}"][0].endswith("repeat 0")
    assert frame["question"].notna().all()


def test_summary_table_against_a_baseline(store):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.45, 40)
    better = base + 0.1 + rng.normal(0, 0.01, 40)
    baseline = make_run(store, base.tolist())
    improved = make_run(store, better[:30].tolist())  # answered only the first 30 questions
    same = make_run(store, base.tolist())
    table = compare.summary_table(store, [baseline, improved, same], baseline_run=baseline, threshold=0.4)
    rows = table.set_index("run")

    assert rows.loc[baseline, "n"] == 40
    assert rows.loc[baseline, "mean"] == pytest.approx(base.mean())
    assert rows.loc[baseline, "ci_low"] < base.mean() < rows.loc[baseline, "ci_high"]
    assert rows.loc[baseline, "share_above"] == pytest.approx((base >= 0.4).mean())
    assert rows.loc[baseline, ["n_shared", "mean_diff", "p_wilcoxon", "effect_size"]].isna().all()

    assert rows.loc[improved, "n_shared"] == 30
    assert rows.loc[improved, "mean_diff"] == pytest.approx((better[:30] - base[:30]).mean())
    assert rows.loc[improved, "diff_ci_low"] < 0.1 < rows.loc[improved, "diff_ci_high"]
    assert rows.loc[improved, "p_wilcoxon"] < 1e-6

    assert rows.loc[same, "mean_diff"] == 0.0
    assert rows.loc[same, "p_wilcoxon"] == 1.0


def test_summary_table_without_a_baseline_has_no_difference_columns(store):
    one, other = make_run(store, [0.4, 0.6]), make_run(store, [0.5, 0.5])
    table = compare.summary_table(store, [one, other], metric="rouge_l")
    assert list(table.columns) == ["run", "n", "mean", "median", "std", "ci_low", "ci_high", "share_above"]
    with pytest.raises(BadInput, match="not one of the compared runs"):
        compare.summary_table(store, [one], baseline_run=other)
    with pytest.raises(BadInput, match="metric must be one of"):
        compare.summary_table(store, [one], metric="bleu")


def test_config_diff_keeps_only_the_settings_that_differ(store):
    one = make_run(store, [0.4], params=DecodingParams(temperature=0.0), label="greedy")
    other = make_run(store, [0.4], params=DecodingParams(temperature=0.7), label="warm")
    diff = compare.config_diff(store, [one, other])
    assert list(diff.columns) == ["run", "label", "temperature"]
    assert diff.to_dict("records") == [
        {"run": one, "label": "greedy", "temperature": 0.0},
        {"run": other, "label": "warm", "temperature": 0.7},
    ]
    assert list(compare.config_diff(store, [one]).columns) == ["run"]


# ---- optimistic comparisons and the preset -----------------------------------------------------


def test_a_best_of_n_compared_on_the_questions_it_was_chosen_on_is_marked_optimistic(starter):
    honest = scored_sweep(starter, [A, B], part="validation")
    a, b = (r.id for r in sweep.sweep_runs(starter, honest))
    leaky = scored_sweep(starter, [A, B], part="test")  # as sweeps chose before: on the test part
    leaky_best = sweep.sweep_runs(starter, leaky)[1].id
    assert compare.selection_notes(starter, [a, b]) == [
        f"run {a}: best of 2 configurations of sweep {honest} by mean F1 on validation, chosen on 11 of the 11"
        " questions it is scored on: optimistic"
    ]
    assert compare.selection_notes(starter, [leaky_best]) == [
        f"run {leaky_best}: best of 2 configurations of sweep {leaky} by mean F1 on test, chosen on 23 of the 23"
        " questions it is scored on: optimistic"
    ]


def test_a_chosen_run_is_marked_only_where_it_is_scored_on_questions_it_was_chosen_on(starter):
    validation = [p.id for p in dataset.select_pairs(starter, "starter", "validation")]
    selection = {
        "how": "best of 4 trials by mean F1 on validation",
        "candidates": 4,
        "split_id": dataset.latest_split(starter, "starter").id,
        "part": "validation",
        "pair_ids": validation,
    }
    on_test = make_run(starter, [0.5] * 3, part="test", selection=selection)
    on_validation = make_run(starter, [0.5] * 3, part="validation", selection=selection)
    alone = make_run(starter, [0.5] * 3, part="validation", selection={**selection, "candidates": 1})
    assert compare.selection_notes(starter, [on_test, on_validation, alone]) == [
        f"run {on_validation}: best of 4 trials by mean F1 on validation, chosen on 3 of the 3 questions it is"
        " scored on: optimistic"
    ]


def test_the_preset_chooses_on_validation_then_compares_that_configurations_test_run(starter):
    nothing = compare.preset_runs(starter)
    assert nothing.run_ids == [] and "no sweep has validation scores" in nothing.note
    honest = scored_sweep(starter, [A, B], part="validation", limit=4)
    scored_sweep(starter, [B, A], part="test", limit=4)  # newer, but chosen on test: never the preset's pick
    chosen = sweep.sweep_runs(starter, honest)[0]  # A, the best on validation

    waiting = compare.preset_runs(starter)
    assert waiting.best_decoding is None and waiting.to_confirm == honest
    assert f"sweep {honest}'s best (run {chosen.id}) is chosen on validation: confirm it on test first" == waiting.note

    run_id, job_id = sweep.confirm_best(starter, honest)
    assert jobs.wait(starter, job_id, timeout=180).state == "done"
    baseline = make_run(starter, [0.3] * 4, part="test")  # default decoding, on the test part of the same split
    make_run(starter, [0.3] * 4, part="validation")  # newer, but not comparable with a test run
    tuned = make_run(starter, [0.8] * 4, part="test", kind="evaluate", adapter="adapters/run-1")
    preset = compare.preset_runs(starter)
    assert (preset.baseline, preset.best_decoding, preset.fine_tuned, preset.note) == (baseline, run_id, tuned, "")
    assert runs.get_run(starter, run_id).params == chosen.params
    compare.check_comparable(starter, preset.run_ids)
    assert compare.selection_notes(starter, preset.run_ids) == []  # the test run was not chosen on test
    assert compare.selection_notes(starter, [chosen.id])  # the same configuration on the questions it won on
    assert compare.preset_runs(starter, dataset="none-such").run_ids == []


def test_without_a_default_run_the_baseline_is_the_first_run_of_the_latest_sweep(starter):
    sweep_id = scored_sweep(starter, [A, B], baseline=DecodingParams(top_k=1))  # no run at the defaults
    assert compare.preset_runs(starter).baseline == sweep.sweep_runs(starter, sweep_id)[0].id
