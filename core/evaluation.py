"""Evaluating a fine-tuned adapter: answers to the test questions from base model + adapter, scored like any run.

The questions come from the split the adapter was trained on (its test part; a search scores
its trials on the validation part), never from a newer split that may hold its training pairs.

The result is an ordinary run (kind `finetuned`, its adapter recorded), so the Compare page
puts it next to the decoding-only runs. The prompt template is the one the adapter was
trained with; the decoding parameters are copied from a chosen baseline run, so the
comparison changes one thing only. By default the embedded llama.cpp engine runs the
base GGUF with the adapter converted to GGUF (llama.cpp speed); transformers+PEFT runs
the PEFT adapter directly.

Never trains and never merges weights; a training output folder is only read (apart
from the GGUF adapter, which is converted into its export folder when first needed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core import generation, jobs, models, runs, scoring, settings
from core.config import Config, option
from core.dataset import PART_CHOICES
from core.decoding import DecodingParams
from core.errors import BackendError, BadInput
from core.jobs import JobContext, JobPaused
from core.store import Store
from core.train_dir import TrainDir

ENGINES = ("llamacpp", "transformers")
RUN_KIND = "finetuned"


@dataclass(frozen=True)
class EvalConfig(Config):
    what = "evaluation setting"

    train_dir: str = option(help="training output folder (it holds adapter/ and train_config.json)", flag="--adapter")
    backend: str = option(
        "llamacpp",
        help="llamacpp: base GGUF + GGUF adapter (fast); transformers: base checkpoint + PEFT adapter",
        choices=ENGINES,
    )
    baseline_run: int | None = option(None, help="copy the decoding parameters of this run; empty: greedy decoding")
    part: str = option("test", help="which part of the split to answer", choices=PART_CHOICES, flag="--split")
    split_id: int | None = option(
        None, help="the split (by id) to answer a part of; empty: the one the adapter was trained on"
    )
    limit: int | None = option(None, help="answer only the first N questions", min=1)
    base_gguf: str = option("", help="base model as GGUF for llamacpp; empty: the embedded GGUF (embedded base only)")
    scorer_model: str = option(
        "", help="BERTScore model; empty: the Settings' scorer model, else the embedded MiniLM", flag="--scorer"
    )

    @property
    def scorer(self) -> scoring.ScorerConfig:
        return scoring.ScorerConfig(model=self.scorer_model)


def _label(trained: dict[str, Any], train_dir: Path) -> str:
    """How an evaluation run is named on Compare: method, rank, learning rate, folder (and what DPO started from)."""
    label = f"{trained['method']} r={trained['lora_r']} lr={trained['learning_rate']:g} ({train_dir.name})"
    if trained.get("method") == "dpo":
        label += f" beta={trained['beta']:g}"
    if trained.get("from_adapter"):
        label += f" after {Path(trained['from_adapter']).name}"
    return label


def train_settings(train_dir: str | Path) -> dict[str, Any]:
    """The settings a training output folder was made with (its train_config.json)."""
    folder = TrainDir.holding(train_dir)  # the adapter folder itself may be given
    return {**folder.settings(BadInput), "train_dir": str(folder.root)}


def gguf_adapter_path(train_dir: str | Path) -> Path:
    return TrainDir(train_dir).gguf_adapter


def _base_gguf(store: Store, config: EvalConfig, trained: dict[str, Any]) -> str:
    if config.base_gguf:
        return config.base_gguf
    if models.is_embedded_checkpoint(trained["resolved_model"]):
        # Named, so that a Settings GGUF never stands in: an adapter runs on the base it was trained on.
        return settings.resolve_generator(store, "llamacpp", models.EMBEDDED_GENERATOR)
    raise BadInput(
        "the adapter was trained on a model other than the embedded one: give its GGUF as base_gguf, "
        "or evaluate with the transformers engine"
    )


def decoding_params(store: Store, baseline_run: int | None) -> DecodingParams:
    if baseline_run is None:
        return DecodingParams(temperature=0.0)
    return runs.get_run(store, baseline_run).params


def _prepare_eval(
    store: Store, config: EvalConfig, selection: dict[str, Any] | None = None
) -> tuple[runs.RunSpec, runs.Prepared, EvalConfig]:
    """Check everything and hash the base model (slow) before anything is written; refuses bad settings."""
    if config.backend not in ENGINES:
        raise BadInput(f"evaluation engine must be one of {', '.join(ENGINES)}, got {config.backend!r}")
    # Recorded with the run, so that a resumed job scores with the scorer its stamp names, whatever Settings say then.
    config = replace(config, scorer_model=settings.resolve_scorer(store, config.scorer_model))
    trained = train_settings(config.train_dir)
    train_dir = Path(trained["train_dir"])
    # The split the adapter was trained on: the latest split's test part may hold pairs it was trained on. A
    # folder trained before runs recorded their split has none: the latest split, as then.
    split_id = config.split_id if config.split_id is not None else trained.get("split_id")
    if config.backend == "llamacpp":
        model, adapter = _base_gguf(store, config, trained), str(gguf_adapter_path(train_dir))
    else:
        model, adapter = trained["resolved_model"], str(TrainDir(train_dir).adapter)
    spec = runs.RunSpec(
        dataset=trained["dataset"],
        backend=config.backend,
        model=model,
        params=decoding_params(store, config.baseline_run),
        part=config.part,
        kind=RUN_KIND,
        adapter=adapter,
        prompt_template=trained["prompt_template"],
        label=_label(trained, train_dir),
        limit=config.limit,
        backend_options={},
        scorer=scoring.scorer_stamp(config.scorer),
        split_id=split_id,
        selection=selection or {},
    )
    return spec, runs.prepare_run(store, spec), replace(config, train_dir=str(train_dir), split_id=split_id)


def _record_eval(store: Store, spec: runs.RunSpec, prepared: runs.Prepared, config: EvalConfig) -> int:
    """The run with its evaluation settings, in one insert (a run without them could not be evaluated)."""
    return runs.record_run(store, spec, prepared, extra_config={"evaluation": config.to_dict()})


def create_eval_run(store: Store, config: EvalConfig, selection: dict[str, Any] | None = None) -> runs.Run:
    """Check everything and record the run (nothing is generated yet); refuses bad settings with BadInput.

    `selection`: how the adapter's settings were chosen (a search's record, see runs.Run.selection).
    """
    return runs.get_run(store, _record_eval(store, *_prepare_eval(store, config, selection)))


def ensure_gguf_adapter(run: runs.Run, log=print) -> None:
    """Convert the PEFT adapter to GGUF for llama.cpp when the run needs it and it is not there yet."""
    if run.backend != "llamacpp" or Path(run.adapter).exists():
        return
    from core import packaging

    train_dir = Path(run.adapter).parent.parent
    trained = train_settings(train_dir)
    log("converting the adapter to GGUF for llama.cpp ...")
    packaging.adapter_to_gguf(TrainDir(train_dir).adapter, Path(trained["resolved_model"]), Path(run.adapter))


def evaluate_run(ctx: JobContext, run: runs.Run) -> float:
    """Generate the run's missing answers and score them; returns the run's mean F1."""
    evaluation = EvalConfig.from_dict(run.config.get("evaluation") or {"train_dir": ""})
    ensure_gguf_adapter(run, ctx.log)
    scorer = evaluation.scorer
    total = generation.total_items(ctx.store, run)
    tally = generation.Tally(total=total, done=total - len(generation.pending_items(ctx.store, run)))
    try:
        backend = generation.backend_for(ctx.store, run)
        generation.generate_and_score(ctx, [run], backend, tally, scorer)
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None
    return mean_f1(ctx.store, run)


def mean_f1(store: Store, run: runs.Run) -> float:
    scores = scoring.run_scores(store, run.id, run.scorer or None)
    if scores.empty:
        raise BadInput(f"run {run.id} has no scored answers")
    return float(scores["f1"].mean())


class QuietContext(JobContext):
    """A context for evaluating inside another process's work (an Optuna trial): no progress rows, no log."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, job_id=0, params={})

    def progress(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False


def evaluate_training(
    store: Store,
    train_dir: str | Path,
    backend: str = "llamacpp",
    limit: int | None = None,
    baseline_run: int | None = None,
    part: str = "test",
    ctx: JobContext | None = None,
) -> runs.Run:
    """Create and fill an evaluation run in this process (Optuna trials call this, on the validation part)."""
    config = EvalConfig(train_dir=str(train_dir), backend=backend, limit=limit, baseline_run=baseline_run, part=part)
    run = create_eval_run(store, config)
    evaluate_run(ctx or QuietContext(store), run)
    return runs.get_run(store, run.id)


def start_evaluation(store: Store, config: EvalConfig) -> tuple[runs.Run, int]:
    """Record the evaluation run (refusing bad settings first) and start its job.

    The run and its job are one transaction (as a sweep's, see core.sweep.start_sweep): a crash leaves
    both or neither, never a run no job will fill.
    """
    prepared = _prepare_eval(store, config)
    with store.transaction():
        run_id = _record_eval(store, *prepared)
        job_id = jobs.submit(store, "evaluate", {"run_id": run_id})
        store.execute("UPDATE runs SET job_id = ? WHERE id = ?", (job_id, run_id))
    return runs.get_run(store, run_id), job_id


def run_evaluate_job(ctx: JobContext) -> None:
    """The `evaluate` job kind: params {"run_id": N}; resuming generates and scores only what is missing."""
    run = runs.get_run(ctx.store, int(ctx.params["run_id"]))
    f1 = evaluate_run(ctx, run)
    ctx.progress(generation.total_items(ctx.store, run), None, f"run {run.id}: mean F1 {f1:.3f}", mean_f1=f1)
