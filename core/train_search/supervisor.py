"""The `train-search` job: one study, several worker processes, and the job's progress while they train.

The job creates (or, on resume, reloads) the study, queues the first trials and the retries of
interrupted ones, starts `workers` processes (`python -m workbench search-worker --study NAME`, see
core.train_search.worker) and follows the study until they stop. It trains nothing itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from core import dataset, jobs, settings, studies, workspace
from core.errors import WorkbenchError
from core.jobs import JobContext
from core.store import Store
from core.train_search.config import SearchConfig
from core.train_search.study import STORAGE_ENV, finished, pruner, pruner_settings, study_name, trial_params

POLL_SECONDS = 1.0


def start_search(store: Store, config: SearchConfig) -> int:
    """Check everything (BadInput with the reason, before any process starts), then start the search job.

    An empty storage takes the Settings' Optuna storage, fixed into the job so that a later
    change of Settings does not move a running study.
    """
    config = replace(
        config,
        storage=config.storage.strip() or settings.load(store).optuna_storage,
        base=_pin_split(store, _pin_model(store, config.base)),
    )
    config.validate(store)
    return jobs.submit(store, "train-search", config.to_dict())


def _pin_model(store: Store, base: dict[str, Any]) -> dict[str, Any]:
    """The base settings with their model fixed (the Settings' generator model when none is named): every worker,
    on this machine or another, then trains the same base."""
    return {**base, "model": settings.pinned_generator(store, "transformers", base.get("model", ""))}


def _pin_split(store: Store, base: dict[str, Any]) -> dict[str, Any]:
    """The base settings with their split fixed (the latest, unless given): every trial, and the final training,
    then use the same parts even if a new split is drawn meanwhile."""
    if base.get("split_id") is not None:
        return base
    split = dataset.latest_split(store, base.get("dataset", ""))
    return {**base, "split_id": split.id} if split else base


def run_train_search_job(ctx: JobContext) -> None:
    """The `train-search` job kind: params are a SearchConfig as a dict.

    A resumed job continues the same study: trials whose worker was killed are tried again
    (same parameters, same output folder, so training resumes from its last epoch checkpoint).
    """
    import optuna

    store, config = ctx.store, SearchConfig.from_dict(ctx.params)
    config.validate(store)
    url = studies.storage_url(store, config.storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name(ctx.job_id),
        storage=studies.open_storage(url),
        direction=config.direction,
        pruner=pruner(config),
        load_if_exists=True,
    )
    if "config" not in study.user_attrs:
        study.set_user_attr("config", config.to_dict())
        study.set_user_attr("job_id", ctx.job_id)
        study.set_user_attr("pruner", {"name": "MedianPruner", **pruner_settings(config)})
        study.set_user_attr("sampler", "TPESampler(constant_liar=True)")
    if not study.trials:
        for params in config.first_trials:
            study.enqueue_trial(params)
    for number in _retry_interrupted(study):
        ctx.log(f"trial {number} did not finish (it failed or its worker was stopped); it is tried again")

    done = finished(study)
    remaining = config.trials - len(done)
    ctx.progress(len(done), config.trials, f"study {study.study_name}: {len(done)} of {config.trials} trials")
    procs = _start_workers(ctx.job_id, url, min(config.workers, remaining)) if remaining > 0 else []
    if procs:
        ctx.log(f"{len(procs)} worker(s) started: pids {', '.join(str(p.pid) for p, _ in procs)}")
    try:
        failed = _follow(ctx, study, config, procs, seen={t.number for t in done})
    except BaseException:  # a cancel (or the job's own SIGTERM): the workers stop with it
        _stop_workers([p for p, _ in procs])
        raise
    _conclude(ctx, study, config, failed)


def _conclude(ctx: JobContext, study, config: SearchConfig, failed: list) -> None:
    """The job's end once its workers have stopped: done with the best trial, or failed with why it stopped."""
    from optuna.trial import TrialState

    done = len(finished(study))
    if done < config.trials:
        if failed:
            proc, log = failed[-1]
            raise WorkbenchError(
                f"search stopped at {done} of {config.trials} trials: worker {proc.pid} failed: {_last_line(log)}"
            )
        raise WorkbenchError(f"search stopped at {done} of {config.trials} trials; resume to continue")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        ctx.progress(done, config.trials, f"done: all {done} trials were pruned", stage="done")
        return
    best = study.best_trial
    message = f"done: best trial {best.number}, {config.objective} {best.value:.4f}"
    ctx.progress(done, config.trials, message, stage="done")
    ctx.log(f"best trial {best.number}: {config.objective} {best.value:.4f} with {trial_params(config, best)}")


def _follow(ctx: JobContext, study, config: SearchConfig, procs: list, seen: set[int]) -> list:
    """Poll the study until every worker has exited: log each trial as it finishes (and each worker that
    fails), report progress, pass a cancel on. Returns the failed workers as (process, log file)."""
    failed: list = []
    while True:
        exited = all(p.poll() is not None for p, _ in procs)
        for proc, log in procs:
            if proc.returncode not in (None, 0) and (proc, log) not in failed:
                failed.append((proc, log))
                ctx.log(f"worker {proc.pid} exited with code {proc.returncode}: {_last_line(log)} (log: {log})")
        new = sorted((t for t in finished(study) if t.number not in seen), key=lambda t: t.number)
        for trial in new:
            seen.add(trial.number)
            ctx.log(_describe(trial, config))
        if new:
            _report(ctx, study, config, len(seen))
        if exited:
            return failed
        ctx.check_cancel()
        time.sleep(POLL_SECONDS)


def _describe(trial, config: SearchConfig) -> str:
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    if trial.state.name == "PRUNED":
        return f"trial {trial.number} pruned after {'fold' if config.folds else 'epoch'} {trial.last_step} ({params})"
    return f"trial {trial.number} complete: {config.objective} {trial.value:.4f} ({params})"


def _report(ctx: JobContext, study, config: SearchConfig, done: int) -> None:
    from optuna.trial import TrialState

    figures: dict[str, Any] = {"stage": "searching", "study": study.study_name}
    message = f"{done} of {config.trials} trials finished"
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        figures.update(best_value=best.value, best_params=trial_params(config, best), best_trial=best.number)
        message += f"; best {config.objective} {best.value:.4f} (trial {best.number})"
    ctx.progress(done, config.trials, message, **figures)


def _retry_interrupted(study) -> list[int]:
    """Mark trials whose worker on this machine is gone as failed, and queue each failed trial once more.

    A retry keeps the parameters and the output folder (so training resumes from the trial's
    last epoch checkpoint) and re-reports the epochs the first attempt had reported.
    Trials run by live workers, or by workers on other machines, are left alone.
    """
    from optuna.trial import TrialState

    studies.fail_interrupted(study, alive=lambda trial: _worker_alive(trial.user_attrs))
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.number not in retried:
            attrs = {"retry_of": trial.number, "output_dir": trial.user_attrs.get("output_dir", "")}
            attrs["reported"] = {str(step): value for step, value in trial.intermediate_values.items()}
            study.enqueue_trial(trial.params, user_attrs=attrs)
            queued.append(trial.number)
    return queued


def _worker_alive(attrs: dict[str, Any]) -> bool:
    if attrs.get("worker_host", socket.gethostname()) != socket.gethostname():
        return True  # another machine's worker: only it can tell
    pid = attrs.get("worker_pid")
    try:
        proc = psutil.Process(pid) if pid else None
        return proc is not None and abs(proc.create_time() - attrs.get("worker_started", 0)) < 1.0
    except psutil.Error:
        return False


def _start_workers(job_id: int, url: str, n: int) -> list[tuple[subprocess.Popen, Path]]:
    """n worker processes in the job's process group (a cancel that kills the group kills them too)."""
    threads = max(1, (os.cpu_count() or 1) // n)  # n workers share the cores instead of fighting over them
    env = {
        **os.environ,
        "WORKBENCH_HOME": str(workspace.home()),
        STORAGE_ENV: url,
        "OMP_NUM_THREADS": str(threads),
    }
    procs = []
    for index in range(n):
        log = workspace.jobs_dir() / f"{job_id}-worker-{index}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            command = [sys.executable, "-m", "workbench", "search-worker", "--study", study_name(job_id)]
            command += ["--index", str(index), "--parent", str(os.getpid())]
            proc = subprocess.Popen(
                command, cwd=jobs.PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        procs.append((proc, log))
    return procs


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + jobs.CANCEL_GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    return lines[-1][:300] if lines else "(no output)"
