"""Reward-model training: a scalar head scores each answer; Bradley-Terry loss on chosen vs rejected."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.methods.pairs import PairObjective, Stats, halves


def sequence_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score head's output at each row's last real token (rows are right-padded).

    Picked by position from the attention mask, not by comparing ids with the pad id, which
    would misplace the score when the pad token is also the end-of-turn token.
    """
    seqcls = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(seqcls, seqcls.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1
    picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    return seqcls.score(picked).squeeze(-1).float()


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, center_coefficient: float | None) -> torch.Tensor:
    losses = -F.logsigmoid(chosen - rejected)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


class Reward(PairObjective):
    name = "reward"

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, Stats]:
        chosen, rejected = halves(sequence_scores(model, batch))
        losses = bradley_terry_losses(chosen, rejected, self.spec.center_coefficient)
        n = float(chosen.numel())
        c, r = chosen.detach(), rejected.detach()
        stats = {"rewards/chosen": (c.sum().item(), n), "rewards/rejected": (r.sum().item(), n),
                 "rewards/accuracies": ((c > r).float().sum().item(), n), "rewards/ties": ((c == r).float().sum().item(), n),
                 "rewards/margins": ((c - r).sum().item(), n)}
        return losses.sum() / totals["pairs"], stats
