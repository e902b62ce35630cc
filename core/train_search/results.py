"""The read side of a search: its trials, best settings, importances and history, for the Training page and the CLI.

`final_config` is what the final training is started with, carrying how its settings were chosen.
Never builds figures (workbench/figures.py does), never writes to the study.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from core import jobs
from core.errors import NotFound, WorkbenchError
from core.store import Store
from core.train_config import TrainConfig
from core.train_search.config import OBJECTIVE_NAMES
from core.train_search.space import SEARCHED
from core.train_search.study import finished, job_config, load_study, trial_params

TRIAL_COLUMNS = ["number", "state", "value", *SEARCHED, "last_epoch", "seconds", "worker_pid", "output_dir"]


def study_trials(store: Store, job_id: int):
    """One row per trial: number, state, value, the settings it trained with, epochs reported, seconds, worker pid."""
    import pandas as pd

    config = job_config(store, job_id)
    try:
        trials = load_study(store, job_id).get_trials(deepcopy=False)
    except NotFound:
        trials = []
    # A trial whose search was stopped stays RUNNING in the study until a resume retries it.
    stopped = jobs.get(store, job_id).state not in jobs.ACTIVE
    rows = []
    for t in trials:
        state = t.state.name.lower()
        rows.append(
            {
                "number": t.number,
                "state": "stopped" if stopped and state == "running" else state,
                "value": t.value,
                **trial_params(config, t),
                "last_epoch": t.last_step,
                "seconds": t.user_attrs.get("seconds"),
                "worker_pid": t.user_attrs.get("worker_pid"),
                "output_dir": t.user_attrs.get("output_dir", ""),
            }
        )
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def best_params(store: Store, job_id: int) -> dict[str, Any]:
    """The best completed trial's settings (fixed ones included); NotFound while no trial has completed."""
    config = job_config(store, job_id)
    return trial_params(config, _best_trial(store, job_id))


def _best_trial(store: Store, job_id: int):
    study = load_study(store, job_id)
    try:
        return study.best_trial
    except ValueError:
        raise NotFound(f"no trial of search job {job_id} has completed yet") from None


def final_config(store: Store, job_id: int) -> TrainConfig:
    """Base settings + the best trial's: what the final training runs (in its own output folder, not the trial's, on
    the whole train part), with how they were chosen for its evaluation run to record."""
    config = job_config(store, job_id)
    return replace(config.train_config(best_params(store, job_id)), selection=selection(store, job_id))


def selection(store: Store, job_id: int) -> dict[str, Any]:
    """How the search chose its best trial, as a run records it (runs.Run.selection): Compare can then tell
    whether the questions a run is scored on are among those its settings were chosen on."""
    config = job_config(store, job_id)
    best = _best_trial(store, job_id)
    candidates = len(finished(load_study(store, job_id)))
    # A search from before validation parts scored its trials on the test part, and did not record which pairs.
    scored = best.user_attrs.get("scored_on", {"split_id": None, "part": "test", "pair_ids": []})
    where = {
        "validation": "the validation part",
        "cv-train": f"{config.folds}-fold cross-validation over the train part",
        "test": "the test part",
    }[scored["part"]]
    how = f"best of {candidates} trials of hyperparameter search job {job_id}, by {OBJECTIVE_NAMES[config.objective]}"
    return {"how": f"{how} on {where}", "candidates": candidates, **scored}


def param_importances(store: Store, job_id: int) -> dict[str, float]:
    """How much each searched setting explains the objective (Optuna's fANOVA); {} until it can be told."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = load_study(store, job_id)
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
            return {}
        return dict(optuna.importance.get_param_importances(study))
    except (WorkbenchError, ValueError, RuntimeError, ZeroDivisionError):
        return {}


def history(store: Store, job_id: int):
    """Optimisation-history data: number, state, value (a pruned trial's last reported one) and the best value
    so far (only completed trials set it)."""
    import pandas as pd

    config = job_config(store, job_id)
    frame = study_trials(store, job_id)[["number", "state", "value"]]
    frame = frame[frame["state"].isin(["complete", "pruned"])].sort_values("number").reset_index(drop=True)
    last_reported = intermediate_values(store, job_id).groupby("number")["value"].last()
    pruned = frame["state"] == "pruned"  # a pruned trial has no value: it is drawn at the last one it reported
    frame.loc[pruned, "value"] = frame.loc[pruned, "number"].map(last_reported)
    done = frame["value"].where(frame["state"] == "complete")
    best = done.cummin() if config.direction == "minimize" else done.cummax()
    return frame.assign(best=pd.to_numeric(best).ffill())


def intermediate_values(store: Store, job_id: int):
    """Each trial's value after every epoch (what the pruner compared): number, state, epoch, value."""
    import pandas as pd

    try:
        trials = load_study(store, job_id).get_trials(deepcopy=False)
    except NotFound:
        trials = []
    rows = [
        {"number": t.number, "state": t.state.name.lower(), "epoch": step, "value": value}
        for t in trials
        for step, value in sorted(t.intermediate_values.items())
    ]
    return pd.DataFrame(rows, columns=["number", "state", "epoch", "value"])
