"""DPO (direct preference optimisation) on a run's pinned preference triples.

For a prompt x and answers y_w (chosen) and y_l (rejected), the loss is

    -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with pi the model being trained and ref the reference policy (Rafailov et al., 2023). log pi(y|x) sums
over the answer tokens only, as the SFT loss does. The reference is the policy before the first step:
the base model with the adapter disabled, or the continued SFT adapter as loaded. Its log-probabilities
are computed once, before training, into the examples (and kept in the run's checkpoint), so no second
copy of the weights is ever in memory and a resumed run compares against the same reference.
"""

from __future__ import annotations

import contextlib

import torch

from core.preferences import Preference
from core.training.data import collate, token_example
from core.training.devices import device, to_device
from core.training.loss import sequence_logps

FIGURES = ("reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward")  # per step, beside the loss


def build_preference_examples(tokenizer, triples: list[Preference], template: str, max_seq_len: int) -> list[dict]:
    """Token ids and labels of each triple's two answers after the same prompt; a triple where either answer
    keeps no token under max_seq_len is dropped."""
    examples = []
    for triple in triples:
        chosen = token_example(tokenizer, triple.question, triple.chosen, template, max_seq_len)
        rejected = token_example(tokenizer, triple.question, triple.rejected, template, max_seq_len)
        if chosen is not None and rejected is not None:
            examples.append({"chosen": chosen, "rejected": rejected})
    return examples


def _collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen sequences then the rejected ones, as one batch: one forward pass scores both."""
    return to_device(collate([ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples], pad_id))


def _logps(model, examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    logps = sequence_logps(model, _collate_pairs(examples, pad_id))
    return logps[: len(examples)], logps[len(examples) :]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean DPO loss over a batch and its figures: the implicit rewards beta * (log pi - log ref) of the
    chosen and rejected answers, their margin, and the share of triples whose chosen answer has the higher reward
    (preference accuracy)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margins = chosen_rewards - rejected_rewards
    loss = -torch.nn.functional.logsigmoid(margins).mean()
    figures = {
        "reward_margin": margins.mean().item(),
        "preference_accuracy": (margins > 0).float().mean().item(),
        "chosen_reward": chosen_rewards.mean().item(),
        "rejected_reward": rejected_rewards.mean().item(),
    }
    return loss, figures


def _references(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    reference = torch.tensor([ex["reference"] for ex in examples], dtype=torch.float32, device=device())
    return reference[:, 0], reference[:, 1]


def batch_dpo_loss(model, examples: list[dict], pad_id: int, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of a batch of examples whose reference log-probabilities are in place (see add_references)."""
    policy_chosen, policy_rejected = _logps(model, examples, pad_id)
    return dpo_loss(policy_chosen, policy_rejected, *_references(examples), beta)


@torch.no_grad()
def add_references(model, examples: list[dict], batch_size: int, pad_id: int, adapter_disabled: bool) -> None:
    """Put each example's reference log-probabilities (chosen, rejected) into it, under "reference".

    The reference is the model as it is now, in eval mode (no dropout); with `adapter_disabled`, the base
    model alone (peft's disable_adapter: the same weights, the LoRA layers bypassed).
    """
    was_training = model.training
    model.eval()
    with model.disable_adapter() if adapter_disabled else contextlib.nullcontext():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            chosen, rejected = _logps(model, batch, pad_id)
            for example, c, r in zip(batch, chosen.tolist(), rejected.tolist(), strict=True):
                example["reference"] = [c, r]
    model.train(was_training)


@torch.no_grad()
def preference_eval(model, examples: list[dict], batch_size: int, pad_id: int, beta: float) -> dict[str, float]:
    """The DPO loss, reward margin and preference accuracy over held-out triples (empty when there are none)."""
    if not examples:
        return {}
    model.eval()
    sums = {"eval_loss": 0.0, "eval_reward_margin": 0.0, "eval_preference_accuracy": 0.0}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        loss, figures = batch_dpo_loss(model, batch, pad_id, beta)
        sums["eval_loss"] += loss.item() * len(batch)
        sums["eval_reward_margin"] += figures["reward_margin"] * len(batch)
        sums["eval_preference_accuracy"] += figures["preference_accuracy"] * len(batch)
    model.train()
    return {name: value / len(examples) for name, value in sums.items()}
