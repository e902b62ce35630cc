"""What a run trains on: its pairs pinned at its start, as token ids and labels, in length-grouped batches.

A pair becomes text through core.prompting (the same prompt the evaluation asks); the loss covers the
answer tokens only. Never reads a test pair: only the evaluation after training answers those.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core import dataset
from core.errors import BadInput
from core.files import write_json
from core.preferences import Preference, preference_data
from core.prompting import render_prompt
from core.store import Store
from core.train_config import TrainConfig
from core.train_dir import TrainDir
from core.training.checkpoints import checkpoint_folder

IGNORE = -100  # label of a token that carries no loss (prompt and padding)
MEGA_CHUNK_BATCHES = 50  # length grouping sorts within chunks of this many batches


def build_examples(tokenizer, pairs: list[dataset.StoredPair], template: str, max_seq_len: int) -> list[dict]:
    """Token ids and labels per pair: prompt tokens carry no loss, answer tokens + EOS do.

    The prompt and the answer are tokenized apart, so the boundary where the labels start is
    exact. Pairs whose prompt alone fills max_seq_len have nothing to learn and are dropped.
    """
    examples = (token_example(tokenizer, pair.question, pair.answer, template, max_seq_len) for pair in pairs)
    return [example for example in examples if example is not None]


def token_example(tokenizer, question: str, answer: str, template: str, max_seq_len: int) -> dict | None:
    """One prompt + answer as token ids and labels (see build_examples); None when no answer token is left."""
    prompt = tokenizer(render_prompt(question, template))["input_ids"]
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    input_ids = (prompt + answer_ids + [tokenizer.eos_token_id])[:max_seq_len]
    labels = ([IGNORE] * len(prompt) + answer_ids + [tokenizer.eos_token_id])[:max_seq_len]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


@dataclass(frozen=True)
class PinnedPairs:
    """What a run trains on and takes its eval loss on, and the split they come from (see pinned_pairs).

    The pairs are StoredPairs (question and answer), or Preferences (question, chosen, rejected) for dpo.
    """

    train: list[Any]
    validation: list[Any]  # for a fold of a cross-validation: its held-out fold
    split_id: int | None


def pinned_pairs(store: Store, config: TrainConfig, out: str | Path) -> PinnedPairs:
    """The train and validation pairs (ids and texts) of the run in `out`: chosen from its split at its start and
    kept in its folder, so that a resumed run trains on exactly them.

    Read from the dataset again, a new split, newly accepted pairs or an edit would change what a resumed
    run skips, repeats and trains on. A checkpoint without pinned pairs (written before they were pinned)
    is refused: which pairs it was trained on is not known. The test part is never pinned nor read here:
    only the evaluation after training answers it.
    """
    folder = TrainDir(out)
    selection: dict[str, Any] = {"dataset": config.dataset, "part": config.part, "limit": config.limit}
    if config.split_id is not None:  # added only when set, so that folders pinned before it still match
        selection["split_id"] = config.split_id
    if config.cv_folds:
        selection |= {"cv_folds": config.cv_folds, "cv_fold": config.cv_fold, "seed": config.seed}
    if config.method == "dpo":  # added only for dpo, so that folders pinned before it still match
        selection["triples"] = "preferences"
    kind = Preference if config.method == "dpo" else dataset.StoredPair
    if folder.examples.exists():
        pinned = json.loads(folder.examples.read_text())
        if pinned["selection"] != selection:
            raise BadInput(f"{out} holds a run on other pairs ({pinned['selection']}); choose another output folder")
        # A run pinned before splits had validation parts took its eval loss on test pairs: those are not read
        # any more, so it resumes without an eval loss.
        return PinnedPairs(
            [kind(**pair) for pair in pinned["train"]],
            [kind(**pair) for pair in pinned.get("validation", [])],
            pinned["split_id"],
        )
    if checkpoint_folder(folder) is not None:
        raise BadInput(
            f"{out} holds a checkpoint that does not record the pairs it was trained on; train into another folder"
        )
    split = _split(store, config)
    split_id = split.id if split else None
    train_pairs, held_out = (_preferences if config.method == "dpo" else _pairs)(store, config, split)
    record = {
        "selection": selection,
        "split_id": split_id,
        "split_version": split.version if split else None,
        "train": [asdict(pair) for pair in train_pairs],
        "validation": [asdict(pair) for pair in held_out],
    }
    write_json(folder.examples, record, durable=True)
    return PinnedPairs(train_pairs, held_out, split_id)


def _pairs(store: Store, config: TrainConfig, split) -> tuple[list[Any], list[Any]]:
    """The accepted pairs of the run's part and the ones its eval loss is on (validation part, or held-out fold)."""
    split_id = split.id if split else None
    train_pairs = dataset.select_pairs(store, config.dataset, config.part, "accepted", split_id=split_id)
    train_pairs = train_pairs[: config.limit]
    if config.cv_folds:
        held_out = cv_folds(train_pairs, config.cv_folds, config.seed)[config.cv_fold - 1]
        held_ids = {pair.id for pair in held_out}
        return [pair for pair in train_pairs if pair.id not in held_ids], held_out
    if split is None:
        return train_pairs, []
    held_out = dataset.select_pairs(store, config.dataset, "validation", "accepted", split_id=split_id)
    return train_pairs, held_out[: config.limit]


def _preferences(store: Store, config: TrainConfig, split) -> tuple[list[Any], list[Any]]:
    """The preference triples of the split's train part, and of its validation part (DPO's eval loss)."""
    triples = preference_data(store, config.dataset, split.id if split else None)
    return triples.train[: config.limit], triples.validation[: config.limit]


def _split(store: Store, config: TrainConfig):
    """The split a new run is pinned to: the one it names, else its dataset's latest (None: there is none)."""
    if config.split_id is not None:
        return dataset.split_info(store, config.split_id)
    return dataset.latest_split(store, config.dataset)


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


def example_length(example: dict) -> int:
    """Tokens a batch pads an example to: its sequence's, or the longer of a preference example's two."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen"]["input_ids"]), len(example["rejected"]["input_ids"]))


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
        group = sorted(order[start : start + chunk], key=lambda i: example_length(examples[i]))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches
