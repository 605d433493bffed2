"""Random state saved with a checkpoint (torch CPU and CUDA, Python's `random`), so dropout and
sampling continue the stream an uninterrupted run would have drawn."""

from __future__ import annotations

import random

import torch


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for a safetensors file, JSON for Python's state)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    """Put back the random state `rng_state` saved."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = python_state
    random.setstate((version, tuple(state), gauss))
