"""Blind pairwise human rating: which of two runs' answers to the same question is better?

A rater sees the questions two runs share in a random order fixed per rater, and the two
answers (first repeat) in a random left/right order, unlabelled; both orders are derived from
a hash, so a reload shows the same screen. Verdicts are stored in canonical terms (run_a is the
smaller run id; 'a' = run_a's answer is better), so the order shown never leaks into the numbers.
This module reads runs' generations and writes only the `ratings` table; it never draws.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass

from core import runs, stats
from core.errors import BadInput
from core.store import Store, now

CHOICES = ("left", "right", "tie")
VERDICTS = ("a", "b", "tie")
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class RatingItem:
    pair_id: int
    question: str
    left_answer: str
    right_answer: str
    left_run: int
    right_run: int
    remaining: int  # questions this rater has still to rate for this run pair, this one included


@dataclass(frozen=True)
class WinRates:
    run_x: int
    run_y: int
    wins_x: int
    wins_y: int
    ties: int
    n: int
    win_rate_x: float  # (wins_x + ties / 2) / n; NaN with no ratings
    ci_low: float  # 95 % Wilson interval of win_rate_x
    ci_high: float


def _rater(rater: str) -> str:
    name = rater.strip()
    if not name:
        raise BadInput("a rater needs a name")
    return name


def canonical_pair(store: Store, run_x: int, run_y: int) -> tuple[int, int]:
    """Two runs as verdicts name them: (run_a, run_b), run_a the smaller id; NotFound for an unknown run."""
    if run_x == run_y:
        raise BadInput("rate two different runs")
    for run_id in (run_x, run_y):
        runs.get_run(store, run_id)  # NotFound for an unknown run
    return min(run_x, run_y), max(run_x, run_y)


def _draw(*key: object) -> str:
    """A stable pseudo-random value per key: Python's hash() changes between processes, sha256 does not."""
    return hashlib.sha256(repr(key).encode()).hexdigest()


def _rated(store: Store, rater: str, run_a: int, run_b: int) -> set[int]:
    rows = store.query("SELECT pair_id FROM ratings WHERE rater = ? AND run_a = ? AND run_b = ?", (rater, run_a, run_b))
    return {r["pair_id"] for r in rows}


def next_item(store: Store, rater: str, run_x: int, run_y: int, seed: int | None = None) -> RatingItem | None:
    """The next shared question this rater has not rated for these runs, or None when all are rated."""
    rater = _rater(rater)
    run_a, run_b = canonical_pair(store, run_x, run_y)
    answers_a, answers_b = runs.first_answers(store, run_a), runs.first_answers(store, run_b)
    rated = _rated(store, rater, run_a, run_b)
    todo = [p for p in answers_a if p in answers_b and p not in rated]
    if not todo:
        return None
    pair_id = min(todo, key=lambda p: _draw(seed, rater, run_a, run_b, p))
    a_left = int(_draw(seed, rater, run_a, run_b, pair_id, "side"), 16) % 2 == 0
    left, right = (run_a, run_b) if a_left else (run_b, run_a)
    answers = {run_a: answers_a[pair_id], run_b: answers_b[pair_id]}
    # The question as the runs were asked it (frozen with them), not as it may have been edited since.
    question = store.one_or_raise(
        "SELECT question FROM run_pairs WHERE run_id = ? AND pair_id = ?",
        (run_a, pair_id),
        f"run {run_a} has no frozen copy of pair {pair_id}",
    )[0]
    return RatingItem(pair_id, question, answers[left], answers[right], left, right, len(todo))


def record(store: Store, rater: str, item: RatingItem, choice: str) -> None:
    """Store a rater's choice ('left', 'right' or 'tie') on an item; rating it again replaces the first verdict."""
    rater = _rater(rater)
    if choice not in CHOICES:
        raise BadInput(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    run_a, run_b = canonical_pair(store, item.left_run, item.right_run)
    if choice == "tie":
        verdict = "tie"
    else:
        better = item.left_run if choice == "left" else item.right_run
        verdict = "a" if better == run_a else "b"
    store.execute(
        "INSERT INTO ratings (rater, pair_id, run_a, run_b, left_run, verdict, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (rater, pair_id, run_a, run_b) DO UPDATE SET"
        " left_run = excluded.left_run, verdict = excluded.verdict, created_at = excluded.created_at",
        (rater, item.pair_id, run_a, run_b, item.left_run, verdict, now()),
    )


def rated_count(store: Store, rater: str, run_x: int, run_y: int) -> int:
    return len(_rated(store, _rater(rater), *canonical_pair(store, run_x, run_y)))


def verdicts(store: Store, run_a: int, run_b: int) -> list[tuple[str, int, str]]:
    """Every (rater, pair_id, verdict) on two runs in canonical order, oldest first."""
    rows = store.query(
        "SELECT rater, pair_id, verdict FROM ratings WHERE run_a = ? AND run_b = ? ORDER BY id", (run_a, run_b)
    )
    return [(r["rater"], r["pair_id"], r["verdict"]) for r in rows]


def wilson_interval(successes: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (well-behaved near 0, 1 and for small n)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def win_rates(store: Store, run_x: int, run_y: int) -> WinRates:
    """Every rater's verdicts on these two runs, from run_x's side; a tie counts half a win."""
    run_a, run_b = canonical_pair(store, run_x, run_y)
    return win_rates_of([v for _, _, v in verdicts(store, run_a, run_b)], run_x, run_y)


def win_rates_of(canonical_verdicts: list[str], run_x: int, run_y: int) -> WinRates:
    """Win rates of run_x over run_y from verdicts in canonical terms ('a': the smaller run id's answer won)."""
    run_a, run_b = min(run_x, run_y), max(run_x, run_y)
    counts = Counter(canonical_verdicts)
    wins = {run_a: counts["a"], run_b: counts["b"]}
    n = sum(counts.values())
    score = wins[run_x] + counts["tie"] / 2
    low, high = wilson_interval(score, n)
    return WinRates(
        run_x, run_y, wins[run_x], wins[run_y], counts["tie"], n, score / n if n else float("nan"), low, high
    )


def agreement(store: Store, run_x: int, run_y: int) -> dict | None:
    """How far raters agree on the items two or more of them rated; None when no item was.

    Percent agreement is the share of agreeing rater pairs per item, averaged over items. Kappa
    corrects it for chance: Cohen's with exactly two raters, else Fleiss' (items may have different
    numbers of raters). Kappa is NaN when chance alone predicts full agreement (one category used).
    """
    by_item: dict[int, dict[str, str]] = {}
    for rater, pair_id, verdict in verdicts(store, *canonical_pair(store, run_x, run_y)):
        by_item.setdefault(pair_id, {})[rater] = verdict
    shared = {p: v for p, v in by_item.items() if len(v) >= 2}
    if not shared:
        return None
    raters = sorted({r for v in shared.values() for r in v})
    if len(raters) == 2:  # every shared item has both
        method = "Cohen"
        first, second = ([v[r] for v in shared.values()] for r in raters)
        cohen = stats.agreement(first, second, VERDICTS)
        observed, kappa = cohen.equal_share, cohen.kappa
    else:
        method = "Fleiss"
        per_item = []
        for given in shared.values():
            counts, m = Counter(given.values()), len(given)
            per_item.append(sum(c * (c - 1) for c in counts.values()) / (m * (m - 1)))
        observed = sum(per_item) / len(per_item)
        pooled = Counter(x for v in shared.values() for x in v.values())
        total = sum(pooled.values())
        expected = sum((c / total) ** 2 for c in pooled.values())
        kappa = (observed - expected) / (1 - expected) if expected < 1 else float("nan")
    return {
        "items": len(shared),
        "raters": len(raters),
        "percent_agreement": observed,
        "kappa": kappa,
        "method": method,
    }
