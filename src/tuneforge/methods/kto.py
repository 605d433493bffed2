"""KTO (Ethayarajh et al. 2024): unpaired answers labelled desirable or not.

The KL reference point is estimated inside each micro-batch from mismatched pairs: example i's
prompt with example i-1's answer. A micro-batch of one has no mismatched pair, which is why the
config asks for micro_batch_size >= 2.
"""

from __future__ import annotations

import logging

import torch

from tuneforge.data.batching import collate
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.data.tokenized import Example
from tuneforge.fast import FastPath
from tuneforge.methods.logps import sequence_logps
from tuneforge.methods.pairs import Stats
from tuneforge.methods.run import LossOnValidation

log = logging.getLogger(__name__)


def split_prompt(ex: Example) -> int:
    """Index of the first trained token: what comes before it is the prompt."""
    return next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)


def mismatched(examples: list[Example]) -> list[Example]:
    """Prompt i with the answer of example i-1 (the first takes the last's): the KL estimate's inputs."""
    out = []
    for i, ex in enumerate(examples):
        other = examples[i - 1]
        cut_self, cut_other = split_prompt(ex), split_prompt(other)
        ids = ex.input_ids[:cut_self] + other.input_ids[cut_other:]
        labels = [IGNORE_INDEX] * cut_self + other.labels[cut_other:]
        out.append(Example(ids, labels, ex.record))
    return out


def kto_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """Per-example losses, desirable ones first: 1 - sigmoid(beta (r - z0)) and 1 - sigmoid(beta (z0 - r))."""
    chosen = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    return torch.cat([desirable_weight * chosen, undesirable_weight * rejected])


def balance_warning(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """KTO's paper: weight x count of desirable over undesirable should lie in [1, 4/3]."""
    if not desirable or not undesirable:
        return (f"kto: the data has {desirable} desirable and {undesirable} undesirable examples; "
                "KTO needs both kinds")
    ratio = desirable * desirable_weight / (undesirable * undesirable_weight)
    if 1.0 <= ratio <= 4 / 3:
        return None
    low, high = undesirable * undesirable_weight / desirable, undesirable * undesirable_weight * 4 / 3 / desirable
    return (f"kto: desirable:undesirable = {desirable}:{undesirable} with weights {desirable_weight:g}:{undesirable_weight:g} "
            f"gives a weighted ratio of {ratio:.2f}, outside [1, 1.33]; set kto.desirable_weight in "
            f"[{low:.2f}, {high:.2f}]")


class KTO(LossOnValidation):
    name = "kto"
    fast = FastPath()  # the fast path the log-probs take (set by build_objective)

    def __init__(self, spec, data, pad_id: int, reference):
        self.spec, self.data, self.pad_id, self.reference = spec, data, pad_id, reference
        tags = getattr(data.train, "tags", None)  # a TokenizedSet without tags has no desirable example
        desirable = int(tags.sum()) if tags is not None else sum(e.tag for e in data.train if isinstance(e, Example))
        warning = balance_warning(desirable, len(data.train) - desirable, spec.desirable_weight, spec.undesirable_weight)
        self.notes = [warning] if warning else []  # shown by the loop at the start (R-PREF-3)

    def describe(self) -> dict:
        return {"method": self.name, **self.spec.model_dump(), "logps": "sum over the answer's tokens",
                "kl": "per micro-batch, mismatched pairs", "normalised_by": "examples of the accumulated batch"}

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        examples = [self.data.train[i] for i in indices]
        batch = collate(examples, self.pad_id)
        batch["desirable"] = torch.tensor([bool(e.tag) for e in examples])
        kl = collate(mismatched(examples), self.pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch

    def units(self, batch) -> dict[str, int]:
        return {"examples": batch["input_ids"].size(0), "tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def prepare(self, model, batch):
        batch["ref_logps"] = self.reference.logps(model, batch)
        batch["ref_kl_logps"] = self.reference.logps(model, _kl_rows(batch))
        return batch

    def loss(self, model, batch, totals) -> tuple[torch.Tensor, Stats]:
        s = self.spec
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, _kl_rows(batch), self.fast)
        kl = (kl_logps - batch["ref_kl_logps"]).mean().clamp(min=0)
        logps, _ = sequence_logps(model, batch, self.fast)
        ratios = logps - batch["ref_logps"]
        good = batch["desirable"]
        losses = kto_losses(ratios[good], ratios[~good], kl, s.beta, s.desirable_weight, s.undesirable_weight)
        c, r = s.beta * ratios[good].detach(), s.beta * ratios[~good].detach()
        # Every key every time (a count of 0 when a micro-batch lacks one kind): the processes sum the
        # same keys, and a statistic with no examples anywhere is left out of the step's record.
        stats = {"kl": (kl.item(), 1.0),
                 "rewards/chosen": (c.sum().item(), float(c.numel())),
                 "logps/chosen": (logps[good].detach().sum().item(), float(c.numel())),
                 "rewards/rejected": (r.sum().item(), float(r.numel())),
                 "logps/rejected": (logps[~good].detach().sum().item(), float(r.numel()))}
        return losses.sum() / totals["examples"], stats


def _kl_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
