"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO, hinge and robust variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.methods.logps import policy_logps
from tuneforge.methods.pairs import PairObjective, Stats, halves, reward_stats


def dpo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, loss: str,
               label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss from log(pi/pi_ref) of each side (summed over the answer's tokens)."""
    delta = chosen_logratios - rejected_logratios
    if loss == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    if loss == "ipo":
        # Squared loss on per-token log-ratios, so its scale does not grow with answer length.
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    if loss == "robust":
        # Unbiased under a known share of flipped labels (Chowdhury et al. 2024).
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"dpo.loss: unknown variant {loss!r}")


class DPO(PairObjective):
    name = "dpo"

    def describe(self) -> dict:
        logps = "per-token mean" if self.spec.loss == "ipo" else "sum over the answer's tokens"
        return {"method": self.name, **self.spec.model_dump(), "logps": logps,
                "normalised_by": "pairs of the accumulated batch"}

    def prepare(self, model, batch):
        batch["ref_logps"] = self.reference.logps(model, batch)
        return batch

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, Stats]:
        per_token, mask = policy_logps(model, batch, self.fast)
        logps, tokens = per_token.sum(-1), mask.sum(-1)
        ratios = logps - batch["ref_logps"]
        (c_ratio, r_ratio), (c_tok, r_tok) = halves(ratios), halves(tokens)
        s = self.spec
        losses = dpo_losses(c_ratio, r_ratio, s.beta, s.loss, s.label_smoothing, c_tok, r_tok)
        stats = reward_stats(s.beta * c_ratio, s.beta * r_ratio, *halves(logps))
        return losses.sum() / totals["pairs"], stats
