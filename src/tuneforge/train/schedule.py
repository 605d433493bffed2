"""Learning-rate schedule as a pure function of the step: nothing to save, exact on resume."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return int(round(warmup_ratio * total_steps))


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup: int, kind: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, linear or constant to 0."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {kind!r}")
