"""A search's worker process: it takes trials of the study until N have finished, training and scoring each.

Run as `python -m workbench search-worker --study NAME` (the search job starts them; one may be started
by hand on another machine sharing a PostgreSQL storage). A trial trains with the drawn learning rate,
r, alpha, dropout and epochs, reports the eval loss after every epoch to the median pruner, and is scored
by its eval loss on the split's validation part (or the BERTScore F1 of its answers to the validation
questions); for a dataset too small for a useful validation part, by k-fold cross-validation over the
train part instead. Never reads a test pair.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from core import studies, workspace
from core.errors import BadInput
from core.store import Store
from core.train_search.config import SearchConfig
from core.train_search.study import pruner


@contextlib.contextmanager
def _claim_lock(name: str) -> Iterator[None]:
    """Serialises "count the trials, then ask for one" among this machine's workers of one study.

    Without it two workers finishing at the same moment could both start a trial N + 1 (as
    Optuna's MaxTrialsCallback does with parallel workers). Workers on other machines are not
    covered: a shared study may end with up to one extra trial per machine.
    """
    path = workspace.jobs_dir() / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def work(name: str, url: str, index: int = 0, parent: int | None = None) -> int:
    """A worker: take trials of study `name` until N have finished or are running; returns trials run.

    The search's settings come from the study itself, so a worker on another machine needs
    only the storage URL, the study name and a workspace holding the same dataset.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = studies.open_storage(url)
    try:
        probe = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise BadInput(f"no study {name!r} in {studies.redact(url)}") from None
    config = SearchConfig.from_dict(probe.user_attrs["config"])
    job_id = int(probe.user_attrs["job_id"])
    # Seeded apart per worker and per attempt, so that parallel workers do not draw the same settings;
    # constant_liar makes a worker's sampler count the trials other workers are still running.
    seed = int(config.base.get("seed", 42)) + 1000 * index + len(probe.trials)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner(config))
    me = psutil.Process()
    store = Store()
    ran = 0
    try:
        while parent is None or os.getppid() == parent:
            with _claim_lock(name):
                taken = study.get_trials(
                    deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                )
                if len(taken) >= config.trials:
                    break
                trial = study.ask()
                trial.set_user_attr("worker_pid", me.pid)
                trial.set_user_attr("worker_host", socket.gethostname())
                trial.set_user_attr("worker_started", me.create_time())
            print(f"trial {trial.number}: starting", flush=True)
            try:
                value = objective(trial, config, store, job_id, parent)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                print(f"trial {trial.number}: pruned", flush=True)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                study.tell(trial, value)
                print(f"trial {trial.number}: {config.objective} {value:.4f}", flush=True)
            ran += 1
    finally:
        store.close()
    return ran


def objective(trial, config: SearchConfig, store: Store, job_id: int, parent: int | None = None) -> float:
    """Train one trial's settings and score it on the validation part (or by cross-validation over the train part).

    What it was scored on is kept in the trial (`scored_on`): the final training's evaluation run records it.
    """
    import optuna

    from core import training

    params = config.space.suggest(trial)
    out = Path(
        trial.user_attrs.get("output_dir") or workspace.artifacts_dir() / f"search-{job_id}" / f"trial-{trial.number}"
    )
    trial.set_user_attr("output_dir", str(out))
    reported = {int(step): value for step, value in trial.user_attrs.get("reported", {}).items()}
    for step, value in reported.items():  # a retry keeps the first attempt's epochs (folds)
        trial.report(value, step)

    def stop_with_the_search() -> None:
        if parent is not None and os.getppid() != parent:
            raise SystemExit("the search job ended; this worker stops with it")

    started = time.perf_counter()
    try:
        if config.folds:
            return _cross_validate(trial, config, store, params, out, reported, stop_with_the_search)
        return _train_and_score(trial, config, store, params, out, stop_with_the_search)
    except optuna.TrialPruned:
        for folder in [out, *out.glob("fold-*")]:
            training.discard_checkpoint(folder)  # a pruned trial is never resumed
        raise
    finally:
        trial.set_user_attr("seconds", time.perf_counter() - started)


def _train_and_score(trial, config: SearchConfig, store: Store, params: dict, out: Path, stop_with_the_search) -> float:
    """One training on the train part; its eval loss on the validation part after each epoch goes to the pruner.

    The pruner compares intermediate values in the study's direction, so when the objective
    is F1 (maximised) the reported value is the negated eval loss: higher is better either way.
    """
    import optuna

    from core import evaluation, runs, training

    sign = 1.0 if config.direction == "minimize" else -1.0

    def on_epoch(epoch: int, eval_loss: float | None) -> None:
        stop_with_the_search()
        if eval_loss is None:
            return
        trial.set_user_attr("eval_loss_after", eval_loss)
        trial.report(sign * eval_loss, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"eval loss {eval_loss:.4f} after epoch {epoch} is worse than the median")

    train_config = config.train_config(params, str(out))
    result = training.train(None, train_config, store, on_epoch=on_epoch)
    trial.set_user_attr("eval_loss_before", result.eval_loss_before)
    trial.set_user_attr("eval_loss_after", result.eval_loss_after)
    if config.objective == "eval_loss":
        pinned = training.pinned_pairs(store, train_config, out)
        _scored_on(trial, pinned.split_id, "validation", pinned.validation)
        return _finite_eval_loss(trial, result.eval_loss_after)
    run = evaluation.evaluate_training(
        store, out, backend="transformers", limit=config.base.get("limit"), part="validation"
    )
    trial.set_user_attr("eval_run_id", run.id)
    _scored_on(trial, run.split_id, "validation", runs.run_pairs(store, run))
    return evaluation.mean_f1(store, run)


def _cross_validate(
    trial, config: SearchConfig, store: Store, params: dict, out: Path, reported: dict[int, float], stop_with_the_search
) -> float:
    """k trainings, each on k-1 folds of the train part and scored by its eval loss on the fold it held out (fold f
    trains into out/fold-f); the objective is the mean of the k losses.

    The pruner gets the running mean after each fold (step f = folds done), not each epoch's loss: every trial
    deals the same folds (from the training seed, which is not searched) and trains them in the same order, so
    at step f all trials are compared on the mean over the same f folds, whatever their number of epochs.
    A retried trial does not train a finished fold again (train() finds its last checkpoint complete) and does
    not report its step twice.
    """
    import optuna

    from core import training

    losses: list[float] = []
    held_out: list = []
    split_id = None
    for fold in range(1, config.folds + 1):
        fold_config = config.train_config(params, str(out / f"fold-{fold}"), fold)
        result = training.train(None, fold_config, store, on_epoch=lambda _epoch, _loss: stop_with_the_search())
        losses.append(_finite_eval_loss(trial, result.eval_loss_after))
        pinned = training.pinned_pairs(store, fold_config, out / f"fold-{fold}")
        held_out += pinned.validation
        split_id = pinned.split_id
        mean = statistics.fmean(losses)
        trial.set_user_attr("fold_eval_losses", losses)
        if fold not in reported:
            trial.report(mean, fold)
            if trial.should_prune():
                raise optuna.TrialPruned(f"mean eval loss {mean:.4f} after fold {fold} is worse than the median")
    trial.set_user_attr("eval_loss_after", mean)
    _scored_on(trial, split_id, "cv-train", held_out)
    return mean


def _finite_eval_loss(trial, value: float | None) -> float:
    if value is None or not math.isfinite(value):
        raise BadInput(f"trial {trial.number} has no finite eval loss ({value})")
    return value


def _scored_on(trial, split_id: int | None, part: str, pairs: list) -> None:
    """Which questions the trial was scored on: what its selection, should it be the best, is recorded with."""
    trial.set_user_attr("scored_on", {"split_id": split_id, "part": part, "pair_ids": sorted(p.id for p in pairs)})
