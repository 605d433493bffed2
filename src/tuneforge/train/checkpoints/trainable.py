"""The tensors a checkpoint holds of the model: those that train (the adapter, or every weight of a
full fine-tune); frozen base weights come back from the base model."""

from __future__ import annotations

import torch


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
