"""Data order and batches.

The order of an epoch is a pure function of (seed, epoch), so the data position saved in a
checkpoint is just (epoch, micro-batch index): resuming replays nothing and skips nothing.
"""

from __future__ import annotations

import math

import torch

from tuneforge.data.template import IGNORE_INDEX


def epoch_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> list[int]:
    """Shuffled example indices for one epoch; dataset k contributes weight_k x size_k examples."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    picked: list[int] = []
    offset = 0
    for size, weight in zip(sizes, weights):
        whole, frac = divmod(weight, 1.0)
        for _ in range(int(whole)):
            picked += range(offset, offset + size)
        n_extra = round(frac * size)
        if n_extra:
            picked += (torch.randperm(size, generator=g)[:n_extra] + offset).tolist()
        offset += size
    perm = torch.randperm(len(picked), generator=g).tolist()
    return [picked[i] for i in perm]


def micro_batches_per_epoch(n_examples: int, micro_batch_size: int) -> int:
    return math.ceil(n_examples / micro_batch_size)


def collate(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Labels are padded with IGNORE_INDEX by position, never by
    comparing ids with pad_id, so an end-of-turn token equal to the pad token is still trained."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard_step(micro_batches: list[list[int]], rank: int, size: int) -> tuple[list[list[int]], int]:
    """This process's micro-batches of one global step: every `size`-th one from `rank` on, a disjoint,
    deterministic share. Returns (micro-batches, how many are real): a process short of one at the end
    of an epoch gets a filler copy, trained with weight 0, so every process runs the same passes."""
    mine = micro_batches[rank::size]
    real = len(mine)
    per_process = math.ceil(len(micro_batches) / size)
    return mine + [micro_batches[0]] * (per_process - real), real
