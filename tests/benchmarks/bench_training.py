"""Training cost, and the loss it reaches, side by side on one epoch of the starter train split on this CPU.

Every variant optimises the same objective: the workbench's examples (core.training.build_examples:
prompt tokens unlabelled, answer tokens + EOS labelled), the mean cross-entropy over those labels,
the same model checkpoint, LoRA settings, seed, AdamW, learning-rate schedule, batch size and epoch.

- workbench_qlora, workbench_lora: the real core.training.train; length-grouped batches padded per
  batch, logits on the answer tokens only (core.training.answer_loss);
- plain_loop: a plain PyTorch + peft loop written here, fed the workbench's batches in the workbench's
  order (so its first and last losses compare batch for batch with workbench_lora), each padded to the
  longest example of the dataset, `model(..., labels=...).loss` from full-sequence logits, no gradient
  checkpointing: what a hand-written loop does, none of which changes the loss;
- trl_sft: TRL's SFTTrainer with a peft LoraConfig, the peer a user would pick instead, fp32, given
  prompt/completion records with completion_only_loss=True. TRL tokenizes them itself; the variant
  counts the examples whose tokens or labels differ from the workbench's (0 expected). TRL is not an
  app requirement: tests/benchmarks/requirements.txt pins it (`make bench` installs it).

Figures per variant: seconds per epoch, non-padding tokens per second, peak RSS, the share of padding
in the batches fed, the first and last training loss, and the eval loss before and after the epoch on
the split's validation pairs, computed for every variant by the workbench's own core.training.eval_loss.
Each variant runs in a fresh process of its own (`python -m tests.benchmarks.bench_training --variant
NAME`), so its peak RSS is its own; it prints one `BENCH_RESULT {json}` line that the parent reads back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core import intake, models, workspace
from core.store import Store
from tests.benchmarks.common import report

VARIANTS = ("workbench_qlora", "workbench_lora", "plain_loop", "trl_sft")
BATCH_SIZE = 4
ROOT = Path(__file__).resolve().parents[2]
MARK = "BENCH_RESULT "
TRL_INSTALL = "pip install -r tests/benchmarks/requirements.txt -c requirements.txt"


def _max_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _base_config(method: str, output_dir: str):
    from core.training import TrainConfig

    # TrainConfig defaults: LoRA r 8, alpha 16, dropout 0.05 on q_proj,v_proj; lr 2e-4, linear schedule after
    # 5% warmup; seed 42; 1 epoch; max_seq_len 256; gradient checkpointing.
    return TrainConfig(
        dataset="starter", method=method, batch_size=BATCH_SIZE, output_dir=output_dir, evaluate_with="none"
    )


def _epoch_figures(epoch_s: float, tokens: int, pads: int, rss_at_start: float, losses: list[float]) -> dict:
    return {
        "epoch_s": epoch_s,
        "tok_s": tokens / epoch_s,
        "peak_rss_mb": _max_rss_mb(),
        "rss_peak_before_epoch_mb": rss_at_start,
        "padding_share": pads / (tokens + pads),
        "tokens": tokens,
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


# ---- the workbench --------------------------------------------------------------------------


def run_workbench(method: str) -> dict[str, float]:
    """One epoch of the real `train()`, timed from the first training batch to the last step.

    train() also loads the model and evaluates the validation part before and after the epoch; those
    are not part of "an epoch", so the clock starts when the first training batch is collated
    and stops at the last on_step. The batches are observed by wrapping the loop's collate:
    calls with gradients enabled are the training batches (eval_loss runs under no_grad), so
    the padding counted is that of the batches actually fed, not a re-derivation of them.
    """
    import torch

    from core import training

    seen = {"tokens": 0, "pads": 0, "started": None, "rss_at_start": 0.0}
    real_collate = training.collate

    def observed_collate(batch: list[dict], pad_id: int) -> dict:
        out = real_collate(batch, pad_id)
        if torch.is_grad_enabled():
            if seen["started"] is None:
                seen["started"] = time.perf_counter()
                seen["rss_at_start"] = _max_rss_mb()
            real = int(out["attention_mask"].sum())
            seen["tokens"] += real
            seen["pads"] += out["attention_mask"].numel() - real
        return out

    steps: list[float] = []
    losses: list[float] = []

    def on_step(metrics: dict[str, float]) -> None:
        steps.append(time.perf_counter())
        losses.append(metrics["train_loss"])

    store = Store()
    training.loop.collate = observed_collate
    try:
        with tempfile.TemporaryDirectory() as out:
            result = training.train(None, _base_config(method, out), store, on_step=on_step)
    finally:
        training.loop.collate = real_collate
        store.close()
    figures = _epoch_figures(steps[-1] - seen["started"], seen["tokens"], seen["pads"], seen["rss_at_start"], losses)
    return figures | {"eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after}


# ---- what the baselines share with it -------------------------------------------------------


def _same_work(out: str):
    """The workbench's run settings, model path, tokenizer and examples (train and validation), as train() makes them.

    The pairs come from core.training.pinned_pairs and become examples through core.training.build_examples,
    the very functions train() calls, so a baseline cannot drift from the workbench's tokens or labels.
    """
    from transformers import AutoTokenizer

    from core import training

    config = _base_config("lora", out)
    store = Store()
    try:
        path = config.validate(store)
        pairs = training.pinned_pairs(store, config, out)
    finally:
        store.close()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_examples = training.build_examples(tokenizer, pairs.train, config.prompt_template, config.max_seq_len)
    validation = training.build_examples(tokenizer, pairs.validation, config.prompt_template, config.max_seq_len)
    return config, path, tokenizer, pairs, train_examples, validation


# ---- the plain loop -------------------------------------------------------------------------


def run_plain_loop() -> dict[str, float]:
    """What a hand-written fine-tuning loop does without the workbench's care for padding and logits."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    from core import training

    with tempfile.TemporaryDirectory() as out:
        config, path, tokenizer, _, examples, validation = _same_work(out)
    pad_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache in training, as any fine-tuning script sets
    torch.manual_seed(config.seed)  # where the workbench seeds: its LoRA A matrices and dropout masks are these
    model = peft.get_peft_model(model, training.lora_config(config))

    # The whole dataset collated as one batch: every example padded to the longest of them, pads masked out of
    # attention and loss; the loop then takes the workbench's batches as rows of it.
    padded = training.collate(examples, pad_id)
    input_ids, attention_mask, labels = padded["input_ids"], padded["attention_mask"], padded["labels"]
    batches = training.length_grouped_batches(examples, config.batch_size, config.seed, 0)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    scheduler = get_scheduler(
        config.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * len(batches)),  # as train() rounds its warmup
        num_training_steps=len(batches),
    )
    eval_before = training.eval_loss(model, validation, config.batch_size, pad_id)
    model.train()
    rss_at_start = _max_rss_mb()
    started = time.perf_counter()
    losses = []
    for rows in batches:
        loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    epoch_s = time.perf_counter() - started
    tokens = int(attention_mask.sum())
    figures = _epoch_figures(epoch_s, tokens, attention_mask.numel() - tokens, rss_at_start, losses)
    eval_after = training.eval_loss(model, validation, config.batch_size, pad_id)
    width = input_ids.shape[1]
    return figures | {"eval_loss_before": eval_before, "eval_loss_after": eval_after, "padded_width": width}


# ---- TRL's SFTTrainer -----------------------------------------------------------------------


def run_trl_sft() -> dict[str, float | str]:
    """One epoch of TRL's SFTTrainer + peft on the same pairs, timed from the epoch's start to its last step."""
    try:
        import trl
    except ImportError:
        return {"error": f"trl is not installed; {TRL_INSTALL}"}
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from core import training
    from core.prompting import render_prompt

    out = tempfile.mkdtemp()
    config, path, tokenizer, pairs, examples, validation = _same_work(out)
    # What a user hands SFTTrainer: the prompt text and the answer; TRL appends EOS and labels the completion.
    records = [
        {"prompt": render_prompt(p.question, config.prompt_template), "completion": " " + p.answer.strip()}
        for p in pairs.train
    ]
    args = trl.SFTConfig(
        output_dir=out,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a share of the steps, rounded up as train() does
        optim="adamw_torch",  # torch.optim.AdamW, as the workbench on a CPU ...
        weight_decay=0.01,  # ... with torch's default decay (Trainer's own default is 0)
        max_grad_norm=0.0,  # the workbench does not clip gradients
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=config.max_seq_len,
        completion_only_loss=True,
        seed=config.seed,
        use_cpu=True,
        bf16=False,  # SFTConfig defaults to bf16 autocast; the workbench's lora and these baselines are fp32
        model_init_kwargs={"dtype": torch.float32},
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,  # a loss per step, as the workbench records
        report_to="none",
        disable_tqdm=True,
    )
    marks = {"started": 0.0, "ended": 0.0, "rss_at_start": 0.0}

    class Clock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            marks["started"], marks["rss_at_start"] = time.perf_counter(), _max_rss_mb()

        def on_step_end(self, args, state, control, **kwargs):
            marks["ended"] = time.perf_counter()

    trainer = trl.SFTTrainer(
        model=path,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=training.lora_config(config),
        callbacks=[Clock()],
    )
    prepared = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in trainer.train_dataset]
    unlike = sum(a != b for a, b in zip(prepared, examples, strict=False)) + abs(len(prepared) - len(examples))

    seen = {"tokens": 0, "pads": 0}
    real_collate = trainer.data_collator

    def observed_collate(rows: list[dict]) -> dict:
        batch = real_collate(rows)
        real = int(batch["attention_mask"].sum())
        seen["tokens"] += real
        seen["pads"] += batch["attention_mask"].numel() - real
        return batch

    trainer.data_collator = observed_collate  # no evaluation during training: every batch is a training batch
    pad_id = tokenizer.pad_token_id
    eval_before = training.eval_loss(trainer.model, validation, config.batch_size, pad_id)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    epoch_s = marks["ended"] - marks["started"]
    figures = _epoch_figures(epoch_s, seen["tokens"], seen["pads"], marks["rss_at_start"], losses)
    eval_after = training.eval_loss(trainer.model, validation, config.batch_size, pad_id)
    return figures | {
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "examples_unlike_workbench": unlike,
        "trl_version": trl.__version__,
    }


def run_variant(name: str) -> dict:
    if name == "plain_loop":
        return run_plain_loop()
    if name == "trl_sft":
        return run_trl_sft()
    return run_workbench(name.removeprefix("workbench_"))


# ---- the parent -----------------------------------------------------------------------------


def _in_fresh_process(name: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_training", "--variant", name]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"variant {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(MARK))


def main() -> dict:
    # The scratch workspace keeps using the prepared embedded models.
    models_dir = os.environ.get("WORKBENCH_MODELS") or str(workspace.models_dir())
    os.environ["WORKBENCH_MODELS"] = models_dir
    models.prepare_hf_checkpoint()
    results = {}
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "WORKBENCH_HOME": home, "WORKBENCH_MODELS": models_dir}
        store = Store(os.path.join(home, "workbench.sqlite"))
        intake.ensure_starter(store)  # imported already split 70/10/20 (seed 42): train on its train part
        store.close()
        for name in VARIANTS:  # one after another: two cores, and each must have the machine to itself
            results[name] = _in_fresh_process(name, env)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    if "error" in results["trl_sft"]:
        print(f"trl_sft not run: {results.pop('trl_sft')['error']}", flush=True)

    figures = {}
    for name, r in results.items():
        figures |= {
            f"{name}_epoch_s": r["epoch_s"],
            f"{name}_tok_s": r["tok_s"],
            f"{name}_peak_rss_mb": r["peak_rss_mb"],
            f"{name}_padding_share": r["padding_share"],
            f"{name}_loss_first": r["loss_first"],
            f"{name}_loss_last": r["loss_last"],
            f"{name}_eval_loss_before": r["eval_loss_before"],
            f"{name}_eval_loss_after": r["eval_loss_after"],
        }
    plain = results["plain_loop"]
    ratios = {}
    for method in ("qlora", "lora"):
        r = results[f"workbench_{method}"]
        ratios[f"{method}_rss_vs_plain"] = r["peak_rss_mb"] / plain["peak_rss_mb"]
        ratios[f"{method}_time_vs_plain"] = r["epoch_s"] / plain["epoch_s"]
    targets = {
        "qlora_rss_vs_plain": "<=0.5",
        "qlora_time_vs_plain": "<=0.7",
        "workbench_qlora_padding_share": "<=0.15",
        "workbench_lora_padding_share": "<=0.15",
    }
    if (trl_run := results.get("trl_sft")) is not None:
        qlora = results["workbench_qlora"]
        figures["trl_sft_examples_unlike_workbench"] = trl_run["examples_unlike_workbench"]
        # Above 1: TRL takes longer / more memory than the workbench's qlora for the same epoch.
        ratios["trl_time_vs_qlora"] = trl_run["epoch_s"] / qlora["epoch_s"]
        ratios["trl_rss_vs_qlora"] = trl_run["peak_rss_mb"] / qlora["peak_rss_mb"]
        ratios["trl_time_vs_lora"] = trl_run["epoch_s"] / results["workbench_lora"]["epoch_s"]
        targets |= {"trl_time_vs_qlora": ">=1.0", "trl_rss_vs_qlora": ">=1.0"}
        targets["trl_sft_examples_unlike_workbench"] = "<=0"  # TRL trained on the workbench's tokens and labels
    return report("training", figures, ratios, targets)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print its figures")
    args = parser.parse_args()
    if args.variant:
        print(MARK + json.dumps(run_variant(args.variant)), flush=True)
    else:
        main()
