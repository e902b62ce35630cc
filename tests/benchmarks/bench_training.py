"""Training cost, side by side on one epoch of the starter train split on this CPU:

- the workbench trainer (core.training.train, qlora and lora): length-grouped batches padded
  per batch, loss and logits on the answer tokens only;
- a plain PyTorch + peft loop written here: the same model (fp32) and LoRA settings, prompt +
  answer + EOS padded to the longest example of the dataset, labels on the whole sequence,
  `model(..., labels=...).loss` (full-sequence logits), AdamW, batches of 4 in dataset order.

Figures per variant: seconds per epoch, non-padding tokens per second, peak RSS and the share
of padding tokens in the batches fed. Each variant runs in a fresh process of its own
(`python -m tests.benchmarks.bench_training --variant NAME`), so its peak RSS is its own; it
prints one `BENCH_RESULT {json}` line that the parent reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core import dataset, intake, models, workspace
from core.store import Store
from tests.benchmarks.common import report

VARIANTS = ("workbench_qlora", "workbench_lora", "baseline")
BATCH_SIZE = 4
ROOT = Path(__file__).resolve().parents[2]
MARK = "BENCH_RESULT "


def _max_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _base_config(method: str, output_dir: str):
    from core.training import TrainConfig

    # TrainConfig defaults: LoRA r 8, alpha 16, dropout 0.05 on q_proj,v_proj; lr 2e-4; seed 42; 1 epoch.
    return TrainConfig(
        dataset="starter", method=method, batch_size=BATCH_SIZE, output_dir=output_dir, evaluate_with="none"
    )


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

    seen = {"tokens": 0, "pads": 0, "batches": 0, "started": None, "rss_at_start": 0.0}
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
            seen["batches"] += 1
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
            training.train(None, _base_config(method, out), store, on_step=on_step)
    finally:
        training.loop.collate = real_collate
        store.close()
    epoch_s = steps[-1] - seen["started"]
    return {
        "epoch_s": epoch_s,
        "tok_s": seen["tokens"] / epoch_s,
        "peak_rss_mb": _max_rss_mb(),
        "rss_peak_before_epoch_mb": seen["rss_at_start"],
        "padding_share": seen["pads"] / (seen["tokens"] + seen["pads"]),
        "tokens": seen["tokens"],
        "steps": len(steps),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


# ---- the plain baseline ---------------------------------------------------------------------


def run_baseline() -> dict[str, float]:
    """What a hand-written fine-tuning loop does without the workbench's care for padding and logits."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import training
    from core.prompting import render_prompt

    config = _base_config("lora", "")
    path = str(models.prepare_hf_checkpoint(progress=lambda _: None))
    store = Store()
    pairs = dataset.select_pairs(store, config.dataset, config.part, "accepted")
    store.close()

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache in training, as any fine-tuning script sets
    torch.manual_seed(config.seed)
    model = peft.get_peft_model(model, training.lora_config(config))  # the workbench's LoRA settings
    tokenizer = AutoTokenizer.from_pretrained(path)

    # prompt + answer + EOS, cut at the same max_seq_len, all padded to the longest example.
    texts = [render_prompt(p.question, config.prompt_template) + " " + p.answer.strip() for p in pairs]
    ids = [(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])[: config.max_seq_len] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    model.train()
    rss_at_start = _max_rss_mb()
    started = time.perf_counter()
    losses = []
    for start in range(0, len(ids), BATCH_SIZE):
        rows = slice(start, start + BATCH_SIZE)
        loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    epoch_s = time.perf_counter() - started
    tokens = int(attention_mask.sum())
    return {
        "epoch_s": epoch_s,
        "tok_s": tokens / epoch_s,
        "peak_rss_mb": _max_rss_mb(),
        "rss_peak_before_epoch_mb": rss_at_start,
        "padding_share": 1 - tokens / attention_mask.numel(),
        "tokens": tokens,
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "padded_width": width,
    }


def run_variant(name: str) -> dict[str, float]:
    if name == "baseline":
        return run_baseline()
    return run_workbench(name.removeprefix("workbench_"))


# ---- the parent -----------------------------------------------------------------------------


def _in_fresh_process(name: str, env: dict[str, str]) -> dict[str, float]:
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
        intake.ensure_starter(store)  # imported already split 80/20 (seed 42): train on its train part
        store.close()
        for name in VARIANTS:  # one after another: two cores, and each must have the machine to itself
            results[name] = _in_fresh_process(name, env)
            print(f"{name}: {json.dumps(results[name])}", flush=True)

    figures = {}
    for name, r in results.items():
        figures |= {
            f"{name}_epoch_s": r["epoch_s"],
            f"{name}_tok_s": r["tok_s"],
            f"{name}_peak_rss_mb": r["peak_rss_mb"],
            f"{name}_padding_share": r["padding_share"],
        }
    base = results["baseline"]
    ratios = {}
    for method in ("qlora", "lora"):
        r = results[f"workbench_{method}"]
        ratios[f"{method}_rss_vs_baseline"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        ratios[f"{method}_time_vs_baseline"] = r["epoch_s"] / base["epoch_s"]
    return report(
        "training",
        figures,
        ratios,
        {
            "qlora_rss_vs_baseline": "<=0.5",
            "qlora_time_vs_baseline": "<=0.7",
            "workbench_qlora_padding_share": "<=0.15",
            "workbench_lora_padding_share": "<=0.15",
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print its figures")
    args = parser.parse_args()
    if args.variant:
        print(MARK + json.dumps(run_variant(args.variant)), flush=True)
    else:
        main()
