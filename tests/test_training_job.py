"""The `train` job as a user starts it: its own process, export and evaluation after training, SIGKILL and
resume, one training job per device, and the CLI's one-command QLoRA run on the embedded model."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from core import jobs, runs, training
from core.evaluation import RUN_KIND
from core.store import Store
from core.training import TrainConfig
from tests.conftest import run_cli, tiny_training, wait_until


def _config(tiny_llama, **overrides) -> TrainConfig:
    return TrainConfig(
        **tiny_training(tiny_llama, **{"evaluate_with": "transformers", "export_merged": False, **overrides})
    )


def _steps(store, job_id: int) -> list[int]:
    rows = store.query("SELECT step FROM training_metrics WHERE job_id = ? AND name = 'train_loss'", (job_id,))
    return [r["step"] for r in rows]


def test_a_training_job_trains_exports_and_evaluates_its_adapter_as_a_scored_run(starter, tiny_llama):
    job_id = training.start_training(starter, _config(tiny_llama, limit=6, epochs=2))
    job = jobs.wait(starter, job_id, timeout=300)
    assert job.state == "done", job.message
    figures = job.figures
    out = Path(figures["output_dir"])
    assert out == Path(os.environ["WORKBENCH_HOME"]) / "artifacts" / f"train-{job_id}"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert (out / "export" / "adapter.gguf").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and figures["eval_loss_after"] < figures["eval_loss_before"]
    assert _steps(starter, job_id) == list(range(1, 7))  # the loss curve, one point per optimizer step

    run = runs.get_run(starter, figures["eval_run_id"])
    assert run.kind == RUN_KIND and run.adapter and run.dataset == "starter"
    # its eval loss came from the validation part, its evaluation answers the test part of the same split
    pinned = json.loads((out / training.EXAMPLES_FILE).read_text())
    assert (run.part, run.split_id) == ("test", pinned["split_id"]) and "test" not in pinned
    assert run.selection == {}  # nobody chose these settings among others
    [summary] = [s for s in runs.list_runs(starter) if s.run.id == run.id]
    assert summary.n_scored == 6 and 0 < summary.mean_f1 == pytest.approx(figures["mean_f1"])


def test_a_training_job_killed_mid_epoch_resumes_from_its_checkpoint_to_completion(starter, tiny_llama):
    config = _config(tiny_llama, epochs=2, batch_size=1, evaluate_with="none")
    job_id = training.start_training(starter, config)
    per_epoch = wait_until(lambda: jobs.get(starter, job_id).total, timeout=120) // 2

    def in_second_epoch():
        steps = _steps(starter, job_id)
        return steps and per_epoch + 2 <= max(steps) < 2 * per_epoch - 2

    wait_until(in_second_epoch, timeout=120)
    os.killpg(jobs.get(starter, job_id).pid, signal.SIGKILL)
    wait_until(lambda: jobs.get(starter, job_id).state == "interrupted", timeout=15)
    killed_at = max(_steps(starter, job_id))
    assert per_epoch < killed_at < 2 * per_epoch

    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=300)
    assert job.state == "done", job.message
    log = "\n".join(jobs.log_tail(starter, job_id, 200))
    assert f"resuming at epoch 2, step {per_epoch} of {2 * per_epoch}" in log
    assert _steps(starter, job_id) == list(range(1, 2 * per_epoch + 1))  # the redone steps are recorded once
    metrics = json.loads((Path(job.figures["output_dir"]) / "metrics.json").read_text())
    assert metrics["steps"] == 2 * per_epoch and len(metrics["train_losses"]) == 2 * per_epoch


def test_a_second_training_job_waits_in_a_visible_queue_until_the_first_ends(starter, tiny_llama):
    first = training.start_training(starter, _config(tiny_llama, epochs=3, batch_size=1, evaluate_with="none"))
    wait_until(lambda: _steps(starter, first), timeout=120)
    second = training.start_training(starter, _config(tiny_llama, limit=4, evaluate_with="none"))
    waiting = wait_until(lambda: "waiting" in (j := jobs.get(starter, second)).message and j, timeout=30)
    assert waiting.state == "queued" and f"job {first}" in waiting.message
    assert jobs.device_holder(starter, second, "train") == first
    assert _steps(starter, second) == []

    jobs.cancel(starter, first)
    assert jobs.wait(starter, second, timeout=300).state == "done"
    assert jobs.get(starter, first).state == "cancelled"


@pytest.mark.slow
def test_cli_qlora_on_the_embedded_model_writes_every_artifact_and_an_evaluated_run(embedded_models):
    result = run_cli(
        "train", "--dataset", "starter", "--method", "qlora", "--epochs", "1", "--limit", "16", timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    with Store() as store:
        figures = jobs.list_jobs(store, kind="train")[0].figures
    out = Path(figures["output_dir"])
    assert figures["eval_loss_after"] < figures["eval_loss_before"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert {"metrics.json", "train_config.json"} <= {p.name for p in out.iterdir()}
    export = out / "export"
    merged = [p for p in export.glob("*.gguf") if p.name != "adapter.gguf"]
    assert (export / "adapter.gguf").stat().st_size > 0 and len(merged) == 1
    modelfile = (export / "Modelfile").read_text()
    assert f"FROM ./{merged[0].name}" in modelfile and "TEMPLATE" in modelfile
    assert "ollama create" in result.stdout and f"mean F1 {figures['mean_f1']:.4f}" in result.stdout
    listed = json.loads(run_cli("runs", "--json").stdout)
    [run] = [r for r in listed if r["id"] == figures["eval_run_id"]]
    assert run["n"] == 16 and run["mean_f1"] is not None


def test_two_processes_under_accelerate_take_the_same_steps_as_one_process_taking_both_batches(
    starter, tiny_llama, monkeypatch
):
    from safetensors.torch import load_file

    def adapter(job_id: int) -> dict:
        job = jobs.wait(starter, job_id, timeout=600)
        assert job.state == "done", (job.message, jobs.log_tail(starter, job_id, 20))
        return load_file(Path(job.figures["output_dir"]) / "adapter" / "adapter_model.safetensors")

    settings = {"limit": 12, "batch_size": 1, "lora_dropout": 0.0, "evaluate_with": "none"}
    single = training.start_training(starter, _config(tiny_llama, grad_accum=2, **settings))
    one = adapter(single)
    monkeypatch.setenv(training.PROCESSES_ENV, "2")  # the job process inherits it: gloo on the CPU
    double = training.start_training(starter, _config(tiny_llama, grad_accum=1, **settings))
    two = adapter(double)
    assert "training in 2 processes" in "\n".join(jobs.log_tail(starter, double, 50))
    assert _steps(starter, double) == _steps(starter, single) == list(range(1, 7))
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name


def test_a_cancelled_two_process_run_saves_its_checkpoint_and_resumes_to_completion(starter, tiny_llama, monkeypatch):
    monkeypatch.setenv(training.PROCESSES_ENV, "2")
    job_id = training.start_training(starter, _config(tiny_llama, epochs=2, batch_size=1, evaluate_with="none"))
    total = wait_until(lambda: jobs.get(starter, job_id).total, timeout=180)
    wait_until(lambda: len(_steps(starter, job_id)) >= 3, timeout=180)
    job = jobs.cancel(starter, job_id)
    assert job.state == "cancelled", job.message
    out = Path(os.environ["WORKBENCH_HOME"]) / "artifacts" / f"train-{job_id}"
    saved = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert 3 <= saved < total

    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=600)
    assert job.state == "done", (job.message, jobs.log_tail(starter, job_id, 20))
    assert f"resuming at epoch {saved * 2 // total + 1}, step {saved} of {total}" in "\n".join(
        jobs.log_tail(starter, job_id, 200)
    )
    assert _steps(starter, job_id) == list(range(1, total + 1))
