"""Preference triples from comparisons already made: blind human ratings and consistent judges, train questions
only (test questions never become training data), what is left out counted, and the JSONL TRL's DPO trainer reads.
"""

from __future__ import annotations

import json

import pytest

from core import dataset, formats, judge, preferences, runs, settings
from core.prompting import DEFAULT_TEMPLATE, render_prompt
from tests.ollama_standin import OllamaStandin
from tests.test_compare import make_run
from tests.test_judging import judge_and_wait, rate, shown

QUESTIONS = 40  # the first 40 pairs of the starter set: every part of its split has some


@pytest.fixture
def two_runs(starter) -> tuple[int, int]:
    """Two runs that answered the same 40 starter questions, from every part of the split."""
    return make_run(starter, [0.4] * QUESTIONS), make_run(starter, [0.5] * QUESTIONS)


@pytest.fixture
def server(starter):
    """The Ollama stand-in as the judge's server."""
    with OllamaStandin() as standin:
        settings.save(starter, settings.WorkbenchSettings(ollama_host=standin.url))
        yield standin


def part_ids(store, part: str) -> set[int]:
    return {p.id for p in dataset.select_pairs(store, "starter", part)}


def test_human_verdicts_on_train_questions_become_triples_and_test_questions_never_do(starter, two_runs):
    one, other = two_runs
    rate(starter, "ana", one, other, lambda pair_id: "tie" if pair_id % 5 == 0 else "b")
    data = preferences.preference_data(starter, "starter")

    asked = {p.id for p in runs.run_pairs(starter, runs.get_run(starter, one))}
    train, validation, test = (asked & part_ids(starter, part) for part in ("train", "validation", "test"))
    assert test and validation  # the runs did answer test and validation questions
    assert {t.pair_id for t in data.train} == {p for p in train if p % 5}
    assert {t.pair_id for t in data.validation} == {p for p in validation if p % 5}
    assert not {t.pair_id for t in data.train + data.validation} & part_ids(starter, "test")
    assert data.left_out["test"] == len([p for p in test if p % 5])
    assert data.left_out["tie"] == len([p for p in asked if p % 5 == 0])

    triple = data.train[0]
    answers = {run_id: runs.first_answers(starter, run_id) for run_id in two_runs}
    assert (triple.chosen_run, triple.rejected_run, triple.source) == (other, one, "human")
    assert (triple.chosen, triple.rejected) == (answers[other][triple.pair_id], answers[one][triple.pair_id])
    assert f"{len(data.train)} train triples ({len(data.train)} from blind human ratings, 0 from judges)" in (
        data.describe()
    )


def test_raters_who_disagree_give_no_triple_and_a_majority_gives_one(starter, two_runs):
    rate(starter, "ana", *two_runs, lambda pair_id: "a")
    rate(starter, "bo", *two_runs, lambda pair_id: "b")
    data = preferences.preference_data(starter, "starter")
    assert not data.train and data.left_out["raters_disagree"] == QUESTIONS
    rate(starter, "cy", *two_runs, lambda pair_id: "a")
    data = preferences.preference_data(starter, "starter")
    assert data.train and all(t.chosen_run == min(two_runs) for t in data.train)


def test_a_consistent_judge_adds_triples_where_no_human_rated_and_a_human_outranks_it(starter, two_runs, server):
    one, other = two_runs
    rate(starter, "ana", one, other, lambda pair_id: "a" if pair_id < 20 else "tie")  # humans prefer run one
    judge_config = judge.JudgeConfig(backend="ollama", model="standin-small")

    def prefers_later_run_on_some(body: dict) -> str:
        (first, second), pair_id = shown(body["prompt"])
        if pair_id % 2:  # these it answers by position: a flip, no verdict
            return json.dumps({"reason": "the first one", "better": "1"})
        return json.dumps({"reason": "more recent run", "better": "1" if first > second else "2"})

    server.reply = prefers_later_run_on_some
    assert judge_and_wait(starter, judge_config, two_runs).state == "done"
    data = preferences.preference_data(starter, "starter")
    triples = data.train + data.validation
    by_human = [t for t in triples if t.source == "human"]
    by_judge = [t for t in triples if t.source != "human"]
    assert by_human and all(t.chosen_run == one for t in by_human)  # the judge disagrees; the human counts
    assert {t.pair_id for t in by_human} == {t.pair_id for t in triples if t.pair_id < 20}
    # the humans' ties are ties, not a gap a judge fills
    assert by_judge == [] and data.left_out["judge_flipped"] == QUESTIONS // 2

    starter.execute("DELETE FROM ratings WHERE pair_id >= 20")  # no human verdict on those any more
    data = preferences.preference_data(starter, "starter")
    by_judge = [t for t in data.train + data.validation if t.source != "human"]
    assert by_judge and all(t.pair_id >= 20 and t.pair_id % 2 == 0 and t.chosen_run == other for t in by_judge)
    assert by_judge[0].source == f"judge: {judge.describe(judge_config)}"


def test_identical_answers_are_left_out(starter, two_runs):
    one, other = two_runs
    starter.execute(
        "UPDATE generations SET answer = (SELECT g.answer FROM generations g WHERE g.run_id = ?"
        " AND g.pair_id = generations.pair_id) WHERE run_id = ?",
        (one, other),
    )
    rate(starter, "ana", one, other, lambda pair_id: "a")
    data = preferences.preference_data(starter, "starter")
    assert not data.train and data.left_out["same_answer"] > 0


def test_the_export_is_the_prompt_chosen_rejected_layout_of_trl(starter, two_runs, tmp_path):
    rate(starter, "ana", *two_runs, lambda pair_id: "b")
    data = preferences.preference_data(starter, "starter")
    written = preferences.export_jsonl(data, tmp_path / "prefs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert written == len(rows) == len(data.train)
    first = rows[0]
    assert first["prompt"] == render_prompt(data.train[0].question, DEFAULT_TEMPLATE)
    assert first["chosen"] == " " + data.train[0].chosen.strip() and first["rejected"].startswith(" ")
    assert {"pair_id", "question", "source", "chosen_run", "rejected_run"} <= set(first)


def test_a_dataset_without_a_split_has_no_triples_and_says_why(store):
    dataset.add_pairs(store, "fresh", [formats.PairRow("What is a p-value?", "A probability.")], "accepted")
    data = preferences.preference_data(store, "fresh")
    assert (data.train, data.validation) == ([], [])
    assert "has no split" in data.describe()
