"""Producing a run's answers: the `generate` job kind.

Each answer is committed as soon as it exists, keyed by (run, pair, repeat), so a job that
is killed at any moment and resumed generates every item exactly once. A prompt is the question
as the run froze it when it was made (`runs.run_pairs`), whatever is edited since. Backend failures
the user can fix (server down, unknown model, timeout) pause the job, keeping what was done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from core import runs, scoring, settings
from core.backends.base import Backend
from core.decoding import DecodingParams
from core.errors import BackendError
from core.jobs import JobContext, JobPaused
from core.prompting import render_prompt, stop_sequences
from core.store import Store, now


def repeat_params(params: DecodingParams, repeat: int) -> DecodingParams:
    """Repeat r of a configuration samples with seed+r, so repeats differ yet stay reproducible."""
    if params.seed is None or repeat == 0:
        return params
    return replace(params, seed=params.seed + repeat)


def pending_items(store: Store, run: runs.Run) -> list[tuple[runs.ds.StoredPair, int]]:
    done = {
        (r["pair_id"], r["repeat"])
        for r in store.query("SELECT pair_id, repeat FROM generations WHERE run_id = ?", (run.id,))
    }
    repeats = int(run.config.get("repeats", 1))
    pairs = runs.run_pairs(store, run)
    return [(p, r) for r in range(repeats) for p in pairs if (p.id, r) not in done]


def backend_for(store: Store, run: runs.Run) -> Backend:
    """The backend a run asks for: its recorded model and adapter, configured from the workspace settings."""
    options = dict(run.config.get("backend_options") or {})
    if run.adapter and run.backend == "transformers":
        options["adapter"] = run.adapter
    if run.adapter and run.backend == "llamacpp":
        options["lora_path"] = run.adapter
    return settings.backend_for(store, run.backend, run.model, **options)


def batch_size_for(backend: Backend) -> int:
    """Prompts sharing a configuration go together: transformers batches them, Ollama serves them in parallel."""
    return int(getattr(backend, "batch_size", None) or getattr(backend, "parallel", None) or 1)


@dataclass
class Tally:
    """Progress of a job across one or several runs, reported through the job context."""

    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    tokens_at_start: int | None = None

    def report(self, ctx: JobContext, backend: Backend, message: str) -> None:
        if self.tokens_at_start is None:
            self.tokens_at_start = backend.completion_tokens
        elapsed = time.monotonic() - self.started
        rate = (backend.completion_tokens - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0
        ctx.progress(self.done, self.total, message, tokens_per_s=round(rate, 1))


def total_items(store: Store, run: runs.Run) -> int:
    return len(runs.run_pairs(store, run)) * int(run.config.get("repeats", 1))


def generate_run(
    ctx: JobContext,
    run: runs.Run,
    backend: Backend,
    tally: Tally,
    on_batch: Callable[[list[int]], object] | None = None,
) -> None:
    """Generate a run's missing answers, committing each batch; `on_batch` gets the new generation ids."""
    store = ctx.store
    todo = pending_items(store, run)
    stop = stop_sequences(run.prompt_template)
    batch_size = batch_size_for(backend)
    try:
        for repeat in sorted({r for _, r in todo}):
            pairs = [p for p, r in todo if r == repeat]
            for start in range(0, len(pairs), batch_size):
                ctx.check_cancel()
                batch = pairs[start : start + batch_size]
                t0 = time.monotonic()
                answers = backend.generate(
                    [render_prompt(p.question, run.prompt_template) for p in batch],
                    repeat_params(run.params, repeat),
                    stop,
                )
                if len(answers) != len(batch):
                    raise BackendError(f"{backend.name} returned {len(answers)} answers for {len(batch)} prompts")
                seconds = (time.monotonic() - t0) / len(batch)

                with store.transaction() as conn:
                    ids = [
                        conn.execute(
                            "INSERT INTO generations (run_id, pair_id, repeat, answer, seconds, created_at)"
                            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                            (run.id, p.id, repeat, a, seconds, now()),
                        ).fetchone()
                        for p, a in zip(batch, answers)
                    ]
                if on_batch:
                    on_batch([row[0] for row in ids if row])
                tally.done += len(batch)
                tally.report(ctx, backend, f"run {run.id}: {tally.done}/{tally.total} answers")
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None


def generate_and_score(
    ctx: JobContext, run: runs.Run, backend: Backend, tally: Tally, scorer: scoring.ScorerConfig
) -> None:
    """Generate a run's missing answers and score each batch as it lands (a sweep's or an evaluation's work)."""
    scoring.score_run(ctx.store, run.id, scorer)  # answers committed before a crash, not yet scored
    generate_run(ctx, run, backend, tally, on_batch=lambda ids: scoring.score_generations(ctx.store, ids, scorer))


def run_generation_job(ctx: JobContext) -> None:
    run = runs.get_run(ctx.store, int(ctx.params["run_id"]))
    total = total_items(ctx.store, run)
    tally = Tally(total=total, done=total - len(pending_items(ctx.store, run)))
    ctx.progress(tally.done, total, f"run {run.id}: {total - tally.done} answers to generate")
    try:
        backend = backend_for(ctx.store, run)
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None
    generate_run(ctx, run, backend, tally)
