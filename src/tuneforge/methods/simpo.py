"""SimPO (Meng et al. 2024): length-normalised log-probs as the reward, a target margin, no reference."""

from __future__ import annotations

import torch

from tuneforge.methods.logps import policy_logps
from tuneforge.methods.pairs import PairObjective, Stats, halves, logsigmoid_smoothed, reward_stats


def simpo_losses(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss: -log sigmoid(beta x (avg logp chosen - avg logp rejected) - gamma)."""
    return logsigmoid_smoothed(beta * (chosen_avg_logps - rejected_avg_logps - gamma / beta), label_smoothing)


class SimPO(PairObjective):
    name = "simpo"

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, Stats]:
        s = self.spec
        per_token, mask = policy_logps(model, batch, self.fast)
        c_avg, r_avg = halves(per_token.sum(-1) / mask.sum(-1))
        loss = simpo_losses(c_avg, r_avg, s.beta, s.gamma, s.label_smoothing).sum() / totals["pairs"]
        stats = reward_stats(s.beta * c_avg, s.beta * r_avg, c_avg, r_avg)
        if s.sft_weight:
            pairs = c_avg.numel()
            nll = -per_token[:pairs].sum()  # the chosen answers' negative log-likelihood
            loss = loss + s.sft_weight * nll / totals["tokens"]
            stats["nll_loss"] = (nll.detach().item(), float((batch["labels"][:pairs, 1:] != -100).sum()))
        return loss, stats
