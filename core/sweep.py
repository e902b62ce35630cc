"""Decoding-parameter sweeps: a grid (or an Optuna search) of configurations, one run each.

A sweep is a row in `sweeps` plus one run per configuration, all on the same questions (their texts
frozen when the sweep is made, for the runs an Optuna search makes later too), and
one background job that generates and scores every (question, configuration, repeat) exactly
once: each answer is committed as it is produced and scored right after, and a resumed job
skips what is already there. The backend is loaded once for the whole sweep.

The best configuration is chosen on the sweep's validation questions (`choose`: the one rule the
table, the Optuna objective, the confirmation and Compare follow), and is then run once on the
test part of the same split (`confirm_best`), so the number reported is not the best of N noisy
estimates on the questions it was picked on. A sweep never reports a choice made on test as honest.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from core import dataset, generation, jobs, runs, scoring, settings, studies
from core.backends import USER_BACKENDS
from core.config import Config, option
from core.dataset import PART_CHOICES
from core.decoding import INT_PARAMS, DecodingParams
from core.errors import BackendError, BadInput, NotFound
from core.jobs import JobContext, JobPaused
from core.prompting import DEFAULT_TEMPLATE, check_template
from core.store import Store, now
from core.studies import store_url as optuna_storage  # the store's file as Optuna storage

SWEEPABLE = tuple(f.name for f in fields(DecodingParams))
MODES = ("product", "one-at-a-time", "optuna")


@dataclass(frozen=True)
class SweepConfig(Config):
    what = "sweep setting"

    dataset: str = option(help="dataset whose questions are asked")
    grid: dict[str, list[float]] = option(
        help="values per parameter, e.g. 'temperature=0,0.7 top_p=0.7 max_tokens=30 repeat_penalty=1.1'; "
        "with --mode optuna, each parameter's smallest and largest value bound the search"
    )
    mode: str = option(
        "product",
        help="product: every combination; one-at-a-time: vary each parameter alone around the baseline "
        "(as in the study); optuna: search the same space for the best mean F1",
        choices=MODES,
    )
    baseline: DecodingParams = option(DecodingParams(), help="values of the parameters not in the grid")
    backend: str = option(
        "llamacpp",
        help="llamacpp (embedded), transformers, ollama or openai (an OpenAI-compatible server, see Settings)",
        choices=(*USER_BACKENDS, "echo"),
    )
    model: str = option(
        "", help="model name or path; empty: the Settings' generator for this backend, else the embedded model"
    )
    part: str = option(
        "validation",
        help="which part of the latest split to ask: validation (for choosing: the best configuration is "
        "picked on it, then confirmed once on test), test (for reporting: a best picked on it is optimistic), "
        "train, or all (the best is picked on its validation questions)",
        choices=PART_CHOICES,
        flag="--split",
    )
    limit: int | None = option(None, help="ask only the first N questions", min=1)
    repeats: int = option(
        1,
        help="answers per question and configuration, with seeds seed, seed+1, ... (tells sampling noise "
        "from a real effect)",
        min=1,
        max=100,
    )
    # 0 is a grid sweep's to keep: sweeps saved with it (the number is unused there) must still load.
    trials: int = option(10, help="Optuna trials (mode optuna)", min=0)
    prompt_template: str = option(DEFAULT_TEMPLATE, help="prompt text; must contain {question}")
    scorer_model: str = option(
        "", help="BERTScore model; empty: the Settings' scorer model, else the embedded MiniLM", flag="--scorer"
    )
    rescale: bool = option(False, help="also store F1 rescaled with the dataset's own baseline")
    backend_options: dict[str, Any] = option({}, help="engine options", cli=False)
    confirms: int | None = option(
        None,
        help="the sweep whose best configuration this one runs on the test part (set by confirm_best)",
        cli=False,
    )

    def _check(self) -> None:
        if not self.grid:
            raise BadInput("the grid is empty: give at least one parameter, e.g. temperature=0,0.7")
        for name, values in self.grid.items():
            if name not in SWEEPABLE:
                raise BadInput(f"cannot sweep {name!r}; sweepable: {', '.join(SWEEPABLE)}")
            if not values:
                raise BadInput(f"no values for {name}")
            for value in values:  # each value must make valid parameters
                DecodingParams(**{**self.baseline.to_dict(), name: value})
        if self.mode == "optuna" and self.trials < 1:
            raise BadInput("an Optuna search needs at least one trial")
        check_template(self.prompt_template)

    @property
    def scorer(self) -> scoring.ScorerConfig:
        return scoring.ScorerConfig(model=self.scorer_model, rescale=self.rescale)


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


def _run_spec(config: SweepConfig, params: DecodingParams, selection: dict[str, Any] | None = None) -> runs.RunSpec:
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
        selection=selection or {},
    )


@dataclass(frozen=True)
class _Prepared:
    """What a sweep is made from, found before anything is written (see runs.Prepared for its runs' part)."""

    configurations: list[DecodingParams]  # the grid's (none for Optuna: its trials make their runs later)
    run: runs.Prepared
    # The split the sweep's questions are told apart by (validation, test): its part's, the latest for part all.
    split: dataset.SplitInfo | None


def _prepare(store: Store, config: SweepConfig, split_id: int | None = None) -> _Prepared:
    """Check everything and hash the model (slow) before anything is written; on split `split_id` (None: the latest)."""
    dataset.dataset_id(store, config.dataset)
    configurations = expand(config) if config.mode != "optuna" else []
    prepared = runs.prepare_run(store, replace(_run_spec(config, config.baseline), split_id=split_id))
    split = prepared.split if config.part != "all" else dataset.latest_split(store, config.dataset)
    return _Prepared(configurations, prepared, split)


def _check_choosable(config: SweepConfig, prepared: _Prepared) -> None:
    """Refuse a sweep whose best could only be chosen on test questions without it saying so: part all of a split
    without a validation part (part validation is refused by runs.check_spec). Asking for the test part by name
    stays allowed; Compare then marks its best as optimistic."""
    if config.part != "all" or (prepared.split is not None and prepared.split.validation):
        return
    if prepared.split is None:
        raise BadInput(f"dataset {config.dataset!r} has no split yet; run `split --dataset {config.dataset}` first")
    raise BadInput(dataset.no_validation_message(prepared.split))


def _record(store: Store, config: SweepConfig, prepared: _Prepared, selection: dict[str, Any] | None = None) -> int:
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
        assert sweep_id is not None  # an INSERT always sets it
        runs.freeze_pairs(store, "sweep", sweep_id, prepared.run.pairs)
        for params in prepared.configurations:
            runs.record_run(store, _run_spec(config, params, selection), prepared.run, sweep_id=sweep_id)
    return sweep_id


def _with_settings(store: Store, config: SweepConfig) -> SweepConfig:
    """The config with its generator and scorer as Settings choose them, recorded so: its runs, later trials and
    its confirmation all use the ones the sweep was made with, whatever Settings say by then."""
    return replace(
        config,
        model=settings.pinned_generator(store, config.backend, config.model),
        scorer_model=settings.resolve_scorer(store, config.scorer_model),
    )


def create_sweep(store: Store, config: SweepConfig) -> int:
    """Record a sweep and (for grids) its runs, without a job; everything is checked before anything is written."""
    config = _with_settings(store, config)
    prepared = _prepare(store, config)
    _check_choosable(config, prepared)
    return _record(store, config, prepared)


def start_sweep(store: Store, config: SweepConfig) -> tuple[int, int]:
    """Create the sweep and start its job; returns (sweep id, job id)."""
    if config.confirms is not None:  # its run must carry the selection and split only confirm_best knows
        raise BadInput(f"a confirmation on test is made from its sweep: confirm sweep {config.confirms} instead")
    config = _with_settings(store, config)
    prepared = _prepare(store, config)
    _check_choosable(config, prepared)
    return _start(store, config, prepared)


def _start(
    store: Store, config: SweepConfig, prepared: _Prepared, selection: dict[str, Any] | None = None
) -> tuple[int, int]:
    """The sweep, its runs and its job as one transaction: a crash at any point leaves either all of them
    or none (never runs no job will fill). The job's process starts inside it and waits for the commit
    when it claims the job; if the commit never comes, it finds no job and ends.
    """
    with store.transaction():
        sweep_id = _record(store, config, prepared, selection)
        job_id = jobs.submit(store, "sweep", {"sweep_id": sweep_id})
        store.execute("UPDATE sweeps SET job_id = ? WHERE id = ?", (job_id, sweep_id))
        store.execute("UPDATE runs SET job_id = ? WHERE sweep_id = ?", (job_id, sweep_id))
    return sweep_id, job_id


def _frozen(store: Store, sweep: Sweep) -> runs.Prepared:
    """What the runs a sweep makes later (Optuna trials) are made from: its model, and its split and
    questions as frozen when the sweep was made, so that every trial asks the same texts."""
    pairs = runs.frozen_pairs(store, "sweep", sweep.id)
    if not pairs:  # a sweep made before sweeps froze their questions (store migration 5), with no run: freeze now
        prepared = _prepare(store, sweep.config)
        with store.transaction():
            split_id = prepared.split.id if prepared.split else None
            store.execute("UPDATE sweeps SET split_id = ? WHERE id = ?", (split_id, sweep.id))
            runs.freeze_pairs(store, "sweep", sweep.id, prepared.run.pairs)
        return prepared.run
    model = settings.resolve_generator(store, sweep.config.backend, sweep.config.model)
    # A run of part all has no split (runs.check_spec), even where its sweep keeps one to tell its parts apart.
    split = (
        dataset.split_info(store, sweep.split_id) if sweep.split_id is not None and sweep.config.part != "all" else None
    )
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
        # All configurations at once: the embedded engine mixes them in one batch and reads each question once.
        generation.generate_and_score(ctx, members, backend, tally, config.scorer)
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


def _run_optuna(ctx: JobContext, sweep: Sweep) -> None:
    """Optuna search for the best mean F1 on the questions that decide (`choice_questions`: its validation
    questions where it has any); the study lives in the store's SQLite file.

    A trial interrupted by a crash, a cancel or a vanished server is tried again with the same
    parameters, on the same run, so its finished answers are kept. A resumed search draws new
    parameters (its sampler is seeded past the trials already made) instead of repeating them.
    """
    import optuna

    store, config = ctx.store, sweep.config
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=f"sweep-{sweep.id}",
        storage=studies.open_storage(optuna_storage(store)),  # writers wait for each other (not 5 s)
        direction="maximize",
        load_if_exists=True,
    )
    study.sampler = optuna.samplers.TPESampler(seed=(config.baseline.seed or 0) + len(study.trials))
    studies.fail_interrupted(study)  # this job is the only process running its trials
    unfinished = {r.id for r in sweep_runs(store, sweep.id) if generation.pending_items(store, r)}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if trial.user_attrs.get("run_id") in unfinished:
            study.enqueue_trial(trial.params, skip_if_exists=False)
            unfinished.discard(trial.user_attrs["run_id"])

    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    prepared = _frozen(store, sweep)
    n_items = len(prepared.pairs) * config.repeats
    # Read again: freezing an old sweep's questions just now may have recorded its split.
    part, deciding = choice_questions(store, get_sweep(store, sweep.id))

    tally = generation.Tally(total=config.trials * n_items, done=finished * n_items)
    backend = None

    def objective(trial) -> float:
        nonlocal backend
        ctx.check_cancel()
        chosen = {name: _suggest(trial, name, values) for name, values in config.grid.items()}
        run = _add_or_find(store, sweep, DecodingParams(**{**config.baseline.to_dict(), **chosen}), prepared)
        trial.set_user_attr("run_id", run.id)
        backend = backend or generation.backend_for(store, run)
        generation.generate_and_score(ctx, [run], backend, tally, config.scorer)
        return decision_f1(scoring.run_scores(store, run.id, scoring.scorer_stamp(config.scorer)), deciding)

    remaining = config.trials - finished
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    best = study.best_trial
    ctx.log(f"best trial {best.number}: mean F1 {best.value:.4f} on {part} with {best.params}")


def _add_or_find(store: Store, sweep: Sweep, params: DecodingParams, prepared: runs.Prepared) -> runs.Run:
    for run in sweep_runs(store, sweep.id):
        if run.params == params:
            return run
    spec = _run_spec(sweep.config, params)
    return runs.get_run(store, runs.record_run(store, spec, prepared, sweep_id=sweep.id, job_id=sweep.job_id))


# ---- choosing the best, and confirming it on test ----------------------------------------------


@dataclass(frozen=True)
class Choice:
    """How a sweep's best configuration is chosen: on which of its questions, and its runs ranked on them."""

    sweep_id: int
    part: str  # "validation"; or, for a sweep whose questions hold no validation pair, its own part
    pair_ids: tuple[int, ...]  # the questions the choice is made on
    ranked: tuple[tuple[int, float], ...]  # (run id, mean F1 on those questions), best first; runs without one left out

    @property
    def best(self) -> int | None:
        return self.ranked[0][0] if self.ranked else None

    @property
    def how(self) -> str:
        return f"best of {len(self.ranked)} configurations of sweep {self.sweep_id} by mean F1 on {self.part}"

    def describe(self) -> str:
        """One line for the sweep's table: where its best is chosen, and what that means for its score."""
        if self.part == "validation":
            return (
                f"The best is chosen by mean F1 on the sweep's {len(self.pair_ids)} validation questions;"
                " confirm it on test to report it."
            )
        return (
            f"This sweep has no validation questions: the best is chosen on the {len(self.pair_ids)} {self.part}"
            " questions it is scored on, so its score is optimistic."
        )


def _part_ids(store: Store, sweep: Sweep, part: str) -> set[int]:
    """The pairs in one part of the split the sweep was made on (none for a sweep without a split)."""
    if sweep.split_id is None:
        return set()
    return {p.id for p in dataset.select_pairs(store, sweep.config.dataset, part, "all", split_id=sweep.split_id)}


def choice_questions(store: Store, sweep: Sweep) -> tuple[str, tuple[int, ...]]:
    """The one rule for which questions decide a sweep's best: (part, pair ids).

    Those of its questions in the validation part of its split; when it has none (a sweep of the test or
    train part, or of a split without validation), all its questions, on which it is also scored.
    """
    asked = [p.id for p in runs.frozen_pairs(store, "sweep", sweep.id)]
    validation = _part_ids(store, sweep, "validation")
    deciding = tuple(i for i in asked if i in validation)
    return ("validation", deciding) if deciding else (sweep.config.part, tuple(asked))


def decision_f1(scores, pair_ids: Sequence[int]) -> float:
    """A run's mean F1 over its answers (every repeat) to the deciding questions; NaN while none is scored."""
    return float(scores.loc[scores["pair_id"].isin(pair_ids), "f1"].mean())


def _rank(sweep: Sweep, part: str, pair_ids: tuple[int, ...], scores: dict[int, Any]) -> Choice:
    decided = [(run_id, decision_f1(frame, pair_ids)) for run_id, frame in scores.items()]
    # sorted() is stable: of equal scores, the earlier run stays first.
    ranked = sorted(((run_id, f1) for run_id, f1 in decided if f1 == f1), key=lambda item: -item[1])
    return Choice(sweep.id, part, pair_ids, tuple(ranked))


def _member_scores(store: Store, sweep: Sweep) -> dict[int, Any]:
    stamp = scoring.scorer_stamp(sweep.config.scorer)
    return {run.id: scoring.run_scores(store, run.id, stamp) for run in sweep_runs(store, sweep.id)}


def choose(store: Store, sweep_id: int) -> Choice:
    """A sweep's runs ranked on the questions that decide (`choice_questions`), with the sweep's scorer."""
    sweep = get_sweep(store, sweep_id)
    return _rank(sweep, *choice_questions(store, sweep), _member_scores(store, sweep))


def confirmation(store: Store, sweep_id: int) -> tuple[int, int] | None:
    """(run id, job id) of the run of a sweep's best on test that confirm_best made; None before it is made."""
    row = store.one(
        "SELECT r.id, s.job_id FROM sweeps s JOIN runs r ON r.sweep_id = s.id"
        " WHERE json_extract(s.config, '$.confirms') = ? ORDER BY s.id LIMIT 1",
        (sweep_id,),
    )
    return (row["id"], row["job_id"]) if row else None


def confirm_best(store: Store, sweep_id: int) -> tuple[int, int]:
    """Run a sweep's best configuration once on the test part of the split it was made on; (run id, job id).

    The run is the one run of a new sweep (its `confirms` names this one), scored with the same scorer, in a
    background job like any sweep's; its `selection` records the candidates and the questions the best was
    chosen on. A sweep is confirmed once: asked again, this returns the confirmation made before.
    """
    sweep = get_sweep(store, sweep_id)
    if sweep.config.confirms is not None:
        raise BadInput(f"sweep {sweep.id} is the test run of sweep {sweep.config.confirms}'s best; confirm that sweep")
    if (made := confirmation(store, sweep.id)) is not None:
        return made
    if sweep.split_id is None:
        raise BadInput(f"sweep {sweep.id} was made without a split version, so it has no test part to confirm on")
    if sweep.job_id is not None and jobs.get(store, sweep.job_id).state in jobs.ACTIVE:
        raise BadInput(f"sweep {sweep.id} is still running: confirm its best once it has finished")
    choice = choose(store, sweep.id)
    if choice.best is None:
        raise BadInput(f"sweep {sweep.id} has no scored answers yet: there is no best to confirm")
    if _part_ids(store, sweep, "test") & set(choice.pair_ids):
        raise BadInput(
            f"sweep {sweep.id} chose its best on test questions: a test run would be scored on the questions it"
            " was chosen on; sweep the validation part to choose, then confirm"
        )
    best = runs.get_run(store, choice.best)
    config = replace(
        sweep.config,
        part="test",
        mode="product",
        grid={name: [getattr(best.params, name)] for name in sweep.config.grid},
        baseline=best.params,
        confirms=sweep.id,
    )
    selection = {
        "how": choice.how,
        "candidates": len(choice.ranked),
        "split_id": sweep.split_id,
        "part": choice.part,
        "pair_ids": list(choice.pair_ids),
    }
    prepared = _prepare(store, config, split_id=sweep.split_id)  # hashes the model: outside the transaction
    with store.transaction():
        if (made := confirmation(store, sweep.id)) is not None:  # another click made it while this one hashed
            return made
        confirming_id, job_id = _start(store, config, prepared, selection)
    return sweep_runs(store, confirming_id)[0].id, job_id


def sweep_table(store: Store, sweep_id: int):
    """One row per configuration: its parameters and F1 summary (mean, median, std, 95% CI) over all its
    questions, its mean F1 per part where its questions span parts (validation_f1, test_f1), best first.

    `best` marks the configuration `choose` picks: by mean F1 on its validation questions where it has any.
    """
    import pandas as pd

    from core import stats

    sweep = get_sweep(store, sweep_id)
    scores = _member_scores(store, sweep)
    choice = _rank(sweep, *choice_questions(store, sweep), scores)
    asked = {p.id for p in runs.frozen_pairs(store, "sweep", sweep.id)}
    # A mean per part only where the questions span parts (part all): otherwise it is mean_f1 again.
    in_part = {part: _part_ids(store, sweep, part) & asked for part in ("validation", "test")}
    spans = {part: ids for part, ids in in_part.items() if 0 < len(ids) < len(asked)}
    rows = []
    for run in sweep_runs(store, sweep_id):
        frame = scores[run.id]
        summary = stats.summarize(frame["f1"].dropna().to_numpy())
        rows.append(
            {
                "run": run.id,
                **{k: getattr(run.params, k) for k in SWEEPABLE},
                "n": summary.n,
                "mean_f1": summary.mean,
                **{f"{part}_f1": decision_f1(frame, list(ids)) for part, ids in spans.items()},
                "median_f1": summary.median,
                "std_f1": summary.std,
                "ci_low": summary.ci_low,
                "ci_high": summary.ci_high,
                "rouge_l": float(frame["rouge_l"].mean()) if len(frame) else float("nan"),
                "best": run.id == choice.best,
            }
        )
    frame = pd.DataFrame(rows)
    if len(frame):
        order = [run_id for run_id, _ in choice.ranked]
        order += [run_id for run_id in frame["run"] if run_id not in order]  # unscored runs last, in run order
        frame = frame.set_index("run").loc[order].reset_index()
    return frame
