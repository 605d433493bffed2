"""ORPO (Hong et al. 2024): the chosen answer's NLL plus an odds-ratio term, no reference model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.methods.logps import forward_logits, token_logps
from tuneforge.methods.pairs import (
    PairObjective, Stats, all_token_labels, halves, log1mexp, nll_sum, pair_units, reward_stats,
)


def odds_ratio_terms(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sigmoid(log odds ratio), log odds ratio) per pair, from per-token average log-probs."""
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    return F.logsigmoid(log_odds), log_odds


class ORPO(PairObjective):
    name = "orpo"

    def units(self, batch) -> dict[str, int]:
        units = pair_units(batch)
        if self.spec.nll_on_prompt:
            chosen = all_token_labels(batch)[: units["pairs"]]
            units["tokens"] = int((chosen[:, 1:] != -100).sum())
        return units

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, Stats]:
        logits = forward_logits(model, batch)
        per_token, mask = token_logps(logits, batch["labels"])
        avg = per_token.sum(-1) / mask.sum(-1)
        c_avg, r_avg = halves(avg)
        ratio, log_odds = odds_ratio_terms(c_avg, r_avg)
        pairs = c_avg.numel()
        labels = all_token_labels(batch) if self.spec.nll_on_prompt else batch["labels"]
        nll = nll_sum(logits[:pairs], labels[:pairs])
        loss = nll / totals["tokens"] - self.spec.beta * ratio.sum() / totals["pairs"]
        stats = reward_stats(self.spec.beta * c_avg, self.spec.beta * r_avg, c_avg, r_avg)
        stats["log_odds_ratio"] = (ratio.detach().sum().item(), pairs)
        stats["log_odds_chosen"] = (log_odds.detach().sum().item(), pairs)
        stats["nll_loss"] = (nll.detach().item(), float((labels[:pairs, 1:] != -100).sum()))
        return loss, stats
