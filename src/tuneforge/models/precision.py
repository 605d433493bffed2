"""The autocast context a forward pass runs under, shared by the loop, the objectives and evaluation."""

from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on `device`'s type; nothing at float32 (autocast has no fp32 mode)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
