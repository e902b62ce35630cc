"""Hyperparameter search over LoRA training: an Optuna study whose trials are training runs.

A search is a `train-search` job. Its process creates (or, on resume, reloads) the study
`train-search-<job id>` in the Optuna storage (by default the workbench's own SQLite file,
Optuna's tables beside ours; or a PostgreSQL URL from Settings, so that workers on other
machines can join the same study), then starts `workers` worker processes
(`python -m core.train_search worker --study NAME`) and reports the study's progress until
they stop. Each worker takes trials until N have finished: it trains with the drawn learning
rate, r, alpha, dropout and epochs, reports the eval loss after every epoch to a median
pruner, and scores the finished trial by its eval loss on the split's validation part (or the
BERTScore F1 of its answers to the validation questions). For a dataset too small for a useful
validation part, a trial is scored by k-fold cross-validation over the train part instead. The
read side (trials table, best parameters, importances, history data) serves the Training page
and the CLI; `final_config` is what the final training is started with, carrying how it was chosen.

Never reads a test pair (the final training's evaluation is the only one that does), never
builds figures (workbench/figures.py does), never imports streamlit, never trains the final
model itself (that is an ordinary `train` job), and never deletes a study.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from core import dataset, jobs, settings, workspace
from core.errors import BadInput, NotFound, WorkbenchError
from core.jobs import JobContext
from core.store import Store
from core.sweep import optuna_storage
from core.train_config import TrainConfig, refuse_unknown

SEARCHED = ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "epochs")
OBJECTIVES = {"eval_loss": "minimize", "bertscore": "maximize"}
OBJECTIVE_NAMES = {"eval_loss": "eval loss", "bertscore": "BERTScore F1"}
STORAGE_ENV = "WORKBENCH_OPTUNA_STORAGE"  # hands a worker its storage URL without showing a password in `ps`
POLL_SECONDS = 1.0
SQLITE_BUSY_SECONDS = 60.0  # a worker waits this long for another process's write instead of "database is locked"


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SearchSpace:
    """The ranges a search draws from; a range whose ends are equal (or a single choice) fixes that setting."""

    learning_rate: tuple[float, float] = _opt((1e-5, 1e-3), "learning rate: low, high (drawn on a log scale)")
    lora_r: tuple[int, ...] = _opt((4, 8, 16), "LoRA r: the choices, e.g. 4,8,16")
    lora_alpha: tuple[float, ...] = _opt((8, 16, 32), "LoRA alpha: the choices, e.g. 8,16,32")
    lora_dropout: tuple[float, float] = _opt((0.0, 0.1), "LoRA dropout: low, high, within [0, 1)")
    epochs: tuple[int, int] = _opt((1, 3), "epochs: low, high (whole numbers)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchSpace:
        unknown = set(values) - set(SEARCHED)
        if unknown:
            raise BadInput(f"cannot search {', '.join(sorted(unknown))}; searchable: {', '.join(SEARCHED)}")
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in values.items()})

    @classmethod
    def parse(cls, text: str) -> SearchSpace:
        """'learning_rate=1e-5,1e-3 lora_r=4,8' -> those ranges, the defaults for the rest."""
        from core.sweep import parse_grid

        return cls.from_dict(parse_grid(text))

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in asdict(self).items()}

    def check(self) -> None:
        """BadInput (one line) for a range that cannot be searched."""
        for name in ("learning_rate", "lora_dropout", "epochs"):
            if len(getattr(self, name)) != 2:
                raise BadInput(f"{name} range needs two values, low and high; got {list(getattr(self, name))}")
        (lr_low, lr_high), (drop_low, drop_high), (ep_low, ep_high) = self.learning_rate, self.lora_dropout, self.epochs
        checks = [
            (lr_low > 0, f"learning rate must be > 0, got {lr_low}"),
            (lr_low <= lr_high, f"learning rate range is empty: low {lr_low} > high {lr_high}"),
            (bool(self.lora_r), "give at least one LoRA r"),
            (all(int(r) == r and r >= 1 for r in self.lora_r), f"LoRA r must be whole numbers >= 1: {self.lora_r}"),
            (bool(self.lora_alpha), "give at least one LoRA alpha"),
            (all(a > 0 for a in self.lora_alpha), f"LoRA alpha must be > 0: {self.lora_alpha}"),
            (0 <= drop_low < 1 and 0 <= drop_high < 1, f"LoRA dropout must be in [0, 1): {self.lora_dropout}"),
            (drop_low <= drop_high, f"LoRA dropout range is empty: low {drop_low} > high {drop_high}"),
            (int(ep_low) == ep_low and int(ep_high) == ep_high, f"epochs must be whole numbers: {self.epochs}"),
            (ep_low >= 1, f"epochs must be at least 1, got {ep_low}"),
            (ep_low <= ep_high, f"epochs range is empty: low {ep_low} > high {ep_high}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)

    def fixed(self) -> dict[str, Any]:
        """Settings the space does not vary (equal ends, one choice): never suggested, always applied."""
        return {name: _cast(name, values[0]) for name, values in self._values().items() if len(set(values)) == 1}

    def contains(self, name: str, value: Any) -> bool:
        values = self._values()[name]
        if name in ("lora_r", "lora_alpha"):
            return value in values
        return values[0] <= value <= values[1]

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's settings: drawn for what varies, fixed for the rest."""
        chosen = self.fixed()
        for name, values in self._values().items():
            if name in chosen:
                continue
            if name == "learning_rate":
                chosen[name] = trial.suggest_float(name, values[0], values[1], log=True)
            elif name == "lora_dropout":
                chosen[name] = trial.suggest_float(name, values[0], values[1])
            elif name == "epochs":
                chosen[name] = trial.suggest_int(name, int(values[0]), int(values[1]))
            else:
                chosen[name] = _cast(name, trial.suggest_categorical(name, list(values)))
        return chosen

    def _values(self) -> dict[str, tuple]:
        return {name: tuple(getattr(self, name)) for name in SEARCHED}


def _cast(name: str, value: Any) -> Any:
    """JSON brings 8.0 for 8: r and epochs must reach TrainConfig as whole numbers."""
    return int(value) if name in ("lora_r", "epochs") else float(value)


@dataclass(frozen=True)
class SearchConfig:
    base: dict[str, Any] = field(
        metadata={"help": "the fixed training settings (a TrainConfig); the searched ones are drawn per trial"}
    )
    trials: int = _opt(10, "trials that must finish (completed or pruned)")
    workers: int = _opt(1, "worker processes on this machine, each training one trial at a time")
    objective: str = _opt(
        "eval_loss",
        "eval_loss: lowest loss on the validation part after training; bertscore: highest mean F1 of the answers"
        " to the validation questions",
    )
    folds: int = _opt(
        0,
        "0: score trials on the split's validation part; K >= 2: K-fold cross-validation over the train part"
        " instead (each trial trains K times, scored by the mean eval loss on the held-out folds), for a dataset"
        " too small for a useful validation part",
    )
    space: SearchSpace = _opt(SearchSpace(), "the ranges the searched settings are drawn from")
    prune_startup_trials: int = _opt(2, "completed trials before the median pruner starts stopping weak trials")
    prune_warmup_epochs: int = _opt(
        0, "epochs (folds, with cross-validation) a trial always trains before it can be pruned"
    )
    first_trials: list[dict[str, Any]] = _opt(
        [], "parameter sets tried before the sampler draws its own (e.g. your current settings)"
    )
    storage: str = _opt(
        "", "Optuna storage URL; empty: the Settings' Optuna storage when given, else the workbench's SQLite file"
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        refuse_unknown(cls, values, "search")
        values = dict(values)
        if isinstance(values.get("space"), dict):
            values["space"] = SearchSpace.from_dict(values["space"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "space": self.space.to_dict()}

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def train_config(self, params: dict[str, Any], output_dir: str = "", fold: int = 0) -> TrainConfig:
        """A trial's settings (or, for cross-validation, those of its fold 1..folds; 0: the whole train part)."""
        folds = {"cv_folds": self.folds if fold else 0, "cv_fold": fold}
        return TrainConfig.from_dict({**self.base, **params, "output_dir": output_dir, **folds})

    def validate(self, store: Store) -> TrainConfig:
        """Refuse a search that cannot run (BadInput, one line) before anything starts; returns the base config."""
        checks = [
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"),
            (self.trials >= 1, f"a search needs at least one trial, got {self.trials}"),
            (self.workers >= 1, f"a search needs at least one worker, got {self.workers}"),
            (self.prune_startup_trials >= 0, "prune_startup_trials must be >= 0"),
            (self.prune_warmup_epochs >= 0, "prune_warmup_epochs must be >= 0"),
            (len(self.first_trials) <= self.trials, f"more first trials ({len(self.first_trials)}) than trials"),
            (
                self.folds == 0 or self.folds >= 2,
                f"folds must be 0 (the validation part) or at least 2, got {self.folds}",
            ),
            (
                self.folds == 0 or self.objective == "eval_loss",
                "cross-validation scores trials by eval_loss (bertscore answers the questions of a split part)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        self.space.check()
        for params in self.first_trials:
            for name, value in params.items():
                if name not in SEARCHED:
                    raise BadInput(f"first trial sets {name!r}, which is not searched")
                if not self.space.contains(name, value):
                    raise BadInput(f"first trial's {name}={value} lies outside the search space")
        # With cross-validation, a fold's settings: their check also counts the train pairs there are to deal.
        base = self.train_config(self.space.fixed(), fold=1 if self.folds else 0)
        base.validate(store)
        if not self.folds and not dataset.select_pairs(
            store, base.dataset, "validation", "accepted", split_id=base.split_id
        ):
            raise BadInput(
                f"{_no_validation_reason(store, base)}; or cross-validate over the train part instead"
                " (`train --trials N --folds 5`, or Folds on the search form)"
            )
        open_storage(storage_url(store, self.storage))
        return base


def _no_validation_reason(store: Store, base: TrainConfig) -> str:
    """Why a search cannot score its trials on base's validation part (one line)."""
    if base.split_id is not None:
        split = dataset.split_info(store, base.split_id)
    else:
        split = dataset.latest_split(store, base.dataset)
    if split is not None and not split.validation:
        return dataset.no_validation_message(split)
    return f"dataset {base.dataset!r} has no accepted validation pairs to score trials on"


# ---- storage -------------------------------------------------------------------------------------


def storage_url(store: Store, url: str = "") -> str:
    """The study's storage: the given URL, else the store's own SQLite file (as the decoding sweeps use)."""
    return url.strip() or optuna_storage(store)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


@functools.lru_cache(maxsize=8)
def open_storage(url: str):
    """Optuna's RDB storage at url (cached per process); BadInput with the reason when it cannot be opened.

    SQLite: every process writing the study (workers, the job, the page) waits for another's
    write instead of failing with "database is locked"; the file is the store's, already in WAL mode.
    """
    import optuna

    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_SECONDS}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as exc:  # a bad URL, a missing driver, a refused connection
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot open the Optuna storage {redact(url)}: {_scrub(reason, url)}") from None


def _scrub(text: str, url: str) -> str:
    """An error message may quote the URL (a parse error does): never its password."""
    from sqlalchemy.engine import make_url

    text = text.replace(url, redact(url))
    try:
        password = make_url(url).password
    except Exception:
        password = url.partition("@")[0].rpartition(":")[2] if "@" in url else None
    return text.replace(password, "***") if password else text


def study_name(job_id: int) -> str:
    return f"train-search-{job_id}"


def _job_config(store: Store, job_id: int) -> SearchConfig:
    job = jobs.get(store, job_id)
    if job.kind != "train-search":
        raise BadInput(f"job {job_id} is a {job.kind} job, not a hyperparameter search")
    return SearchConfig.from_dict(job.params)


def _pruner(config: SearchConfig):
    import optuna

    return optuna.pruners.MedianPruner(
        n_startup_trials=config.prune_startup_trials, n_warmup_steps=config.prune_warmup_epochs
    )


def load_study(store: Store, job_id: int):
    """The search job's Optuna study (NotFound before its job has created it)."""
    import optuna

    config = _job_config(store, job_id)
    try:
        return optuna.load_study(
            study_name=study_name(job_id),
            storage=open_storage(storage_url(store, config.storage)),
            pruner=_pruner(config),
        )
    except KeyError:
        raise NotFound(f"search job {job_id} has not created its study yet") from None


# ---- the job: one study, several worker processes --------------------------------------------------


def start_search(store: Store, config: SearchConfig) -> int:
    """Check everything (BadInput with the reason, before any process starts), then start the search job.

    An empty storage takes the Settings' Optuna storage, fixed into the job so that a later
    change of Settings does not move a running study.
    """
    config = replace(
        config,
        storage=config.storage.strip() or settings.load(store).optuna_storage,
        base=_pin_split(store, config.base),
    )
    config.validate(store)
    return jobs.submit(store, "train-search", config.to_dict())


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
    from optuna.trial import TrialState

    store, config = ctx.store, SearchConfig.from_dict(ctx.params)
    config.validate(store)
    url = storage_url(store, config.storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name(ctx.job_id),
        storage=open_storage(url),
        direction=config.direction,
        pruner=_pruner(config),
        load_if_exists=True,
    )
    if "config" not in study.user_attrs:
        study.set_user_attr("config", config.to_dict())
        study.set_user_attr("job_id", ctx.job_id)
        study.set_user_attr("pruner", {"name": "MedianPruner", **_pruner_settings(config)})
        study.set_user_attr("sampler", "TPESampler(constant_liar=True)")
    if not study.trials:
        for params in config.first_trials:
            study.enqueue_trial(params)
    for number in _retry_interrupted(study):
        ctx.log(f"trial {number} did not finish (it failed or its worker was stopped); it is tried again")

    finished = _finished(study)
    remaining = config.trials - len(finished)
    ctx.progress(len(finished), config.trials, f"study {study.study_name}: {len(finished)} of {config.trials} trials")
    procs = _start_workers(ctx.job_id, url, min(config.workers, remaining)) if remaining > 0 else []
    if procs:
        ctx.log(f"{len(procs)} worker(s) started: pids {', '.join(str(p.pid) for p, _ in procs)}")
    try:
        failed = _follow(ctx, study, config, procs, seen={t.number for t in finished})
    except BaseException:  # a cancel (or the job's own SIGTERM): the workers stop with it
        _stop_workers([p for p, _ in procs])
        raise
    done = len(_finished(study))
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
    ctx.log(f"best trial {best.number}: {config.objective} {best.value:.4f} with {_params(config, best)}")


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
        new = sorted((t for t in _finished(study) if t.number not in seen), key=lambda t: t.number)
        for trial in new:
            seen.add(trial.number)
            ctx.log(_describe(trial, config))
        if new:
            _report(ctx, study, config, len(seen))
        if exited:
            return failed
        ctx.check_cancel()
        time.sleep(POLL_SECONDS)


def _pruner_settings(config: SearchConfig) -> dict[str, int]:
    return {"n_startup_trials": config.prune_startup_trials, "n_warmup_steps": config.prune_warmup_epochs}


def _finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _params(config: SearchConfig, trial) -> dict[str, Any]:
    return {**config.space.fixed(), **trial.params}


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
        figures.update(best_value=best.value, best_params=_params(config, best), best_trial=best.number)
        message += f"; best {config.objective} {best.value:.4f} (trial {best.number})"
    ctx.progress(done, config.trials, message, **figures)


def _retry_interrupted(study) -> list[int]:
    """Mark trials whose worker on this machine is gone as failed, and queue each failed trial once more.

    A retry keeps the parameters and the output folder (so training resumes from the trial's
    last epoch checkpoint) and re-reports the epochs the first attempt had reported.
    Trials run by live workers, or by workers on other machines, are left alone.
    """
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _worker_alive(trial.user_attrs):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
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
        return bool(proc) and abs(proc.create_time() - attrs.get("worker_started", 0)) < 1.0
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
            command = [sys.executable, "-m", "core.train_search", "worker", "--study", study_name(job_id)]
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


# ---- the worker: takes trials until the study has enough ---------------------------------------------


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
    storage = open_storage(url)
    try:
        probe = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise BadInput(f"no study {name!r} in {redact(url)}") from None
    config = SearchConfig.from_dict(probe.user_attrs["config"])
    job_id = int(probe.user_attrs["job_id"])
    # Seeded apart per worker and per attempt, so that parallel workers do not draw the same settings;
    # constant_liar makes a worker's sampler count the trials other workers are still running.
    seed = int(config.base.get("seed", 42)) + 1000 * index + len(probe.trials)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=_pruner(config))
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


# ---- the read side: what the page shows ----------------------------------------------------------------

TRIAL_COLUMNS = ["number", "state", "value", *SEARCHED, "last_epoch", "seconds", "worker_pid", "output_dir"]


def study_trials(store: Store, job_id: int):
    """One row per trial: number, state, value, the settings it trained with, epochs reported, seconds, worker pid."""
    import pandas as pd

    config = _job_config(store, job_id)
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
                **_params(config, t),
                "last_epoch": t.last_step,
                "seconds": t.user_attrs.get("seconds"),
                "worker_pid": t.user_attrs.get("worker_pid"),
                "output_dir": t.user_attrs.get("output_dir", ""),
            }
        )
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def best_params(store: Store, job_id: int) -> dict[str, Any]:
    """The best completed trial's settings (fixed ones included); NotFound while no trial has completed."""
    config = _job_config(store, job_id)
    return _params(config, _best_trial(store, job_id))


def _best_trial(store: Store, job_id: int):
    study = load_study(store, job_id)
    try:
        return study.best_trial
    except ValueError:
        raise NotFound(f"no trial of search job {job_id} has completed yet") from None


def final_config(store: Store, job_id: int) -> TrainConfig:
    """Base settings + the best trial's: what the final training runs (in its own output folder, not the trial's, on
    the whole train part), with how they were chosen for its evaluation run to record."""
    config = _job_config(store, job_id)
    return replace(config.train_config(best_params(store, job_id)), selection=selection(store, job_id))


def selection(store: Store, job_id: int) -> dict[str, Any]:
    """How the search chose its best trial, as a run records it (runs.Run.selection): Compare can then tell
    whether the questions a run is scored on are among those its settings were chosen on."""
    config = _job_config(store, job_id)
    best = _best_trial(store, job_id)
    candidates = len(_finished(load_study(store, job_id)))
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

    config = _job_config(store, job_id)
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


# ---- `python -m core.train_search worker --study NAME` ---------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.train_search", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="take trials of a search study until it has enough")
    worker.add_argument("--study", required=True, help="study name, train-search-JOB")
    worker.add_argument("--storage", default="", help=f"storage URL; default ${STORAGE_ENV}, else the store's file")
    worker.add_argument("--index", type=int, default=0, help="this worker's number (it seeds the sampler)")
    worker.add_argument("--parent", type=int, default=None, help="stop when this process (the search job) ends")
    args = parser.parse_args(argv)
    url = args.storage or os.environ.get(STORAGE_ENV, "")
    if not url:
        with Store() as store:
            url = storage_url(store)
    ran = work(args.study, url, args.index, args.parent)
    print(f"worker {os.getpid()}: {ran} trial(s) run", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
