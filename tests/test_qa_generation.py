"""Generating candidate pairs: parsing model output, dropping what is unusable, pending pairs with provenance."""

import json

import pytest

from core import dataset, jobs, qa_generation
from core.errors import BadInput
from core.qa_generation import QAGenerationConfig, drop_reason, parse_question, parse_topics
from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("reply", "question"),
    [
        (" How should a baseline be tuned?\n4. Next", "How should a baseline be tuned?"),
        ("4. What is leakage in a test split? It is", "What is leakage in a test split?"),
        ('- "Why report confidence intervals?"', "Why report confidence intervals?"),
        ("Question 3: When is a paired test the right choice?", "When is a paired test the right choice?"),
        ("There is no question here.", None),
        ("Why?", None),  # too short to be a research question
        ("\n\n", None),
    ],
)
def test_the_question_is_the_first_line_up_to_its_question_mark(reply, question):
    assert parse_question(reply) == question


def test_unusable_answers_are_named():
    assert drop_reason("   ", False, 8) == "empty answer"
    assert drop_reason("word " * 200, True, 8) == "runaway length"
    assert drop_reason("Too short.", False, 8) == "answer too short"
    assert drop_reason("A full answer with enough words to be a real answer here.", False, 8) is None


def test_topics_split_on_semicolons_commas_and_lines():
    assert parse_topics("nlp; systems,\nhci ;") == ["nlp", "systems", "hci"]


def test_bad_requests_are_refused_before_a_job_starts():
    with pytest.raises(BadInput, match="topic"):
        QAGenerationConfig(dataset="d", topics=[" "])
    with pytest.raises(BadInput, match="{question}"):
        QAGenerationConfig(dataset="d", topics=["nlp"], answer_prompt="Answer:")
    with pytest.raises(BadInput, match="between 1 and"):
        QAGenerationConfig(dataset="d", topics=["nlp"], n=0)


def test_config_round_trips_through_job_params():
    config = QAGenerationConfig(dataset="d", topics=["nlp"], n=3)
    assert QAGenerationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_generated_pairs_arrive_pending_with_provenance_and_duplicates_are_dropped(store):
    # The echo backend repeats the prompt, so every topic yields one question and then duplicates of it.
    config = QAGenerationConfig(dataset="gen", topics=["nlp", "systems", "hci"], n=3, backend="echo")
    job = jobs.wait(store, qa_generation.submit(store, config), timeout=60)
    assert job.state == "done", job.message
    frame = dataset.pairs_frame(store, "gen")
    assert len(frame) == 3 and set(frame["status"]) == {"pending"}
    assert set(frame["field"]) == {"nlp", "systems", "hci"}
    provenance = dataset.get_pair(store, int(frame["id"][0]))["provenance"]
    assert provenance["job_id"] == job.id and provenance["backend"] == "echo"
    assert provenance["question_prompt"] == qa_generation.DEFAULT_QUESTION_PROMPT
    assert provenance["answer_params"]["max_tokens"] == config.answer_params.max_tokens


def test_a_job_that_cannot_make_enough_pairs_fails_with_its_drop_counts(store):
    config = QAGenerationConfig(dataset="gen", topics=["nlp"], n=4, backend="echo")
    job = jobs.wait(store, qa_generation.submit(store, config), timeout=60)
    assert job.state == "failed" and "duplicate question" in job.message
    assert job.figures["dropped"]["duplicate question"] > 0
    assert len(dataset.pairs_frame(store, "gen")) == 1  # what was made is kept


@pytest.mark.slow
def test_the_embedded_model_generates_ten_pending_pairs_as_a_job(store, embedded_models):
    config = QAGenerationConfig(dataset="generated", topics=["machine learning", "nlp", "systems"], n=10)
    job_id = qa_generation.submit(store, config)
    job = jobs.wait(store, job_id, timeout=600)
    assert job.state == "done", job.message
    assert job.done == job.total == 10
    frame = dataset.pairs_frame(store, "generated")
    assert len(frame) == 10 and set(frame["status"]) == {"pending"}
    assert frame["question"].str.endswith("?").all()
    assert (frame["answer"].str.split().str.len() >= config.min_answer_words).all()
    print(f"\n10 pairs in {job.seconds_running:.0f} s, dropped: {job.figures.get('dropped')}")


def test_cli_generate_qa_refuses_bad_input_with_exit_2():
    result = run_cli("generate-qa", "--dataset", "d", "--topics", " ; ", "--n", "2")
    assert result.returncode == 2 and "topic" in result.stderr and "Traceback" not in result.stderr


def test_cli_generate_qa_follows_the_job_to_the_end():
    result = run_cli("generate-qa", "--dataset", "d", "--topics", "nlp; hci", "--n", "2", "--backend", "echo")
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout


def test_generation_into_a_new_dataset_with_a_refused_name_is_refused_before_it_starts(starter):
    config = QAGenerationConfig(dataset="../escape", topics=["statistics"], n=2, backend="echo")
    with pytest.raises(BadInput, match="dataset name"):
        qa_generation.submit(starter, config)
    assert not jobs.list_jobs(starter)
