"""The interface every training method implements, so the loop and `tuneforge eval` never branch on the method.

Each micro-batch goes collate -> prepare -> units -> loss; the loss is divided by the units of the whole
accumulated batch, so micro-batch 2 x accumulation 4 equals micro-batch 8 (methods/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class Runtime:
    """What an objective needs from the run besides its spec and data: where it runs, the tokenizer
    (GRPO's sampling, SFT's generation), and the config's evaluation and batch settings."""

    cfg: Any = None
    tokenizer: Any = None
    stop_ids: list[int] = field(default_factory=list)
    end_of_turn: str | None = None
    device: Any = "cpu"
    dtype: Any = None
    base: Path | None = None  # where reward functions' relative paths start
    seed: int = 0


class Objective(Protocol):
    notes: Sequence[str]  # shown once at the start of training (e.g. KTO's class balance, R-PREF-3)

    def collate(self, indices: list[int], place: tuple[int, int] = (0, 0)) -> dict:
        """The batch of those training examples. `place` (step, number of the micro-batch in the step's
        global batch) is where it sits in the run, whatever the number of processes: GRPO seeds its sampling with it."""

    def prepare(self, model, batch: dict) -> dict:
        """Work done without gradients before the loss: reference log-probs, rollouts."""

    def units(self, batch: dict) -> dict[str, int]:
        """What the loss is averaged over (trained tokens, pairs, examples), counted per micro-batch."""

    def loss(self, model, batch: dict, totals: dict[str, int]) -> tuple[Any, dict]:
        """This micro-batch's share of the step's loss (divided by `totals`) and statistics as (sum, count)."""

    def held_out(self, model, data, final: bool = False, reference=None) -> dict:
        """Numbers on the validation split: val_* keys during training, the before/after report when
        `final`; `reference` replaces the objective's own (before training: the base model itself)."""

    def preflight(self, model) -> None:
        """Run once before the first step (GRPO: the largest step's memory, before any sampling)."""

    def describe(self) -> dict:
        """The loss actually trained and its normalisation: printed at the start and stored in run.json."""
