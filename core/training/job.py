"""The `train` job: train (in one process or several), export (core.packaging), then evaluate (core.evaluation).

Each stage skips what an earlier attempt finished, so a resumed job picks up where it stopped.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from core import jobs, runs, settings
from core.jobs import JobContext
from core.store import Store
from core.train_config import TrainConfig, with_adapter_settings
from core.training.distributed import train_distributed, training_processes
from core.training.loop import train


def start_training(store: Store, config: TrainConfig) -> int:
    """Check the settings (BadInput with the reason, before any process starts), then start the job."""
    config = replace(config, model=settings.pinned_generator(store, "transformers", config.model))
    config = with_adapter_settings(config)  # recorded with the LoRA settings that train, the continued adapter's
    config.validate(store)
    return jobs.submit(store, "train", config.to_dict())


def run_train_job(ctx: JobContext) -> None:
    """The `train` job kind: train, export (PEFT, GGUF adapter, merged GGUF), then evaluate the adapter.

    params are a TrainConfig as a dict; output defaults to artifacts/train-JOB. The evaluation
    answers the test part of the split the run trained on, the only place a training job reads
    it; a run started from a search records how the search chose it.
    """
    from core import evaluation, packaging

    config = TrainConfig.from_dict(ctx.params)
    row = ctx.store.one_or_raise("SELECT done FROM jobs WHERE id = ?", (ctx.job_id,), f"no job with id {ctx.job_id}")
    done = row["done"]
    ctx.progress(done, None, "loading the model", stage="training")
    processes = training_processes()
    result = train_distributed(ctx, config, processes) if processes > 1 else train(ctx, config, ctx.store)
    summary = f"train loss {result.train_loss_first:.4f} -> {result.train_loss_last:.4f}"
    ctx.progress(
        result.steps,
        result.steps,
        summary,
        stage="exporting",
        output_dir=result.output_dir,
        eval_loss_before=result.eval_loss_before,
        eval_loss_after=result.eval_loss_after,
    )
    baseline = evaluation.decoding_params(ctx.store, config.eval_baseline_run)
    packaging.package_training(Path(result.output_dir), params=baseline, merged=config.export_merged, progress=ctx.log)
    ctx.check_cancel()
    if config.evaluate_with == "none":
        ctx.progress(result.steps, result.steps, f"done: {summary}", stage="done")
        return
    run = _evaluation_run(ctx, config, result.output_dir)
    ctx.progress(0, None, f"evaluating: run {run.id}", stage="evaluating", eval_run_id=run.id)
    f1 = evaluation.evaluate_run(ctx, run)
    ctx.progress(
        result.steps, result.steps, f"done: {summary}; run {run.id} mean F1 {f1:.3f}", stage="done", mean_f1=f1
    )


def _evaluation_run(ctx: JobContext, config: TrainConfig, train_dir: str) -> runs.Run:
    """The job's evaluation run: the one it recorded or an earlier attempt created, else a new one on the test part
    of the split the run was pinned to (see evaluation.EvalConfig.split_id)."""
    from core import evaluation

    run_id = ctx.figures().get("eval_run_id") or _unrecorded_eval_run(ctx, train_dir, config.evaluate_with)
    if run_id is not None:
        return runs.get_run(ctx.store, run_id)
    return evaluation.create_eval_run(
        ctx.store,
        evaluation.EvalConfig(
            train_dir=train_dir, backend=config.evaluate_with, baseline_run=config.eval_baseline_run, limit=config.limit
        ),
        selection=config.selection,
    )


def _unrecorded_eval_run(ctx: JobContext, train_dir: str, backend: str) -> int | None:
    """The evaluation run an earlier attempt of this job created and was stopped before recording, if any.

    The run and the job's figures are two commits; finding the run again makes the second step safe to
    redo, so a resumed job never evaluates into a second, empty run.
    """
    from core.evaluation import RUN_KIND

    row = ctx.store.one(
        "SELECT r.id FROM runs r JOIN jobs j ON j.id = ? WHERE r.kind = ? AND r.backend = ?"
        " AND r.created_at >= j.created_at AND json_extract(r.config, '$.evaluation.train_dir') = ?"
        " ORDER BY r.id DESC LIMIT 1",
        (ctx.job_id, RUN_KIND, backend, str(Path(train_dir))),
    )
    return row["id"] if row else None
