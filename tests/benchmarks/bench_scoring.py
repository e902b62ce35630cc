"""Scoring 100 answers with cached reference embeddings vs a plain `bert_score.score` call, target >= 1.5x.

The same 100 starter pairs on both sides; the references' embeddings are already in the store,
as after the first run of a dataset. Two like-with-like comparisons, each the median of 3:

- cold: each side's first call in a fresh process of its own. Both import torch, transformers and
  bert_score before the clock starts; the clock then counts what a fresh sweep worker pays on its
  first run: tokenizer and model load, torch's thread start-up, the first forward pass (and, on
  the cached side, reading the cached references from SQLite and ROUGE-L's imports).
- warm: both in this process after one untimed call each, timed in turn so that a noisy
  neighbour slows both alike. The cached side starts each call with the in-process LRU empty,
  so it reads the references from SQLite every time. `bert_score.score` loads its model on
  every call, as anyone who calls it pays; `BERTScorer`, which holds its model as the workbench
  does, is timed beside it as the strictest baseline (no target: what caching alone buys).

The cached side is `Scorer.score`, ROUGE-L included, because that is what scoring a run costs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from core import dataset, intake, models, scoring
from core.store import Store
from tests.benchmarks.common import report, scratch_workspace

N_ANSWERS = 100
REPEATS = 3
BATCH_SIZE = 64  # bert_score's default, and the workbench's
ROOT = Path(__file__).resolve().parents[2]


def pairs(store: Store) -> tuple[list[str], list[str]]:
    """Candidates and references; the candidates, like model answers, never repeat a reference verbatim."""
    chosen = dataset.select_pairs(store, "starter")[:N_ANSWERS]
    references = [p.answer for p in chosen]
    candidates = [f"{chosen[i].question} {chosen[(i + 1) % len(chosen)].answer}" for i in range(len(chosen))]
    return candidates, references


def _plain(candidates: list[str], references: list[str]) -> None:
    import bert_score

    bert_score.score(
        candidates,
        references,
        model_type=models.resolve_scorer(None),
        num_layers=models.SCORER_NUM_LAYERS,
        batch_size=BATCH_SIZE,
    )


def _cold_call(side: str) -> float:
    """Seconds of one side's first call in this (fresh) process, after the imports both sides share."""
    import bert_score  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    with Store() as store:
        candidates, references = pairs(store)
        started = time.perf_counter()
        if side == "cached":
            scoring.Scorer(scoring.ScorerConfig(batch_size=BATCH_SIZE)).score(candidates, references, store)
        else:
            _plain(candidates, references)
        return time.perf_counter() - started


def cold(side: str) -> float:
    """Median seconds of `side`'s first call, each in a fresh process on this workspace."""
    times = []
    for _ in range(REPEATS):
        out = subprocess.run(
            [sys.executable, "-m", "tests.benchmarks.bench_scoring", side],
            cwd=ROOT,
            env=os.environ,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise RuntimeError(f"the cold {side} call failed:\n{out.stderr[-2000:]}")
        times.append(json.loads(out.stdout.splitlines()[-1])["seconds"])
    return statistics.median(times)


def warm(store: Store) -> dict[str, float]:
    import bert_score

    candidates, references = pairs(store)
    scorer = scoring.Scorer(scoring.ScorerConfig(batch_size=BATCH_SIZE))
    held = bert_score.BERTScorer(
        model_type=models.resolve_scorer(None), num_layers=models.SCORER_NUM_LAYERS, batch_size=BATCH_SIZE
    )

    def cached() -> None:
        scoring._MEMORY.clear()  # the references come from SQLite, as in a fresh worker
        scorer.score(candidates, references, store)

    sides = {
        "score_cached_warm_s": cached,
        "score_plain_bert_score_warm_s": lambda: _plain(candidates, references),
        "score_held_bert_scorer_warm_s": lambda: held.score(candidates, references),
    }
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(REPEATS):
        for name, fn in sides.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> dict:
    with scratch_workspace():
        with Store() as store:
            intake.ensure_starter(store)
            _, references = pairs(store)
            # Fills the reference cache, as the first run of a dataset does.
            scoring.Scorer(scoring.ScorerConfig(batch_size=BATCH_SIZE)).score(references, references, store)
        # Before the warm side, so no process of this benchmark runs beside another.
        figures = {"score_cached_cold_s": cold("cached"), "score_plain_bert_score_cold_s": cold("plain")}
        with Store() as store:
            figures |= warm(store)
    ratios = {
        "cached_vs_plain_cold": figures["score_plain_bert_score_cold_s"] / figures["score_cached_cold_s"],
        "cached_vs_plain_warm": figures["score_plain_bert_score_warm_s"] / figures["score_cached_warm_s"],
        "cached_vs_held_bert_scorer_warm": figures["score_held_bert_scorer_warm_s"] / figures["score_cached_warm_s"],
    }
    return report("scoring", figures, ratios, {"cached_vs_plain_cold": ">=1.5", "cached_vs_plain_warm": ">=1.5"})


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] in ("cached", "plain"):
        print(json.dumps({"seconds": _cold_call(sys.argv[1])}))
    else:
        main()
