"""A search job's Optuna study: its name, its storage, its pruner, and the trials it has finished.

The job, its workers and the read side all open the study through here, so they agree on where it
is and how it prunes.
"""

from __future__ import annotations

from typing import Any

from core import jobs, studies
from core.errors import BadInput, NotFound
from core.store import Store
from core.train_search.config import SearchConfig

STORAGE_ENV = "WORKBENCH_OPTUNA_STORAGE"  # hands a worker its storage URL without showing a password in `ps`


def study_name(job_id: int) -> str:
    return f"train-search-{job_id}"


def job_config(store: Store, job_id: int) -> SearchConfig:
    """The settings of search job `job_id` (BadInput for a job of another kind)."""
    job = jobs.get(store, job_id)
    if job.kind != "train-search":
        raise BadInput(f"job {job_id} is a {job.kind} job, not a hyperparameter search")
    return SearchConfig.from_dict(job.params)


def pruner_settings(config: SearchConfig) -> dict[str, int]:
    return {"n_startup_trials": config.prune_startup_trials, "n_warmup_steps": config.prune_warmup_epochs}


def pruner(config: SearchConfig):
    import optuna

    return optuna.pruners.MedianPruner(**pruner_settings(config))


def load_study(store: Store, job_id: int):
    """The search job's Optuna study (NotFound before its job has created it)."""
    import optuna

    config = job_config(store, job_id)
    try:
        return optuna.load_study(
            study_name=study_name(job_id),
            storage=studies.open_storage(studies.storage_url(store, config.storage)),
            pruner=pruner(config),
        )
    except KeyError:
        raise NotFound(f"search job {job_id} has not created its study yet") from None


def finished(study) -> list:
    """The trials that count towards the search's N: completed or pruned."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def trial_params(config: SearchConfig, trial) -> dict[str, Any]:
    """A trial's training settings: the drawn ones and those the space fixes."""
    return {**config.space.fixed(), **trial.params}
