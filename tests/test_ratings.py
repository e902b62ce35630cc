"""Blind pairwise rating: a stable random order, verdicts that survive a reload and a pause,
win rates with their interval, and agreement between raters on constructed ratings.
"""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from core import ratings
from core.errors import BadInput
from core.store import Store
from tests.test_compare import make_run


@pytest.fixture
def two_runs(store) -> tuple[int, int]:
    """Two runs sharing questions 2..5 of the starter set (the first run alone answered 0 and 1)."""
    return make_run(store, [0.4] * 6), make_run(store, [0.5] * 4, offset=2)


def test_the_blind_order_is_random_but_stable(store, two_runs):
    one, other = two_runs
    first = ratings.next_item(store, "ana", one, other)
    assert first.remaining == 4
    assert ratings.next_item(store, "ana", one, other) == first  # a reload shows the same screen
    assert ratings.next_item(store, "ana", other, one) == first  # whichever run is picked first
    assert {first.left_run, first.right_run} == {one, other}
    assert {first.left_answer, first.right_answer} == {
        f"run {one} pair {first.pair_id} repeat 0",
        f"run {other} pair {first.pair_id} repeat 0",
    }

    def order(rater: str) -> list[tuple[int, int]]:
        out = []
        while (item := ratings.next_item(store, rater, one, other)) is not None:
            out.append((item.pair_id, item.left_run))
            ratings.record(store, rater, item, "tie")
        return out

    orders = {name: order(name) for name in ("bo", "cy", "di", "ed", "flo")}
    assert all(sorted(p for p, _ in o) == sorted(p for p, _ in orders["bo"]) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1  # raters see different orders
    assert len({left for o in orders.values() for _, left in o}) == 2  # both runs are shown on the left


def test_verdicts_are_canonical_and_survive_a_reload(store, two_runs):
    one, other = two_runs
    item = ratings.next_item(store, "ana", one, other)
    ratings.record(store, "ana", item, "left")
    with Store() as reopened:
        row = reopened.one("SELECT * FROM ratings")
        assert (row["run_a"], row["run_b"], row["left_run"]) == (one, other, item.left_run)
        assert row["verdict"] == ("a" if item.left_run == one else "b")
        assert ratings.rated_count(reopened, "ana", other, one) == 1
        assert ratings.next_item(reopened, "ana", one, other).pair_id != item.pair_id


def test_rating_again_replaces_the_first_verdict(store, two_runs):
    one, other = two_runs
    item = ratings.next_item(store, "ana", one, other)
    ratings.record(store, "ana", item, "left")
    ratings.record(store, "ana", item, "tie")
    assert [r["verdict"] for r in store.query("SELECT verdict FROM ratings")] == ["tie"]


def test_a_rater_can_stop_and_continue(store, two_runs):
    one, other = two_runs
    for expected in (4, 3):
        item = ratings.next_item(store, "ana", one, other)
        assert item.remaining == expected
        ratings.record(store, "ana", item, "right")
    assert ratings.rated_count(store, "ana", one, other) == 2
    assert ratings.next_item(store, "bo", one, other).remaining == 4  # another rater has their own queue
    while (item := ratings.next_item(store, "ana", one, other)) is not None:
        ratings.record(store, "ana", item, "left")
    assert ratings.rated_count(store, "ana", one, other) == 4


def test_bad_ratings_are_refused(store, two_runs):
    one, other = two_runs
    item = ratings.next_item(store, "ana", one, other)
    with pytest.raises(BadInput, match="name"):
        ratings.record(store, "  ", item, "left")
    with pytest.raises(BadInput, match="choice"):
        ratings.record(store, "ana", item, "both")
    with pytest.raises(BadInput, match="different runs"):
        ratings.next_item(store, "ana", one, one)


def test_win_rate_counts_ties_as_half_with_a_wilson_interval(store, two_runs):
    one, other = two_runs
    verdicts = {0: one, 1: one, 2: None}  # by position in ana's queue: who wins, None = tie
    for position in range(4):
        item = ratings.next_item(store, "ana", one, other)
        winner = verdicts.get(position, other)
        choice = "tie" if winner is None else "left" if item.left_run == winner else "right"
        ratings.record(store, "ana", item, choice)
    result = ratings.win_rates(store, one, other)
    assert (result.wins_x, result.wins_y, result.ties, result.n) == (2, 1, 1, 4)
    assert result.win_rate_x == 2.5 / 4
    assert (result.ci_low, result.ci_high) == pytest.approx((0.2194, 0.9081), abs=1e-4)  # Wilson, 2.5 of 4
    flipped = ratings.win_rates(store, other, one)
    assert (flipped.wins_x, flipped.win_rate_x) == (1, 1.5 / 4)


def test_the_wilson_interval_is_scipys():
    expected = binomtest(5, 8).proportion_ci(method="wilson")
    assert ratings.wilson_interval(5, 8) == pytest.approx((expected.low, expected.high))


def test_win_rate_without_ratings_is_empty(store, two_runs):
    result = ratings.win_rates(store, *two_runs)
    assert result.n == 0
    assert result.win_rate_x != result.win_rate_x  # NaN


def rate(store: Store, rater: str, pair_id: int, one: int, other: int, verdict: str) -> None:
    """Store a canonical verdict ('a' = run `one` is better) on `pair_id`, as if `one` was shown on the left."""
    item = ratings.RatingItem(pair_id, "", "", "", left_run=one, right_run=other, remaining=1)
    ratings.record(store, rater, item, {"a": "left", "b": "right", "tie": "tie"}[verdict])


def test_agreement_of_two_raters_is_cohens_kappa(store, two_runs):
    one, other = two_runs
    assert ratings.agreement(store, one, other) is None
    pairs = [row["pair_id"] for row in store.query("SELECT pair_id FROM generations WHERE run_id = ?", (other,))]
    for pair_id, ana, bo in zip(pairs, "aabt", "abbt"):
        rate(store, "ana", pair_id, one, other, ana.replace("t", "tie"))
        rate(store, "bo", pair_id, one, other, bo.replace("t", "tie"))
    # observed 3/4; chance: ana a .5 b .25 tie .25, bo a .25 b .5 tie .25 -> .125 + .125 + .0625 = .3125
    assert ratings.agreement(store, one, other) == {
        "items": 4,
        "raters": 2,
        "percent_agreement": 0.75,
        "kappa": pytest.approx((0.75 - 0.3125) / (1 - 0.3125)),
        "method": "Cohen",
    }


def test_agreement_of_three_raters_is_fleiss_kappa(store, two_runs):
    one, other = two_runs
    pairs = [row["pair_id"] for row in store.query("SELECT pair_id FROM generations WHERE run_id = ?", (other,))]
    table = {pairs[0]: "aaa", pairs[1]: "aab", pairs[2]: "bbb"}  # the fourth question is rated by ana alone
    for pair_id, verdicts in table.items():
        for rater, verdict in zip(("ana", "bo", "cy"), verdicts):
            rate(store, rater, pair_id, one, other, verdict)
    rate(store, "ana", pairs[3], one, other, "a")
    # per item agreement 1, 1/3, 1 -> 7/9; pooled a 5/9, b 4/9 -> chance 41/81
    result = ratings.agreement(store, one, other)
    assert (result["items"], result["raters"], result["method"]) == (3, 3, "Fleiss")
    assert result["percent_agreement"] == pytest.approx(7 / 9)
    assert result["kappa"] == pytest.approx((7 / 9 - 41 / 81) / (1 - 41 / 81))


def test_a_rater_sees_the_question_as_the_runs_were_asked_it(store, two_runs):
    from core import dataset

    one, other = two_runs
    item = ratings.next_item(store, "ana", one, other)
    dataset.update_pair(store, item.pair_id, question="Edited after both runs answered it?")
    assert (
        ratings.next_item(store, "ana", one, other).question == item.question != "Edited after both runs answered it?"
    )
