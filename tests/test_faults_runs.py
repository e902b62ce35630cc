"""Runs under faults: an edit in the middle of a sweep, a crash between recording a run and its job,
a slow model hash while other processes write, a busy Optuna storage."""

import sqlite3
import threading
import time

import pytest

from core import compare, dataset, evaluation, jobs, runs, scoring, sweep
from core.decoding import DecodingParams
from core.errors import BadInput
from core.store import Store, now
from core.sweep import SweepConfig
from tests.conftest import wait_until


def config(**overrides) -> SweepConfig:
    values = {"dataset": "starter", "grid": {"temperature": [0.0, 0.7]}, "backend": "echo", "part": "test", "limit": 4}
    return SweepConfig(**{**values, **overrides})


def counts(store: Store) -> dict[str, int]:
    return {t: store.one(f"SELECT COUNT(*) FROM {t}")[0] for t in ("sweeps", "runs", "jobs")}


# ---- an edit in the middle of a sweep ------------------------------------------------------------


def test_a_pair_edited_in_the_middle_of_a_sweep_leaves_every_run_on_the_texts_frozen_at_creation(starter):
    sweep_id, job_id = sweep.start_sweep(starter, config(backend_options={"delay": 0.3}))
    members = sweep.sweep_runs(starter, sweep_id)
    assert sweep.get_sweep(starter, sweep_id).job_id == job_id and {r.job_id for r in members} == {job_id}
    frozen = runs.run_pairs(starter, members[0])
    edited = frozen[-1]  # the last question of every run: each run asks it after the edit below
    wait_until(lambda: jobs.get(starter, job_id).done >= 1)
    edited_at = now()
    dataset.update_pair(starter, edited.id, question="EDITED question?", answer="EDITED reference.")
    job = jobs.wait(starter, job_id, timeout=120)
    assert job.state == "done", job.message

    later = starter.one("SELECT COUNT(*) FROM generations WHERE created_at > ?", (edited_at,))[0]
    assert later >= 2, "the edit landed after most of the sweep; it must fall in its middle"
    scorer = scoring.Scorer(scoring.ScorerConfig())
    for run in members:
        assert runs.run_pairs(starter, run) == frozen
        scores = scoring.run_scores(starter, run.id, run.scorer)
        assert len(scores) == len(frozen) and scores["f1"].notna().all()
        assert list(scores["question"]) == [p.question for p in frozen]
        assert list(scores["reference"]) == [p.answer for p in frozen]
        assert not scores["answer"].str.contains("EDITED").any()  # the echo backend repeats the prompt
        row = scores[scores["pair_id"] == edited.id].iloc[0]
        assert edited.question.split()[0] in row["answer"]
        [expected] = scorer.score([row["answer"]], [edited.answer])
        assert row["f1"] == pytest.approx(expected.f1, abs=1e-6)
    assert dataset.get_pair(starter, edited.id)["answer"] == "EDITED reference."  # the pair itself changed


def test_an_optuna_trial_made_after_an_edit_asks_the_texts_frozen_with_its_sweep(starter):
    sweep_id = sweep.create_sweep(starter, config(mode="optuna", trials=1, limit=2))
    frozen = runs.frozen_pairs(starter, "sweep", sweep_id)
    dataset.update_pair(starter, frozen[0].id, question="EDITED question?", answer="EDITED reference.")
    dataset.make_split(starter, "starter", seed=7)  # a new split after the sweep was made
    made = sweep.get_sweep(starter, sweep_id)
    trial = sweep._add_or_find(starter, made, DecodingParams(temperature=0.5), sweep._frozen(starter, made))
    assert runs.run_pairs(starter, trial) == frozen
    assert trial.split_id == made.split_id and trial.split_version == 1 and trial.sweep_id == sweep_id


def scored_run(store: Store, stamp: str = "test-stamp") -> int:
    """A run with one scored answer per question (written directly: the numbers do not matter here)."""
    run_id = runs.create_run(store, runs.RunSpec(dataset="starter", backend="echo", part="test", limit=3))
    store.execute("UPDATE runs SET scorer = ? WHERE id = ?", (stamp, run_id))
    with store.transaction() as conn:
        for pair in runs.run_pairs(store, runs.get_run(store, run_id)):
            generation = conn.execute(
                "INSERT INTO generations (run_id, pair_id, answer, created_at) VALUES (?, ?, 'an answer', ?)",
                (run_id, pair.id, now()),
            ).lastrowid
            conn.execute(
                "INSERT INTO scores (generation_id, scorer, f1, created_at) VALUES (?, ?, 0.5, ?)",
                (generation, stamp, now()),
            )
    return run_id


def test_compare_refuses_runs_scored_against_different_reference_texts(starter):
    before = scored_run(starter)
    same = scored_run(starter)
    compare.check_comparable(starter, [before, same])  # made on the same texts: comparable
    pair = runs.run_pairs(starter, runs.get_run(starter, before))[1]
    dataset.update_pair(starter, pair.id, answer="A different reference answer.")
    after = scored_run(starter)
    with pytest.raises(BadInput, match=f"different texts of 1 question.*pair {pair.id} was edited") as refused:
        compare.check_comparable(starter, [before, after])
    assert "\n" not in str(refused.value)
    compare.check_comparable(starter, [before, same])  # the edit changed neither earlier run


def test_runs_of_an_old_store_keep_their_questions_after_the_migration(tmp_path, monkeypatch):
    from core import store as store_module

    path = tmp_path / "old.sqlite"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:4])
    with Store(path) as old:
        dataset_id = old.execute("INSERT INTO datasets (name, created_at) VALUES ('d', 0)").lastrowid
        pair_ids = [
            old.execute(
                "INSERT INTO pairs (dataset_id, question, answer, status, created_at, updated_at)"
                " VALUES (?, ?, ?, 'accepted', 0, 0)",
                (dataset_id, f"question {i}?", f"answer {i}."),
            ).lastrowid
            for i in range(3)
        ]
        sweep_id = old.execute("INSERT INTO sweeps (dataset_id, config, created_at) VALUES (?, '{}', 0)", (dataset_id,))
        sweep_id = sweep_id.lastrowid
        run_id = old.execute(
            "INSERT INTO runs (kind, dataset_id, backend, model, config, sweep_id, created_at)"
            " VALUES ('sweep', ?, 'echo', 'echo', ?, ?, 0)",
            (dataset_id, f'{{"pair_ids": [{pair_ids[2]}, {pair_ids[0]}], "repeats": 1}}', sweep_id),
        ).lastrowid
    monkeypatch.undo()
    with Store(path) as new:
        assert new.schema_version == len(store_module.MIGRATIONS)
        asked = runs.run_pairs(new, runs.get_run(new, run_id))
        assert [(p.id, p.question, p.answer) for p in asked] == [
            (pair_ids[2], "question 2?", "answer 2."),
            (pair_ids[0], "question 0?", "answer 0."),
        ]
        assert runs.frozen_pairs(new, "sweep", sweep_id) == asked


# ---- a crash between recording a run and its job -------------------------------------------------


def crash(*args, **kwargs):
    raise RuntimeError("the process died here")


def test_a_sweep_whose_job_was_never_recorded_leaves_no_orphan_run(starter, monkeypatch):
    before = counts(starter)
    monkeypatch.setattr(jobs, "submit", crash)
    with pytest.raises(RuntimeError):
        sweep.start_sweep(starter, config())
    assert counts(starter) == before


def test_a_sweep_whose_process_could_not_start_leaves_nothing(starter, monkeypatch):
    before = counts(starter)

    def no_process(*args, **kwargs):
        raise OSError("fork failed")

    monkeypatch.setattr(jobs, "spawn", no_process)
    with pytest.raises(BadInput, match="fork failed"):
        sweep.start_sweep(starter, config())
    assert counts(starter) == before


def finished_training(directory):
    """What a training leaves behind, as far as starting an evaluation reads it."""
    import json

    (directory / "adapter").mkdir(parents=True)
    (directory / "adapter" / "adapter_config.json").write_text("{}")
    settings = {
        "dataset": "starter",
        "resolved_model": "some-org/some-model",
        "prompt_template": "Question: {question}\nAnswer:",
        "method": "lora",
        "lora_r": 8,
        "learning_rate": 2e-4,
    }
    (directory / "train_config.json").write_text(json.dumps(settings))
    return directory


def test_an_evaluation_whose_job_was_never_recorded_leaves_no_orphan_run(starter, monkeypatch, tmp_path):
    train_dir = finished_training(tmp_path / "train")
    before = counts(starter)
    monkeypatch.setattr(jobs, "submit", crash)
    with pytest.raises(RuntimeError):
        evaluation.start_evaluation(starter, evaluation.EvalConfig(train_dir=str(train_dir), backend="transformers"))
    assert counts(starter) == before
    run = evaluation.create_eval_run(starter, evaluation.EvalConfig(train_dir=str(train_dir), backend="transformers"))
    assert run.config["evaluation"]["train_dir"] == str(train_dir)  # recorded with the run, not after it


# ---- slow work outside write transactions, writers that wait -------------------------------------


def test_a_write_from_another_process_does_not_wait_while_a_sweep_hashes_its_model(starter, monkeypatch):
    hashing, written = threading.Event(), []
    real_fingerprint = runs.model_fingerprint

    def slow_fingerprint(store, model):  # a multi-GB GGUF takes seconds to hash
        hashing.set()
        time.sleep(1.5)
        return real_fingerprint(store, model) or "sha256:slow"

    def other_writer():
        hashing.wait(10)
        conn = sqlite3.connect(starter.path, timeout=0.2, isolation_level=None)
        try:
            started = time.monotonic()
            conn.execute("INSERT INTO settings (key, value) VALUES ('other', '1')")
            written.append(time.monotonic() - started)
        except sqlite3.OperationalError as exc:
            written.append(exc)
        finally:
            conn.close()

    monkeypatch.setattr(runs, "model_fingerprint", slow_fingerprint)
    writer = threading.Thread(target=other_writer)
    writer.start()
    sweep_id = sweep.create_sweep(starter, config())
    writer.join()
    assert isinstance(written[0], float) and written[0] < 0.2, written
    assert {r.model_hash for r in sweep.sweep_runs(starter, sweep_id)} == {"sha256:slow"}


def test_the_optuna_sweep_storage_waits_at_least_30_s_for_other_writers(starter, monkeypatch):
    import optuna

    used = []

    def stop_at_study(*args, storage=None, **kwargs):
        used.append(optuna.storages.get_storage(storage))
        raise RuntimeError("stop before the first trial")

    monkeypatch.setattr(optuna, "create_study", stop_at_study)
    sweep_id = sweep.create_sweep(starter, config(mode="optuna", trials=1, limit=1))
    job_id = jobs.submit(starter, "sweep", {"sweep_id": sweep_id}, start=False)
    with pytest.raises(RuntimeError, match="stop before"):
        sweep.run_sweep_job(jobs.JobContext(starter, job_id, {"sweep_id": sweep_id}))
    engine = used[0]._backend.engine
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30_000
