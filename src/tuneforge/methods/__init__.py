"""Training objectives, one module each. The loop asks an objective for four things:

- `collate(indices)`: the batch of those training examples;
- `prepare(model, batch)`: work done without gradients before the loss: reference log-probs, rollouts;
- `units(batch)`: what the loss is averaged over (trained tokens, pairs, examples), counted per micro-batch
  and summed over the accumulated batch by the loop;
- `loss(model, batch, totals)`: this micro-batch's share of the step's loss (divided by those totals),
  and statistics as (sum, count) pairs.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch


def build_objective(cfg, data, pad_id: int, reference=None, fast=None, **online):
    """The objective for `cfg.method`, taking the resolved fast path `fast` (tuneforge.fast.resolve;
    every objective has the plain one by default); `online` carries what GRPO needs to sample."""
    objective = _objective(cfg, data, pad_id, reference, **online)
    if fast is not None:
        objective.fast = fast
    return objective


def _objective(cfg, data, pad_id: int, reference, **online):
    if cfg.method == "sft":
        from tuneforge.methods.sft import SFT

        return SFT(data, pad_id)
    if cfg.method == "grpo":
        from tuneforge.methods.grpo import GRPO

        return GRPO(cfg.grpo, data, pad_id, reference, **online)
    from tuneforge.methods.dpo import DPO
    from tuneforge.methods.kto import KTO
    from tuneforge.methods.orpo import ORPO
    from tuneforge.methods.reward import Reward
    from tuneforge.methods.simpo import SimPO

    kind = {"dpo": DPO, "orpo": ORPO, "simpo": SimPO, "kto": KTO, "reward": Reward}[cfg.method]
    return kind(getattr(cfg, cfg.method), data, pad_id, reference)


def needs_reference(cfg) -> bool:
    """Whether the method compares against a reference (for reference-free DPO, a uniform one)."""
    if cfg.method == "dpo":
        return True
    if cfg.method == "grpo":
        return cfg.grpo.beta > 0
    return cfg.method == "kto"


def resolved_loss(cfg) -> dict:
    """The loss actually trained, with its normalisation: printed at the start and stored in run.json."""
    m = cfg.method
    if m == "sft":
        return {"method": m, "loss": "cross-entropy", "normalised_by": "trained tokens of the accumulated batch"}
    if m == "grpo":
        g = cfg.grpo
        return {"method": m, "loss": g.loss, "scale_rewards": g.scale_rewards, "beta": g.beta, "epsilon": g.epsilon,
                "epsilon_high": g.epsilon_high or g.epsilon, "generations": g.generations,
                "normalised_by": {"grpo": "completions, then tokens of each", "dapo": "completion tokens of the batch",
                                  "dr_grpo": "completions x max_completion_tokens"}[g.loss]}
    spec = getattr(cfg, m).model_dump()
    base = {"method": m, **spec}
    if m == "dpo":
        logps = "per-token mean" if cfg.dpo.loss == "ipo" else "sum over the answer's tokens"
        return {**base, "logps": logps, "normalised_by": "pairs of the accumulated batch"}
    if m in ("orpo", "simpo"):
        return {**base, "logps": "per-token mean", "normalised_by": "pairs (odds/margin term), chosen tokens (NLL)"}
    if m == "kto":
        return {**base, "logps": "sum over the answer's tokens", "kl": "per micro-batch, mismatched pairs",
                "normalised_by": "examples of the accumulated batch"}
    return {**base, "loss": "bradley-terry", "normalised_by": "pairs of the accumulated batch"}


def on_validation(objective, data, reference=None):
    """The same objective over the validation split, optionally against another reference."""
    view = copy.copy(objective)
    view.data = SimpleNamespace(train=data.validation, train_rejected=data.validation_rejected)
    if reference is not None:
        view.reference = reference
    elif getattr(objective, "reference", None) is not None:
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
    from tuneforge.models.precision import autocast_for
    from tuneforge.parallel.apply import gradient_sync
    from tuneforge.parallel.world import SINGLE

    world = world or SINGLE
    counted = len(batches) if counted is None else counted
    prepared = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device, dtype):
            prepared.append(objective.prepare(model, batch))
    masks = [b["attention_mask"] for b in prepared[:counted]]
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
