"""Log-probabilities of the trained tokens, in fp32 whatever the model's dtype.

Every preference loss is a function of these sums; computing them in fp32 is what keeps DPO
finite under fp16/bf16 autocast (half-precision log-softmax over a large vocabulary is where
NaN rewards come from).
"""

from __future__ import annotations

import torch

from tuneforge.data.template import IGNORE_INDEX
from tuneforge.fast import FastPath, default_chunk
from tuneforge.fast.causal_lm import last_hidden_state, output_layer
from tuneforge.fast.chunked_logps import label_logps
from tuneforge.fast.padding_free import model_inputs


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) after the one-token shift, zero where untrained, and the trained mask."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * mask, mask


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**model_inputs(batch)).logits


def policy_logps(model, batch: dict[str, torch.Tensor], fast: FastPath | None = None,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps of the model on the batch (logits divided by `temperature`). With the fast path's
    chunked loss, the output layer runs on trained positions only, a chunk at a time, so the full
    logits never exist (fast/chunked_logps.py), where the model allows it; the numbers are the same."""
    out = output_layer(model) if fast is not None and fast.chunked_loss else None
    if out is None:
        return token_logps(forward_logits(model, batch) / temperature, batch["labels"])
    hidden = last_hidden_state(model, model_inputs(batch))[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)
    chunk = fast.loss_chunk_tokens or default_chunk(out.head.weight.size(0))
    picked = label_logps(hidden[rows], out.head.weight, labels[rows], chunk, out.softcap, temperature, fast.kernels)
    per_token = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).index_put(rows, picked)
    return per_token, mask


def sequence_logps(model, batch: dict[str, torch.Tensor],
                   fast: FastPath | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's trained tokens and how many there are."""
    per_token, mask = policy_logps(model, batch, fast)
    return per_token.sum(-1), mask.sum(-1)
