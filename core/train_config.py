"""What a fine-tuning run is asked to do: TrainConfig, its checks, and the names it accepts.

Kept apart from core.training so that the CLI and the pages can build their forms from
these fields without loading torch. Never trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import dataset, models, preferences, runs, settings
from core.config import Config, option, specs
from core.dataset import PART_CHOICES
from core.errors import BadInput
from core.prompting import DEFAULT_TEMPLATE, check_template
from core.store import Store
from core.train_dir import TrainDir

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("qlora", "lora", "dpo")
DPO_BASES = ("4bit", "full")
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")  # what a continued adapter brings
SCHEDULERS = ("linear", "cosine", "constant")
EVAL_ENGINES = ("llamacpp", "transformers", "none")


@dataclass(frozen=True)
class TrainConfig(Config):
    """What a training run is asked to do; construction refuses what needs no store to refuse, `validate` the rest."""

    what = "training setting"

    dataset: str = option(help="dataset whose accepted pairs are trained on")
    part: str = option(
        "train",
        help="which part of the split to train on (the eval loss is taken on its validation part, the evaluation"
        " after training answers its test part)",
        choices=PART_CHOICES,
    )
    method: str = option(
        "qlora",
        help="qlora: 4-bit NF4 base weights + LoRA; lora: full-precision base + LoRA; dpo: preference tuning of LoRA"
        " on the triples the blind ratings (and consistent judges) give for train questions",
        choices=METHODS,
    )
    dpo_base: str = option(
        "4bit",
        help="with dpo: the base weights in 4-bit NF4 (as qlora) or in full precision (as lora)",
        choices=DPO_BASES,
    )
    beta: float = option(
        0.1, help="with dpo: DPO's beta, how strongly the policy is held to the reference (higher: closer)", min=0
    )
    from_adapter: str = option(
        "",
        help="continue the adapter of this finished training run (its folder) instead of fresh LoRA, e.g. DPO after"
        " SFT; its rank, alpha, dropout and target modules apply",
    )
    model: str = option(
        "",
        help="model folder or hub id; empty: the Settings' generator model, else the embedded Gemma 3 270M checkpoint",
    )
    # No min: _check's message names it as people write it ("LoRA r"), which the generic one would not.
    lora_r: int = option(8, help="LoRA rank r: the size of the low-rank update")
    lora_alpha: float = option(16, help="LoRA alpha: the update is scaled by alpha / r", min=0)
    lora_dropout: float = option(0.05, help="dropout on the LoRA input, in [0, 1)", min=0, max=1)
    target_modules: tuple[str, ...] = option(
        ("q_proj", "v_proj"),
        help=f"module names that get LoRA adapters; all linear layers: {','.join(ALL_LINEAR)}",
    )
    learning_rate: float = option(2e-4, help="peak learning rate of AdamW", min=0)
    scheduler: str = option(
        "linear", help="learning-rate schedule after warmup: linear, cosine or constant", choices=SCHEDULERS
    )
    warmup_ratio: float = option(
        0.05, help="share of the optimizer steps spent warming the learning rate up", min=0, max=1
    )
    epochs: int = option(1, help="passes over the training pairs", min=1)
    batch_size: int = option(4, help="pairs per forward pass", min=1)
    grad_accum: int = option(
        1, help="forward passes per optimizer step (effective batch = batch_size * grad_accum)", min=1
    )
    max_seq_len: int = option(256, help="tokens per pair (prompt + answer); longer pairs are cut", min=8)
    gradient_checkpointing: bool = option(
        True, help="recompute activations in the backward pass: much less memory (the QLoRA recipe), ~30% slower"
    )
    limit: int | None = option(
        None, help="use only the first N train and N validation pairs (and N test questions)", min=1
    )
    seed: int = option(42, help="seed for the LoRA initialisation, dropout, batch order and cross-validation folds")
    prompt_template: str = option(DEFAULT_TEMPLATE, help="prompt text; must contain {question}")
    output_dir: str = option(
        "", help="where checkpoint, adapter and metrics go; empty: the workspace's artifacts/train-JOB"
    )
    evaluate_with: str = option(
        "llamacpp",
        help="after training, answer the split's test part with base + adapter on: llamacpp, transformers or none",
        choices=EVAL_ENGINES,
    )
    eval_baseline_run: int | None = option(None, help="evaluation copies this run's decoding parameters; empty: greedy")
    export_merged: bool = option(
        True, help="also merge the adapter into the base and write a Q8_0 GGUF with a Modelfile"
    )
    # Set by a hyperparameter search for its trials and its final training, not by hand: the CLI's `train` has no
    # flags for them (`--trials` and `--folds` start a search, `--from-search` trains with its choice).
    split_id: int | None = option(
        None, help="the split (by id) whose parts are used; empty: the latest one at the run's start", cli=False
    )
    cv_folds: int = option(
        0, help="k-fold cross-validation: the train part is dealt into this many folds (0: none)", min=0, cli=False
    )
    cv_fold: int = option(
        0,
        help="with cv_folds: the fold (1..cv_folds) held out for the eval loss; the rest is trained on",
        min=0,
        cli=False,
    )
    selection: dict[str, Any] = option(
        {}, help="how these settings were chosen (by a search), recorded with the evaluation run", cli=False
    )

    def _check(self) -> None:
        # Open bounds, which a range cannot say, and relations between fields.
        checks = [
            (self.learning_rate > 0, f"learning rate must be > 0, got {self.learning_rate}"),
            (self.beta > 0, f"DPO beta must be > 0, got {self.beta}"),
            (self.method != "dpo" or self.part == "train", "DPO trains on the train part's preference triples only"),
            (self.method != "dpo" or not self.cv_folds, "DPO has no cross-validation: its eval loss is on validation"),
            (self.lora_r >= 1, f"LoRA r must be at least 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"LoRA alpha must be > 0, got {self.lora_alpha}"),
            (self.lora_dropout < 1, f"LoRA dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.warmup_ratio < 1, f"warmup ratio must be in [0, 1), got {self.warmup_ratio}"),
            (bool(self.target_modules), "give at least one target module"),
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

    @property
    def quantized(self) -> bool:
        """The base weights are loaded in 4-bit NF4 (qlora, and dpo on a 4-bit base)."""
        return self.method == "qlora" or (self.method == "dpo" and self.dpo_base == "4bit")

    def validate(self, store: Store) -> str:
        """Refuse settings that cannot train (BadInput, one line); returns the resolved model path or id."""
        if self.split_id is not None and dataset.split_info(store, self.split_id).dataset != self.dataset:
            raise BadInput(f"split {self.split_id} is not a split of dataset {self.dataset!r}")
        if self.method == "dpo":
            data = preferences.preference_data(store, self.dataset, self.split_id)
            if not data.train:
                raise BadInput(
                    f"dataset {self.dataset!r} has no preference triples for DPO ({data.describe()}): rate two runs'"
                    " answers to its train questions on Compare"
                )
            pairs: list = data.train
        else:
            pairs = dataset.select_pairs(store, self.dataset, self.part, "accepted", split_id=self.split_id)
        if not pairs:
            raise BadInput(f"dataset {self.dataset!r} has no accepted pairs in its {self.part} part")
        if len(pairs[: self.limit]) < self.cv_folds:
            raise BadInput(
                f"{self.cv_folds} folds need at least {self.cv_folds} {self.part} pairs, got {len(pairs[: self.limit])}"
            )
        if self.eval_baseline_run is not None and not runs.run_exists(store, self.eval_baseline_run):
            raise BadInput(f"no run with id {self.eval_baseline_run} to copy the decoding parameters from")
        path = _local_folder(settings.resolve_generator(store, "transformers", self.model))
        if self.from_adapter:
            _check_adapter(self, path)
        module_names = _module_names(path)
        missing = sorted(set(self.target_modules) - module_names)
        if missing:
            raise BadInput(f"the model has no module(s) named {', '.join(missing)}")
        if self.evaluate_with == "llamacpp" and not models.is_embedded_checkpoint(path):
            raise BadInput(
                f"evaluating on llamacpp needs the base model as GGUF, which the workbench has only for the embedded "
                f"model, not {path}{'' if self.model else ' (the Settings generator model)'}: evaluate with"
                " transformers (or none) for another base model"
            )
        return path


def continued_adapter(folder: str) -> dict[str, Any]:
    """The settings of the finished training run in `folder` (or its adapter folder) whose adapter is continued."""
    out = TrainDir.holding(folder)
    if not out.root.is_dir():
        raise BadInput(f"no training run at {folder!r} to continue the adapter of")
    return out.settings(BadInput)


def with_adapter_settings(config: TrainConfig) -> TrainConfig:
    """A config that continues an adapter, with that adapter's LoRA settings (which are what trains) in place of
    the form's; unchanged without from_adapter."""
    if not config.from_adapter:
        return config
    earlier = continued_adapter(config.from_adapter)
    return TrainConfig.from_dict({**config.to_dict(), **{name: earlier[name] for name in LORA_FIELDS}})


def _check_adapter(config: TrainConfig, path: str) -> None:
    """The adapter continued must have been trained on this base model, with the LoRA settings the config says."""
    earlier = continued_adapter(config.from_adapter)
    if Path(earlier.get("resolved_model", "")).resolve() != Path(path).resolve():
        raise BadInput(
            f"the adapter in {config.from_adapter} was trained on {earlier.get('resolved_model')}, not on {path}:"
            " continue it on the same base model"
        )
    adapted = with_adapter_settings(config)
    differ = [name for name in LORA_FIELDS if getattr(adapted, name) != getattr(config, name)]
    if differ:
        raise BadInput(f"the adapter in {config.from_adapter} has other {', '.join(differ)} than these settings")


SEARCH_FIELDS = tuple(s.name for s in specs(TrainConfig) if not s.cli)  # set by a search, never by hand


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
