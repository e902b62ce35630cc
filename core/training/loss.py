"""The loss on a batch's answer tokens, computed without the (tokens x vocabulary) logits of the whole batch.

Logits are computed only where there is a label: with Gemma 3's 262k-token vocabulary,
full-sequence logits would dominate memory.
"""

from __future__ import annotations

import torch

from core.training.data import IGNORE, collate
from core.training.devices import to_device

LOSS_CHUNK_ROWS = 64  # answer tokens whose vocabulary-wide logits exist at once (64 x 262k fp32 = 67 MB)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens, the same as `model(labels=...).loss`."""
    nll, _rows = answer_token_nll(model, batch)
    return nll.mean()


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sequence's log-probability of its labelled (answer) tokens, summed: what DPO compares."""
    nll, rows = answer_token_nll(model, batch)
    return -torch.zeros(batch["labels"].shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)


def answer_token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative log-likelihood of each labelled token, and the batch row it belongs to.

    The transformer body gives hidden states; only the rows that predict a labelled token go
    through lm_head, and those in chunks of LOSS_CHUNK_ROWS, so the (tokens x vocabulary)
    logits never exist for more than one chunk at a time (see _ChunkedHeadNLL).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1]  # position t predicts token t + 1
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    rows = keep.nonzero()[:, 0]
    head = base.get_output_embeddings()
    cap = float(getattr(base.config, "final_logit_softcapping", None) or 0.0)
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _ChunkedHeadNLL.apply(hidden[keep], head.weight, targets[keep], cap), rows
    logits = head(hidden[keep].to(head.weight.dtype)).float()  # a trained or unusual head: plain autograd
    return torch.nn.functional.cross_entropy(_softcap(logits, cap), targets[keep], reduction="none"), rows


def _softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2/3 squash logits before the softmax (cap * tanh(x / cap)); the model's own loss does too."""
    return torch.tanh(logits / cap) * cap if cap else logits


class _ChunkedHeadNLL(torch.autograd.Function):
    """Per-row cross-entropy of (hidden @ W.T) over chunks of rows, with each row's gradient of hidden computed on
    the way.

    Autograd would keep every chunk's logits alive until the backward pass; here each chunk's
    softmax gradient is folded into d(nll_i)/d(hidden_i) at once and the logits are dropped, so
    peak memory is one chunk's logits whatever the number of answer tokens. A row's NLL depends on
    its own hidden state only, so the backward pass scales each row's gradient by the incoming
    one (a mean, DPO's per-sequence sums). W (the tied embedding) is frozen in LoRA training, so
    no gradient for it is needed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap):
        rows = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        nll = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, LOSS_CHUNK_ROWS):
            h, t = hidden[start : start + LOSS_CHUNK_ROWS], targets[start : start + LOSS_CHUNK_ROWS]
            logits = (h.to(weight.dtype) @ weight.T).float()
            squashed = logits.div_(cap).tanh_() if cap else None  # Gemma's softcap, in place
            if cap:
                logits = squashed * cap
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            nll[start : start + LOSS_CHUNK_ROWS] = lse - picked
            if need_grad:
                grad = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1
                if cap:  # d/dx of cap * tanh(x / cap) is 1 - tanh(x / cap)^2
                    grad.mul_(squashed.square_().neg_().add_(1))
                grad_hidden[start : start + LOSS_CHUNK_ROWS] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_nll[:, None].to(grad_hidden.dtype), None, None, None


@torch.no_grad()
def eval_loss(model, examples: list[dict], batch_size: int, pad_id: int) -> float | None:
    """Token-weighted mean answer loss over examples (None when there are none)."""
    if not examples:
        return None
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id))
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += answer_loss(model, batch).item() * n
        tokens += n
    model.train()
    return total / tokens
