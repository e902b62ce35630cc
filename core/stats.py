"""Summaries of a score distribution: mean, median, spread and a bootstrap confidence interval.

Pure numpy on plain sequences of numbers. This module never reads the store, never draws,
and never decides which scores belong together (core.scoring's stamps do that). Missing
values (NaN, e.g. answers not scored yet) are left out of every figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import BadInput

# Resampled values held in memory at once: n_boot x n indices are drawn in blocks of about
# this many, so 2,000 resamples of 100,000 scores need ~16 MB instead of 1.6 GB.
_BLOCK_VALUES = 2_000_000


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    median: float
    std: float  # sample standard deviation (ddof=1); 0 for a single value
    ci_low: float  # 95 % percentile-bootstrap confidence interval of the mean
    ci_high: float


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise BadInput(f"expected a flat list of numbers, got an array of shape {x.shape}")
    return x[~np.isnan(x)]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[..., np.ndarray] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap (1 - alpha) confidence interval of `statistic` over `values`.

    `statistic` is a numpy reduction that takes `axis=` (np.mean, np.median, ...): it is applied
    to all resamples at once. Same values and seed, same interval. No values: (nan, nan).
    """
    if n_boot < 1:
        raise BadInput(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise BadInput(f"alpha must be between 0 and 1, got {alpha}")
    x = _finite(values)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_VALUES // x.size)
    stats = np.concatenate(
        [
            statistic(x[rng.integers(0, x.size, size=(min(rows, n_boot - start), x.size))], axis=1)
            for start in range(0, n_boot, rows)
        ]
    )
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0) -> Summary:
    """n, mean, median, standard deviation and the 95 % bootstrap interval of the mean; NaNs when empty."""
    x = _finite(values)
    if x.size == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan)
    low, high = bootstrap_ci(x, np.mean, n_boot=n_boot, seed=seed)
    return Summary(
        n=int(x.size),
        mean=float(x.mean()),
        median=float(np.median(x)),
        std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        ci_low=low,
        ci_high=high,
    )


@dataclass(frozen=True)
class Agreement:
    """How far two raters' labels on the same items agree (a judge and the humans, say)."""

    n: int
    equal_share: float  # items both labelled alike
    kappa: float  # Cohen's kappa: agreement beyond what each rater's label frequencies give by chance
    ci_low: float  # 95 % percentile-bootstrap interval of kappa, items resampled
    ci_high: float
    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]  # confusion[i][j]: items the first labelled labels[i], the second labels[j]


def _kappas(first: np.ndarray, second: np.ndarray, k: int) -> np.ndarray:
    """Cohen's kappa of each row of two (resamples x items) arrays of label indices in range(k)."""
    n = first.shape[1]
    observed = (first == second).mean(axis=1)
    counts_first = np.stack([(first == c).sum(axis=1) for c in range(k)], axis=1)
    counts_second = np.stack([(second == c).sum(axis=1) for c in range(k)], axis=1)
    expected = (counts_first * counts_second).sum(axis=1) / n**2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected < 1, (observed - expected) / (1 - expected), np.nan)


def agreement(
    first: Sequence[str], second: Sequence[str], labels: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> Agreement:
    """Cohen's kappa with its bootstrap interval and the confusion table of two raters' labels, item by item.

    Kappa is NaN when chance alone predicts full agreement (both raters used one and the same label), and a
    resample where that happens is left out of the interval. No items: NaNs and an empty table of zeros.
    """
    if len(first) != len(second):
        raise BadInput(f"two raters' labels must be of equal length, got {len(first)} and {len(second)}")
    labels = tuple(labels)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({x for x in (*first, *second) if x not in index})
    if unknown:
        raise BadInput(f"labels must be among {', '.join(labels)}, got {', '.join(unknown)}")
    k, nan = len(labels), float("nan")
    a = np.array([index[x] for x in first], dtype=np.int64)
    b = np.array([index[x] for x in second], dtype=np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (a, b), 1)
    table = tuple(tuple(int(c) for c in row) for row in confusion)
    if a.size == 0:
        return Agreement(0, nan, nan, nan, nan, labels, table)
    kappa = float(_kappas(a[None, :], b[None, :], k)[0])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, a.size, size=(n_boot, a.size))
    resampled = _kappas(a[draws], b[draws], k)
    resampled = resampled[~np.isnan(resampled)]
    low, high = (float(q) for q in np.quantile(resampled, [0.025, 0.975])) if resampled.size else (nan, nan)
    return Agreement(int(a.size), float((a == b).mean()), kappa, low, high, labels, table)
