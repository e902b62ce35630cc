"""Decoding-parameter sweeps: a grid (or an Optuna search) of configurations, one run each.

A sweep is a row in `sweeps` plus one run per configuration, all on the same questions (their texts
frozen when the sweep is made, for the runs an Optuna search makes later too), and
one background job that generates and scores every (question, configuration, repeat) exactly
once: each answer is committed as it is produced and scored right after, and a resumed job
skips what is already there. The backend is loaded once for the whole sweep.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core import dataset, generation, jobs, runs, scoring
from core.decoding import INT_PARAMS, DecodingParams
from core.errors import BackendError, BadInput, NotFound
from core.jobs import JobContext, JobPaused
from core.prompting import DEFAULT_TEMPLATE, check_template
from core.store import Store, now

SWEEPABLE = tuple(f.name for f in fields(DecodingParams))
MODES = ("product", "one-at-a-time", "optuna")


@dataclass(frozen=True)
class SweepConfig:
    dataset: str = field(metadata={"help": "dataset whose questions are asked"})
    grid: dict[str, list[float]] = field(
        metadata={
            "help": "values per parameter, e.g. 'temperature=0,0.7 top_p=0.7 max_tokens=30 repeat_penalty=1.1'; "
            "with --mode optuna, each parameter's smallest and largest value bound the search"
        }
    )
    mode: str = field(
        default="product",
        metadata={
            "help": "product: every combination; one-at-a-time: vary each parameter alone around the baseline "
            "(as in the study); optuna: search the same space for the best mean F1"
        },
    )
    baseline: DecodingParams = field(
        default_factory=DecodingParams, metadata={"help": "values of the parameters not in the grid"}
    )
    backend: str = field(default="llamacpp", metadata={"help": "llamacpp (embedded), transformers or ollama"})
    model: str = field(default="", metadata={"help": "model name or path; empty uses the embedded model"})
    part: str = field(default="test", metadata={"help": "which part of the latest split to ask: test, train or all"})
    limit: int | None = field(default=None, metadata={"help": "ask only the first N questions"})
    repeats: int = field(
        default=1,
        metadata={
            "help": "answers per question and configuration, with seeds seed, seed+1, ... (tells sampling noise "
            "from a real effect)"
        },
    )
    trials: int = field(default=10, metadata={"help": "Optuna trials (mode optuna)"})
    prompt_template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "prompt text; must contain {question}"})
    scorer_model: str = field(default="", metadata={"help": "BERTScore model; empty uses the embedded MiniLM"})
    rescale: bool = field(default=False, metadata={"help": "also store F1 rescaled with the dataset's own baseline"})
    backend_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "engine options"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadInput(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.grid:
            raise BadInput("the grid is empty: give at least one parameter, e.g. temperature=0,0.7")
        for name, values in self.grid.items():
            if name not in SWEEPABLE:
                raise BadInput(f"cannot sweep {name!r}; sweepable: {', '.join(SWEEPABLE)}")
            if not values:
                raise BadInput(f"no values for {name}")
            for value in values:  # each value must make valid parameters
                DecodingParams(**{**self.baseline.to_dict(), name: value})
        if self.repeats < 1 or self.repeats > 100:
            raise BadInput("repeats must be between 1 and 100")
        if self.mode == "optuna" and self.trials < 1:
            raise BadInput("an Optuna search needs at least one trial")
        if self.limit is not None and self.limit < 1:
            raise BadInput("limit must be at least 1")
        check_template(self.prompt_template)

    @property
    def scorer(self) -> scoring.ScorerConfig:
        return scoring.ScorerConfig(model=self.scorer_model, rescale=self.rescale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepConfig:
        values = dict(values)
        if isinstance(values.get("baseline"), dict):
            values["baseline"] = DecodingParams.from_dict(values["baseline"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def parse_grid(text: str) -> dict[str, list[float]]:
    """'temperature=0,0.7 top_p=0.7' -> {'temperature': [0.0, 0.7], 'top_p': [0.7]}."""
    grid: dict[str, list[float]] = {}
    for item in text.split():
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise BadInput(f"grid item {item!r} should look like name=v1,v2")
        try:
            numbers = [float(v) for v in values.split(",") if v != ""]
        except ValueError:
            raise BadInput(f"grid values for {name} must be numbers, got {values!r}") from None
        if name in INT_PARAMS:
            if any(n != int(n) for n in numbers):
                raise BadInput(f"{name} takes whole numbers, got {values!r}")
            numbers = [int(n) for n in numbers]
        grid[name] = numbers
    return grid


def expand(config: SweepConfig) -> list[DecodingParams]:
    """The configurations a grid sweep runs, without duplicates, in a stable order."""
    base = config.baseline.to_dict()
    if config.mode == "product":
        names = list(config.grid)
        combos = [dict(zip(names, values)) for values in itertools.product(*config.grid.values())]
    else:  # one-at-a-time: each parameter varies alone, the others stay at the baseline
        combos = [{name: v} for name, values in config.grid.items() for v in values]
    out: list[DecodingParams] = []
    for combo in combos:
        params = DecodingParams(**{**base, **combo})
        if params not in out:
            out.append(params)
    return out


@dataclass(frozen=True)
class Sweep:
    id: int
    config: SweepConfig
    job_id: int | None
    created_at: float
    split_id: int | None = None  # the split its questions were drawn from when it was made


def get_sweep(store: Store, sweep_id: int) -> Sweep:
    row = store.one("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
    if row is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    config = SweepConfig.from_dict(json.loads(row["config"]))
    return Sweep(row["id"], config, row["job_id"], row["created_at"], row["split_id"])


def list_sweeps(store: Store, dataset_name: str | None = None) -> list[Sweep]:
    rows = store.query("SELECT id FROM sweeps ORDER BY id DESC")
    sweeps = [get_sweep(store, r["id"]) for r in rows]
    return [s for s in sweeps if dataset_name is None or s.config.dataset == dataset_name]


def sweep_runs(store: Store, sweep_id: int) -> list[runs.Run]:
    return [
        runs.get_run(store, r["id"])
        for r in store.query("SELECT id FROM runs WHERE sweep_id = ? ORDER BY id", (sweep_id,))
    ]


def _run_spec(config: SweepConfig, params: DecodingParams) -> runs.RunSpec:
    return runs.RunSpec(
        dataset=config.dataset,
        backend=config.backend,
        model=config.model,
        params=params,
        part=config.part,
        kind="sweep",
        prompt_template=config.prompt_template,
        limit=config.limit,
        repeats=config.repeats,
        backend_options=config.backend_options,
        scorer=scoring.scorer_stamp(config.scorer),
    )


def _prepare(store: Store, config: SweepConfig) -> tuple[list[DecodingParams], runs.Prepared]:
    """Check everything and hash the model (slow) before anything is written: (grid configurations, prepared)."""
    dataset.dataset_id(store, config.dataset)
    configurations = expand(config) if config.mode != "optuna" else []
    return configurations, runs.prepare_run(store, _run_spec(config, config.baseline))


def _record(store: Store, config: SweepConfig, configurations: list[DecodingParams], prepared: runs.Prepared) -> int:
    """The sweep, its questions frozen for all its runs, and (for grids) its runs: quick writes, one transaction."""
    with store.transaction():
        sweep_id = store.execute(
            "INSERT INTO sweeps (dataset_id, config, split_id, created_at) VALUES (?, ?, ?, ?)",
            (
                dataset.dataset_id(store, config.dataset),
                json.dumps(config.to_dict()),
                prepared.split.id if prepared.split else None,
                now(),
            ),
        ).lastrowid
        runs.freeze_pairs(store, "sweep", sweep_id, prepared.pairs)
        for params in configurations:
            runs.record_run(store, _run_spec(config, params), prepared, sweep_id=sweep_id)
    return sweep_id


def create_sweep(store: Store, config: SweepConfig) -> int:
    """Record a sweep and (for grids) its runs, without a job; everything is checked before anything is written."""
    return _record(store, config, *_prepare(store, config))


def start_sweep(store: Store, config: SweepConfig) -> tuple[int, int]:
    """Create the sweep and start its job; returns (sweep id, job id).

    The sweep, its runs and its job are one transaction: a crash at any point leaves either all of them
    or none (never runs no job will fill). The job's process starts inside it and waits for the commit
    when it claims the job; if the commit never comes, it finds no job and ends.
    """
    prepared = _prepare(store, config)
    with store.transaction():
        sweep_id = _record(store, config, *prepared)
        job_id = jobs.submit(store, "sweep", {"sweep_id": sweep_id})
        store.execute("UPDATE sweeps SET job_id = ? WHERE id = ?", (job_id, sweep_id))
        store.execute("UPDATE runs SET job_id = ? WHERE sweep_id = ?", (job_id, sweep_id))
    return sweep_id, job_id


def _frozen(store: Store, sweep: Sweep) -> runs.Prepared:
    """What the runs a sweep makes later (Optuna trials) are made from: its model, and its split and
    questions as frozen when the sweep was made, so that every trial asks the same texts."""
    pairs = runs.frozen_pairs(store, "sweep", sweep.id)
    if not pairs:  # a sweep made before sweeps froze their questions (store migration 5), with no run: freeze now
        _, prepared = _prepare(store, sweep.config)
        with store.transaction():
            split_id = prepared.split.id if prepared.split else None
            store.execute("UPDATE sweeps SET split_id = ? WHERE id = ?", (split_id, sweep.id))
            runs.freeze_pairs(store, "sweep", sweep.id, prepared.pairs)
        return prepared
    model = runs.resolve_model(store, sweep.config.backend, sweep.config.model)
    split = dataset.split_info(store, sweep.split_id) if sweep.split_id is not None else None
    return runs.Prepared(model, runs.model_fingerprint(store, model), split, pairs)


# ---- the job ------------------------------------------------------------------------------------


def run_sweep_job(ctx: JobContext) -> None:
    store = ctx.store
    sweep = get_sweep(store, int(ctx.params["sweep_id"]))
    config = sweep.config
    try:
        if config.mode == "optuna":
            _run_optuna(ctx, sweep)
            return
        members = sweep_runs(store, sweep.id)
        total = sum(generation.total_items(store, r) for r in members)
        done = total - sum(len(generation.pending_items(store, r)) for r in members)
        tally = generation.Tally(total=total, done=done)
        ctx.progress(done, total, f"sweep {sweep.id}: {len(members)} configurations")
        backend = generation.backend_for(store, members[0])
        scoring.warm_up(config.scorer)
        for run in members:
            generation.generate_and_score(ctx, run, backend, tally, config.scorer)
        ctx.progress(tally.done, total, f"sweep {sweep.id}: {len(members)} configurations scored")
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None


def _suggest(trial, name: str, values: list[float]) -> float | int:
    low, high = min(values), max(values)
    if low == high:
        return low
    if name in INT_PARAMS:
        return trial.suggest_int(name, int(low), int(high))
    return trial.suggest_float(name, low, high)


def optuna_storage(store: Store) -> str:
    return f"sqlite:///{store.path}"


def _study_storage(store: Store):
    """The store's file as Optuna storage whose writers wait for each other (not Optuna's default 5 s)."""
    from core.train_search import open_storage  # imported here: core.train_search imports this module

    return open_storage(optuna_storage(store))


def _run_optuna(ctx: JobContext, sweep: Sweep) -> None:
    """Optuna search for the best mean F1; the study lives in the store's SQLite file.

    A trial interrupted by a crash, a cancel or a vanished server is tried again with the same
    parameters, on the same run, so its finished answers are kept. A resumed search draws new
    parameters (its sampler is seeded past the trials already made) instead of repeating them.
    """
    import optuna

    store, config = ctx.store, sweep.config
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=f"sweep-{sweep.id}",
        storage=_study_storage(store),
        direction="maximize",
        load_if_exists=True,
    )
    study.sampler = optuna.samplers.TPESampler(seed=(config.baseline.seed or 0) + len(study.trials))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    unfinished = {r.id for r in sweep_runs(store, sweep.id) if generation.pending_items(store, r)}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if trial.user_attrs.get("run_id") in unfinished:
            study.enqueue_trial(trial.params, skip_if_exists=False)
            unfinished.discard(trial.user_attrs["run_id"])

    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    prepared = _frozen(store, sweep)
    n_items = len(prepared.pairs) * config.repeats

    tally = generation.Tally(total=config.trials * n_items, done=finished * n_items)
    backend = None

    def objective(trial) -> float:
        nonlocal backend
        ctx.check_cancel()
        chosen = {name: _suggest(trial, name, values) for name, values in config.grid.items()}
        run = _add_or_find(store, sweep, DecodingParams(**{**config.baseline.to_dict(), **chosen}), prepared)
        trial.set_user_attr("run_id", run.id)
        backend = backend or generation.backend_for(store, run)
        generation.generate_and_score(ctx, run, backend, tally, config.scorer)
        return float(scoring.run_scores(store, run.id, scoring.scorer_stamp(config.scorer))["f1"].mean())

    remaining = config.trials - finished
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    best = study.best_trial
    ctx.log(f"best trial {best.number}: mean F1 {best.value:.4f} with {best.params}")


def _add_or_find(store: Store, sweep: Sweep, params: DecodingParams, prepared: runs.Prepared) -> runs.Run:
    for run in sweep_runs(store, sweep.id):
        if run.params == params:
            return run
    spec = _run_spec(sweep.config, params)
    return runs.get_run(store, runs.record_run(store, spec, prepared, sweep_id=sweep.id, job_id=sweep.job_id))


def sweep_table(store: Store, sweep_id: int):
    """One row per configuration: its parameters and F1 summary (mean, median, std, 95% CI), best first."""
    import pandas as pd

    from core import stats

    sweep = get_sweep(store, sweep_id)
    stamp = scoring.scorer_stamp(sweep.config.scorer)
    rows = []
    for run in sweep_runs(store, sweep_id):
        scores = scoring.run_scores(store, run.id, stamp)
        summary = stats.summarize(scores["f1"].dropna().to_numpy())
        rows.append(
            {
                "run": run.id,
                **{k: getattr(run.params, k) for k in SWEEPABLE},
                "n": summary.n,
                "mean_f1": summary.mean,
                "median_f1": summary.median,
                "std_f1": summary.std,
                "ci_low": summary.ci_low,
                "ci_high": summary.ci_high,
                "rouge_l": float(scores["rouge_l"].mean()) if len(scores) else float("nan"),
            }
        )
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values("mean_f1", ascending=False, na_position="last").reset_index(drop=True)
        frame["best"] = frame.index == 0
    return frame
