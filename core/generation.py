"""Producing a run's answers: the `generate` job kind.

Each answer is committed as soon as it exists, keyed by (run, pair, repeat), so a job that
is killed at any moment and resumed generates every item exactly once. Backend failures
the user can fix (server down, unknown model, timeout) pause the job, keeping what was done.
"""

from __future__ import annotations

import time
from dataclasses import replace

from core import runs, settings
from core.backends import make_backend
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


def generate_run(ctx: JobContext, run_id: int) -> None:
    store = ctx.store
    run = runs.get_run(store, run_id)
    total = len(runs.run_pairs(store, run)) * int(run.config.get("repeats", 1))
    todo = pending_items(store, run)
    done = total - len(todo)
    ctx.progress(done, total, f"run {run_id}: {len(todo)} answers to generate")
    if not todo:
        return
    options = dict(run.config.get("backend_options") or {})
    if run.adapter and run.backend == "transformers":
        options["adapter"] = run.adapter
    if run.adapter and run.backend == "llamacpp":
        options["lora_path"] = run.adapter
    if run.backend == "ollama":
        chosen = settings.load(store)
        options.setdefault("host", chosen.effective_ollama_host)
        options.setdefault("parallel", chosen.ollama_parallel)
    stop = stop_sequences(run.prompt_template)
    # Prompts sharing a configuration go to the backend together: transformers batches them,
    # Ollama serves `parallel` of them at once.
    batch_size = {"transformers": int(options.get("batch_size", 16)), "ollama": int(options.get("parallel", 1))}
    batch_size = batch_size.get(run.backend, 1)
    try:
        backend = make_backend(run.backend, run.model or None, **options)
        started = time.monotonic()
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
                seconds = (time.monotonic() - t0) / len(batch)
                with store.transaction() as conn:
                    conn.executemany(
                        "INSERT OR IGNORE INTO generations (run_id, pair_id, repeat, answer, seconds, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        [(run_id, p.id, repeat, a, seconds, now()) for p, a in zip(batch, answers)],
                    )
                done += len(batch)
                elapsed = time.monotonic() - started
                ctx.progress(
                    done,
                    total,
                    f"run {run_id}: {done}/{total} answers",
                    tokens_per_s=round(backend.completion_tokens / elapsed, 1) if elapsed else None,
                )
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None


def run_generation_job(ctx: JobContext) -> None:
    generate_run(ctx, int(ctx.params["run_id"]))
