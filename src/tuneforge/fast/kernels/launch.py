"""When a Triton kernel runs, and how it is launched.

Triton compiles for a GPU, or, with TRITON_INTERPRET=1, runs the same kernel source on CPU tensors
with NumPy (slowly: that is how the kernels are tested without a GPU). Elsewhere the kernels'
pure-PyTorch path runs, so a model with the kernels applied works on every device.
"""

from __future__ import annotations

import os
from functools import cache

import torch


@cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Triton settles this when it is first imported
    (its own library functions are wrapped then), so TRITON_INTERPRET=1 must be set before that."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_runs(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `x`: on a CUDA device, or on CPU in interpreter mode."""
    if not triton_importable():
        return False
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


def warps(block: int) -> int:
    """Warps for a row of `block` elements: more threads for wider rows (ignored by the interpreter)."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def programs(rows: int, device: torch.device) -> int:
    """Programs that share the rows of a backward pass (each sums its own share of a weight's gradient):
    a few per streaming multiprocessor on a GPU, a handful in the interpreter."""
    per_device = 4 * _multiprocessors(device.index) if device.type == "cuda" else 4
    return max(1, min(rows, per_device))


@cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count
