"""Adapter weights are read from safetensors only: a pickle file (.bin) can run code when it is loaded."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import ModelError

SAFE = "adapter_model.safetensors"


def adapter_weights(folder: Path, label: str) -> Path:
    """The adapter's safetensors file, or an error that names the pickle file and how to convert it."""
    safe, pickled = folder / SAFE, folder / "adapter_model.bin"
    if safe.is_file():
        return safe
    if pickled.is_file():
        raise ModelError(
            f"{label}: {pickled} is a pickle file, which tuneforge never loads (unpickling can run code); convert it "
            f"once, if you trust it: python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{pickled}', weights_only=True), '{safe}')\""
        )
    raise ModelError(f"{label}: no {SAFE} in {folder}; give an adapter saved as safetensors")
