"""How a run's examples become optimizer steps: micro-batches per step, steps per epoch and of the run,
and the example indices of each step, from a cursor a checkpoint saves."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuneforge.config import Config
from tuneforge.data.batching import epoch_order, micro_batches_per_epoch
from tuneforge.data.dataset import PreparedData
from tuneforge.errors import ConfigError


@dataclass
class StepCounts:
    """How many examples, micro-batches and optimizer steps an epoch and the run hold."""

    examples_per_epoch: int
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    micro_per_step: int  # micro-batches of one optimizer step, over all processes


def micro_batches_per_step(cfg: Config, processes: int = 1) -> int:
    """grad_accum in each process, or global_batch_size / micro_batch_size shared by the processes."""
    if cfg.global_batch_size is None:
        return cfg.grad_accum * processes
    n = cfg.global_batch_size // cfg.micro_batch_size
    if n % processes:
        step = cfg.micro_batch_size * processes
        raise ConfigError(f"global_batch_size: {cfg.global_batch_size} is {n} micro-batches of {cfg.micro_batch_size}, "
                          f"which {processes} processes cannot share evenly; use a multiple of micro_batch_size x "
                          f"processes ({step}, {2 * step}, ...) or another number of processes")
    return n


def count_steps(cfg: Config, data: PreparedData, processes: int = 1) -> StepCounts:
    n = len(epoch_order(data.dataset_sizes, data.dataset_weights, cfg.seed, 0))
    micro = micro_batches_per_epoch(n, cfg.micro_batch_size)
    per_step = micro_batches_per_step(cfg, processes)
    steps = math.ceil(micro / per_step)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps))
    return StepCounts(n, micro, steps, total, per_step)


def next_step_batches(cfg: Config, data: PreparedData, counts: StepCounts, cursor: dict, orders: dict) -> list[list[int]]:
    """Example indices of the micro-batches of the next optimizer step, over all processes; advances the cursor.

    A step never spans two epochs: the last step of an epoch may have fewer micro-batches. The cursor
    counts micro-batches of the epoch's order, whatever the number of processes, so a checkpoint's data
    position holds on any number of them.
    """
    if cursor["micro"] >= counts.micro_per_epoch:
        cursor["epoch"] += 1
        cursor["micro"] = 0
    epoch = cursor["epoch"]
    if epoch not in orders:
        orders.clear()
        orders[epoch] = data.arrange(epoch_order(data.dataset_sizes, data.dataset_weights, cfg.seed, epoch),
                                     cfg.micro_batch_size)
    order = orders[epoch]
    batches = []
    while len(batches) < counts.micro_per_step and cursor["micro"] < counts.micro_per_epoch:
        start = cursor["micro"] * cfg.micro_batch_size
        batches.append(order[start : start + cfg.micro_batch_size])
        cursor["micro"] += 1
    return batches
