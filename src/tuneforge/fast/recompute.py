"""Activation checkpointing as a function applied to a model: `apply_activation_checkpointing`.

A checkpointed decoder layer keeps only its input during the forward pass and runs again during the
backward pass; `offload` also parks that input in pinned CPU memory until the backward needs it.
The layers are switched with transformers' own per-layer mechanism (GradientCheckpointingLayer: a
`gradient_checkpointing` flag and a `_gradient_checkpointing_func` on each layer instance). It
checkpoints the layer's `forward` inside the module's hooks, so FSDP's gathers and PEFT's adapters
work unchanged and nothing is wrapped or patched. Which level a run uses is fast.switches.choose_level's
answer, from plan's memory model (plan.recompute), so `tuneforge plan` shows the same choice.
"""

from __future__ import annotations

from functools import partial

from tuneforge.errors import ConfigError
from tuneforge.models.layers import decoder_layers


def _checkpoint(function, *args, **kwargs):
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def _checkpoint_offloaded(function, *args, device_type: str = "cuda", **kwargs):
    """A checkpoint whose saved inputs go to pinned CPU memory. Non-reentrant checkpointing saves the
    layer's inputs under the hooks outside it (these) and replaces everything saved inside with
    recompute handles, so the layer inputs are all that moves."""
    import torch

    with torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=device_type):
        return _checkpoint(function, *args, **kwargs)


def checkpointed_indices(layers: int, level: str, every: int = 1) -> list[int]:
    """Decoder layers a level recomputes: layers 0, k, 2k, ... for selective, all for full and offload."""
    if level == "none":
        return []
    step = every if level == "selective" else 1
    return list(range(0, layers, step))


def apply_activation_checkpointing(model, level: str, every: int = 1, device_type: str = "cuda") -> list[int]:
    """Checkpoint the model's decoder layers at this level (offload only on a GPU); returns the indices
    of the checkpointed layers. Apply it before DDP or FSDP wrap the model, and before compile."""
    if level == "none":
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = decoder_layers(model)
    odd = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, GradientCheckpointingLayer)})
    if not layers or odd:
        found = f"its layers ({', '.join(odd)}) are not transformers GradientCheckpointingLayers" if odd else \
            "no decoder layers (modules named layers.N) were found"
        raise ConfigError(f"performance.activation_checkpointing: {level} checkpoints each decoder layer, but "
                          f"{found}; set performance.activation_checkpointing: none for this model")
    func = partial(_checkpoint_offloaded, device_type=device_type) if level == "offload" and device_type == "cuda" \
        else _checkpoint
    chosen = checkpointed_indices(len(layers), level, every)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
        layer._gradient_checkpointing_func = func
    return chosen
