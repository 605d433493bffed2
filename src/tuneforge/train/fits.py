"""Refuse a micro-batch that cannot fit the device, before the model is loaded.

The schema's bounds stop absurd numbers; this stops a merely large micro_batch_size or max_seq_len
from growing memory until the kernel kills the process. The size comes from the prepared data (a
micro-batch holds at most every example, each at most the longest) and plan's memory model with
the activation checkpointing the run will use.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from tuneforge.config import Config
from tuneforge.data.dataset import PreparedData
from tuneforge.errors import ConfigError, ModelError
from tuneforge.fast.switches import run_shape
from tuneforge.plan.recompute import for_device
from tuneforge.plan.hardware import GIB, ram_bytes
from tuneforge.plan.memory import Settings, compute_dtype, memory
from tuneforge.plan.model import image_positions, shape_from_hf_config
from tuneforge.plan.report import settings_from_config
from tuneforge.plan.shapes import ModelShape


def device_memory(device: torch.device) -> int:
    """Total bytes of the device a run computes on: the GPU's memory, else this machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return ram_bytes()


def micro_batch_bytes(shape: ModelShape, s: Settings, total: float, is_cpu: bool, compute: str) -> float:
    """What one micro-batch of these settings keeps alive: its activations and logits (weights and
    optimizer state aside), with the checkpointing the run chooses on a device of `total` bytes."""
    used = memory(shape, for_device(shape, s, total, is_cpu, compute), compute)
    return used.activations + used.logits


def check_micro_batch_fits(cfg: Config, model_folder: Path, data: PreparedData, device: torch.device,
                           total: float | None = None) -> None:
    """A ConfigError naming micro_batch_size when one micro-batch of this data needs more than the whole
    device (`total` bytes; by default its measured memory)."""
    try:
        config = json.loads((model_folder / "config.json").read_text())
        shape, _ = shape_from_hf_config(config)
    except (OSError, ValueError, ModelError):
        return  # an architecture plan cannot size: the run finds out as before
    # A vision encoder's rows are its patches (and class token), whatever the images.
    seq_len, padded = (image_positions(model_folder), False) if "patch_size" in config else run_shape(cfg, data)
    settings, _ = settings_from_config(cfg, seq_len, padded)
    is_cpu, compute = device.type != "cuda", compute_dtype(cfg.precision, device.type != "cuda")
    total = device_memory(device) if total is None else total
    rows = min(cfg.micro_batch_size, max(len(data.train), 1))

    def need(n: int) -> float:
        return micro_batch_bytes(shape, replace(settings, micro_batch=n), total, is_cpu, compute)

    if need(rows) <= total:
        return
    fits = rows
    while fits > 1 and need(fits) > total:
        fits //= 2
    fix = (f"set micro_batch_size: {fits} (grad_accum keeps the batch per step)" if need(fits) <= total
           else f"lower max_seq_len (the longest example here is {seq_len} tokens)")
    raise ConfigError(f"micro_batch_size: {cfg.micro_batch_size} puts {rows} examples of up to {seq_len} tokens in "
                      f"one micro-batch, whose activations and logits need about {need(rows) / GIB:.1f} GiB, more than the "
                      f"{total / GIB:.1f} GiB of this {device.type.upper()}; {fix}")
