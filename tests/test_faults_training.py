"""Training under faults: a kill in the middle of a checkpoint swap, a SIGTERM while the checkpoint of a cancel is
being written, data that changed before a resume, the CUDA random state, and a kill between the evaluation run's
commit and the job's record of it. Each test injects the fault and asserts what was kept.

A kill inside one process is simulated by an exception no code of the workbench catches, raised at the chosen
point: it leaves on disk and in the store exactly what the kill leaves. The SIGTERM is a real signal to a real job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import textwrap
from pathlib import Path

import pytest
import torch

from core import dataset, evaluation, jobs, runs, training
from core.errors import BadInput
from core.formats import PairRow
from core.jobs import JobContext
from core.training import TrainConfig, checkpoints, loop
from tests.conftest import tiny_training, wait_until


class Killed(BaseException):
    """The process dies here (a BaseException, so that no `except Exception` of the code under test sees it)."""


def _config(tiny_llama, out: Path | None = None, **overrides) -> TrainConfig:
    return TrainConfig(**tiny_training(tiny_llama, **({"output_dir": str(out)} if out else {}), **overrides))


def _steps(store, job_id: int) -> list[int]:
    rows = store.query("SELECT step FROM training_metrics WHERE job_id = ? AND name = 'train_loss'", (job_id,))
    return [r["step"] for r in rows]


def _saved(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=True)


# ---- 2: the checkpoint swap ------------------------------------------------------------------

# Every filesystem step a checkpoint save can take, in the old swap (rmtree, rename) as in the new one
# (rename of a file, symlink, rename over the link, rmtree of the previous generation).
SWAP_STEPS = [(torch, "save"), (os, "replace"), (os, "rename"), (os, "symlink"), (shutil, "rmtree"), (Path, "rename")]


@pytest.mark.parametrize("kill_at", range(1, 7))
def test_a_kill_at_any_point_of_a_checkpoint_swap_leaves_a_complete_checkpoint_that_resume_continues_from(
    starter, tiny_llama, tmp_path, monkeypatch, kill_at
):
    out = tmp_path / "out"
    config = _config(tiny_llama, out, epochs=2, limit=2)  # one step per epoch, a checkpoint after each
    saves, taken = [], []
    real_save = loop.save_checkpoint

    def counting_save(*args, **kwargs):
        saves.append(1)
        return real_save(*args, **kwargs)

    def killable(owner, name):
        real = getattr(owner, name)

        def step(*args, **kwargs):
            if len(saves) == 2:  # the second save replaces the first one's checkpoint
                taken.append(name)
                if len(taken) == kill_at:
                    raise Killed()
            return real(*args, **kwargs)

        return step

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", counting_save)
        for owner, name in SWAP_STEPS:
            patch.setattr(owner, name, killable(owner, name))
        with contextlib.suppress(Killed):  # past the swap's last step, nothing is killed
            training.train(None, config, starter)

    steps: list[dict] = []
    result = training.train(None, config, starter, on_step=steps.append)
    resumed_after = steps[0]["step"] - 1 if steps else result.steps
    assert resumed_after in (1, 2), f"killed at step {kill_at} of the swap ({taken}), resumed from scratch"
    assert result.steps == 2 and _saved(out)["step"] == 2
    assert (out / "checkpoint" / "adapter_model.safetensors").exists()


# ---- 3: SIGTERM while the checkpoint of a cancel is written -----------------------------------

SLOW_SAVE = """
    import os
    import time

    import torch

    _real_save = torch.save


    def _slow_save(obj, f, *args, **kwargs):
        # A training checkpoint's state is written, then the save lingers once (as a big model's would),
        # telling the test that it is inside the save.
        _real_save(obj, f, *args, **kwargs)
        marker = os.environ["SLOW_SAVE_MARKER"]
        if isinstance(obj, dict) and "optimizer" in obj and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(4)


    torch.save = _slow_save
"""


def test_a_sigterm_while_a_cancelled_run_writes_its_checkpoint_waits_for_it_and_resume_continues_from_it(
    starter, tiny_llama, tmp_path, monkeypatch
):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SLOW_SAVE))
    marker = tmp_path / "inside-the-save"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SLOW_SAVE_MARKER", str(marker))
    job_id = training.start_training(starter, _config(tiny_llama, batch_size=1))
    wait_until(lambda: len(_steps(starter, job_id)) >= 3, timeout=180)
    jobs.request_cancel(starter, job_id)
    wait_until(marker.exists, timeout=60)
    os.killpg(jobs.get(starter, job_id).pid, signal.SIGTERM)  # what a cancel's escalation sends the job's group

    job = jobs.wait(starter, job_id, timeout=120)
    assert job.state == "cancelled", job.message
    trained = _steps(starter, job_id)
    out = Path(os.environ["WORKBENCH_HOME"]) / "artifacts" / f"train-{job_id}"
    saved = _saved(out)["step"]
    assert saved == max(trained) < job.total  # the checkpoint holds the last step taken, written whole

    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=300)
    assert job.state == "done", job.message
    assert f"resuming at epoch 1, step {saved} of {job.total}" in "\n".join(jobs.log_tail(starter, job_id, 200))
    assert _steps(starter, job_id) == list(range(1, job.total + 1))


# ---- 5: resume after the data changed --------------------------------------------------------


def test_a_resumed_run_trains_on_the_pairs_pinned_at_its_start_whatever_the_dataset_became(
    starter, tiny_llama, tmp_path
):
    out = tmp_path / "out"
    config = _config(tiny_llama, out, epochs=2, limit=4)  # two steps per epoch, a checkpoint after the first epoch
    reference = training.train(None, _config(tiny_llama, tmp_path / "uninterrupted", epochs=2, limit=4), starter)
    first = {"train": dataset.select_pairs(starter, "starter", "train")[:4]}

    def killed_in_the_second_epoch(step: dict) -> None:
        if step["step"] == 3:
            raise Killed()

    with pytest.raises(Killed):
        training.train(None, config, starter, on_step=killed_in_the_second_epoch)
    assert _saved(out)["step"] == 2

    edited = first["train"][2]
    dataset.update_pair(starter, edited.id, answer="A different answer that the run never saw.")
    dataset.add_pairs(starter, "starter", [PairRow("A new question?", "A new answer.", "")], "accepted")
    dataset.make_split(starter, "starter", seed=7)
    assert dataset.select_pairs(starter, "starter", "train")[:4] != first["train"]

    steps: list[dict] = []
    result = training.train(None, config, starter, on_step=steps.append)
    assert [s["step"] for s in steps] == [3, 4]
    assert result.train_loss_last == pytest.approx(reference.train_loss_last, rel=1e-5)
    assert result.eval_loss_after == pytest.approx(reference.eval_loss_after, rel=1e-5)
    pinned = json.loads((out / training.EXAMPLES_FILE).read_text())
    assert [p["id"] for p in pinned["train"]] == [p.id for p in first["train"]]
    assert pinned["train"][2]["answer"] == edited.answer and pinned["split_version"] == 1

    (out / training.EXAMPLES_FILE).unlink()  # as a checkpoint written before runs pinned their pairs
    with pytest.raises(BadInput, match="does not record the pairs it was trained on"):
        training.train(None, config, starter)


# ---- 14: the CUDA random state ---------------------------------------------------------------


def test_a_checkpoint_keeps_the_random_state_of_the_cpu_and_of_every_cuda_device(monkeypatch):
    state = checkpoints._rng_state()
    drawn = torch.rand(3)
    checkpoints._restore_rng(state)
    assert torch.equal(torch.rand(3), drawn)
    assert ("cuda_rng" in state) == torch.cuda.is_available()

    devices = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here: its generators are stood in for
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine with fewer GPUs
    state = checkpoints._rng_state()
    assert state["cuda_rng"] == devices
    checkpoints._restore_rng(state)
    assert restored == devices[:1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_restores_the_cuda_generator_on_a_gpu():
    state = checkpoints._rng_state()
    drawn = torch.rand(3, device="cuda")
    checkpoints._restore_rng(state)
    assert torch.equal(torch.rand(3, device="cuda"), drawn)


# ---- 10: the evaluation run and the job's record of it ---------------------------------------


def test_a_kill_between_the_evaluation_runs_commit_and_its_record_in_the_job_evaluates_into_that_one_run(
    starter, tiny_llama, monkeypatch
):
    params = tiny_training(tiny_llama, limit=2, evaluate_with="transformers", export_merged=False)
    job_id = jobs.submit(starter, "train", TrainConfig(**params).to_dict(), start=False)
    real_create = evaluation.create_eval_run

    def created_then_killed(*args, **kwargs):
        real_create(*args, **kwargs)
        raise Killed()

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(evaluation, "create_eval_run", created_then_killed)
        training.run_train_job(JobContext(starter, job_id, params))
    [orphan] = [r for r in runs.list_runs(starter) if r.run.kind == evaluation.RUN_KIND]
    assert "eval_run_id" not in jobs.get(starter, job_id).figures

    training.run_train_job(JobContext(starter, job_id, params))  # the resumed attempt
    evaluated = [r for r in runs.list_runs(starter) if r.run.kind == evaluation.RUN_KIND]
    assert [r.run.id for r in evaluated] == [orphan.run.id] == [jobs.get(starter, job_id).figures["eval_run_id"]]
    assert evaluated[0].n_scored == 2
