"""Training on a tiny random Llama: what must change (LoRA weights, loss) and what must not (base weights)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict

import pytest
import torch

from core import dataset, jobs, training
from core.errors import BadInput
from core.jobs import JobCancelled, JobContext
from core.prompting import DEFAULT_TEMPLATE, render_prompt
from core.training import (
    IGNORE,
    TrainConfig,
    answer_loss,
    build_examples,
    collate,
    length_grouped_batches,
    load_model,
    train,
)
from tests.conftest import tiny_training


@pytest.fixture
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _config(tiny_llama, tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**tiny_training(tiny_llama, **{"limit": 8, "output_dir": str(tmp_path / "out"), **overrides}))


def _job(store, config: TrainConfig) -> int:
    return store.execute(
        "INSERT INTO jobs (kind, params, state, created_at) VALUES ('train', ?, 'running', 0)",
        (json.dumps(config.to_dict()),),
    ).lastrowid


def test_labels_mask_the_prompt(starter, tokenizer):
    pair = dataset.select_pairs(starter, "starter", "train")[0]
    [example] = build_examples(tokenizer, [pair], DEFAULT_TEMPLATE, 512)
    prompt_len = len(tokenizer(render_prompt(pair.question))["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    answer = tokenizer.decode(example["input_ids"][prompt_len:-1])
    assert answer.strip() == pair.answer.strip()
    [short] = build_examples(tokenizer, [pair], DEFAULT_TEMPLATE, prompt_len + 3)
    assert len(short["input_ids"]) == len(short["labels"]) == prompt_len + 3
    assert build_examples(tokenizer, [pair], DEFAULT_TEMPLATE, prompt_len) == []  # nothing left to learn


def test_collate_pads_dynamically_and_length_grouping_cuts_padding(starter, tokenizer):
    pairs = dataset.select_pairs(starter, "starter", "train")
    examples = build_examples(tokenizer, pairs, DEFAULT_TEMPLATE, 256)
    batch = collate(examples[:3], tokenizer.pad_token_id)
    longest = max(len(e["input_ids"]) for e in examples[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, ex in enumerate(examples[:3]):
        n = len(ex["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()

    def padding(batches):
        return sum(collate([examples[i] for i in b], 0)["attention_mask"].eq(0).sum().item() for b in batches)

    grouped = length_grouped_batches(examples, 4, seed=1, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(len(examples)))
    assert grouped == length_grouped_batches(examples, 4, seed=1, epoch=0)
    assert grouped != length_grouped_batches(examples, 4, seed=1, epoch=1)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    at_random = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert padding(grouped) < padding(at_random) / 2


def test_answer_loss_equals_the_full_loss_and_gives_the_same_gradients(starter, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(training.loss, "LOSS_CHUNK_ROWS", 7)  # several chunks, the last one short
    config = _config(tiny_llama, tmp_path, lora_dropout=0.0)
    model, tokenizer = load_model(config, str(tiny_llama))
    pairs = dataset.select_pairs(starter, "starter", "train")[:4]
    batch = collate(build_examples(tokenizer, pairs, DEFAULT_TEMPLATE, 96), tokenizer.pad_token_id)
    model.eval()
    trained = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trained]

    full, full_grads = loss_and_grads(lambda: model(**batch).loss)
    ours, our_grads = loss_and_grads(lambda: answer_loss(model, batch))
    assert abs(full - ours) < 1e-4
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(full_grads, our_grads, strict=True))


@pytest.mark.parametrize("cap", [0.0, 30.0])
def test_the_chunked_head_loss_matches_autograd_with_and_without_softcapping(cap, monkeypatch):
    monkeypatch.setattr(training.loss, "LOSS_CHUNK_ROWS", 4)
    torch.manual_seed(0)
    weight = torch.randn(50, 8) * 3  # large logits, so the softcap bends them
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    upstream = torch.randn(10)  # each row's NLL weighted differently (a mean weighs all alike, DPO's sums do not)
    ours = training.loss._ChunkedHeadNLL.apply(hidden, weight, targets, cap)
    (our_grad,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    logits = training.loss._softcap(hidden @ weight.T, cap)
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(our_grad, reference_grad, atol=1e-5)


def test_one_lora_epoch_learns_and_the_adapter_reloads(starter, tiny_llama, tmp_path, monkeypatch):
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from core import training

    loaded = []

    def keep(*args):
        loaded.append(load_model(*args))
        return loaded[-1]

    monkeypatch.setattr(training.loop, "load_model", keep)
    config = _config(tiny_llama, tmp_path)
    job_id = _job(starter, config)
    steps: list[dict] = []
    started = time.perf_counter()
    result = train(JobContext(starter, job_id, config.to_dict()), config, starter, on_step=steps.append)
    seconds = time.perf_counter() - started

    assert result.steps == len(steps) == 4  # 8 pairs / batch 2
    assert result.train_loss_last < result.train_loss_first
    assert result.eval_loss_after < result.eval_loss_before
    names = {r["name"] for r in starter.query("SELECT name FROM training_metrics WHERE job_id = ?", (job_id,))}
    assert names == {"train_loss", "learning_rate", "tokens_per_s", "peak_memory_mb", "eval_loss"}
    assert tuple(starter.one("SELECT done, total FROM jobs WHERE id = ?", (job_id,))) == (4, 4)
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert json.loads((out / "train_config.json").read_text())["dataset"] == "starter"

    [(trained, _)] = loaded
    trained.eval()
    base_before = load_file(tiny_llama / "model.safetensors")
    for name, param in trained.get_base_model().named_parameters():
        if "lora_" in name:
            assert param.requires_grad
        else:
            assert not param.requires_grad
            assert torch.equal(param, base_before[name.replace(".base_layer", "")]), name
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero: these moved

    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "adapter")
    reloaded.eval()
    ids = torch.tensor([[2, 100, 200, 300, 400]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    print(
        f"\nlora: 4 steps + 2 evals in {seconds:.1f} s; tokens/s per step: {[round(s['tokens_per_s']) for s in steps]}"
    )


@pytest.fixture(scope="module")
def tiny_llama_64(tiny_llama, tmp_path_factory):
    """tiny_llama widened to 64: bitsandbytes' CPU 4-bit kernel needs in_features divisible by its block of 64."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-64")
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


def test_qlora_runs_a_step_on_cpu(starter, tiny_llama_64, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    from core import training

    loaded = []
    monkeypatch.setattr(training.loop, "load_model", lambda *args: loaded.append(load_model(*args)) or loaded[-1])
    config = _config(tiny_llama_64, tmp_path, method="qlora", limit=4, batch_size=4)
    started = time.perf_counter()
    result = train(None, config, starter)
    seconds = time.perf_counter() - started
    assert result.steps == 1
    assert torch.isfinite(torch.tensor([result.train_loss_first, result.eval_loss_after])).all()
    [(model, _)] = loaded
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    print(f"\nqlora (4-bit base on CPU): 1 step + 2 evals in {seconds:.1f} s")


def test_qlora_gradients_reach_every_layer_even_after_an_evaluation_pass(starter, tiny_llama_64, tmp_path):
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel on its first no-grad forward in eval
    mode (on CPUs with AVX512-BF16); that kernel has no backward, so the gradient would stop at every
    quantized layer. Training must see the same gradients with or without an evaluation first."""
    config = _config(tiny_llama_64, tmp_path, method="qlora", lora_dropout=0.0)
    pairs = dataset.select_pairs(starter, "starter", "train")[:4]

    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model, tokenizer = load_model(config, str(tiny_llama_64))
        examples = build_examples(tokenizer, pairs, DEFAULT_TEMPLATE, 64)
        if evaluate_first:
            training.eval_loss(model, examples, 4, tokenizer.pad_token_id)
        answer_loss(model, collate(examples, tokenizer.pad_token_id)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, evaluated = gradients(False), gradients(True)
    first_layer = [n for n in fresh if ".layers.0." in n and "lora_B" in n]
    assert first_layer and all(fresh[n].abs().sum() > 0 for n in first_layer)
    for name, grad in fresh.items():
        assert torch.allclose(grad, evaluated[name], rtol=1e-3, atol=1e-6), name


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16 matmul")
def test_qlora_on_a_bf16_cpu_runs_the_output_head_in_bf16_with_the_fp32_loss_to_three_digits(
    starter, tiny_llama_64, tmp_path
):
    model, tokenizer = load_model(_config(tiny_llama_64, tmp_path, method="qlora"), str(tiny_llama_64))
    head = model.get_base_model().get_output_embeddings()
    assert head.weight.dtype == torch.bfloat16
    pairs = dataset.select_pairs(starter, "starter", "train")[:4]
    batch = collate(build_examples(tokenizer, pairs, DEFAULT_TEMPLATE, 64), tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        ours = answer_loss(model, batch).item()
        hidden = model.get_base_model().get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        targets = batch["labels"][:, 1:]
        keep = targets != training.IGNORE
        logits = hidden.last_hidden_state[:, :-1][keep] @ head.weight.float().T
        reference = torch.nn.functional.cross_entropy(logits, targets[keep]).item()
    assert ours == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": 0}, "learning rate"),
        ({"lora_r": 0}, "LoRA r"),
        ({"lora_alpha": -1}, "alpha"),
        ({"lora_dropout": 1.0}, "dropout"),
        ({"epochs": 0}, "epochs"),
        ({"target_modules": ("q_proj", "c_attn")}, "c_attn"),
        ({"model": "/nowhere/model"}, "no model"),
        ({"part": "test", "dataset": "empty"}, "no accepted pairs"),
        ({"evaluate_with": "llamacpp"}, "llamacpp needs the base model as GGUF"),
        ({"eval_baseline_run": 999}, "no run with id 999"),
        ({"model": "no-such-org/no-such-model"}, "neither a checkpoint folder nor a cached hub id"),
    ],
)
def test_bad_settings_are_refused(starter, tiny_llama, tmp_path, overrides, message):
    dataset.add_pairs(starter, "empty", [], "accepted")
    if overrides.get("dataset") == "empty":
        starter.execute(
            "INSERT INTO splits (dataset_id, version, seed, test_size, stratified, created_at)"
            " VALUES (?, 1, 0, 0.2, 0, 0)",
            (dataset.dataset_id(starter, "empty"),),
        )
    with pytest.raises(BadInput, match=message):
        train(None, _config(tiny_llama, tmp_path, **overrides), starter)
    assert not (tmp_path / "out").exists()


class CancelAt(JobContext):
    """A job context whose user presses cancel at optimizer step `at`."""

    def __init__(self, store, job_id, params, at: int) -> None:
        super().__init__(store, job_id, params)
        self.at, self.step = at, 0

    def progress(self, done, total=None, message=None, **figures) -> None:
        super().progress(done, total, message, **figures)
        self.step = done

    def check_cancel(self) -> None:
        if self.step == self.at:
            raise JobCancelled()


def test_resume_continues_from_the_checkpoint(starter, tiny_llama, tmp_path):
    config = _config(tiny_llama, tmp_path, epochs=2, limit=4)  # 2 steps per epoch
    job_id = _job(starter, config)
    with pytest.raises(JobCancelled):
        train(CancelAt(starter, job_id, config.to_dict(), at=3), config, starter)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint" / "state.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["batch"]) == (1, 3, 1)

    steps: list[dict] = []
    result = train(CancelAt(starter, job_id, config.to_dict(), at=-1), config, starter, on_step=steps.append)
    assert [s["step"] for s in steps] == [4]
    assert result.steps == 4
    assert result.eval_loss_before is not None and result.train_loss_first == checkpoint["losses"][0]
    recorded = starter.query("SELECT step FROM training_metrics WHERE job_id = ? AND name = 'train_loss'", (job_id,))
    assert [r["step"] for r in recorded] == [1, 2, 3, 4]


# ---- what the eval loss is taken on ------------------------------------------------------------


def _ids(pairs) -> list[int]:
    return [p.id if isinstance(p, dataset.StoredPair) else p["id"] for p in pairs]


def test_the_eval_loss_is_taken_on_the_validation_pairs_of_the_split_and_no_test_pair_is_read(
    starter, tiny_llama, tmp_path, monkeypatch
):
    seen: list[list[dict]] = []
    real_eval_loss = training.eval_loss

    def eval_loss(model, examples, *args):
        seen.append(examples)
        return real_eval_loss(model, examples, *args)

    monkeypatch.setattr(training.loop, "eval_loss", eval_loss)
    config = _config(tiny_llama, tmp_path, limit=4)
    result = train(None, config, starter)

    split = dataset.latest_split(starter, "starter")
    pinned = json.loads((tmp_path / "out" / training.EXAMPLES_FILE).read_text())
    assert pinned["split_id"] == split.id and set(pinned) >= {"train", "validation"} and "test" not in pinned
    assert _ids(pinned["train"]) == _ids(dataset.select_pairs(starter, "starter", "train")[:4])
    validation = dataset.select_pairs(starter, "starter", "validation")[:4]
    assert _ids(pinned["validation"]) == _ids(validation)
    test_ids = set(_ids(dataset.select_pairs(starter, "starter", "test")))
    assert not test_ids & set(_ids(pinned["train"]) + _ids(pinned["validation"]))

    # before training and after its one epoch, the eval loss saw exactly the validation pairs' examples
    from transformers import AutoTokenizer

    expected = build_examples(AutoTokenizer.from_pretrained(tiny_llama), validation, DEFAULT_TEMPLATE, 64)
    assert seen == [expected, expected]
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["split_id"] == split.id


def test_without_a_validation_part_training_works_and_says_why_it_has_no_eval_loss(starter, tiny_llama, tmp_path):
    split = dataset.make_split(starter, "starter", validation_size=0)
    config = _config(tiny_llama, tmp_path, limit=4)
    job_id = _job(starter, config)
    result = train(JobContext(starter, job_id, config.to_dict()), config, starter)

    assert result.steps == 2
    assert result.eval_loss_before is None and result.eval_loss_after is None
    names = {r["name"] for r in starter.query("SELECT name FROM training_metrics WHERE job_id = ?", (job_id,))}
    assert "eval_loss" not in names and "train_loss" in names
    why = dataset.no_validation_message(split)
    assert any(line.endswith(f"no eval loss: {why}") for line in jobs.log_tail(starter, job_id))
    assert json.loads(starter.one("SELECT figures FROM jobs WHERE id = ?", (job_id,))["figures"])["eval_note"] == why


def test_a_folder_pinned_before_validation_parts_loads_its_train_pairs_and_no_eval_pairs(starter, tiny_llama, tmp_path):
    config = _config(tiny_llama, tmp_path, limit=2)
    out = tmp_path / "out"
    out.mkdir()
    train_pairs = dataset.select_pairs(starter, "starter", "train")[:2]
    test_pairs = dataset.select_pairs(starter, "starter", "test")[:2]
    old = {
        "selection": {"dataset": "starter", "part": "train", "limit": 2},
        "split_id": 1,
        "split_version": 1,
        "train": [asdict(p) for p in train_pairs],
        "test": [asdict(p) for p in test_pairs],  # what its eval loss was taken on then: not read any more
    }
    (out / training.EXAMPLES_FILE).write_text(json.dumps(old))
    pinned = training.pinned_pairs(starter, config, out)
    assert (pinned.train, pinned.validation, pinned.split_id) == (train_pairs, [], 1)


def test_folds_deal_the_train_part_into_disjoint_stratified_folds_and_each_fold_run_pins_its_own(
    starter, tiny_llama, tmp_path
):
    train_part = dataset.select_pairs(starter, "starter", "train")
    folds = training.cv_folds(train_part, 4, seed=42)
    assert sorted(_ids(p for fold in folds for p in fold)) == _ids(train_part)  # a partition of the train part
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for field in {p.field for p in train_part}:  # every field spread over the folds
        counts = [sum(p.field == field for p in fold) for fold in folds]
        assert max(counts) - min(counts) <= 1, (field, counts)
    assert training.cv_folds(train_part, 4, seed=42) == folds and training.cv_folds(train_part, 4, seed=1) != folds

    limited = train_part[:9]
    held_out = []
    for fold in (1, 2, 3):
        out = tmp_path / f"fold-{fold}"
        out.mkdir()
        pinned = training.pinned_pairs(starter, _config(tiny_llama, tmp_path, limit=9, cv_folds=3, cv_fold=fold), out)
        assert sorted(_ids(pinned.train + pinned.validation)) == _ids(limited)
        assert not set(_ids(pinned.train)) & set(_ids(pinned.validation))
        held_out += _ids(pinned.validation)
    assert sorted(held_out) == _ids(limited)  # the held-out folds partition the pairs the folds were dealt from
    with pytest.raises(BadInput, match="holds a run on other pairs"):  # a fold's folder is not another fold's
        training.pinned_pairs(starter, _config(tiny_llama, tmp_path, limit=9, cv_folds=3, cv_fold=2), out)
    with pytest.raises(BadInput, match="cv_folds >= 2"):
        _config(tiny_llama, tmp_path, cv_folds=1, cv_fold=1).validate(starter)
