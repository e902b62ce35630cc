"""core.stats: summaries and bootstrap confidence intervals of score distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import BadInput
from core.stats import Summary, agreement, bootstrap_ci, summarize


def test_the_interval_of_a_normal_sample_holds_the_true_mean_and_has_the_textbook_width():
    values = np.random.default_rng(1).normal(loc=0.4, scale=0.1, size=400)
    low, high = bootstrap_ci(values)
    assert low < 0.4 < high
    textbook_half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(textbook_half_width, rel=0.2)


def test_about_95_percent_of_intervals_hold_the_true_mean():
    rng = np.random.default_rng(2)
    hits = [low < 0.5 < high for low, high in (bootstrap_ci(rng.normal(0.5, 1, 60), n_boot=500) for _ in range(300))]
    assert 0.9 <= np.mean(hits) <= 0.99


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    values = np.random.default_rng(3).uniform(size=50)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)
    assert summarize(values) == summarize(values)


def test_other_statistics_and_narrower_levels():
    values = np.random.default_rng(4).exponential(size=200)
    low, high = bootstrap_ci(values, statistic=np.median)
    assert low < np.median(values) < high
    low90, high90 = bootstrap_ci(values, alpha=0.1)
    low95, high95 = bootstrap_ci(values, alpha=0.05)
    assert high90 - low90 < high95 - low95


def test_large_samples_are_resampled_in_blocks():
    values = np.random.default_rng(5).normal(size=30_000)  # 2,000 x 30,000 draws would not fit in one block
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high


def test_summary_figures():
    s = summarize([0.2, 0.4, 0.6, 0.8])
    assert (s.n, s.mean, s.median) == (4, pytest.approx(0.5), pytest.approx(0.5))
    assert s.std == pytest.approx(np.std([0.2, 0.4, 0.6, 0.8], ddof=1))
    assert 0.2 <= s.ci_low < 0.5 < s.ci_high <= 0.8


def test_no_values_give_nans_and_one_value_a_zero_width_interval():
    empty = summarize([])
    assert empty.n == 0
    assert all(math.isnan(getattr(empty, name)) for name in ("mean", "median", "std", "ci_low", "ci_high"))
    assert summarize([0.42]) == Summary(n=1, mean=0.42, median=0.42, std=0.0, ci_low=0.42, ci_high=0.42)
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)


def test_missing_scores_are_left_out():
    assert summarize([0.3, float("nan"), 0.5]) == summarize([0.3, 0.5])


def test_bad_arguments_are_refused():
    with pytest.raises(BadInput):
        bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(BadInput):
        bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(BadInput):
        summarize([[1.0, 2.0], [3.0, 4.0]])


VERDICTS = ("a", "b", "tie")


def test_a_rater_that_always_agrees_has_kappa_1_and_a_diagonal_confusion_table():
    humans = ["a", "b", "tie", "a", "b", "a"] * 5
    result = agreement(humans, list(humans), VERDICTS)
    assert (result.n, result.equal_share, result.kappa) == (30, 1.0, 1.0)
    assert result.ci_low == result.ci_high == 1.0
    assert result.confusion == ((15, 0, 0), (0, 10, 0), (0, 0, 5))


def test_a_rater_answering_at_random_has_kappa_near_0_inside_its_interval():
    rng = np.random.default_rng(4)
    humans, judge = (list(rng.choice(VERDICTS, size=300)) for _ in range(2))
    result = agreement(humans, judge, VERDICTS)
    assert abs(result.kappa) < 0.1
    assert result.ci_low < 0 < result.ci_high
    assert result.ci_low < result.kappa < result.ci_high


def test_kappa_takes_out_the_agreement_chance_gives_and_reads_the_confusion_table_row_by_first_rater():
    # 80 % equal, yet both say "a" 70 % of the time: chance alone gives 0.7*0.7 + 0.3*0.3 = 58 %.
    first = ["a"] * 60 + ["b"] * 20 + ["a"] * 10 + ["b"] * 10
    second = ["a"] * 60 + ["b"] * 20 + ["b"] * 10 + ["a"] * 10
    result = agreement(first, second, ("a", "b"))
    assert result.equal_share == pytest.approx(0.8)
    assert result.kappa == pytest.approx((0.8 - 0.58) / (1 - 0.58))
    assert result.confusion == ((60, 10), (10, 20))


def test_agreement_with_one_label_everywhere_or_no_items_is_nan_and_bad_labels_are_refused():
    assert math.isnan(agreement(["a"] * 5, ["a"] * 5, VERDICTS).kappa)
    empty = agreement([], [], VERDICTS)
    assert empty.n == 0 and math.isnan(empty.kappa) and empty.confusion == ((0,) * 3,) * 3
    with pytest.raises(BadInput, match="among a, b, tie"):
        agreement(["a", "maybe"], ["a", "b"], VERDICTS)
    with pytest.raises(BadInput, match="equal length"):
        agreement(["a"], [], VERDICTS)
