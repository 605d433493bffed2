"""Activation checkpointing as a function applied to a model: `apply_activation_checkpointing`.

A checkpointed decoder layer keeps only its input during the forward pass and runs again during the
backward pass; `offload` also parks that input in pinned CPU memory until the backward needs it.
The layers are switched with transformers' own per-layer mechanism (GradientCheckpointingLayer: a
`gradient_checkpointing` flag and a `_gradient_checkpointing_func` on each layer instance). It
checkpoints the layer's `forward` inside the module's hooks, so FSDP's gathers and PEFT's adapters
work unchanged and nothing is wrapped or patched. Which level a run uses is `choose_level`'s answer,
from plan's memory model (plan.checkpointing), so `tuneforge plan` shows the same choice.
"""

from __future__ import annotations

from dataclasses import replace

from functools import partial

from tuneforge.errors import ConfigError
from tuneforge.methods.facts import method_facts


def run_shape(cfg, data) -> tuple[int, bool]:
    """(widest micro-batch, whether batches are padded) of the prepared data, as plan reads them: the
    longest SFT example, else max_seq_len (a preference pair's rows are not known here)."""
    lengths = getattr(getattr(data, "train", None), "lengths", None) if method_facts(cfg).example_rows else None
    if lengths is None or not len(lengths):
        return cfg.max_seq_len, True
    return int(max(lengths)), bool(min(lengths) != max(lengths))


def choose_level(cfg, device_type: str, model=None, device_memory: float | None = None,
                 data=None, kernels: bool | None = None) -> tuple[str, int]:
    """(level, k) a run uses: what the config sets, or on a GPU the level its memory allows (plan's
    prediction for this model, these settings, the data's longest example and whether the fused
    `kernels` run; None: plan's default); on other devices none for auto, full for min_memory, and
    offload is full (there is no device memory to free)."""
    from tuneforge.plan.checkpointing import CPU_EVERY, for_device, level, requested

    request, every = requested(cfg)
    if device_type != "cuda":
        if request in ("budget", "lean"):
            return ("none", 1) if request == "budget" else ("full", 1)
        if request == "selective":
            return "selective", every or CPU_EVERY
        return ("full" if request == "offload" else request), 1
    if request not in ("budget", "lean") and not (request == "selective" and every is None):
        return request, every or 1
    shape = _shape(model)
    if shape is None:  # an architecture plan cannot size: behave as before budgets existed
        return {"budget": ("none", 1), "lean": ("full", 1)}.get(request, ("selective", CPU_EVERY))
    from tuneforge.plan.memory import compute_dtype
    from tuneforge.plan.report import settings_from_config

    settings, _ = settings_from_config(cfg, *run_shape(cfg, data))
    if kernels is not None:
        settings = replace(settings, kernels=kernels)
    if device_memory is None:
        import torch

        device_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    chosen = for_device(shape, settings, device_memory, False, compute_dtype(cfg.precision, is_cpu=False))
    name = level(chosen)
    return ("selective", 1) if request == "selective" and name == "full" else (name, chosen.checkpoint_every)


def _shape(model):
    """plan's ModelShape of a loaded model, or None for one it cannot describe."""
    from tuneforge.plan.model import shape_from_hf_config

    config = getattr(model, "config", None)
    try:
        return shape_from_hf_config(config.to_dict())[0]
    except Exception:  # no config, a mixture of experts, missing keys
        return None


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

    from tuneforge.parallel.apply import decoder_layers

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
