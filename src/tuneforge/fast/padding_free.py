"""Padding-free batches: a micro-batch's examples back to back in one row, no pad token anywhere.

Positions restart at 0 for each example, which is how transformers recognises a packed row: its
attention mask then keeps every example to itself (FlashAttention reads the same positions as
variable-length sequences, and so does fast/varlen.py, which skips the pairs across examples). A step holds the same examples as the padded path, so the loss and the
data position of a checkpoint are unchanged; only the compute spent on padding goes.
"""

from __future__ import annotations

import torch

from tuneforge.data.template import IGNORE_INDEX


def collate_flat(examples: list) -> dict[str, torch.Tensor]:
    """One row of all `examples`. The first token of each is not a label, since it would be predicted
    from the end of the example before it (the padded path drops it in the shift the same way)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        ids += e.input_ids
        labels += [IGNORE_INDEX, *e.labels[1:]]
        positions += range(len(e.input_ids))
    row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    # attention_mask only counts the tokens (all real); model_inputs leaves it out so the
    # positions decide the attention.
    return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}


def flat_pays(lengths: list[int], pair_cost: float, varlen: bool = False) -> bool:
    """Whether one padding-free row costs less than the padded batch of these examples.

    The padded batch runs every example to the longest, B x L positions and B x L^2 query-key pairs;
    the row runs only the T real positions. Its attention scores all T^2 pairs of the row (masked)
    unless `varlen` (fast/varlen.py) attends within each example, the sum of L_i^2. `pair_cost`
    weighs a pair against a position (fast.switches.pair_cost). With `varlen` the row never costs more, so
    any padding saved pays; without it equal lengths never pay, and many short examples beside a
    long one always do.
    """
    total, longest, n = sum(lengths), max(lengths), len(lengths)
    pairs = sum(length * length for length in lengths) if varlen else total * total
    return total + pair_cost * pairs < n * longest + pair_cost * n * longest * longest


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model is called with: a padding-free row by its positions, a padded batch by its mask.
    No key-value cache: training never reads one, and transformers only reads a row as packed without it."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
