"""Hyperparameter search: an Optuna study in the store's SQLite file, trials trained by worker processes.

Everything here is real: the job and worker processes, the tiny random Llama, LoRA training,
Optuna's TPE sampler and median pruner, the SQLite file shared by all of them.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from pathlib import Path

import pytest

from core import dataset, jobs, settings, training, workspace
from core.errors import BadInput, NotFound
from core.store import MIGRATIONS, Store
from core.train_search import (
    SearchConfig,
    SearchSpace,
    best_params,
    final_config,
    history,
    intermediate_values,
    load_study,
    objective,
    param_importances,
    start_search,
    study_name,
    study_trials,
)
from core.training import ALL_LINEAR, TrainConfig
from tests.conftest import run_cli, tiny_training

GOOD = 1e-2  # the tiny model's loss falls visibly within one epoch at this learning rate (see test_training)
USELESS = 1e-6  # ... and does not move at this one


def _base(tiny_llama, **overrides) -> dict:
    return tiny_training(tiny_llama, **{"limit": 8, **overrides})


def _config(tiny_llama, base: dict | None = None, **overrides) -> SearchConfig:
    values = {
        "base": base or _base(tiny_llama),
        "trials": 3,
        "workers": 2,
        "space": SearchSpace(learning_rate=(USELESS, GOOD), lora_r=(4, 8), lora_alpha=(16,), epochs=(1, 3)),
        "prune_startup_trials": 1,
    }
    return SearchConfig(**{**values, **overrides})


def _ids(pairs) -> list[int]:
    return [p.id if isinstance(p, dataset.StoredPair) else p["id"] for p in pairs]


def _part_ids(store, part: str, limit: int | None = None) -> list[int]:
    return _ids(dataset.select_pairs(store, "starter", part)[:limit])


def _pinned(folder: str | Path) -> dict:
    """The pairs a training folder trained and took its eval loss on (training.pinned_pairs' record)."""
    return json.loads((Path(folder) / training.EXAMPLES_FILE).read_text())


def _wait(store, job_id: int, timeout: float) -> jobs.JobInfo:
    job = jobs.wait(store, job_id, timeout=timeout)
    assert job.state == "done", (job.state, job.message, jobs.log_tail(store, job_id))
    return job


def test_three_trials_on_two_workers_share_one_sqlite_study_and_a_weak_trial_is_pruned(starter, tiny_llama):
    # Two good settings first; the third trains at a learning rate that cannot move the loss. Each
    # worker trains one trial at a time, so the third starts only after one of the first two has
    # completed, and the median pruner then stops it after its first epoch.
    config = _config(
        tiny_llama,
        first_trials=[
            {"learning_rate": GOOD, "lora_r": 8, "epochs": 1},
            {"learning_rate": GOOD, "lora_r": 4, "epochs": 2},
            {"learning_rate": USELESS, "lora_r": 8, "epochs": 3},
        ],
    )
    started = time.perf_counter()
    job_id = start_search(starter, config)
    job = _wait(starter, job_id, timeout=300)
    seconds = time.perf_counter() - started

    assert (job.done, job.total) == (3, 3)
    assert job.figures["best_params"] == best_params(starter, job_id)

    # The study lives in the store's own file, beside the workbench's tables.
    with sqlite3.connect(starter.path) as conn:
        names = [r[0] for r in conn.execute("SELECT study_name FROM studies")]
        assert study_name(job_id) in names
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == 1

    trials = study_trials(starter, job_id)
    print(f"\n{trials.drop(columns=['output_dir']).to_string()}")
    assert len(trials) == 3 and set(trials["state"]) <= {"complete", "pruned"}
    assert trials["worker_pid"].nunique() == 2  # both workers trained
    assert job.pid not in set(trials["worker_pid"])  # the job process only coordinates
    logs = sorted(p.name for p in workspace.jobs_dir().glob(f"{job_id}-worker-*.log"))
    assert logs == [f"{job_id}-worker-0.log", f"{job_id}-worker-1.log"]

    study = load_study(starter, job_id)
    assert study.user_attrs["pruner"]["name"] == "MedianPruner"
    steps = intermediate_values(starter, job_id)
    assert set(steps.groupby("number")["epoch"].max()) <= {1, 2, 3} and len(steps) >= 3  # an eval loss per epoch

    # every trial took its eval loss on the validation part of the split the search fixed, never on a test pair
    split = dataset.latest_split(starter, "starter")
    assert job.params["base"]["split_id"] == split.id
    for trial in study.trials:
        pinned = _pinned(trial.user_attrs["output_dir"])
        assert pinned["split_id"] == split.id and _ids(pinned["validation"]) == _part_ids(starter, "validation", 8)
        assert not set(_part_ids(starter, "test")) & set(_ids(pinned["train"] + pinned["validation"]))
        if trial.state.name == "COMPLETE":
            assert trial.user_attrs["scored_on"] == {
                "split_id": split.id,
                "part": "validation",
                "pair_ids": _part_ids(starter, "validation", 8),
            }

    weak = study.trials[2]
    assert weak.state.name == "PRUNED" and weak.last_step == 1
    completed_at_1 = [t.intermediate_values[1] for t in study.trials if t.state.name == "COMPLETE"]
    assert weak.intermediate_values[1] > statistics.median(completed_at_1)  # what a median pruner stops on

    best = best_params(starter, job_id)
    assert best["learning_rate"] == GOOD and best["lora_alpha"] == 16.0
    final = final_config(starter, job_id)
    assert isinstance(final, TrainConfig) and final.output_dir == "" and final.split_id == split.id
    assert final.selection == {
        "how": f"best of 3 trials of hyperparameter search job {job_id}, by eval loss on the validation part",
        "candidates": 3,
        "split_id": split.id,
        "part": "validation",
        "pair_ids": _part_ids(starter, "validation", 8),
    }
    assert (final.learning_rate, final.lora_r, final.epochs) == (best["learning_rate"], best["lora_r"], best["epochs"])
    assert (final.dataset, final.limit, final.target_modules) == ("starter", 8, ALL_LINEAR)

    chart = history(starter, job_id)
    assert list(chart["number"]) == [0, 1, 2] and chart["best"].iloc[-1] == study.best_value
    assert chart.loc[chart["number"] == weak.number, "value"].item() == weak.intermediate_values[1]  # drawn too
    importances = param_importances(starter, job_id)
    complete = int((trials["state"] == "complete").sum())
    assert importances == {} if complete < 2 else abs(sum(importances.values()) - 1) < 1e-6
    print(f"3 trials on 2 workers in {seconds:.1f} s; states {list(trials['state'])}; importances {importances}")


def test_bad_ranges_are_refused_with_the_reason_before_anything_starts(starter, tiny_llama):
    cases = [
        ({"space": SearchSpace(learning_rate=(1e-2, 1e-4))}, "learning rate range is empty"),
        ({"space": SearchSpace(learning_rate=(0, 1e-4))}, "learning rate must be > 0"),
        ({"space": SearchSpace(lora_r=(0, 8))}, "LoRA r"),
        ({"space": SearchSpace(lora_dropout=(0.0, 1.0))}, "dropout must be in"),
        ({"space": SearchSpace(epochs=(0, 2))}, "epochs must be at least 1"),
        ({"space": SearchSpace(epochs=(3, 2))}, "epochs range is empty"),
        ({"trials": 0}, "at least one trial"),
        ({"workers": 0}, "at least one worker"),
        ({"objective": "accuracy"}, "objective must be one of"),
        ({"first_trials": [{"learning_rate": 1.0}]}, "outside the search space"),
        ({"base": _base(tiny_llama, method="full")}, "method must be one of"),
        ({"base": _base(tiny_llama, model="/nowhere/model")}, "no model"),
        ({"storage": "postgresql://me:secret@127.0.0.1:1/studies"}, "cannot open the Optuna storage"),
    ]
    for overrides, reason in cases:
        with pytest.raises(BadInput, match=reason) as refused:
            start_search(starter, _config(tiny_llama, **overrides))
        assert "\n" not in str(refused.value) and "secret" not in str(refused.value)
    with pytest.raises(BadInput, match="cannot search"):
        SearchConfig.from_dict({"base": {}, "space": {"batch_size": [1, 2]}})
    assert starter.one("SELECT COUNT(*) FROM jobs")[0] == 0  # nothing was started


def test_the_settings_storage_url_is_checked_and_used(starter, tiny_llama):
    current = settings.load(starter)
    with pytest.raises(BadInput, match="Optuna storage should be a URL"):
        settings.save(starter, settings.WorkbenchSettings(optuna_storage="db-host:5432/studies"))
    settings.save(starter, settings.WorkbenchSettings(optuna_storage="postgresql://me:secret@127.0.0.1:1/studies"))
    assert settings.load(starter).optuna_storage.startswith("postgresql://")
    with pytest.raises(BadInput, match=r"postgresql://me:\*\*\*@127.0.0.1:1/studies") as refused:
        start_search(starter, _config(tiny_llama))  # empty storage: the Settings' URL (no driver here)
    assert "secret" not in str(refused.value)
    settings.save(starter, current)


def test_optuna_tables_do_not_collide_with_the_workbench_tables(tmp_path):
    import optuna

    def tables(path) -> set[str]:
        with sqlite3.connect(path) as conn:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    Store(tmp_path / "ours.sqlite").close()
    optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.sqlite'}")
    ours, theirs = tables(tmp_path / "ours.sqlite"), tables(tmp_path / "optuna.sqlite")
    assert ours and theirs and not ours & theirs, ours & theirs
    assert len(MIGRATIONS) >= 1


def test_a_cancelled_search_resumes_the_same_study_up_to_n_trials(starter, tiny_llama):
    # Longer epochs (16 pairs) so that the cancel lands inside a trial, after its first epoch's checkpoint.
    config = _config(
        tiny_llama,
        base=_base(tiny_llama, limit=16, learning_rate=GOOD),
        trials=2,
        workers=1,
        space=SearchSpace(learning_rate=(GOOD, GOOD), lora_r=(4, 8), lora_alpha=(16,), epochs=(3, 3)),
    )
    started = time.perf_counter()
    job_id = start_search(starter, config)

    def first_epoch_saved():
        try:
            trials = load_study(starter, job_id).get_trials(deepcopy=False)
        except NotFound:
            return False
        return any(
            t.state.name == "RUNNING"
            and (Path(t.user_attrs.get("output_dir", "-")) / "checkpoint" / "state.pt").exists()
            for t in trials
        )

    deadline = time.monotonic() + 120
    while not first_epoch_saved():
        assert time.monotonic() < deadline, jobs.log_tail(starter, job_id)
        time.sleep(0.1)
    job = jobs.cancel(starter, job_id)
    assert job.state == "cancelled", job.message
    cut = [t for t in load_study(starter, job_id).trials if t.state.name == "RUNNING"]
    assert len(cut) == 1  # its worker was killed with the job; the trial is left unfinished
    assert study_trials(starter, job_id)["state"].tolist().count("stopped") == 1  # not shown as running

    jobs.resume(starter, job_id)
    job = _wait(starter, job_id, timeout=300)
    seconds = time.perf_counter() - started
    study = load_study(starter, job_id)
    states = [t.state.name for t in study.trials]
    assert (job.done, job.total, job.attempts) == (2, 2, 2)
    assert states.count("COMPLETE") + states.count("PRUNED") == 2 and "RUNNING" not in states
    [failed] = [t for t in study.trials if t.state.name == "FAIL"]
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == failed.number]
    assert retry.params == failed.params and retry.user_attrs["output_dir"] == failed.user_attrs["output_dir"]
    assert set(failed.intermediate_values) <= set(retry.intermediate_values) == {1, 2, 3}
    assert any("tried again" in line for line in jobs.log_tail(starter, job_id, 100))
    print("\n".join(jobs.log_tail(starter, job_id, 100)))
    print(f"\ncancel + resume of a 2-trial search in {seconds:.1f} s; states {states}")


def test_a_search_can_score_trials_by_the_bertscore_of_their_answers(starter, tiny_llama):
    from core import evaluation, runs

    config = _config(
        tiny_llama,
        base=_base(tiny_llama, limit=4, learning_rate=GOOD),
        trials=1,
        workers=1,
        objective="bertscore",
        space=SearchSpace(learning_rate=(GOOD, GOOD), lora_r=(4,), lora_alpha=(16,), epochs=(1, 1)),
    )
    started = time.perf_counter()
    job_id = start_search(starter, config)
    _wait(starter, job_id, timeout=300)
    seconds = time.perf_counter() - started

    [trial] = load_study(starter, job_id).trials
    run = runs.get_run(starter, trial.user_attrs["eval_run_id"])
    assert run.kind == "finetuned" and run.backend == "transformers"
    assert run.adapter.startswith(trial.user_attrs["output_dir"])
    # its answers are to the validation questions of the search's split; no test pair was read on the way
    split = dataset.latest_split(starter, "starter")
    assert (run.part, run.split_id) == ("validation", split.id)
    answered = _ids(runs.run_pairs(starter, run))
    assert answered == _part_ids(starter, "validation", 4) == trial.user_attrs["scored_on"]["pair_ids"]
    pinned = _pinned(trial.user_attrs["output_dir"])
    assert not set(_part_ids(starter, "test")) & set(answered + _ids(pinned["train"] + pinned["validation"]))
    assert trial.value == pytest.approx(evaluation.mean_f1(starter, run)) and 0 < trial.value <= 1
    # the pruner sees the eval loss negated: higher is better, as for F1
    assert trial.intermediate_values[1] == pytest.approx(-trial.user_attrs["eval_loss_after"])
    print(f"\n1 bertscore trial (train + 4 answers + scoring) in {seconds:.1f} s: mean F1 {trial.value:.3f}")


def test_when_every_worker_fails_the_job_fails_with_the_reason_from_their_log(starter, tiny_llama):
    # max_seq_len=8 passes the settings check, but every prompt fills it: training has nothing to learn.
    config = _config(tiny_llama, base=_base(tiny_llama, max_seq_len=8), trials=2, workers=2)
    job_id = start_search(starter, config)
    job = jobs.wait(starter, job_id, timeout=120)
    assert job.state == "failed" and job.resumable
    assert "\n" not in job.error and "every prompt fills max_seq_len=8" in job.error
    assert "search stopped at 0 of 2 trials" in job.error
    assert {t.state.name for t in load_study(starter, job_id).trials} == {"FAIL"}
    log = jobs.log_tail(starter, job_id, 100)
    assert sum("exited with code 1" in line for line in log) == 2, log


def test_the_cli_searches_then_trains_with_the_best_trial_and_can_train_from_a_search_later(starter, tiny_llama):
    common = ["train", "--dataset", "starter", "--model", str(tiny_llama), "--method", "lora", "--limit", "4"]
    common += ["--evaluate-with", "none", "--no-export-merged", "--target-modules", ",".join(ALL_LINEAR)]
    result = run_cli(*common, "--trials", "2", "--space", "learning_rate=1e-3,1e-2 lora_r=4 epochs=1,1", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    search_id = jobs.list_jobs(starter, kind="train-search")[0].id
    best = best_params(starter, search_id)
    assert best["lora_r"] == 4 and best["epochs"] == 1 and 1e-3 <= best["learning_rate"] <= 1e-2
    assert "number" in result.stdout and f"final training with the best parameters: {best}" in result.stdout
    [final] = jobs.list_jobs(starter, kind="train")
    assert final.state == "done" and final.params["learning_rate"] == best["learning_rate"]

    again = run_cli(*common, "--from-search", str(search_id), timeout=600)
    assert again.returncode == 0 and f"best parameters of search job {search_id}" in again.stdout
    refused = run_cli(*common, "--trials", "2", "--space", "learning_rate=1e-2,1e-3")
    assert refused.returncode == 2 and "learning rate range is empty" in refused.stderr
    assert "Traceback" not in refused.stderr


# ---- where trials are scored: the validation part, or folds of the train part; never the test part ----------


def test_a_search_on_a_split_without_a_validation_part_is_refused_and_told_both_ways_out(starter, tiny_llama):
    split = dataset.make_split(starter, "starter", validation_size=0)
    with pytest.raises(BadInput) as refused:
        start_search(starter, _config(tiny_llama))
    message = str(refused.value)
    assert message.startswith(dataset.no_validation_message(split)) and "--folds" in message
    assert "\n" not in message
    _config(tiny_llama, folds=2).validate(starter)  # cross-validation over the train part needs none
    cases = [
        ({"folds": 1}, "folds must be 0"),
        ({"folds": 2, "objective": "bertscore"}, "cross-validation scores trials by eval_loss"),
        ({"folds": 9}, "9 folds need at least 9 train pairs, got 8"),
    ]
    for overrides, reason in cases:
        with pytest.raises(BadInput, match=reason):
            start_search(starter, _config(tiny_llama, **overrides))
    assert starter.one("SELECT COUNT(*) FROM jobs")[0] == 0  # nothing was started


def test_a_cross_validated_search_trains_each_trial_on_every_fold_and_its_final_training_is_tested_once(
    starter, tiny_llama
):
    from core import evaluation, runs
    from core.jobs import JobContext

    config = _config(
        tiny_llama,
        base=_base(tiny_llama, limit=6),
        trials=2,
        workers=1,
        folds=3,
        space=SearchSpace(learning_rate=(GOOD, GOOD), lora_r=(4, 8), lora_alpha=(16,), epochs=(1, 1)),
        first_trials=[{"lora_r": 4}, {"lora_r": 8}],
        prune_startup_trials=2,  # both trials complete: each is checked fold by fold
    )
    job_id = start_search(starter, config)
    _wait(starter, job_id, timeout=300)
    split = dataset.latest_split(starter, "starter")
    train_ids = _part_ids(starter, "train", 6)
    never = set(_part_ids(starter, "test")) | set(_part_ids(starter, "validation"))

    study = load_study(starter, job_id)
    for trial in study.trials:
        assert trial.state.name == "COMPLETE"
        folds = [_pinned(Path(trial.user_attrs["output_dir"]) / f"fold-{fold}") for fold in (1, 2, 3)]
        held_out = [_ids(fold["validation"]) for fold in folds]
        assert sorted(sum(held_out, [])) == train_ids  # the held-out folds partition the train pairs
        for fold, ids in zip(folds, held_out, strict=True):
            assert sorted(_ids(fold["train"]) + ids) == train_ids and fold["split_id"] == split.id
            assert not never & set(_ids(fold["train"]) + ids)  # only the train part is read
        losses = trial.user_attrs["fold_eval_losses"]
        assert len(losses) == 3 and trial.value == pytest.approx(statistics.fmean(losses))
        # what the pruner saw: the mean over the folds done so far, one step per fold
        assert trial.intermediate_values == pytest.approx({f: statistics.fmean(losses[:f]) for f in (1, 2, 3)})
        assert trial.user_attrs["scored_on"] == {"split_id": split.id, "part": "cv-train", "pair_ids": train_ids}

    # The final training, on the whole train part of the search's split, even after a new split was drawn;
    # its evaluation, on that split's test part, records how its settings were chosen.
    dataset.make_split(starter, "starter", seed=7)
    final = final_config(starter, job_id)
    assert (final.cv_folds, final.split_id) == (0, split.id)
    assert final.selection == {
        "how": f"best of 2 trials of hyperparameter search job {job_id}, by eval loss on 3-fold cross-validation"
        " over the train part",
        "candidates": 2,
        "split_id": split.id,
        "part": "cv-train",
        "pair_ids": train_ids,
    }
    final = TrainConfig.from_dict({**final.to_dict(), "evaluate_with": "transformers", "export_merged": False})
    train_job = jobs.submit(starter, "train", final.to_dict(), start=False)
    training.run_train_job(JobContext(starter, train_job, final.to_dict()))
    run = runs.get_run(starter, jobs.get(starter, train_job).figures["eval_run_id"])
    assert (run.kind, run.part, run.split_id, run.selection) == (evaluation.RUN_KIND, "test", split.id, final.selection)
    tested = _ids(runs.run_pairs(starter, run))
    assert tested == _ids(dataset.select_pairs(starter, "starter", "test", split_id=split.id)[:6])
    assert not set(tested) & set(run.selection["pair_ids"])  # chosen on other questions than it is scored on


class Killed(BaseException):
    """The worker dies here (no `except Exception` of the code under test sees it)."""


def test_a_retried_cross_validation_trial_trains_no_finished_fold_again_and_ends_where_it_would_have(
    starter, tiny_llama, monkeypatch
):
    import optuna

    config = _config(
        tiny_llama,
        base=_base(tiny_llama, limit=4, learning_rate=GOOD),
        folds=2,
        space=SearchSpace(
            learning_rate=(GOOD, GOOD), lora_r=(4,), lora_alpha=(16,), lora_dropout=(0, 0), epochs=(2, 2)
        ),
    )
    steps: list[tuple[int, int]] = []  # (fold, step) of every optimizer step taken
    real_train = training.train

    def train(ctx, fold_config, store, on_step=None, on_epoch=None):
        def step(metrics):
            steps.append((fold_config.cv_fold, metrics["step"]))
            if kill_at == steps[-1]:
                raise Killed()

        return real_train(ctx, fold_config, store, on_step=step, on_epoch=on_epoch)

    monkeypatch.setattr(training, "train", train)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")

    kill_at = None
    reference = objective(study.ask(), config, starter, job_id=1)  # uninterrupted, in its own folder
    assert steps == [(1, 1), (1, 2), (2, 1), (2, 2)]  # 2 pairs per fold, batch 2: one step per epoch

    steps.clear()
    kill_at = (2, 2)  # in fold 2's second epoch, after its first epoch's checkpoint
    first = study.ask()
    with pytest.raises(Killed):
        objective(first, config, starter, job_id=2)
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    reported = study.trials[-1].intermediate_values
    assert list(reported) == [1]  # fold 1 was done and reported

    steps.clear()
    kill_at = None
    attrs = {"retry_of": first.number, "output_dir": first.user_attrs["output_dir"]}
    attrs["reported"] = {str(step): value for step, value in reported.items()}
    study.enqueue_trial(first.params, user_attrs=attrs)  # as the search job queues a retry
    retry = study.ask()
    value = objective(retry, config, starter, job_id=2)
    assert steps == [(2, 2)]  # fold 1 is not trained again, fold 2 resumes after its checkpoint
    assert value == pytest.approx(reference, rel=1e-5)
    study.tell(retry, value)
    assert study.trials[-1].intermediate_values == pytest.approx({1: reported[1], 2: value})
