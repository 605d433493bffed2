"""Running an objective over micro-batches: the loss of a step (training) or of the validation split."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from tuneforge.methods.objective import Runtime
from tuneforge.models.precision import autocast_for
from tuneforge.parallel.apply import gradient_sync
from tuneforge.parallel.world import SINGLE


def on_validation(objective, data, reference=None):
    """The same objective over the validation split, optionally against another reference."""
    view = copy.copy(objective)
    view.data = SimpleNamespace(train=data.validation, train_rejected=data.validation_rejected)
    if reference is not None:
        view.reference = reference
    elif objective.reference is not None:
        view.reference = copy.copy(objective.reference)
        view.reference.split = "validation"
    return view


def run_objective(objective, model, batches: list[dict], device, dtype, backward: bool, world=None,
                  counted: int | None = None) -> tuple[float, dict, dict]:
    """Loss, units and statistics of a set of micro-batches taken as one batch; backward if training.

    Each micro-batch's loss is divided by the units of all of them, so gradients accumulate to
    exactly those of the whole batch. Statistics come back averaged over the whole batch; the
    totals include `input_tokens`, every non-padding token the model read (rollouts included), and
    `input_positions`, the same with padding.

    On several processes (`world`) each holds its share of the micro-batches of one global batch:
    units, losses and statistics are summed over all processes before use, so every number is that
    of the global batch, as one process would compute it. DDP and FSDP average gradients over the
    processes, so each backward is scaled by their number to make that average the global gradient.
    Micro-batches from index `counted` on are fillers, run with weight 0 so that every process makes
    the same forward and backward passes (their collectives must line up).
    """
    world = world or SINGLE
    counted = len(batches) if counted is None else counted
    prepared = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device, dtype):
            prepared.append(objective.prepare(model, batch))
    masks = [b["attention_mask"] for b in prepared[:counted] if "attention_mask" in b]  # images have none
    totals: dict[str, int] = {"input_tokens": sum(int(m.sum()) for m in masks),
                              "input_positions": sum(m.numel() for m in masks)}
    for i, batch in enumerate(prepared):  # fillers count 0, but name the same units on every process
        for unit, n in objective.units(batch).items():
            totals[unit] = totals.get(unit, 0) + (n if i < counted else 0)
    totals = world.sum(totals)
    loss_sum, sums = 0.0, {}
    for i, batch in enumerate(prepared):
        weight = 1.0 if i < counted else 0.0
        with gradient_sync(model, enabled=i == len(prepared) - 1), autocast_for(device, dtype), \
                torch.set_grad_enabled(backward):
            loss, stats = objective.loss(model, batch, totals)
            if backward:
                scale = world.size * weight
                (loss if scale == 1 else loss * scale).backward()
        loss_sum += weight * loss.item()
        for name, (total, count) in stats.items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += weight * total
            acc[1] += weight * count
    if world.distributed:
        flat = world.sum({"loss": loss_sum, **{f"{n}\0sum": t for n, (t, _) in sums.items()},
                          **{f"{n}\0count": c for n, (_, c) in sums.items()}})
        loss_sum = flat["loss"]
        sums = {n: (flat[f"{n}\0sum"], flat[f"{n}\0count"]) for n in sums}
    return loss_sum, totals, {name: t / c for name, (t, c) in sums.items() if c}


@torch.no_grad()
def split_metrics(objective, model, data, batch_size: int, device, dtype, final: bool = False,
                  reference=None) -> dict:
    """The objective's loss and statistics over the validation split (its held-out evaluation).

    `preference_accuracy` counts a pair whose chosen answer gets the higher implicit reward; a tie
    counts half, so a policy equal to its reference scores chance (0.5), not 0.
    """
    view = on_validation(objective, data, reference)
    was_training = model.training
    model.eval()
    n = len(data.validation)
    batches = [view.collate(list(range(i, min(n, i + batch_size)))) for i in range(0, n, batch_size)]
    loss, _, stats = run_objective(view, model, batches, device, dtype, backward=False)
    model.train(was_training)
    out = {"val_loss": loss, **{f"val_{k}": v for k, v in stats.items()}}
    if "rewards/accuracies" in stats:
        out["preference_accuracy"] = stats["rewards/accuracies"] + stats.get("rewards/ties", 0.0) / 2
    if "logps/accuracies" in stats:  # the model's own likelihood: does it make the chosen answer the likelier?
        out["likelihood_accuracy"] = stats["logps/accuracies"]
    return out if final else as_validation(out)


def as_validation(metrics: dict) -> dict:
    """Every held-out number logged during training is under val_ (GRPO's mean_reward too), so early
    stopping can read it."""
    return {k if k.startswith("val_") else f"val_{k}": v for k, v in metrics.items()}


class LossOnValidation:
    """For objectives whose held-out numbers are their own loss and statistics on the validation split
    (the preference methods): how they are built, evaluated and (not) preflighted."""

    notes = ()
    run = Runtime()

    @classmethod
    def build(cls, spec, data, pad_id: int, reference, run: Runtime):
        objective = cls(spec, data, pad_id, reference)
        objective.run = run
        return objective

    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        run = self.run
        return split_metrics(self, model, data, run.cfg.micro_batch_size, run.device, run.dtype, final, reference)

    def preflight(self, model) -> None:
        pass
