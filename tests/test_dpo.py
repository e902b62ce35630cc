"""DPO on a tiny random Llama: the loss is the formula, a step moves the chosen answer ahead, the reference is the
base with the adapter disabled (one copy of the weights), the base never changes, and the whole job runs from
ratings recorded through the core API to an exported adapter and an evaluated run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from core import jobs, preferences, runs, training
from core.errors import BadInput
from core.jobs import JobCancelled
from core.prompting import DEFAULT_TEMPLATE
from core.train_search import SearchConfig
from core.training import TrainConfig, load_model
from core.training.data import collate
from core.training.dpo import add_references, batch_dpo_loss, build_preference_examples, dpo_loss
from core.training.loss import sequence_logps
from tests.conftest import run_cli, tiny_training
from tests.test_compare import make_run
from tests.test_judging import rate

QUESTIONS = 30


@pytest.fixture
def rated(starter) -> tuple[int, int]:
    """Two runs over 30 starter questions; a rater preferred the second run's answer to every one."""
    one, other = make_run(starter, [0.4] * QUESTIONS), make_run(starter, [0.5] * QUESTIONS)
    rate(starter, "ana", one, other, lambda pair_id: "b")
    return one, other


def _dpo(tiny_llama, tmp_path, **overrides) -> TrainConfig:
    settings = {"method": "dpo", "dpo_base": "full", "output_dir": str(tmp_path / "dpo"), "limit": 6}
    return TrainConfig(**tiny_training(tiny_llama, **{**settings, **overrides}))


def _examples(store, config: TrainConfig, tokenizer) -> list[dict]:
    triples = preferences.preference_data(store, "starter").train[: config.limit]
    return build_preference_examples(tokenizer, triples, DEFAULT_TEMPLATE, config.max_seq_len)


def test_the_dpo_loss_is_the_formula_on_constructed_log_probabilities():
    policy_chosen, policy_rejected = torch.tensor([-4.0, -9.0, -2.5]), torch.tensor([-6.0, -3.0, -2.5])
    reference_chosen, reference_rejected = torch.tensor([-5.0, -8.0, -3.0]), torch.tensor([-5.5, -4.0, -2.0])
    beta = 0.3
    loss, figures = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, pr, rc, rr in zip([-4.0, -9.0, -2.5], [-6.0, -3.0, -2.5], [-5.0, -8.0, -3.0], [-5.5, -4.0, -2.0])
    ]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert figures["reward_margin"] == pytest.approx(sum(margins) / 3, rel=1e-6)
    assert figures["preference_accuracy"] == pytest.approx(2 / 3)  # margins 0.45, -0.6, 0.3
    assert figures["chosen_reward"] == pytest.approx(beta * (1.0 - 1.0 + 0.5) / 3, rel=1e-5)


def test_sequence_log_probabilities_sum_the_answer_tokens_only_with_exact_gradients(starter, tiny_llama, rated):
    config = _dpo(tiny_llama, Path("/unused"))
    model, tokenizer = load_model(config, str(tiny_llama))
    model.eval()  # the same dropout (none) in both computations
    examples = _examples(starter, config, tokenizer)[:3]
    batch = collate([ex["chosen"] for ex in examples], tokenizer.pad_token_id)

    ours = sequence_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets, keep = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    per_token = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    direct = (per_token * keep).sum(1)
    assert torch.allclose(ours, direct, atol=1e-4)

    lora = [p for p in model.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(ours.sum(), lora)
    direct_grads = torch.autograd.grad(direct.sum(), lora)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours_grads, direct_grads, strict=True))


def test_one_step_raises_the_margin_and_the_reference_is_the_base_with_the_adapter_disabled(starter, tiny_llama, rated):
    config = _dpo(tiny_llama, Path("/unused"))
    model, tokenizer = load_model(config, str(tiny_llama))
    examples = _examples(starter, config, tokenizer)[:4]
    for module in model.modules():  # B = 0 at the start would make the adapter a no-op whether disabled or not
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    add_references(model, examples, 2, tokenizer.pad_token_id, adapter_disabled=True)

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)  # a second copy, here only to check against
    pairs = collate([ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        of_base = sequence_logps(base, pairs)
    references = torch.tensor([ex["reference"] for ex in examples])
    assert torch.allclose(references[:, 0], of_base[:4], atol=1e-4)
    assert torch.allclose(references[:, 1], of_base[4:], atol=1e-4)

    model.eval()  # no dropout: the same batch before and after the step
    _, before = batch_dpo_loss(model, examples, tokenizer.pad_token_id, config.beta)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, _ = batch_dpo_loss(model, examples, tokenizer.pad_token_id, config.beta)
    loss.backward()
    optimizer.step()
    _, after = batch_dpo_loss(model, examples, tokenizer.pad_token_id, config.beta)
    assert after["reward_margin"] > before["reward_margin"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_a_dpo_run_trains_the_adapter_alone_on_one_copy_of_the_base(starter, tiny_llama, rated, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    before = _weights(tiny_llama)
    steps: list[dict] = []
    result = training.train(None, _dpo(tiny_llama, tmp_path, epochs=2), starter, on_step=steps.append)

    assert loads == [str(tiny_llama)]  # one copy of the base: the reference is it with the adapter disabled
    after = _weights(tiny_llama)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert result.train_loss_first == pytest.approx(math.log(2), abs=1e-3)  # step 1's policy is the reference
    assert {"reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward"} <= set(steps[0])
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["train_loss"] < math.log(2)
    adapter = Path(result.output_dir) / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    pinned = json.loads((Path(result.output_dir) / training.EXAMPLES_FILE).read_text())
    assert pinned["selection"]["triples"] == "preferences"
    triples = preferences.preference_data(starter, "starter").train
    assert [t["pair_id"] for t in pinned["train"]] == [t.pair_id for t in triples[:6]]


def test_a_cancelled_dpo_run_resumes_against_the_reference_of_its_start(starter, tiny_llama, rated, tmp_path):
    config = _dpo(tiny_llama, tmp_path, epochs=2, batch_size=1)

    def stop_at_three(figures: dict) -> None:
        if figures["step"] == 3:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        training.train(None, config, starter, on_step=stop_at_three)
    state = torch.load(Path(config.output_dir) / "checkpoint" / "state.pt", weights_only=True)
    references = state["references"]
    steps: list[dict] = []
    result = training.train(None, config, starter, on_step=steps.append)
    assert steps[0]["step"] == 4 and result.steps == 12
    final = torch.load(next(Path(config.output_dir).glob("checkpoint-*")) / "state.pt", weights_only=True)
    assert final["references"] == references  # not the partly trained policy of the checkpoint


def test_dpo_continues_an_sft_adapter_with_its_settings_and_is_refused_what_it_cannot_train(
    starter, tiny_llama, rated, tmp_path
):
    # No dropout in the SFT adapter: the policy of DPO's first step is then exactly its reference.
    sft_config = tiny_training(tiny_llama, lora_r=4, lora_dropout=0.0, limit=4, output_dir=str(tmp_path / "sft"))
    sft = training.train(None, TrainConfig(**sft_config), starter)
    config = _dpo(tiny_llama, tmp_path, from_adapter=sft.output_dir, lora_r=8)
    with pytest.raises(BadInput, match="other lora_r"):
        config.validate(starter)
    steps: list[dict] = []
    result = training.train(None, config, starter, on_step=steps.append)  # the adapter's settings apply
    assert result.train_loss_first == pytest.approx(math.log(2), abs=1e-3)  # the SFT adapter is the reference
    trained = json.loads((Path(result.output_dir) / "train_config.json").read_text())
    assert (trained["lora_r"], trained["from_adapter"]) == (4, sft.output_dir)

    with pytest.raises(BadInput, match="train part"):
        _dpo(tiny_llama, tmp_path, part="all")  # test questions never become training data
    with pytest.raises(BadInput, match="no training run"):
        _dpo(tiny_llama, tmp_path, from_adapter=str(tmp_path / "nowhere")).validate(starter)
    with pytest.raises(BadInput, match="single run"):
        SearchConfig.from_dict({"base": _dpo(tiny_llama, tmp_path).to_dict(), "trials": 2}).validate(starter)
    starter.execute("DELETE FROM ratings")
    with pytest.raises(BadInput, match="no preference triples"):
        _dpo(tiny_llama, tmp_path).validate(starter)


def test_ratings_through_the_core_api_to_a_dpo_job_an_exported_adapter_and_an_evaluated_run(starter, tiny_llama, rated):
    config = _dpo(tiny_llama, Path("."), output_dir="", evaluate_with="transformers", export_merged=False, limit=4)
    job = jobs.wait(starter, training.start_training(starter, config), timeout=300)
    assert job.state == "done", job.message
    out = Path(job.figures["output_dir"])
    assert (out / "export" / "adapter.gguf").stat().st_size > 0
    names = {r["name"] for r in starter.query("SELECT DISTINCT name FROM training_metrics WHERE job_id = ?", (job.id,))}
    assert {"train_loss", "reward_margin", "preference_accuracy", "eval_loss", "eval_preference_accuracy"} <= names
    run = runs.get_run(starter, job.figures["eval_run_id"])
    assert run.part == "test" and run.adapter and run.label.startswith("dpo r=8")
    [summary] = [s for s in runs.list_runs(starter) if s.run.id == run.id]
    assert summary.n_scored == 4


def test_the_cli_trains_dpo_from_an_adapter_with_its_beta(starter, tiny_llama, rated, tmp_path):
    sft_config = tiny_training(tiny_llama, limit=2, output_dir=str(tmp_path / "sft"))
    sft = training.train(None, TrainConfig(**sft_config), starter)
    starter.close()
    done = run_cli(
        "train", "--method", "dpo", "--dataset", "starter", "--model", str(tiny_llama), "--from-adapter",
        sft.output_dir, "--beta", "0.25", "--dpo-base", "full", "--limit", "2", "--max-seq-len", "64",
        "--evaluate-with", "none", "--output-dir", str(tmp_path / "dpo"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    trained = json.loads((tmp_path / "dpo" / "train_config.json").read_text())
    assert (trained["method"], trained["beta"], trained["from_adapter"]) == ("dpo", 0.25, sft.output_dir)


def test_dpo_on_the_4bit_base_of_qlora_trains_the_adapter_too(starter, tiny_llama, rated, tmp_path):
    steps: list[dict] = []
    config = _dpo(tiny_llama, tmp_path, dpo_base="4bit", limit=4, epochs=3, batch_size=4)
    assert config.quantized
    result = training.train(None, config, starter, on_step=steps.append)
    assert result.train_loss_first == pytest.approx(math.log(2), abs=1e-3)
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
