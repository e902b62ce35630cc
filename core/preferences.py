"""Preference data from comparisons already made: (question, chosen, rejected) triples for preference tuning (DPO).

A blind rating on the Compare page says which of two runs' answers to a question is better; so does a
pairwise judge that gave the same verdict in both orders. Each such verdict on a question of the train
part of a split is one triple; the validation part's give the held-out triples DPO takes its eval loss
on. Test questions never become training data. Ties, raters who disagree, judges that flipped with the
order or disagree with each other, and pairs whose two answers are the same text are left out and counted.
A human verdict outranks any judge's on the same question and runs. Reads ratings, judges and runs;
writes nothing but the JSONL export.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core import dataset, judging, ratings, runs
from core.errors import BadInput
from core.files import write_text
from core.prompting import DEFAULT_TEMPLATE, render_prompt
from core.store import Store

HUMAN = "human"
# Why a verdict is not a triple, in the order the counts are shown.
LEFT_OUT = {
    "tie": "ties",
    "raters_disagree": "raters disagree",
    "judge_flipped": "judge verdicts that changed with the order (or unreadable)",
    "judges_disagree": "judges disagree",
    "same_answer": "both answers the same text",
    "duplicate": "the same answers rated on another pair of runs",
    "test": "questions of the test part",
    "outside": "questions outside the split's train and validation parts (not accepted, or added since)",
}


@dataclass(frozen=True)
class Preference:
    """One question and two answers to it, the better one first, and where the verdict came from."""

    pair_id: int
    question: str  # as the runs were asked it (frozen with them), which is what the verdict was given on
    chosen: str
    rejected: str
    chosen_run: int
    rejected_run: int
    source: str  # HUMAN, or the judge's description


@dataclass(frozen=True)
class PreferenceData:
    """A dataset's triples per part of one split, and what was left out and why."""

    dataset: str
    split_id: int | None
    split_version: int | None
    train: list[Preference]
    validation: list[Preference]
    left_out: dict[str, int] = field(default_factory=dict)  # LEFT_OUT key -> count

    def sources(self, part: str = "train") -> Counter:
        return Counter(HUMAN if p.source == HUMAN else "judge" for p in getattr(self, part))

    def describe(self) -> str:
        """One line: the triples per part and source, then what was left out."""
        if self.split_id is None:
            return f"dataset {self.dataset!r} has no split: preference triples come from its train part"
        counts = self.sources()
        head = (
            f"{len(self.train)} train triples ({counts[HUMAN]} from blind human ratings, {counts['judge']} from"
            f" judges), {len(self.validation)} validation triples, split v{self.split_version}"
        )
        left = ", ".join(f"{n} {LEFT_OUT[key]}" for key in LEFT_OUT if (n := self.left_out.get(key)))
        return f"{head}; left out: {left}" if left else head


def preference_data(store: Store, name: str, split_id: int | None = None) -> PreferenceData:
    """Every verdict on two runs of dataset `name` as triples of its split's train and validation parts.

    The split is the one given, else the dataset's latest (the one a training run is pinned to). Per
    question and pair of runs, the raters' majority verdict is taken (no majority: left out); where no
    human rated it, the verdicts of the pairwise judges that agree in both orders (judges that disagree:
    left out).
    """
    split = dataset.split_info(store, split_id) if split_id is not None else dataset.latest_split(store, name)
    if split is None:
        return PreferenceData(name, None, None, [], [])
    parts = {
        part: {p.id for p in dataset.select_pairs(store, name, part, "accepted", split_id=split.id)}
        for part in ("train", "validation", "test")
    }
    found: dict[str, list[Preference]] = {"train": [], "validation": []}
    left: Counter = Counter()
    seen: set[tuple[int, str, str]] = set()
    for run_a, run_b in _rated_run_pairs(store, name):
        answers = {run_id: runs.first_answers(store, run_id) for run_id in (run_a, run_b)}
        questions = {p.id: p.question for p in runs.frozen_pairs(store, "run", run_a)}
        for pair_id, verdict, source in _verdicts(store, run_a, run_b, left):
            part = next((part for part, ids in parts.items() if pair_id in ids), None)
            if verdict == "tie":
                left["tie"] += 1
                continue
            if part not in found:
                left["test" if part == "test" else "outside"] += 1
                continue
            better, worse = (run_a, run_b) if verdict == "a" else (run_b, run_a)
            preference = Preference(
                pair_id, questions[pair_id], answers[better][pair_id], answers[worse][pair_id], better, worse, source
            )
            key = (pair_id, preference.chosen.strip(), preference.rejected.strip())
            if key[1] == key[2]:
                left["same_answer"] += 1
            elif key in seen:
                left["duplicate"] += 1
            else:
                seen.add(key)
                found[part].append(preference)
    return PreferenceData(name, split.id, split.version, found["train"], found["validation"], dict(left))


def _rated_run_pairs(store: Store, name: str) -> list[tuple[int, int]]:
    """The (run_a, run_b) pairs of this dataset's runs that humans rated or a pairwise judge judged."""
    rows = store.query(
        "SELECT v.run_a, v.run_b"
        " FROM (SELECT run_a, run_b FROM ratings UNION SELECT run_a, run_b FROM judge_pairwise) v"
        " JOIN runs a ON a.id = v.run_a JOIN runs b ON b.id = v.run_b JOIN datasets d ON d.id = a.dataset_id"
        " WHERE d.name = ? AND b.dataset_id = a.dataset_id ORDER BY v.run_a, v.run_b",
        (name,),
    )
    return [(r["run_a"], r["run_b"]) for r in rows]


def _verdicts(store: Store, run_a: int, run_b: int, left: Counter) -> list[tuple[int, str, str]]:
    """(pair_id, canonical verdict, source) per question of two runs: the humans' where they rated it, else the
    pairwise judges'. Items without one verdict are counted in `left`."""
    by_item: dict[int, list[str]] = {}
    for _rater, pair_id, verdict in ratings.verdicts(store, run_a, run_b):
        by_item.setdefault(pair_id, []).append(verdict)
    chosen: list[tuple[int, str, str]] = []
    for pair_id, given in sorted(by_item.items()):
        ranked = Counter(given).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:  # no strict majority
            left["raters_disagree"] += 1
        else:
            chosen.append((pair_id, ranked[0][0], HUMAN))
    judged: dict[int, dict[str, str]] = {}
    for result in judging.results(store, run_a, run_b):
        if result.config.mode != "pairwise":  # a rubric's implied verdict compares two scores, not two answers
            continue
        left["judge_flipped"] += result.judged_pairs - len(result.verdicts)
        for pair_id, verdict in result.verdicts.items():
            if pair_id not in by_item:
                judged.setdefault(pair_id, {})[judging.describe(result.config)] = verdict
    for pair_id, by_judge in sorted(judged.items()):
        if len(set(by_judge.values())) > 1:
            left["judges_disagree"] += 1
        else:
            chosen.append((pair_id, next(iter(by_judge.values())), "judge: " + " + ".join(sorted(by_judge))))
    return chosen


def jsonl(data: PreferenceData, template: str = DEFAULT_TEMPLATE, part: str = "train") -> str:
    """One part's triples as JSONL in the layout TRL's DPO trainer reads (`prompt`, `chosen`, `rejected`).

    `prompt` is the question in the training prompt template; `chosen` and `rejected` start with the space the
    workbench's trainer puts between prompt and answer, so that both train on the same tokens. The verdict's
    provenance rides along in extra keys.
    """
    if part not in ("train", "validation"):
        raise BadInput(f"preference triples come from the train or validation part, not {part!r}")
    rows = (
        {
            "prompt": render_prompt(p.question, template),
            "chosen": " " + p.chosen.strip(),
            "rejected": " " + p.rejected.strip(),
            **{k: v for k, v in asdict(p).items() if k not in ("chosen", "rejected")},
        }
        for p in getattr(data, part)
    )
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def export_jsonl(data: PreferenceData, path: str | Path, template: str = DEFAULT_TEMPLATE, part: str = "train") -> int:
    """Write one part's triples as JSONL (see `jsonl`); returns the number written."""
    text = jsonl(data, template, part)
    write_text(path, text)
    return text.count("\n")
