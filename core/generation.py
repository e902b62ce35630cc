"""Producing a run's answers: the `generate` job kind.

Each answer is committed as soon as it exists, keyed by (run, pair, repeat), so a job that
is killed at any moment and resumed generates every item exactly once. A prompt is the question
as the run froze it when it was made (`runs.run_pairs`), whatever is edited since. Backend failures
the user can fix (server down, unknown model, timeout) pause the job, keeping what was done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from core import runs, scoring, settings
from core.backends.base import Backend, Request, answers_as_done
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
    if run.backend == "llamacpp":
        if run.adapter:
            options["lora_path"] = run.adapter
        # The engine mode the run was made with (a run made before runs recorded one: one at a time, as then).
        options["parallel"] = (run.config.get("engine") or {}).get("parallel", 1)
    return settings.backend_for(store, run.backend, run.model, **options)


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


SCORE_EVERY = 16  # answers scored together: BERTScore per answer would cost more than generating it


Item = tuple[runs.Run, runs.ds.StoredPair, int]  # (run, question, repeat)


def pending(store: Store, members: list[runs.Run]) -> list[Item]:
    """Every missing answer of these runs (a sweep's, or one run's)."""
    return [(run, pair, repeat) for run in members for pair, repeat in pending_items(store, run)]


def generate_items(
    ctx: JobContext,
    items: list[Item],
    backend: Backend,
    tally: Tally,
    on_batch: Callable[[list[int]], object] | None = None,
) -> None:
    """Generate the given answers, committing each as it is done; `on_batch` gets new generation ids,
    SCORE_EVERY at a time. Items may belong to several runs (a sweep's configurations): the embedded engine
    decodes them together and reads a question's prompt once for all of them (core.backends.base)."""
    store = ctx.store
    fresh: list[int] = []
    ctx.check_cancel()

    def flush() -> None:
        if on_batch and fresh:
            on_batch(list(fresh))
        fresh.clear()

    try:
        for template in dict.fromkeys(run.prompt_template for run, _, _ in items):
            work = [item for item in items if item[0].prompt_template == template]
            requests = [
                Request(render_prompt(p.question, template), repeat_params(run.params, r)) for run, p, r in work
            ]
            answers = answers_as_done(backend, requests, stop_sequences(template))
            with contextlib.closing(answers):  # a cancel stops the engine's sequences in flight
                for answer in answers:
                    run, pair, repeat = work[answer.index]
                    with store.transaction() as conn:
                        row = conn.execute(
                            "INSERT INTO generations (run_id, pair_id, repeat, answer, seconds, created_at)"
                            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                            (run.id, pair.id, repeat, answer.text, answer.seconds, now()),
                        ).fetchone()
                    if row:
                        fresh.append(row[0])
                    if len(fresh) >= SCORE_EVERY:
                        flush()
                    tally.done += 1
                    tally.report(ctx, backend, f"{tally.done}/{tally.total} answers")
                    ctx.check_cancel()
        flush()
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None


def generate_and_score(
    ctx: JobContext, members: list[runs.Run], backend: Backend, tally: Tally, scorer: scoring.ScorerConfig
) -> None:
    """Generate the runs' missing answers and score them as they land (a sweep's or an evaluation's work)."""
    for run in members:  # answers committed before a crash, not yet scored
        scoring.score_run(ctx.store, run.id, scorer)
    items = pending(ctx.store, members)
    generate_items(ctx, items, backend, tally, on_batch=lambda ids: scoring.score_generations(ctx.store, ids, scorer))


def run_generation_job(ctx: JobContext) -> None:
    run = runs.get_run(ctx.store, int(ctx.params["run_id"]))
    total = total_items(ctx.store, run)
    tally = Tally(total=total, done=total - len(pending_items(ctx.store, run)))
    ctx.progress(tally.done, total, f"run {run.id}: {total - tally.done} answers to generate")
    try:
        backend = backend_for(ctx.store, run)
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None
    generate_items(ctx, pending(ctx.store, [run]), backend, tally)
