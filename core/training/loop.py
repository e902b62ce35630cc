"""The training loop: LoRA / QLoRA fine-tuning on a run's pinned pairs, as a plain PyTorch loop.

The eval loss (before training and after each epoch) is taken on the split's validation pairs,
or on the held-out fold of a cross-validation. Per-step figures go to the store; a checkpoint
each epoch, every CHECKPOINT_SECONDS and on cancel lets a run resume where it stopped. The
adapter is saved in the standard PEFT format.

Never merges, quantizes for export or converts to GGUF (core.packaging), never searches
hyperparameters (core.train_search), never reads a test pair.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from core import dataset, jobs, workspace
from core.errors import BadInput
from core.files import write_json
from core.jobs import JobCancelled, JobContext
from core.store import Store
from core.train_config import TrainConfig, with_adapter_settings
from core.train_dir import TrainDir
from core.training.checkpoints import checkpoint_folder, load_checkpoint, save_checkpoint
from core.training.data import PinnedPairs, build_examples, collate, length_grouped_batches, pinned_pairs
from core.training.devices import all_sum, peak_memory_mb, sum_gradients, to_device, world
from core.training.dpo import FIGURES as DPO_FIGURES
from core.training.dpo import add_references, batch_dpo_loss, build_preference_examples, preference_eval
from core.training.loss import answer_loss, eval_loss
from core.training.metrics import forget_after, log, record
from core.training.model import load_model

CHECKPOINT_SECONDS = 300.0  # besides each epoch's end: a killed run loses at most this much work


@dataclass(frozen=True)
class TrainResult:
    output_dir: str
    steps: int
    epochs: int
    train_loss_first: float
    train_loss_last: float
    eval_loss_before: float | None
    eval_loss_after: float | None


def train(
    ctx: JobContext | None,
    config: TrainConfig,
    store: Store,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> TrainResult:
    """Train LoRA adapters; resumes from output_dir/checkpoint when one exists.

    With a JobContext, each optimizer step is recorded in training_metrics, reported as
    progress and is a point where a cancel stops the run (after saving a checkpoint).
    `on_epoch(epoch, eval_loss)` is called after each epoch's evaluation, before its
    checkpoint; an exception it raises (e.g. Optuna's TrialPruned) ends the run there.

    Under `accelerate launch` (see core.training.distributed) each of the N processes trains on
    every N-th batch of a step's group and the adapter gradients are summed across processes
    before the optimizer step, which makes a step the same as one process taking the whole group;
    process 0 alone records, reports, checkpoints and saves (the others get ctx=None).
    """
    config = with_adapter_settings(config)
    path = config.validate(store)
    out = _output_folder(ctx, config)
    pairs = pinned_pairs(store, config, out.root)
    run = _prepare(ctx, config, store, out, pairs, path)
    _resume_or_begin(run)
    if not run.validation_examples:  # training goes on: a loss curve without an eval loss is still worth having
        why = _no_eval_loss_reason(store, config, pairs)
        log(ctx, f"no eval loss: {why}")
        if ctx is not None:
            ctx.progress(run.state["step"], run.total_steps, eval_note=why)  # the Training page shows it instead

    run.model.train()
    # A SIGTERM (a cancel's escalation) is held: the run stops after its step, and its checkpoint is always whole.
    with jobs.sigterm_held() as terminated:
        try:
            for epoch in range(run.state["epoch"], config.epochs):
                _train_epoch(run, epoch, terminated, on_step)
                _end_epoch(run, epoch, on_epoch)
        except JobCancelled:
            run.save()
            if run.world > 1:  # the others wait for process 0's checkpoint: the launcher ends them all once one exits
                import torch.distributed as dist

                dist.barrier()
            raise
    return _finish(run, pairs.split_id, path)


@dataclass
class _Run:
    """What the steps of train() share: the run's model and optimizer, its examples, its place and its position."""

    ctx: JobContext | None
    config: TrainConfig
    store: Store
    out: TrainDir
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    train_examples: list[dict]
    validation_examples: list[dict]
    pad_id: int
    rank: int
    world: int
    total_steps: int
    # What a checkpoint keeps: the position (epoch, batch within it, optimizer step), the losses, the eval losses.
    state: dict[str, Any]
    peak_mb: float = 0.0
    saved_at: float = field(default_factory=time.monotonic)

    @property
    def per_step(self) -> int:
        """Batches in one optimizer step, over all processes."""
        return self.config.grad_accum * self.world

    @property
    def dpo(self) -> bool:
        return self.config.method == "dpo"

    def evaluate(self) -> dict[str, float]:
        """The figures on the held-out examples ("eval_loss", and DPO's margin and accuracy); empty without any."""
        config = self.config
        if self.dpo:
            return preference_eval(self.model, self.validation_examples, config.batch_size, self.pad_id, config.beta)
        loss = eval_loss(self.model, self.validation_examples, config.batch_size, self.pad_id)
        return {} if loss is None else {"eval_loss": loss}

    def batch_loss(self, examples: list[dict]) -> tuple[torch.Tensor, dict[str, float], int]:
        """A batch's loss, its figures besides the loss, and the tokens it took."""
        if self.dpo:
            loss, figures = batch_dpo_loss(self.model, examples, self.pad_id, self.config.beta)
            pairs = [side for ex in examples for side in (ex["chosen"], ex["rejected"])]
            return loss, figures, sum(len(ex["input_ids"]) for ex in pairs)
        batch = to_device(collate(examples, self.pad_id))
        return answer_loss(self.model, batch), {}, int(batch["attention_mask"].sum())

    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.model, self.optimizer, self.scheduler, self.state, self.out)
        self.saved_at = time.monotonic()


def _output_folder(ctx: JobContext | None, config: TrainConfig) -> TrainDir:
    if config.output_dir:
        out = TrainDir(config.output_dir)
    elif ctx is not None:
        out = TrainDir(workspace.artifacts_dir() / f"train-{ctx.job_id}")
    else:
        raise BadInput("give an output folder when training outside a job")
    out.root.mkdir(parents=True, exist_ok=True)
    return out


def _prepare(
    ctx: JobContext | None, config: TrainConfig, store: Store, out: TrainDir, pairs: PinnedPairs, path: str
) -> _Run:
    """Load the model, tokenize the pinned pairs, build the optimizer and the learning-rate schedule."""
    from transformers import get_scheduler

    model, tokenizer = load_model(config, path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    build = build_preference_examples if config.method == "dpo" else build_examples
    train_examples = build(tokenizer, pairs.train, config.prompt_template, config.max_seq_len)
    validation_examples = build(tokenizer, pairs.validation, config.prompt_template, config.max_seq_len)
    if not train_examples:
        raise BadInput(f"every prompt fills max_seq_len={config.max_seq_len}; no answer tokens are left to train on")
    rank, processes = world()
    batches_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = math.ceil(batches_per_epoch / (config.grad_accum * processes)) * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, config.learning_rate)
    scheduler = get_scheduler(
        "constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    state = {"config": config.to_dict(), "epoch": 0, "batch": 0, "step": 0, "losses": []}
    state |= {"eval_before": None, "eval_after": None}
    return _Run(
        ctx=ctx,
        config=config,
        store=store,
        out=out,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        train_examples=train_examples,
        validation_examples=validation_examples,
        pad_id=pad_id,
        rank=rank,
        world=processes,
        total_steps=total_steps,
        state=state,
    )


def _optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Paged 8-bit AdamW on CUDA (a 7B QLoRA fits in 24 GB with it); plain AdamW on the CPU."""
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def _resume_or_begin(run: _Run) -> None:
    """Continue from the run's checkpoint when there is one; else (DPO: take the reference log-probabilities, then)
    take the eval loss before training."""
    examples = run.train_examples + run.validation_examples
    if (checkpoint := checkpoint_folder(run.out)) is not None:
        run.state = load_checkpoint(run.model, run.optimizer, run.scheduler, checkpoint, run.config)
        for example, reference in zip(examples, run.state.get("references", []), strict=False):
            example["reference"] = reference  # the reference of the run's start, not the checkpoint's policy
        forget_after(run.ctx, run.store, run.state["step"])
        log(run.ctx, f"resuming at epoch {run.state['epoch'] + 1}, step {run.state['step']} of {run.total_steps}")
        return
    if run.dpo:
        log(run.ctx, f"reference log-probabilities of {len(examples)} preference triples")
        fresh = not run.config.from_adapter  # a fresh adapter is the base; a continued one is its own reference
        add_references(run.model, examples, run.config.batch_size, run.pad_id, adapter_disabled=fresh)
        run.state["references"] = [example["reference"] for example in examples]
    figures = run.evaluate()
    run.state["eval_before"] = figures.get("eval_loss")
    if figures:
        record(run.ctx, run.store, 0, 0, figures)
        log(run.ctx, f"eval loss (validation {_held_out(run)}) before training: {run.state['eval_before']}")


def _train_epoch(run: _Run, epoch: int, terminated: threading.Event, on_step) -> None:
    """The optimizer steps of one epoch from the run's position on, each reported, then a point to stop at."""
    config, state = run.config, run.state
    batches = length_grouped_batches(run.train_examples, config.batch_size, config.seed, epoch)
    while state["batch"] < len(batches):
        group = batches[state["batch"] : state["batch"] + run.per_step]
        metrics = _step(run, group)
        state["batch"] += len(group)
        state["step"] += 1
        state["losses"].append(metrics["train_loss"])
        record(run.ctx, run.store, state["step"], epoch + state["batch"] / len(batches), metrics)
        if on_step:
            on_step({"step": state["step"], **metrics})
        if run.ctx is not None:
            message = f"epoch {epoch + 1}/{config.epochs}, loss {metrics['train_loss']:.4f}"
            run.ctx.progress(state["step"], run.total_steps, message, **metrics)
        _check_stop(run.ctx, run.world, terminated)
        if time.monotonic() - run.saved_at > CHECKPOINT_SECONDS and state["batch"] < len(batches):
            run.save()


def _step(run: _Run, group: list[list[int]]) -> dict[str, float]:
    """One optimizer step over a group of batches (this process takes every world-th of them); its figures, each a
    mean over the group's batches (DPO's reward margin and preference accuracy among them)."""
    started, tokens = time.perf_counter(), 0.0  # tokens: a float once summed over processes
    # Every process sums the same names, also one without a batch in this step (several processes).
    sums = dict.fromkeys(("train_loss", *(DPO_FIGURES if run.dpo else ())), 0.0)
    for indices in group[run.rank :: run.world]:
        loss, figures, taken = run.batch_loss([run.train_examples[i] for i in indices])
        (loss / len(group)).backward()
        for name, value in {"train_loss": loss.item(), **figures}.items():
            sums[name] += value
        tokens += taken
    if run.world > 1:
        sum_gradients(run.trainable)
        *totals, tokens = all_sum([*sums.values(), tokens], run.world)
        sums = dict(zip(sums, totals, strict=True))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.peak_mb = peak_memory_mb(run.peak_mb)
    return {
        **{name: value / len(group) for name, value in sums.items()},
        "learning_rate": run.scheduler.get_last_lr()[0],
        "tokens_per_s": tokens / (time.perf_counter() - started),
        "peak_memory_mb": run.peak_mb,
    }


def _end_epoch(run: _Run, epoch: int, on_epoch) -> None:
    """The eval loss after an epoch, the caller's look at it, then the epoch's checkpoint."""
    figures = run.evaluate()
    run.state["eval_after"] = figures.get("eval_loss")
    if figures:
        record(run.ctx, run.store, run.state["step"], epoch + 1, figures)
        log(run.ctx, f"epoch {epoch + 1}: eval loss {run.state['eval_after']}")
    run.state["epoch"], run.state["batch"] = epoch + 1, 0
    if on_epoch:
        on_epoch(epoch + 1, run.state["eval_after"])
    run.save()


def _finish(run: _Run, split_id: int | None, path: str) -> TrainResult:
    """Save the adapter, the figures and the settings as resolved (process 0); the run's result."""
    state = run.state
    result = TrainResult(
        output_dir=str(run.out.root),
        steps=state["step"],
        epochs=run.config.epochs,
        train_loss_first=state["losses"][0],
        train_loss_last=state["losses"][-1],
        eval_loss_before=state["eval_before"],
        eval_loss_after=state.get("eval_after"),
    )
    if run.rank == 0:
        run.model.save_pretrained(run.out.adapter)
        write_json(run.out.metrics, {**asdict(result), "train_losses": state["losses"]})
        # As resolved: the split the run was pinned to (its evaluation answers that split's test part), the model.
        write_json(run.out.train_config, {**run.config.to_dict(), "split_id": split_id, "resolved_model": path})
    return result


def _held_out(run: _Run) -> str:
    return "preference triples" if run.dpo else "pairs"


def _no_eval_loss_reason(store: Store, config: TrainConfig, pairs: PinnedPairs) -> str:
    """Why a run takes no eval loss, in one line (its log, the Training page)."""
    if pairs.validation:
        return f"every validation prompt fills max_seq_len={config.max_seq_len}"
    if pairs.split_id is None:
        return f"dataset {config.dataset!r} has no split, so no validation part"
    split = dataset.split_info(store, pairs.split_id)
    if not split.validation:
        return dataset.no_validation_message(split)
    if config.method == "dpo":
        return f"no rated pairs of runs answer the validation part of split v{split.version} of {config.dataset!r}"
    return f"the validation part of split v{split.version} of {config.dataset!r} has no accepted pairs"


def _check_stop(ctx: JobContext | None, world: int, terminated: threading.Event) -> None:
    """JobCancelled when the run is to stop after this step: a cancel in the store (process 0 reads it) or a
    SIGTERM held meanwhile. In a run of several processes each votes, so that all stop at the same step."""
    if world > 1:
        if all_sum([float(terminated.is_set() or (ctx is not None and ctx.cancelled()))], world)[0]:
            raise JobCancelled()
        return
    if terminated.is_set():
        raise JobCancelled()
    if ctx is not None:
        ctx.check_cancel()
