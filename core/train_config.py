"""What a fine-tuning run is asked to do: TrainConfig, its checks, and the names it accepts.

Kept apart from core.training so that the CLI and the pages can build their forms from
these fields without loading torch. Never trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core import dataset, models, runs
from core.errors import BadInput
from core.prompting import DEFAULT_TEMPLATE, check_template
from core.store import Store

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("qlora", "lora")
SCHEDULERS = ("linear", "cosine", "constant")
EVAL_ENGINES = ("llamacpp", "transformers", "none")
# Set by a hyperparameter search for its trials and its final training, not by hand: the CLI's `train` has no
# flags for them (`--trials` and `--folds` start a search, `--from-search` trains with its choice).
SEARCH_FIELDS = ("split_id", "cv_folds", "cv_fold", "selection")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def refuse_unknown(cls: type, values: dict[str, Any], what: str) -> None:
    """BadInput naming every key of `values` that is not a field of the dataclass `cls`."""
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise BadInput(f"unknown {what} setting(s): {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = field(metadata={"help": "dataset whose accepted pairs are trained on"})
    part: str = _opt(
        "train",
        "which part of the split to train on (the eval loss is taken on its validation part, the evaluation after"
        " training answers its test part)",
    )
    method: str = _opt("qlora", "qlora: 4-bit NF4 base weights + LoRA; lora: full-precision base + LoRA")
    model: str = _opt("", "model folder or hub id; empty uses the embedded Gemma 3 270M checkpoint")
    lora_r: int = _opt(8, "LoRA rank r: the size of the low-rank update")
    lora_alpha: float = _opt(16, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input, in [0, 1)")
    target_modules: tuple[str, ...] = _opt(
        ("q_proj", "v_proj"), f"module names that get LoRA adapters; all linear layers: {','.join(ALL_LINEAR)}"
    )
    learning_rate: float = _opt(2e-4, "peak learning rate of AdamW")
    scheduler: str = _opt("linear", "learning-rate schedule after warmup: linear, cosine or constant")
    warmup_ratio: float = _opt(0.05, "share of the optimizer steps spent warming the learning rate up")
    epochs: int = _opt(1, "passes over the training pairs")
    batch_size: int = _opt(4, "pairs per forward pass")
    grad_accum: int = _opt(1, "forward passes per optimizer step (effective batch = batch_size * grad_accum)")
    max_seq_len: int = _opt(256, "tokens per pair (prompt + answer); longer pairs are cut")
    gradient_checkpointing: bool = _opt(
        True, "recompute activations in the backward pass: much less memory (the QLoRA recipe), ~30% slower"
    )
    limit: int | None = _opt(None, "use only the first N train and N validation pairs (and N test questions)")
    seed: int = _opt(42, "seed for the LoRA initialisation, dropout, batch order and cross-validation folds")
    prompt_template: str = _opt(DEFAULT_TEMPLATE, "prompt text; must contain {question}")
    output_dir: str = _opt("", "where checkpoint, adapter and metrics go; empty: the workspace's artifacts/train-JOB")
    evaluate_with: str = _opt(
        "llamacpp",
        "after training, answer the split's test part with base + adapter on: llamacpp, transformers or none",
    )
    eval_baseline_run: int | None = _opt(None, "evaluation copies this run's decoding parameters; empty: greedy")
    export_merged: bool = _opt(True, "also merge the adapter into the base and write a Q8_0 GGUF with a Modelfile")
    split_id: int | None = _opt(
        None, "the split (by id) whose parts are used; empty: the latest one at the run's start"
    )
    cv_folds: int = _opt(0, "k-fold cross-validation: the train part is dealt into this many folds (0: none)")
    cv_fold: int = _opt(0, "with cv_folds: the fold (1..cv_folds) held out for the eval loss; the rest is trained on")
    selection: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "how these settings were chosen (by a search), recorded with the evaluation run"},
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        refuse_unknown(cls, values, "training")
        values = dict(values)
        if "target_modules" in values:
            modules = values["target_modules"]
            values["target_modules"] = tuple(modules.split(",") if isinstance(modules, str) else modules)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, store: Store) -> str:
        """Refuse settings that cannot train (BadInput, one line); returns the resolved model path or id."""
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"),
            (self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}"),
            (self.lora_r >= 1, f"LoRA r must be at least 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"LoRA alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"LoRA dropout must be in [0, 1), got {self.lora_dropout}"),
            (0 <= self.warmup_ratio < 1, f"warmup ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1, got {self.grad_accum}"),
            (self.max_seq_len >= 8, f"max sequence length must be at least 8, got {self.max_seq_len}"),
            (self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}"),
            (bool(self.target_modules), "give at least one target module"),
            (self.evaluate_with in EVAL_ENGINES, f"evaluate_with must be one of {', '.join(EVAL_ENGINES)}"),
            (
                self.cv_folds == self.cv_fold == 0 or (self.cv_folds >= 2 and 1 <= self.cv_fold <= self.cv_folds),
                f"cross-validation needs cv_folds >= 2 and cv_fold in 1..cv_folds (or both 0), got fold"
                f" {self.cv_fold} of {self.cv_folds}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        check_template(self.prompt_template)
        if self.split_id is not None and dataset.split_info(store, self.split_id).dataset != self.dataset:
            raise BadInput(f"split {self.split_id} is not a split of dataset {self.dataset!r}")
        pairs = dataset.select_pairs(store, self.dataset, self.part, "accepted", split_id=self.split_id)
        if not pairs:
            raise BadInput(f"dataset {self.dataset!r} has no accepted pairs in its {self.part} part")
        if len(pairs[: self.limit]) < self.cv_folds:
            raise BadInput(
                f"{self.cv_folds} folds need at least {self.cv_folds} {self.part} pairs, got {len(pairs[: self.limit])}"
            )
        if self.eval_baseline_run is not None and not runs.run_exists(store, self.eval_baseline_run):
            raise BadInput(f"no run with id {self.eval_baseline_run} to copy the decoding parameters from")
        path = _local_folder(models.resolve_generator(self.model, "transformers"))
        module_names = _module_names(path)
        missing = sorted(set(self.target_modules) - module_names)
        if missing:
            raise BadInput(f"the model has no module(s) named {', '.join(missing)}")
        if self.evaluate_with == "llamacpp" and not models.is_embedded_checkpoint(path):
            raise BadInput(
                "evaluating on llamacpp needs the base model as GGUF, which the workbench has only for the embedded "
                "model: evaluate with transformers (or none) for another base model"
            )
        return path


def _local_folder(model: str) -> str:
    """A checkpoint folder for a folder or a hub id already in the local cache (export converts files)."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except Exception:  # not a valid id, not cached, or the hub library's own errors: all one answer
        raise BadInput(f"no model at {model!r}: neither a checkpoint folder nor a cached hub id") from None


def _module_names(path: str) -> set[str]:
    """Leaf module names of a model, from its config alone (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        raise BadInput(f"no model at {path!r}: neither a checkpoint folder nor a cached hub id") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError:
        raise BadInput(f"{path} is not a causal language model ({type(config).__name__})") from None
    return {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules() if name}
