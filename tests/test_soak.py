"""Soak: a sweep, a training run, a QA generation (embedded model) and a loop of review edits at once on one workspace,
with job process groups killed with SIGKILL at random moments and resumed.

Afterwards nothing is lost or doubled: every edit is in the history once, every (run, pair, repeat) is
answered and scored once, training reached its last step with each step recorded once, and no writer
ever saw "database is locked". Bounded (about two minutes); `make soak` runs it alone, `make test` with
the rest. SOAK_SEED picks other kill moments.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from core import dataset, jobs, qa_generation, sweep, training
from core.errors import WorkbenchError
from core.store import Store
from core.sweep import SweepConfig
from core.train_config import TrainConfig
from tests.conftest import tiny_training

KILLS = 4
EDITS = 150
LOCKED = "database is locked"


def _edit_loop(pair_ids: list[int], counts: dict, errors: list[str], stop: threading.Event) -> None:
    """Review edits and undos through the core API, as a second user would make them."""
    rng = random.Random(1)
    with Store() as store:
        for i in range(EDITS):
            if stop.is_set():
                break
            try:
                if i % 4 == 3:
                    counts["undos"] += dataset.undo_last_change(store, "starter") is not None
                else:
                    dataset.update_pair(store, rng.choice(pair_ids), answer=f"Soak edit number {i}, long enough.")
                    counts["edits"] += 1
            except WorkbenchError as exc:
                errors.append(str(exc))
            except Exception as exc:  # a locked database would land here
                errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)


@pytest.mark.soak
def test_soak_nothing_lost_nothing_doubled(starter, tiny_llama, capsys):
    rng = random.Random(int(os.environ.get("SOAK_SEED", "7")))
    sweep_id, sweep_job = sweep.start_sweep(
        starter,
        SweepConfig(
            dataset="starter",
            grid={"temperature": [0.0, 0.5, 1.0]},
            backend="echo",
            part="test",
            limit=6,
            repeats=2,
            backend_options={"delay": 0.3},
        ),
    )
    train_job = training.start_training(starter, TrainConfig(**tiny_training(tiny_llama, epochs=3, limit=16)))
    qa_job = qa_generation.submit(
        starter, qa_generation.QAGenerationConfig(dataset="soak-generated", topics=["statistics"], n=4)
    )
    job_ids = [sweep_job, train_job, qa_job]

    accepted = dataset.pairs_frame(starter, "starter", ["accepted"])["id"].tolist()
    counts = {"edits": 0, "undos": 0, "kills": 0, "resumes": 0}
    errors: list[str] = []
    stop = threading.Event()
    editor = threading.Thread(target=_edit_loop, args=(accepted[-20:], counts, errors, stop))
    editor.start()

    killed: set[int] = set()  # killed and not yet resumed
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            states = {j: jobs.get(starter, j) for j in job_ids}
            active = [j for j, info in states.items() if info.state in jobs.ACTIVE]
            for job_id in [j for j in killed if states[j].state in jobs.RESUMABLE]:
                jobs.resume(starter, job_id)
                killed.remove(job_id)
                counts["resumes"] += 1
            if not active and not killed:
                break
            running = [j for j in active if states[j].state == "running" and states[j].pid and j not in killed]
            if counts["kills"] < KILLS and running and rng.random() < 0.3:
                victim = rng.choice(running)
                os.killpg(states[victim].pid, signal.SIGKILL)
                killed.add(victim)
                counts["kills"] += 1
            time.sleep(rng.uniform(0.5, 2.0))
    finally:
        stop.set()
        editor.join()

    final = {j: jobs.get(starter, j) for j in job_ids}
    assert all(job.state == "done" for job in final.values()), {j: (i.state, i.message) for j, i in final.items()}

    logs = [line for j in job_ids for line in jobs.log_tail(starter, j, 10_000)]
    locked = [line for line in logs + errors if LOCKED in line]
    assert not locked, locked[:3]
    assert not errors, errors[:3]

    history = starter.query(
        "SELECT h.new_value, COUNT(*) AS n FROM pair_history h JOIN changes c ON c.id = h.change_id"
        " WHERE c.kind = 'edit' AND h.new_value LIKE 'Soak edit number %' GROUP BY 1"
    )
    assert len(history) == counts["edits"] and all(r["n"] == 1 for r in history)  # each edit once
    undone = starter.one("SELECT COUNT(*) FROM changes WHERE kind = 'undo' AND summary LIKE 'undo: %'")[0]
    assert undone == counts["undos"]  # each undo once

    run_ids = [r.id for r in sweep.sweep_runs(starter, sweep_id)]
    marks = ",".join("?" * len(run_ids))
    answered = starter.query(
        f"SELECT run_id, pair_id, repeat, COUNT(*) AS n FROM generations WHERE run_id IN ({marks}) GROUP BY 1, 2, 3",
        run_ids,
    )
    assert len(answered) == final[sweep_job].total == 3 * 6 * 2 and {r["n"] for r in answered} == {1}
    scored = starter.query(
        f"SELECT g.id, COUNT(s.id) AS n FROM generations g LEFT JOIN scores s ON s.generation_id = g.id"
        f" WHERE g.run_id IN ({marks}) GROUP BY g.id",
        run_ids,
    )
    assert {r["n"] for r in scored} == {1}  # every answer scored, once

    steps = [
        r["step"]
        for r in starter.query(
            "SELECT step FROM training_metrics WHERE job_id = ? AND name = 'train_loss' ORDER BY step", (train_job,)
        )
    ]
    assert steps == list(range(1, final[train_job].total + 1))  # resumed to the end, each step once

    with capsys.disabled():
        operations = counts["edits"] + counts["undos"] + len(answered) + len(steps)
        print(
            f"\nsoak: {operations} operations ({counts['edits']} edits, {counts['undos']} undos, {len(answered)}"
            f" answers, {len(steps)} training steps), {counts['kills']} kills, {counts['resumes']} resumes,"
            f" {len(errors)} errors, {len(locked)} 'database is locked'"
        )
