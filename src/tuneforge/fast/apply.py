"""The fast path as one function applied to a model, as parallel/apply.py applies DDP or FSDP.

`apply_fast_path` applies the switches `resolve` (fast/switches.py) chose, in the one order in which
they compose, and returns what it did; the loop calls it once, after the adapter and before DDP/FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.fast import FastPath
from tuneforge.fast.recompute import apply_activation_checkpointing
from tuneforge.fast.compile import apply_compile
from tuneforge.fast.fused_lora import apply_fused_lora
from tuneforge.fast.kernels import apply_kernels
from tuneforge.fast.varlen import apply_varlen_attention


@dataclass(frozen=True)
class Applied:
    """What apply_fast_path changed in the model."""

    fused_lora: tuple[str, ...] = ()  # LoRA linear layers now run as one autograd function each
    kernels: tuple[str, ...] = ()  # RMSNorm and gated-MLP modules swapped for the fused ones
    varlen_attention: str | None = None  # the attention per-example attention stands in for (sdpa, eager)
    checkpointed: tuple[int, ...] = ()  # indices of the decoder layers recomputed in the backward pass
    compiled: int = 0  # decoder layers compiled

    def notes(self) -> list[str]:
        """The lines the run prints about it (the switches themselves are in FastPath.describe)."""
        notes = []
        if self.fused_lora:
            notes.append(f"Fused LoRA: {len(self.fused_lora)} LoRA linear layers run as one autograd function each")
        if self.kernels:
            notes.append(f"Kernels: {len(self.kernels)} RMSNorm and gated-MLP modules fused")
        return notes


def apply_fast_path(model: torch.nn.Module, fast: FastPath, device: torch.device) -> Applied:
    """Apply the fast path's switches to a model with its adapter attached, in place, in this order:
    fused LoRA first (the kernels' gated MLP then calls the fused layers); the kernels after the
    adapter (PEFT matches its targets in the model transformers built); per-example attention;
    activation checkpointing (before compile, which compiles inside each checkpoint); compile last
    (it traces the layers as the others left them). Before DDP or FSDP wrap the model."""
    fused_lora = apply_fused_lora(model) if fast.fused_lora else []
    kernels = apply_kernels(model) if fast.kernels else []
    varlen = apply_varlen_attention(model) if fast.varlen_attention else None  # config.json never carries it
    checkpointed = apply_activation_checkpointing(model, fast.activation_checkpointing, fast.checkpoint_every,
                                                  device.type)
    compiled = apply_compile(model) if fast.compile else 0
    return Applied(tuple(fused_lora), tuple(kernels), varlen, tuple(checkpointed), compiled)
