"""Reward-model training: a scalar head scores each answer; Bradley-Terry loss on chosen vs rejected."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.methods.pairs import PairObjective, Stats, halves
from tuneforge.models.layers import transformers_model


def sequence_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score head's output at each row's last real token (rows are right-padded).

    Picked by position from the attention mask, not by comparing ids with the pad id (as the model's
    own pooling does), which would misplace the score when the pad token is also the end-of-turn token.
    The model runs its own forward, through any DDP wrapper or FSDP root whose hooks must see it; the
    head's per-position scores are taken from it on the way.
    """
    seqcls = transformers_model(model)
    scores = []
    hook = seqcls.score.register_forward_hook(lambda _module, _inputs, out: scores.append(out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        hook.remove()
    per_position = scores[-1].squeeze(-1)
    last = batch["attention_mask"].sum(-1) - 1
    return per_position[torch.arange(per_position.size(0), device=per_position.device), last].float()


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, center_coefficient: float | None) -> torch.Tensor:
    losses = -F.logsigmoid(chosen - rejected)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


class Reward(PairObjective):
    name = "reward"

    def describe(self) -> dict:
        return {"method": self.name, **self.spec.model_dump(), "loss": "bradley-terry",
                "normalised_by": "pairs of the accumulated batch"}

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, Stats]:
        chosen, rejected = halves(sequence_scores(model, batch))
        losses = bradley_terry_losses(chosen, rejected, self.spec.center_coefficient)
        n = float(chosen.numel())
        c, r = chosen.detach(), rejected.detach()
        stats = {"rewards/chosen": (c.sum().item(), n), "rewards/rejected": (r.sum().item(), n),
                 "rewards/accuracies": ((c > r).float().sum().item(), n), "rewards/ties": ((c == r).float().sum().item(), n),
                 "rewards/margins": ((c - r).sum().item(), n)}
        return losses.sum() / totals["pairs"], stats
