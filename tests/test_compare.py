"""Comparing runs: statistics pinned on constructed scores, refusals of runs that cannot be compared,
and the tables the Compare page and the report show, built on real run rows with chosen scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from core import compare, dataset, runs
from core.decoding import DecodingParams
from core.errors import BadInput
from core.formats import PairRow
from core.scoring import ScorerConfig, scorer_stamp
from core.store import Store, now

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
    """A run over pairs offset.. of `data` whose answers score the given F1s (a tuple: one per repeat).

    Precision, recall and ROUGE-L are set to the F1 too; the answer text names the run, pair and repeat.
    """
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
    with store.transaction() as conn:
        for pair, values in zip(pairs, f1s):
            for repeat, f1 in enumerate(values if isinstance(values, tuple) else (values,)):
                generation = conn.execute(
                    "INSERT INTO generations (run_id, pair_id, repeat, answer, created_at) VALUES (?, ?, ?, ?, ?)",
                    (run_id, pair.id, repeat, f"run {run_id} pair {pair.id} repeat {repeat}", now()),
                ).lastrowid
                conn.execute(
                    "INSERT INTO scores (generation_id, scorer, precision, recall, f1, f1_rescaled, rouge_l,"
                    " created_at) VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                    (generation, scorer, f1, f1, f1, f1, now()),
                )
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


def test_preset_runs_pick_baseline_best_decoding_and_fine_tuned(store):
    nothing = {"baseline": None, "best_decoding": None, "fine_tuned": None}
    assert compare.preset_runs(store) == nothing
    baseline = make_run(store, [0.3, 0.35])
    best = make_run(store, [0.5, 0.45], params=DecodingParams(temperature=0.0), kind="sweep")
    make_run(store, [0.4], params=DecodingParams(temperature=1.0), kind="sweep")
    tuned = make_run(store, [0.8], kind="evaluate", adapter="adapters/run-1")
    assert compare.preset_runs(store) == {"baseline": baseline, "best_decoding": best, "fine_tuned": tuned}
    assert compare.preset_runs(store, dataset="none-such") == nothing


def test_without_a_default_run_the_baseline_is_the_first_run_of_the_latest_sweep(store):
    sweep = store.execute(
        "INSERT INTO sweeps (dataset_id, config, created_at) VALUES (?, '{}', ?)",
        (dataset.dataset_id(store, "starter"), now()),
    ).lastrowid
    first, second = (make_run(store, [f1], params=DecodingParams(top_k=k)) for f1, k in ((0.4, 1), (0.3, 2)))
    store.execute("UPDATE runs SET sweep_id = ? WHERE id IN (?, ?)", (sweep, first, second))
    assert compare.preset_runs(store)["baseline"] == first
