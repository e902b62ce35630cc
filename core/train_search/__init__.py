"""Hyperparameter search over LoRA training: an Optuna study whose trials are training runs.

    space.py       SearchSpace: the ranges a trial's settings are drawn from
    config.py      SearchConfig: what a search is asked to do, and its checks
    study.py       the job's study: name, storage, pruner, finished trials
    supervisor.py  the `train-search` job: creates the study, starts the workers, follows them
    worker.py      a worker process: takes trials, trains and scores each
    results.py     the read side: trials, best settings, importances, history, the final training's settings

A search is a `train-search` job whose study `train-search-<job id>` lives in the Optuna storage
(core.studies: by default the workbench's own SQLite file, or a PostgreSQL URL from Settings, so
that workers on other machines can join the same study).

Never reads a test pair (the final training's evaluation is the only one that does), never
builds figures (workbench/figures.py does), never imports streamlit, never trains the final
model itself (that is an ordinary `train` job), and never deletes a study.
"""

from core.studies import redact, storage_url
from core.train_search.config import OBJECTIVE_NAMES, OBJECTIVES, SearchConfig
from core.train_search.results import (
    TRIAL_COLUMNS,
    best_params,
    final_config,
    history,
    intermediate_values,
    param_importances,
    selection,
    study_trials,
)
from core.train_search.space import SEARCHED, SearchSpace, parse_trials
from core.train_search.study import STORAGE_ENV, load_study, study_name
from core.train_search.supervisor import run_train_search_job, start_search
from core.train_search.worker import objective, work

__all__ = [
    "OBJECTIVES",
    "OBJECTIVE_NAMES",
    "SEARCHED",
    "STORAGE_ENV",
    "TRIAL_COLUMNS",
    "SearchConfig",
    "SearchSpace",
    "best_params",
    "final_config",
    "history",
    "intermediate_values",
    "load_study",
    "objective",
    "param_importances",
    "parse_trials",
    "redact",
    "run_train_search_job",
    "selection",
    "start_search",
    "storage_url",
    "study_name",
    "study_trials",
    "work",
]
