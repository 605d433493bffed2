"""Supervised fine-tuning objective: token cross-entropy on the trained positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.batching import collate
from tuneforge.data.template import IGNORE_INDEX


def count_trained(batch: dict[str, torch.Tensor]) -> int:
    """Positions that carry a loss once labels are shifted by one."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sft_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed (not averaged) cross-entropy: fp32 per token, summed in fp64.

    The caller divides by the trained-token count of the whole accumulated batch, so a step's
    loss and gradients do not depend on how the batch was split into micro-batches; the fp64
    sum keeps the logged loss independent of that split too.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).double().sum()


class SFT:
    name = "sft"

    def __init__(self, data, pad_id: int):
        self.data, self.pad_id = data, pad_id

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.data.train[i] for i in indices], self.pad_id)

    def units(self, batch) -> dict[str, int]:
        return {"tokens": count_trained(batch)}

    def prepare(self, model, batch):
        return batch

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, dict]:
        return sft_loss_sum(model, batch) / totals["tokens"], {}
