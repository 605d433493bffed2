"""The switches a run uses: `resolve`, what the config asks for (fast/__init__.py) fitted to the loaded
model, the prepared data and the device, with activation checkpointing sized by plan's memory model
(plan.recompute), so that `tuneforge plan` shows the same choice. Torch-free to import; plan never
imports this module (it reads fast/__init__.py's switches), so it may import plan.
"""

from __future__ import annotations

from dataclasses import replace

from tuneforge.fast import (FastPath, chunked_loss_requested, fused_lora_blocker, kernels_default, kernels_requested,
                            switch_on)
from tuneforge.methods.facts import method_facts
from tuneforge.plan.recompute import CPU_EVERY, for_device, level, requested
from tuneforge.plan.memory import compute_dtype
from tuneforge.plan.model import shape_from_hf_config
from tuneforge.plan.report import settings_from_config


def resolve(cfg, device_type: str = "cpu", model=None, sharded: bool = False, device_memory: float | None = None,
            data=None) -> FastPath:
    """The switches a run uses: each explicit setting, else what its mode implies for this method.
    `model` (the loaded base) prices attention against the weights for padding-free rows, and
    says whether its attention can run per example (fast/varlen.py). Under FSDP (`sharded`) the
    chunked loss and the fused LoRA layers are off (fast/__init__.py says why). Activation
    checkpointing on a GPU is sized by plan's memory model for the model, the prepared `data` and
    the GPU's `device_memory` (bytes; default: the current CUDA device's)."""
    perf = cfg.performance
    kernels = kernels_requested(perf)
    kernels = kernels_default(device_type) if kernels is None else kernels
    checkpointing, every = choose_level(cfg, device_type, model, device_memory, data, kernels)
    padding_free = method_facts(cfg).padding_free and switch_on(perf, perf.padding_free)
    return FastPath(
        padding_free=padding_free,
        chunked_loss=chunked_loss_requested(cfg, sharded),
        loss_chunk_tokens=perf.loss_chunk_tokens,
        gradient_checkpointing=checkpointing != "none",
        fused_optimizer=perf.mode != "off" and device_type == "cuda" and cfg.optimizer == "adamw",
        pair_cost=pair_cost(model) if model is not None and hasattr(model.config, "num_hidden_layers") else 0.0,
        kernels=kernels,
        activation_checkpointing=checkpointing,
        checkpoint_every=every,
        compile=bool(perf.compile),
        varlen_attention=padding_free and perf.varlen_attention is not False and model is not None
        and varlen_supported(model),
        fused_lora=fused_lora_blocker(cfg, sharded) is None and switch_on(perf, perf.fused_lora),
    )


def pair_cost(model) -> float:
    """Per query-key pair, attention does 4 x layers x hidden multiply-adds (scores and values); per
    token the weights do 2 x their size. The embedding table is a lookup, not a product."""
    import torch

    config = model.config
    embedded = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    weights = sum(p.numel() for p in model.parameters()) - embedded
    return 4 * config.num_hidden_layers * config.hidden_size / max(2 * weights, 1)


def varlen_supported(model) -> bool:
    """Whether fast/varlen.py covers this model's attention (imported here, where a model is loaded:
    it imports torch and transformers)."""
    from tuneforge.fast.varlen import supports

    return supports(model)


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
    config = getattr(model, "config", None)
    try:
        return shape_from_hf_config(config.to_dict())[0]
    except Exception:  # no config, a mixture of experts, missing keys
        return None
