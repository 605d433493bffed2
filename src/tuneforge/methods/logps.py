"""Log-probabilities of the trained tokens, in fp32 whatever the model's dtype.

Every preference loss is a function of these sums; computing them in fp32 is what keeps DPO
finite under fp16/bf16 autocast (half-precision log-softmax over a large vocabulary is where
NaN rewards come from).
"""

from __future__ import annotations

import torch

from tuneforge.data.template import IGNORE_INDEX


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) after the one-token shift, zero where untrained, and the trained mask."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * mask, mask


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's trained tokens and how many there are."""
    per_token, mask = token_logps(forward_logits(model, batch), batch["labels"])
    return per_token.sum(-1), mask.sum(-1)
