"""A training job's figures in the store (training_metrics: per step and per epoch) and its log lines.

A run outside a job (a search's trial) records nothing here: it reports through its callbacks.
"""

from __future__ import annotations

from core.jobs import JobContext
from core.store import Store, now


def record(ctx: JobContext | None, store: Store, step: int, epoch: float, metrics: dict[str, float]) -> None:
    """training_metrics rows belong to a job; a run outside a job reports through on_step only."""
    if ctx is None:
        return
    stamp = now()
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO training_metrics (job_id, step, epoch, name, value, at) VALUES (?, ?, ?, ?, ?, ?)",
            [(ctx.job_id, step, epoch, name, float(value), stamp) for name, value in metrics.items()],
        )


def forget_after(ctx: JobContext | None, store: Store, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint; their first recording goes."""
    if ctx is not None:
        store.execute("DELETE FROM training_metrics WHERE job_id = ? AND step > ?", (ctx.job_id, step))


def log(ctx: JobContext | None, line: str) -> None:
    if ctx is not None:
        ctx.log(line)


def metrics_frame(store: Store, job_id: int):
    """Every figure a training job recorded: columns step, epoch, name, value (the loss curve's data)."""
    import pandas as pd

    rows = store.query(
        "SELECT step, epoch, name, value FROM training_metrics WHERE job_id = ? ORDER BY step, id", (job_id,)
    )
    return pd.DataFrame([dict(r) for r in rows], columns=["step", "epoch", "name", "value"])
