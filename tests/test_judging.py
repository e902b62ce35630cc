"""The LLM judge: both orders asked, flips counted as position bias, unparseable replies kept and counted,
the prompt and the JSON schema on the wire, exactly-once resume after a vanished server, and the judge's
agreement with the blind human ratings of the same pairs. The judge model is the Ollama stand-in, over HTTP
through the real client, answering as a function of the prompt it was sent.
"""

from __future__ import annotations

import json
import re

import pytest

from core import jobs, judge, judging, ratings, settings
from core.errors import BadInput
from tests.conftest import wait_until
from tests.ollama_standin import OllamaStandin
from tests.test_compare import make_run

SHARED = 6  # questions both runs answered


@pytest.fixture
def two_runs(store) -> tuple[int, int]:
    return make_run(store, [0.4] * SHARED), make_run(store, [0.5] * SHARED)


@pytest.fixture
def server(store):
    with OllamaStandin() as standin:
        settings.save(store, settings.WorkbenchSettings(ollama_host=standin.url))
        yield standin


def shown(prompt: str) -> tuple[tuple[int, int], int]:
    """The runs whose answers a pairwise prompt shows (first, second), and the question's pair id."""
    first, second = (int(x) for x in re.findall(r"Answer \d: run (\d+) pair", prompt))
    return (first, second), int(re.search(r"pair (\d+) repeat", prompt)[1])


def prefers_later_run(body: dict) -> str:
    """A consistent judge: the answer of the run with the higher id is better, whichever side it is on."""
    (first, second), _ = shown(body["prompt"])
    return json.dumps({"reason": "more recent run", "better": "1" if first > second else "2"})


def judge_and_wait(store, config: judge.JudgeConfig, runs_: tuple[int, int]) -> jobs.JobInfo:
    job_id = judging.start_judging(store, config, *runs_)
    return jobs.wait(store, job_id, timeout=60)


OLLAMA_JUDGE = judge.JudgeConfig(backend="ollama", model="standin-small")


def test_each_pair_is_asked_in_both_orders_with_the_prompt_and_schema_on_the_wire(store, two_runs, server):
    server.reply = prefers_later_run
    job = judge_and_wait(store, OLLAMA_JUDGE, two_runs)
    assert job.state == "done", job.message
    sent = [r.body for r in server.requests if r.path == "/api/generate"]
    assert len(sent) == 2 * SHARED
    assert all(body["format"] == OLLAMA_JUDGE.schema for body in sent)
    assert {body["model"] for body in sent} == {"standin-small"}
    assert all(body["options"]["temperature"] == 0.0 for body in sent)
    orders = {}
    for body in sent:
        assert "Which answer is better" in body["prompt"] and "Reference answer:" in body["prompt"]
        (first, second), pair_id = shown(body["prompt"])
        orders.setdefault(pair_id, set()).add((first, second))
    assert all(seen == {two_runs, two_runs[::-1]} for seen in orders.values())  # each question, both orders

    result = judging.judge_result(store, OLLAMA_JUDGE, *two_runs)
    assert (result.judged_pairs, result.flipped, result.unparseable) == (SHARED, 0, 0)
    assert result.position_bias == 0.0
    assert (result.win_rates.wins_x, result.win_rates.wins_y) == (0, SHARED)  # run_b, the later, always wins
    assert result.win_rates.ci_high < 0.5
    assert result.humans.describe() == "not yet checked against human ratings"
    assert "position bias 0%" in job.message and "not yet checked against human ratings" in job.message


def test_a_verdict_that_follows_the_order_is_position_bias_and_no_verdict(store, two_runs, server):
    server.reply = lambda body: '{"reason": "the first is fine", "better": "1"}'
    judge_and_wait(store, OLLAMA_JUDGE, two_runs)
    result = judging.judge_result(store, OLLAMA_JUDGE, *two_runs)
    assert (result.flipped, result.position_bias, result.verdicts) == (SHARED, 1.0, {})
    assert result.win_rates.n == 0


def test_a_reply_that_is_not_json_is_stored_as_it_came_and_counted_never_guessed(store, two_runs, server):
    server.reply = lambda body: "Answer 2 is clearly better."
    judge_and_wait(store, OLLAMA_JUDGE, two_runs)
    rows = store.query("SELECT reply, verdict FROM judge_pairwise")
    assert len(rows) == 2 * SHARED
    assert {(r["reply"], r["verdict"]) for r in rows} == {("Answer 2 is clearly better.", None)}
    result = judging.judge_result(store, OLLAMA_JUDGE, *two_runs)
    assert (result.unparseable, result.replies, result.flipped, result.verdicts) == (2 * SHARED, 2 * SHARED, 0, {})
    assert "12 of 12 replies unparseable" in result.headline()


def rate(store, rater: str, run_x: int, run_y: int, verdict_of) -> None:
    """A human rater who gives `verdict_of(pair_id)` ('a', 'b' or 'tie', canonical) on every question."""
    run_a = min(run_x, run_y)
    while (item := ratings.next_item(store, rater, run_x, run_y)) is not None:
        verdict = verdict_of(item.pair_id)
        choice = "tie" if verdict == "tie" else ("left" if (item.left_run == run_a) == (verdict == "a") else "right")
        ratings.record(store, rater, item, choice)


def test_a_judge_that_always_agrees_with_the_humans_has_kappa_1(store, two_runs, server):
    def humans(pair_id: int) -> str:
        return "b" if pair_id % 3 else "tie"

    def judge_like_humans(body: dict) -> str:
        (first, second), pair_id = shown(body["prompt"])
        better = "tie" if humans(pair_id) == "tie" else ("1" if first > second else "2")
        return json.dumps({"reason": "as a person would", "better": better})

    rate(store, "ana", *two_runs, humans)
    server.reply = judge_like_humans
    judge_and_wait(store, OLLAMA_JUDGE, two_runs)
    humans_seen = judging.judge_result(store, OLLAMA_JUDGE, *two_runs).humans
    assert (humans_seen.human_verdicts, humans_seen.compared) == (SHARED, SHARED)
    assert humans_seen.agreement.kappa == pytest.approx(1.0) and humans_seen.agreement.equal_share == 1.0
    assert sum(humans_seen.agreement.confusion[i][i] for i in range(3)) == SHARED
    assert "agrees with the humans on 100% of 6 human verdicts, κ 1.00" in humans_seen.describe()


def test_human_verdicts_without_a_judge_verdict_are_named_not_counted(store, two_runs, server):
    rate(store, "ana", *two_runs, lambda pair_id: "a")
    server.reply = lambda body: '{"reason": "x", "better": "1"}'  # flips on every pair: no verdict
    judge_and_wait(store, OLLAMA_JUDGE, two_runs)
    humans_seen = judging.judge_result(store, OLLAMA_JUDGE, *two_runs).humans
    assert (humans_seen.human_verdicts, humans_seen.compared, humans_seen.agreement) == (SHARED, 0, None)
    assert humans_seen.describe() == "no verdict of the judge on the 6 human-rated questions yet"


def test_a_vanished_server_pauses_the_judge_and_resume_asks_each_reply_exactly_once(store, two_runs, server):
    server.reply = prefers_later_run
    server.delay = 0.3
    job_id = judging.start_judging(store, OLLAMA_JUDGE, *two_runs)
    wait_until(lambda: jobs.get(store, job_id).done >= 3, timeout=30)
    server.stop()
    job = jobs.wait(store, job_id, timeout=30)
    assert job.state == "interrupted" and "Ollama" in job.message
    asked_before = len(store.query("SELECT id FROM judge_pairwise"))
    server.clear_requests()
    server.delay = 0.0
    server.start()
    jobs.resume(store, job_id)
    assert jobs.wait(store, job_id, timeout=60).state == "done"
    counts = store.query("SELECT COUNT(*) AS n FROM judge_pairwise GROUP BY pair_id, position")
    assert len(counts) == 2 * SHARED and {r["n"] for r in counts} == {1}
    assert len([r for r in server.requests if r.path == "/api/generate"]) == 2 * SHARED - asked_before


def test_a_rubric_judge_scores_each_answer_per_criterion_and_implies_a_verdict(store, two_runs, server):
    config = judge.JudgeConfig(backend="ollama", model="standin-small", mode="rubric", criteria=("clear", "sound"))

    def scores(body: dict) -> str:
        run_id = int(re.search(r"Answer: run (\d+) pair", body["prompt"])[1])
        return json.dumps({"reason": "ok", "clear": 4 if run_id == max(two_runs) else 2, "sound": 3})

    server.reply = scores
    assert judge_and_wait(store, config, two_runs).state == "done"
    sent = [r.body for r in server.requests if r.path == "/api/generate"]
    assert len(sent) == 2 * SHARED and sent[0]["format"]["required"] == ["reason", "clear", "sound"]
    result = judging.judge_result(store, config, *two_runs)
    means = {(m.run_id, m.criterion): m.summary.mean for m in result.means}
    assert means[(min(two_runs), "clear")] == 2 and means[(max(two_runs), "clear")] == 4
    assert means[(max(two_runs), "overall")] == 3.5 and means[(min(two_runs), "overall")] == 2.5
    assert set(result.verdicts.values()) == {"b"}
    assert [c.mode for c in judging.judges_of(store, *two_runs)] == ["rubric"]


def test_judges_with_different_stamps_never_mix_and_bad_judges_are_refused(store, two_runs, server):
    server.reply = prefers_later_run
    judge_and_wait(store, OLLAMA_JUDGE, two_runs)
    other = judge.JudgeConfig(backend="ollama", model="standin-small", criteria=("clarity",))
    assert judge.judge_stamp(other) != judge.judge_stamp(OLLAMA_JUDGE)
    assert judging.judge_result(store, other, *two_runs).replies == 0
    with pytest.raises(BadInput, match="two different runs"):
        judging.start_judging(store, OLLAMA_JUDGE, two_runs[0], two_runs[0])
    with pytest.raises(BadInput, match="criterion"):
        judge.JudgeConfig(criteria=("reason",))
    with pytest.raises(BadInput, match="distinct"):
        judge.JudgeConfig(criteria=("a", "a"))


def test_replies_are_read_strictly():
    assert judge.read_pairwise('{"reason": "r", "better": "2"}').choice == "2"
    assert judge.read_pairwise('Sure! {"reason": "r", "better": "tie"} Hope this helps').choice == "tie"
    assert not judge.read_pairwise('{"reason": "r", "better": "3"}').parsed
    assert not judge.read_pairwise('["1"]').parsed
    config = judge.JudgeConfig(mode="rubric", criteria=("clear",))
    assert judge.read_rubric(config, '{"reason": "r", "clear": 5}').scores == {"clear": 5}
    assert not judge.read_rubric(config, '{"reason": "r", "clear": 6}').parsed
    assert not judge.read_rubric(config, '{"reason": "r", "clear": true}').parsed
    assert [judge.canonical(c, o) for c, o in (("1", "ab"), ("1", "ba"), ("2", "ab"), ("tie", "ba"))] == [
        "a",
        "b",
        "b",
        "tie",
    ]


def test_the_embedded_engine_is_held_to_the_judges_schema(embedded_models):
    """Gemma 270M left free answers a judge prompt with anything (a URL, measured); with the grammar of the schema
    every reply parses, in both modes, batched."""
    from core.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(parallel=2)
    args = ("How do I pick a sample size?", "Run a power analysis.", "Ask many people.", "Use a power analysis.")
    pairwise, rubric = judge.JudgeConfig(), judge.JudgeConfig(mode="rubric", criteria=("clear", "sound"))
    replies = backend.generate(
        [judge.pairwise_prompt(pairwise, *args), judge.pairwise_prompt(pairwise, args[0], args[1], args[3], args[2])],
        pairwise.params,
        schema=pairwise.schema,
    )
    assert all(judge.read_pairwise(r).parsed for r in replies), replies
    (reply,) = backend.generate([judge.rubric_prompt(rubric, *args[:3])], rubric.params, schema=rubric.schema)
    assert set(judge.read_rubric(rubric, reply).scores) == {"clear", "sound"}, reply


def test_the_cli_judges_two_runs_and_compare_reports_the_judge_beside_the_humans(store, two_runs, server, tmp_path):
    from tests.conftest import run_cli

    server.reply = prefers_later_run
    rate(store, "ana", *two_runs, lambda pair_id: "b" if pair_id % 2 else "a")
    judged = run_cli("judge", *map(str, two_runs), "--backend", "ollama", "--model", "standin-small")
    assert judged.returncode == 0, judged.stderr
    assert "position bias 0%" in judged.stdout and "of 6 human verdicts" in judged.stdout
    report = tmp_path / "report.html"
    compared = run_cli("compare", *map(str, two_runs), "-o", str(report))
    assert compared.returncode == 0, compared.stderr
    assert "pairwise judge · ollama · standin-small: agrees with the humans on" in compared.stdout
    html = report.read_text()
    assert "LLM judges beside the blind human ratings" in html and "agrees with the humans on" in html

    refused = run_cli("judge", str(two_runs[0]), str(two_runs[0]), "--backend", "ollama", "--model", "m")
    assert refused.returncode == 2 and "two different runs" in refused.stderr
    assert len(store.query("SELECT stamp FROM judges")) == 1
