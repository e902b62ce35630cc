"""LoRA / QLoRA fine-tuning of a causal LM on a dataset's accepted train pairs, as a plain PyTorch loop.

A pair becomes text through core.prompting (the same prompt the evaluation asks), the loss
covers the answer tokens only, and logits are computed only where there is a label: with
Gemma 3's 262k-token vocabulary, full-sequence logits would dominate memory. The eval loss
(before training and after each epoch) is taken on the split's validation pairs, or on the
held-out fold of a cross-validation. Progress and per-step metrics go to the store; a checkpoint
each epoch (and on cancel) lets a job resume where it stopped. The adapter is saved in the
standard PEFT format. The `train` job runs this loop, then core.export (GGUF adapter, merged
GGUF + Modelfile), then core.evaluation on the split's test part.

The loop never merges, quantizes for export or converts to GGUF (that is export's job), never
searches hyperparameters (train_search's), never reads a test pair, and never touches the base
model's weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from core import dataset, jobs, runs, workspace
from core.errors import BadInput, WorkbenchError
from core.jobs import JobCancelled, JobContext
from core.prompting import render_prompt
from core.store import Store, now
from core.train_config import ALL_LINEAR, METHODS, TrainConfig  # noqa: F401 - callers find them here too

IGNORE = -100  # label of a token that carries no loss (prompt and padding)
MEGA_CHUNK_BATCHES = 50  # length grouping sorts within chunks of this many batches
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


# ---- data ------------------------------------------------------------------------------------


def build_examples(tokenizer, pairs: list[dataset.StoredPair], template: str, max_seq_len: int) -> list[dict]:
    """Token ids and labels per pair: prompt tokens carry no loss, answer tokens + EOS do.

    The prompt and the answer are tokenized apart, so the boundary where the labels start is
    exact. Pairs whose prompt alone fills max_seq_len have nothing to learn and are dropped.
    """
    examples = []
    for pair in pairs:
        prompt = tokenizer(render_prompt(pair.question, template))["input_ids"]
        answer = tokenizer(" " + pair.answer.strip(), add_special_tokens=False)["input_ids"]
        input_ids = (prompt + answer + [tokenizer.eos_token_id])[:max_seq_len]
        labels = ([IGNORE] * len(prompt) + answer + [tokenizer.eos_token_id])[:max_seq_len]
        if any(label != IGNORE for label in labels):
            examples.append({"input_ids": input_ids, "labels": labels})
    return examples


EXAMPLES_FILE = "examples.json"  # in a run's folder: the pairs it trains and evaluates on, pinned at its start


@dataclass(frozen=True)
class PinnedPairs:
    """What a run trains on and takes its eval loss on, and the split they come from (see pinned_pairs)."""

    train: list[dataset.StoredPair]
    validation: list[dataset.StoredPair]  # for a fold of a cross-validation: its held-out fold
    split_id: int | None


def pinned_pairs(store: Store, config: TrainConfig, out: Path) -> PinnedPairs:
    """The train and validation pairs (ids and texts) of the run in `out`: chosen from its split at its start and
    kept in its folder, so that a resumed run trains on exactly them.

    Read from the dataset again, a new split, newly accepted pairs or an edit would change what a resumed
    run skips, repeats and trains on. A checkpoint without pinned pairs (written before they were pinned)
    is refused: which pairs it was trained on is not known. The test part is never pinned nor read here:
    only the evaluation after training answers it.
    """
    path = out / EXAMPLES_FILE
    selection: dict[str, Any] = {"dataset": config.dataset, "part": config.part, "limit": config.limit}
    if config.split_id is not None:  # added only when set, so that folders pinned before it still match
        selection["split_id"] = config.split_id
    if config.cv_folds:
        selection |= {"cv_folds": config.cv_folds, "cv_fold": config.cv_fold, "seed": config.seed}
    if path.exists():
        pinned = json.loads(path.read_text())
        if pinned["selection"] != selection:
            raise BadInput(f"{out} holds a run on other pairs ({pinned['selection']}); choose another output folder")
        # A run pinned before splits had validation parts took its eval loss on test pairs: those are not read
        # any more, so it resumes without an eval loss.
        return PinnedPairs(
            [dataset.StoredPair(**pair) for pair in pinned["train"]],
            [dataset.StoredPair(**pair) for pair in pinned.get("validation", [])],
            pinned["split_id"],
        )
    if checkpoint_folder(out) is not None:
        raise BadInput(
            f"{out} holds a checkpoint that does not record the pairs it was trained on; train into another folder"
        )
    if config.split_id is not None:
        split = dataset.split_info(store, config.split_id)
    else:
        split = dataset.latest_split(store, config.dataset)
    split_id = split.id if split else None
    train_pairs = dataset.select_pairs(store, config.dataset, config.part, "accepted", split_id=split_id)
    train_pairs = train_pairs[: config.limit]
    if config.cv_folds:
        held_out = cv_folds(train_pairs, config.cv_folds, config.seed)[config.cv_fold - 1]
        held_ids = {pair.id for pair in held_out}
        train_pairs = [pair for pair in train_pairs if pair.id not in held_ids]
    elif split is not None:
        held_out = dataset.select_pairs(store, config.dataset, "validation", "accepted", split_id=split_id)
        held_out = held_out[: config.limit]
    else:
        held_out = []
    record = {
        "selection": selection,
        "split_id": split_id,
        "split_version": split.version if split else None,
        "train": [asdict(pair) for pair in train_pairs],
        "validation": [asdict(pair) for pair in held_out],
    }
    _write_synced(path, lambda file: file.write(json.dumps(record, indent=1).encode()))
    return PinnedPairs(train_pairs, held_out, split_id)


def cv_folds(pairs: list[dataset.StoredPair], folds: int, seed: int) -> list[list[dataset.StoredPair]]:
    """The pairs dealt into `folds` folds, stratified by field, the same for the same pairs, folds and seed.

    Each field's pairs, shuffled, are dealt round-robin, going on where the previous field stopped: the folds
    differ in size by one at most and every field is spread over them, as make_split does for its parts.
    """
    rng = random.Random(f"cv-{seed}")
    by_field: dict[str, list[dataset.StoredPair]] = {}
    for pair in pairs:
        by_field.setdefault(pair.field, []).append(pair)
    dealt: list[list[dataset.StoredPair]] = [[] for _ in range(folds)]
    position = 0
    for name in sorted(by_field):
        members = list(by_field[name])
        rng.shuffle(members)
        for pair in members:
            dealt[position % folds].append(pair)
            position += 1
    return [sorted(fold, key=lambda pair: pair.id) for fold in dealt]


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of this batch (not to max_seq_len); pads carry no loss."""
    width = max(len(ex["input_ids"]) for ex in batch)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([pad(ex["input_ids"], pad_id) for ex in batch]),
        "attention_mask": torch.tensor([pad([1] * len(ex["input_ids"]), 0) for ex in batch]),
        "labels": torch.tensor([pad(ex["labels"], IGNORE) for ex in batch]),
    }


def length_grouped_batches(examples: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches (of example indices) of similar length, so little compute goes to padding.

    Shuffle, sort by length within mega-chunks of MEGA_CHUNK_BATCHES batches, cut into
    batches, shuffle the batches; the same (seed, epoch) always gives the same batches,
    which is what lets a resumed run skip exactly the batches it already trained on.
    """
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * MEGA_CHUNK_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: len(examples[i]["input_ids"]))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


# ---- model -----------------------------------------------------------------------------------


def _device() -> torch.device:
    """This process's device: under `accelerate launch` each process has a GPU of its own (LOCAL_RANK)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _world() -> tuple[int, int]:
    """(rank, number of processes) of a distributed run; (0, 1) for a run in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], world: int) -> list[float]:
    """The element-wise sum of `values` over all processes (itself in a single process)."""
    if world == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return total.tolist()


def load_model(config: TrainConfig, path: str):
    """The base model (4-bit NF4 for qlora) with fresh LoRA adapters; returns (peft model, tokenizer)."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True, "dtype": dtype}
    if config.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": _device()}
    if config.method == "qlora" and not cuda and Path(path).is_dir():
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
        model = model_class.from_pretrained(None, config=model_config, state_dict=_read_weights(path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config.method == "qlora":
        _keep_4bit_layers_differentiable(model)
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if not cuda and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            _output_head_in_bf16(model)
    else:
        model.to(_device())
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(config.seed)  # the LoRA A matrices are drawn here
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return peft.get_peft_model(model, lora_config(config)), tokenizer


def lora_config(config: TrainConfig):
    """The peft LoraConfig of a run's settings."""
    import peft

    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
    )


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """A local checkpoint's tensors read with pread into memory of their own, not memory-mapped.

    from_pretrained maps the safetensors file and leaves the unquantized weights (embedding,
    norms) as views of it, so the whole fp32 file stays mapped and, once read, resident. For a
    4-bit CPU run that is most of the memory: on Gemma 3 270M, 1.9 GB resident after the first
    step instead of 1.2 GB.
    """
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BadInput(f"no .safetensors weights in {path} (weights are only loaded from safetensors)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as reader:
            weights.update({name: reader.get_tensor(name) for name in reader.keys()})  # noqa: SIM118 - a safe_open handle is not a dict
    return weights


def _output_head_in_bf16(model) -> None:
    """QLoRA on a CPU with native bf16 matmul: keep the frozen output head (and the embedding tied to it) in bf16.

    With a 262k vocabulary the head is most of a step's arithmetic, and a bf16 matmul (fp32
    accumulation, as on a GPU) runs 4x faster than fp32 here; it also halves the head's memory.
    Gemma's released weights are bf16, so nothing is lost by storing them so. The embedding's
    output is cast back to fp32, the body's compute dtype on the CPU.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head.weight.data = head.weight.data.to(torch.bfloat16)
    if embedding.weight is head.weight:
        embedding.register_forward_hook(lambda _module, _inputs, output: output.float())


def _keep_4bit_layers_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    It repacks on the first no-grad forward in eval mode (our eval loss before training), for
    good: later training forwards then run that kernel, which has no backward, and the gradient
    stops at every quantized layer without an error. The plain 4-bit path is differentiable.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


LOSS_CHUNK_ROWS = 64  # answer tokens whose vocabulary-wide logits exist at once (64 x 262k fp32 = 67 MB)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens, the same as `model(labels=...).loss`.

    The transformer body gives hidden states; only the rows that predict a labelled token go
    through lm_head, and those in chunks of LOSS_CHUNK_ROWS, so the (tokens x vocabulary)
    logits never exist for more than one chunk at a time (see _ChunkedHeadLoss).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1]  # position t predicts token t + 1
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    head = base.get_output_embeddings()
    cap = float(getattr(base.config, "final_logit_softcapping", None) or 0.0)
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _ChunkedHeadLoss.apply(hidden[keep], head.weight, targets[keep], cap)
    logits = head(hidden[keep].to(head.weight.dtype)).float()  # a trained or unusual head: plain autograd
    return torch.nn.functional.cross_entropy(_softcap(logits, cap), targets[keep])


def _softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2/3 squash logits before the softmax (cap * tanh(x / cap)); the model's own loss does too."""
    return torch.tanh(logits / cap) * cap if cap else logits


class _ChunkedHeadLoss(torch.autograd.Function):
    """Cross-entropy of (hidden @ W.T) over chunks of rows, with the gradient of hidden computed on the way.

    Autograd would keep every chunk's logits alive until the backward pass; here each chunk's
    softmax gradient is folded into d(loss)/d(hidden) at once and the logits are dropped, so
    peak memory is one chunk's logits whatever the number of answer tokens. W (the tied
    embedding) is frozen in LoRA training, so no gradient for it is needed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap):
        rows = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, LOSS_CHUNK_ROWS):
            h, t = hidden[start : start + LOSS_CHUNK_ROWS], targets[start : start + LOSS_CHUNK_ROWS]
            logits = (h.to(weight.dtype) @ weight.T).float()
            squashed = logits.div_(cap).tanh_() if cap else None  # Gemma's softcap, in place
            if cap:
                logits = squashed * cap
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            total += (lse - picked).sum()
            if need_grad:
                grad = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1
                if cap:  # d/dx of cap * tanh(x / cap) is 1 - tanh(x / cap)^2
                    grad.mul_(squashed.square_().neg_().add_(1))
                grad_hidden[start : start + LOSS_CHUNK_ROWS] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
        if need_grad:
            ctx.save_for_backward(grad_hidden.div_(rows))
        return total / rows

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss, None, None, None


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(model, examples: list[dict], batch_size: int, pad_id: int) -> float | None:
    """Token-weighted mean answer loss over examples (None when there are none)."""
    if not examples:
        return None
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _to(collate(examples[start : start + batch_size], pad_id), _device())
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += answer_loss(model, batch).item() * n
        tokens += n
    model.train()
    return total / tokens


# ---- checkpoints -----------------------------------------------------------------------------
#
# A run's folder holds its checkpoint as generations, checkpoint-N/ (N counts the saves): each is written in
# full and fsynced, then `checkpoint`, a symbolic link, is switched to it in one rename, and only then do the
# older generations go. A kill at any moment leaves a complete checkpoint on disk, and the next save never
# removes it before its successor is in place.

CHECKPOINT = "checkpoint"
STATE_FILE = "state.pt"  # renamed into place last: a generation holding it is complete


def _save_checkpoint(model, optimizer, scheduler, state: dict, out: Path) -> None:
    """Adapter + optimizer/scheduler + position + RNG states as a new generation, then pointed at."""
    folder = out / f"{CHECKPOINT}-{max(map(_generation_number, _generations(out)), default=0) + 1}"
    model.save_pretrained(folder)
    for written in folder.iterdir():
        _fsync(written)
    state = {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **_rng_state()}
    _write_synced(folder / STATE_FILE, lambda file: torch.save(state, file))
    _point_checkpoint_at(folder)
    for stale in _generations(out):
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)


def _point_checkpoint_at(folder: Path) -> None:
    """Switch `checkpoint` to a complete generation in one rename (a folder of a run from before generations is
    moved aside first: checkpoint_folder finds the newest generation meanwhile)."""
    link = folder.parent / CHECKPOINT
    if link.is_dir() and not link.is_symlink():
        link.rename(folder.parent / f"{CHECKPOINT}-0")
    staged = folder.parent / f"{CHECKPOINT}.link"
    staged.unlink(missing_ok=True)
    os.symlink(folder.name, staged)
    os.replace(staged, link)
    _fsync(folder.parent)


def checkpoint_folder(out: Path) -> Path | None:
    """The complete checkpoint a run in `out` resumes from: the one `checkpoint` points at, else the newest complete
    generation; None when there is none."""
    candidates = [out / CHECKPOINT, *sorted(_generations(out), key=_generation_number, reverse=True)]
    return next((folder for folder in candidates if (folder / STATE_FILE).exists()), None)


def discard_checkpoint(out: Path) -> None:
    """Remove a run's checkpoint, every generation of it (e.g. a pruned trial's, which is never resumed)."""
    link = out / CHECKPOINT
    if link.is_symlink():
        link.unlink()
    for folder in [link, *_generations(out)]:
        shutil.rmtree(folder, ignore_errors=True)


def _generations(out: Path) -> list[Path]:
    return [p for p in out.glob(f"{CHECKPOINT}-*") if p.name.removeprefix(f"{CHECKPOINT}-").isdigit()]


def _generation_number(folder: Path) -> int:
    return int(folder.name.removeprefix(f"{CHECKPOINT}-"))


def _write_synced(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file beside `path`, fsync it and rename it into place: `path` is either absent or complete."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(part, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (a rename is only durable once its folder is)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _rng_state() -> dict[str, Any]:
    """The random generators' states: the CPU's, and every CUDA device's when there is one (dropout on a GPU)."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    """Put back what _rng_state saved (the CUDA states of the devices this machine has)."""
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"][: torch.cuda.device_count()])


def _load_checkpoint(model, optimizer, scheduler, directory: Path, config: TrainConfig) -> dict:
    import peft
    from safetensors.torch import load_file

    state = torch.load(directory / STATE_FILE, weights_only=True)  # plain tensors and numbers: no pickled code
    optimizer_state, scheduler_state = state.pop("optimizer"), state.pop("scheduler")
    rng = {key: state.pop(key) for key in ("rng", "cuda_rng") if key in state}
    # Read through TrainConfig: a checkpoint from before a setting existed has it at its default.
    if _resume_key(TrainConfig.from_dict(state["config"]).to_dict()) != _resume_key(config.to_dict()):
        raise BadInput(f"{directory} holds a checkpoint of different settings; choose another output folder")
    peft.set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    _restore_rng(rng)
    return state


def _resume_key(settings: dict) -> dict:
    """The settings a checkpoint must match to be resumed: what shapes training, not where it is written
    (a distributed run fills output_dir in), what happens after it or how its settings were chosen."""
    return {
        k: v
        for k, v in settings.items()
        if k not in ("output_dir", "evaluate_with", "eval_baseline_run", "export_merged", "selection")
    }


def _peak_memory_mb(peak: float) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return max(peak, psutil.Process().memory_info().rss / 2**20)


# ---- the loop --------------------------------------------------------------------------------


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

    Under `accelerate launch` (see train_distributed) each of the N processes trains on every
    N-th batch of a step's group and the adapter gradients are summed across processes before
    the optimizer step, which makes a step the same as one process taking the whole group;
    process 0 alone records, reports, checkpoints and saves (the others get ctx=None).
    """
    from transformers import get_scheduler

    path = config.validate(store)
    if config.output_dir:
        out = Path(config.output_dir)
    elif ctx is not None:
        out = workspace.artifacts_dir() / f"train-{ctx.job_id}"
    else:
        raise BadInput("give an output folder when training outside a job")
    out.mkdir(parents=True, exist_ok=True)
    pairs = pinned_pairs(store, config, out)

    model, tokenizer = load_model(config, path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples = build_examples(tokenizer, pairs.train, config.prompt_template, config.max_seq_len)
    validation_examples = build_examples(tokenizer, pairs.validation, config.prompt_template, config.max_seq_len)
    if not train_examples:
        raise BadInput(f"every prompt fills max_seq_len={config.max_seq_len}; no answer tokens are left to train on")

    rank, world = _world()
    per_step = config.grad_accum * world  # batches in one optimizer step, over all processes
    batches_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / per_step)
    total_steps = steps_per_epoch * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, config.learning_rate)
    scheduler = get_scheduler(
        "constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    state = {"config": config.to_dict(), "epoch": 0, "batch": 0, "step": 0, "losses": [], "eval_before": None}
    if (checkpoint := checkpoint_folder(out)) is not None:
        state = _load_checkpoint(model, optimizer, scheduler, checkpoint, config)
        _forget_metrics_after(ctx, store, state["step"])
        _log(ctx, f"resuming at epoch {state['epoch'] + 1}, step {state['step']} of {total_steps}")
    else:
        state["eval_before"] = eval_loss(model, validation_examples, config.batch_size, pad_id)
        if state["eval_before"] is not None:
            _record(ctx, store, 0, 0, {"eval_loss": state["eval_before"]})
            _log(ctx, f"eval loss (validation pairs) before training: {state['eval_before']}")
    if not validation_examples:  # training goes on: a loss curve without an eval loss is still worth having
        why = _no_eval_loss_reason(store, config, pairs)
        _log(ctx, f"no eval loss: {why}")
        if ctx is not None:
            ctx.progress(state["step"], total_steps, eval_note=why)  # the Training page shows it instead
    eval_after = state.get("eval_after")

    def save() -> None:
        if rank == 0:
            _save_checkpoint(model, optimizer, scheduler, {**state, "eval_after": eval_after}, out)

    model.train()
    peak = 0.0
    saved_at = time.monotonic()
    # A SIGTERM (a cancel's escalation) is held: the run stops after its step, and its checkpoint is always whole.
    with jobs.sigterm_held() as terminated:
        try:
            for epoch in range(state["epoch"], config.epochs):
                batches = length_grouped_batches(train_examples, config.batch_size, config.seed, epoch)
                while state["batch"] < len(batches):
                    started, tokens, loss_sum = time.perf_counter(), 0, 0.0
                    group = batches[state["batch"] : state["batch"] + per_step]
                    for indices in group[rank::world]:
                        batch = _to(collate([train_examples[i] for i in indices], pad_id), _device())
                        loss = answer_loss(model, batch)
                        (loss / len(group)).backward()
                        loss_sum += loss.item()
                        tokens += int(batch["attention_mask"].sum())
                    if world > 1:
                        _sum_gradients(trainable)
                        loss_sum, tokens = _all_sum([loss_sum, tokens], world)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["batch"] += len(group)
                    state["step"] += 1
                    peak = _peak_memory_mb(peak)
                    metrics = {
                        "train_loss": loss_sum / len(group),
                        "learning_rate": scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens / (time.perf_counter() - started),
                        "peak_memory_mb": peak,
                    }
                    state["losses"].append(metrics["train_loss"])
                    _record(ctx, store, state["step"], epoch + state["batch"] / len(batches), metrics)
                    if on_step:
                        on_step({"step": state["step"], **metrics})
                    if ctx is not None:
                        ctx.progress(
                            state["step"],
                            total_steps,
                            f"epoch {epoch + 1}/{config.epochs}, loss {metrics['train_loss']:.4f}",
                            **metrics,
                        )
                    _check_stop(ctx, world, terminated)
                    if time.monotonic() - saved_at > CHECKPOINT_SECONDS and state["batch"] < len(batches):
                        save()
                        saved_at = time.monotonic()
                eval_after = eval_loss(model, validation_examples, config.batch_size, pad_id)
                if eval_after is not None:
                    _record(ctx, store, state["step"], epoch + 1, {"eval_loss": eval_after})
                    _log(ctx, f"epoch {epoch + 1}: eval loss {eval_after}")
                state["epoch"], state["batch"] = epoch + 1, 0
                if on_epoch:
                    on_epoch(epoch + 1, eval_after)
                save()
                saved_at = time.monotonic()
        except JobCancelled:
            save()
            if world > 1:  # the others wait for process 0's checkpoint: the launcher ends them all once one exits
                import torch.distributed as dist

                dist.barrier()
            raise

    if rank == 0:
        model.save_pretrained(out / "adapter")
    result = TrainResult(
        output_dir=str(out),
        steps=state["step"],
        epochs=config.epochs,
        train_loss_first=state["losses"][0],
        train_loss_last=state["losses"][-1],
        eval_loss_before=state["eval_before"],
        eval_loss_after=eval_after,
    )
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps({**asdict(result), "train_losses": state["losses"]}, indent=2))
        # As resolved: the split the run was pinned to (its evaluation answers that split's test part), the model.
        resolved = {**config.to_dict(), "split_id": pairs.split_id, "resolved_model": path}
        (out / "train_config.json").write_text(json.dumps(resolved, indent=2))
    return result


def _no_eval_loss_reason(store: Store, config: TrainConfig, pairs: PinnedPairs) -> str:
    """Why a run takes no eval loss, in one line (its log, the Training page)."""
    if pairs.validation:
        return f"every validation prompt fills max_seq_len={config.max_seq_len}"
    if pairs.split_id is None:
        return f"dataset {config.dataset!r} has no split, so no validation part"
    split = dataset.split_info(store, pairs.split_id)
    if not split.validation:
        return dataset.no_validation_message(split)
    return f"the validation part of split v{split.version} of {config.dataset!r} has no accepted pairs"


def _check_stop(ctx: JobContext | None, world: int, terminated: threading.Event) -> None:
    """JobCancelled when the run is to stop after this step: a cancel in the store (process 0 reads it) or a
    SIGTERM held meanwhile. In a run of several processes each votes, so that all stop at the same step."""
    if world > 1:
        if _all_sum([float(terminated.is_set() or (ctx is not None and ctx.cancelled()))], world)[0]:
            raise JobCancelled()
        return
    if terminated.is_set():
        raise JobCancelled()
    if ctx is not None:
        ctx.check_cancel()


def _sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the adapter gradients over all processes (one flat all-reduce; a LoRA adapter is small)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for param, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        param.grad = chunk.view_as(param).clone()


# ---- several processes (accelerate launch) ----------------------------------------------------

PROCESSES_ENV = "WORKBENCH_TRAIN_PROCESSES"  # overrides the number of training processes (e.g. 2 on a CPU)
CANCELLED_EXIT = 3  # a process of a distributed run exits with this after a cancel
RANK_SHUTDOWN_SECONDS = 24 * 3600


def training_processes() -> int:
    """How many processes a training job runs: one per visible GPU, unless WORKBENCH_TRAIN_PROCESSES says."""
    wanted = os.environ.get(PROCESSES_ENV, "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise BadInput(f"{PROCESSES_ENV} must be a whole number >= 1, got {wanted!r}")
        return int(wanted)
    return max(1, torch.cuda.device_count())


def train_distributed(ctx: JobContext, config: TrainConfig, processes: int) -> TrainResult:
    """Run train() in `processes` processes through `accelerate launch` (one per GPU; gloo on the CPU).

    The job's own process only launches and waits: process 0 of the launch reports through the
    store as this job. A cancel reaches process 0 through the store (all processes then stop
    after a checkpoint); if this process is told to stop, the launch's process group goes too.
    """
    import subprocess
    import sys

    out = Path(config.output_dir or workspace.artifacts_dir() / f"train-{ctx.job_id}")
    out.mkdir(parents=True, exist_ok=True)
    pinned_pairs(ctx.store, config, out)  # pinned here, once, so that every process reads the same pairs
    # --multi_gpu is accelerate's torchrun launcher; without a GPU its processes meet over gloo on the CPU
    # (accelerate's --cpu launcher needs MPI for more than one process).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    command += ["--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(_free_port()), "-m", "core.training", "rank", str(ctx.job_id), str(out)]
    ctx.log(f"training in {processes} processes: {' '.join(command[2:])}")
    log_path = out / "processes.log"
    # torchrun gives its processes this long after a SIGTERM before it kills them: long enough for any step and
    # checkpoint (they stop at the end of their step); a job that stops responding is killed by the job's watch.
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(RANK_SHUTDOWN_SECONDS)}
    with open(log_path, "ab") as log:  # in the job's process group: a cancel or kill of the job reaches them
        launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        code = launch.wait()
    except BaseException:
        with jobs.sigterm_held():  # a second SIGTERM must not leave the processes saving without us waiting
            launch.terminate()  # torchrun passes it on to the training processes
            launch.wait()
        raise
    if code == CANCELLED_EXIT or ctx.cancelled():
        raise JobCancelled()
    if code != 0:
        raise WorkbenchError(f"training processes failed (exit {code}): {_failure_reason(log_path)}")
    metrics = json.loads((out / "metrics.json").read_text())
    return TrainResult(**{k: metrics[k] for k in TrainResult.__dataclass_fields__})


def _failure_reason(log_path: Path) -> str:
    """The one line that says why a distributed run failed: a process's own message, else the last exception."""
    lines = log_path.read_text(errors="replace").splitlines()
    own = [line for line in lines if re.match(r"process \d+: ", line)]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception): ", line) and "ChildFailedError" not in line]
    return (own or raised or ["no message; see " + str(log_path)])[-1]


def _free_port() -> int:
    """A free local port for the processes' rendezvous (fixed ports collide when two runs start together)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(job_id: int, output_dir: str) -> int:
    """One process of a distributed run (`python -m core.training rank JOB OUTPUT`, started by accelerate)."""
    import torch.distributed as dist

    jobs.cancel_on_sigterm()  # as in a job's own process: held while training, a cancel at the end of the step
    if torch.cuda.is_available():
        torch.cuda.set_device(_device())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    store = Store()
    try:
        params = jobs.get(store, job_id).params
        config = TrainConfig.from_dict({**params, "output_dir": output_dir})
        ctx = JobContext(store, job_id, params) if dist.get_rank() == 0 else None
        train(ctx, config, store)
        return 0
    except JobCancelled:
        return CANCELLED_EXIT
    except WorkbenchError as exc:
        print(f"process {dist.get_rank()}: {exc}", flush=True)
        return 1
    finally:
        dist.destroy_process_group()
        store.close()


def _optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Paged 8-bit AdamW on CUDA (a 7B QLoRA fits in 24 GB with it); plain AdamW on the CPU."""
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def _forget_metrics_after(ctx: JobContext | None, store: Store, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint; their first recording goes."""
    if ctx is not None:
        store.execute("DELETE FROM training_metrics WHERE job_id = ? AND step > ?", (ctx.job_id, step))


def _record(ctx: JobContext | None, store: Store, step: int, epoch: float, metrics: dict[str, float]) -> None:
    """training_metrics rows belong to a job; a run outside a job reports through on_step only."""
    if ctx is None:
        return
    stamp = now()
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO training_metrics (job_id, step, epoch, name, value, at) VALUES (?, ?, ?, ?, ?, ?)",
            [(ctx.job_id, step, epoch, name, float(value), stamp) for name, value in metrics.items()],
        )


def _log(ctx: JobContext | None, line: str) -> None:
    if ctx is not None:
        ctx.log(line)


def metrics_frame(store: Store, job_id: int):
    """Every figure a training job recorded: columns step, epoch, name, value (the loss curve's data)."""
    import pandas as pd

    rows = store.query(
        "SELECT step, epoch, name, value FROM training_metrics WHERE job_id = ? ORDER BY step, id", (job_id,)
    )
    return pd.DataFrame([dict(r) for r in rows], columns=["step", "epoch", "name", "value"])


def start_training(store: Store, config: TrainConfig) -> int:
    """Check the settings (BadInput with the reason, before any process starts), then start the job."""
    config.validate(store)
    return jobs.submit(store, "train", config.to_dict())


def run_train_job(ctx: JobContext) -> None:
    """The `train` job kind: train, export (PEFT, GGUF adapter, merged GGUF), then evaluate the adapter.

    params are a TrainConfig as a dict; output defaults to artifacts/train-JOB. Each stage
    skips what an earlier attempt finished, so a resumed job picks up where it stopped. The
    evaluation answers the test part of the split the run trained on, the only place a
    training job reads it; a run started from a search records how the search chose it.
    """
    from core import evaluation, export

    config = TrainConfig.from_dict(ctx.params)
    done = ctx.store.one("SELECT done FROM jobs WHERE id = ?", (ctx.job_id,))["done"]
    ctx.progress(done, None, "loading the model", stage="training")
    processes = training_processes()
    result = train_distributed(ctx, config, processes) if processes > 1 else train(ctx, config, ctx.store)
    summary = f"train loss {result.train_loss_first:.4f} -> {result.train_loss_last:.4f}"
    ctx.progress(
        result.steps,
        result.steps,
        summary,
        stage="exporting",
        output_dir=result.output_dir,
        eval_loss_before=result.eval_loss_before,
        eval_loss_after=result.eval_loss_after,
    )
    baseline = evaluation.decoding_params(ctx.store, config.eval_baseline_run)
    export.export_training(Path(result.output_dir), params=baseline, merged=config.export_merged, progress=ctx.log)
    ctx.check_cancel()
    if config.evaluate_with == "none":
        ctx.progress(result.steps, result.steps, f"done: {summary}", stage="done")
        return
    run_id = ctx.figures().get("eval_run_id") or _unrecorded_eval_run(ctx, result.output_dir, config.evaluate_with)
    if run_id is None:  # the test part of the split the run was pinned to (see evaluation.EvalConfig.split_id)
        run = evaluation.create_eval_run(
            ctx.store,
            evaluation.EvalConfig(
                train_dir=result.output_dir,
                backend=config.evaluate_with,
                baseline_run=config.eval_baseline_run,
                limit=config.limit,
            ),
            selection=config.selection,
        )
    else:
        run = runs.get_run(ctx.store, run_id)
    ctx.progress(0, None, f"evaluating: run {run.id}", stage="evaluating", eval_run_id=run.id)
    f1 = evaluation.evaluate_run(ctx, run)
    ctx.progress(
        result.steps, result.steps, f"done: {summary}; run {run.id} mean F1 {f1:.3f}", stage="done", mean_f1=f1
    )


def _unrecorded_eval_run(ctx: JobContext, train_dir: str, backend: str) -> int | None:
    """The evaluation run an earlier attempt of this job created and was stopped before recording, if any.

    The run and the job's figures are two commits; finding the run again makes the second step safe to
    redo, so a resumed job never evaluates into a second, empty run.
    """
    from core.evaluation import RUN_KIND

    row = ctx.store.one(
        "SELECT r.id FROM runs r JOIN jobs j ON j.id = ? WHERE r.kind = ? AND r.backend = ?"
        " AND r.created_at >= j.created_at AND json_extract(r.config, '$.evaluation.train_dir') = ?"
        " ORDER BY r.id DESC LIMIT 1",
        (ctx.job_id, RUN_KIND, backend, str(Path(train_dir))),
    )
    return row["id"] if row else None


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "rank":
        sys.exit("usage: python -m core.training rank JOB_ID OUTPUT_DIR (started by accelerate launch)")
    sys.exit(_rank_main(int(sys.argv[2]), sys.argv[3]))
