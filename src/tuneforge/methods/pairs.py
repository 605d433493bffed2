"""What DPO, ORPO, SimPO and reward training share: a batch of [chosen rows; rejected rows].

Losses are summed over pairs and divided by the pairs of the whole accumulated batch, so a
step does not depend on how it was split into micro-batches. Statistics carry the names TRL
logs (rewards/chosen, rewards/accuracies, ...) and are returned as (sum, count) so the loop
can average them over micro-batches exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tuneforge.data.batching import collate
from tuneforge.fast import FastPath
from tuneforge.methods.logps import token_logps
from tuneforge.methods.run import LossOnValidation

Stats = dict[str, tuple[float, float]]


def collate_pairs(data, indices: list[int], pad_id: int, rejected_rows_from: int) -> dict[str, torch.Tensor]:
    """Chosen sides then rejected sides, one padded batch; `table_rows` index precomputed reference log-probs."""
    chosen = [data.train[i] for i in indices]
    rejected = [data.train_rejected[i] for i in indices]
    batch = collate(chosen + rejected, pad_id)
    batch["table_rows"] = torch.tensor(indices + [rejected_rows_from + i for i in indices])
    return batch


def pair_units(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    pairs = batch["input_ids"].size(0) // 2
    chosen_tokens = int((batch["labels"][:pairs, 1:] != -100).sum())
    return {"pairs": pairs, "tokens": chosen_tokens}


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.chunk(2, dim=0)


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> Stats:
    n = float(chosen_rewards.numel())
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": (c.sum().item(), n),
        "rewards/rejected": (r.sum().item(), n),
        "rewards/accuracies": ((c > r).float().sum().item(), n),
        "rewards/ties": ((c == r).float().sum().item(), n),
        "rewards/margins": ((c - r).sum().item(), n),
        "logps/chosen": (chosen_logps.detach().float().sum().item(), n),
        "logps/accuracies": ((chosen_logps > rejected_logps).float().sum().item(), n),
        "logps/rejected": (rejected_logps.detach().float().sum().item(), n),
    }


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the trained tokens (fp32 per token)."""
    per_token, _ = token_logps(logits, labels)
    return -per_token.sum()


def all_token_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every real token as a label, prompt included (ORPO's NLL as TRL computes it)."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def logsigmoid_smoothed(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(z), with a share of the labels assumed flipped (conservative DPO / cDPO)."""
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


class PairObjective(LossOnValidation):
    """What DPO, ORPO, SimPO and reward training share: the pair batch and the units it is averaged over."""

    name = ""
    fast = FastPath()  # the fast path the log-probs take (set by build_objective)

    def __init__(self, spec, data, pad_id: int, reference=None):
        self.spec, self.data, self.pad_id, self.reference = spec, data, pad_id, reference

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        return collate_pairs(self.data, indices, self.pad_id, len(self.data.train))

    def units(self, batch) -> dict[str, int]:
        return pair_units(batch)

    def prepare(self, model, batch):
        return batch

    def describe(self) -> dict:
        return {"method": self.name, **self.spec.model_dump(), "logps": "per-token mean",
                "normalised_by": "pairs (odds/margin term), chosen tokens (NLL)"}
