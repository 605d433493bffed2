"""The optimizer: AdamW from torch, or bitsandbytes' 8-bit (and paged) AdamW; LoRA+ learning-rate groups.

Each parameter group may carry `lr_ratio`: the loop sets the group's learning rate to the scheduled
rate times that ratio, so LoRA+'s B matrices follow the same schedule at `plus_ratio` times the rate.
"""

from __future__ import annotations

import torch

from tuneforge.config import Config
from tuneforge.train.checkpoints import trainable_parameters

_BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """torch's AdamW, or the bitsandbytes class for an 8-bit name (which must be installed)."""
    if name == "adamw":
        return torch.optim.AdamW
    from tuneforge.models.quantize import require_bitsandbytes

    bnb = require_bitsandbytes(f"optimizer: {name}")
    return getattr(bnb.optim, _BNB_CLASSES[name])


def _optimizer_kwargs(cfg: Config, fused: bool = False) -> dict:
    kwargs = {"betas": cfg.adam_betas}
    if cfg.optimizer == "adamw":
        # Fused (one CUDA kernel) or one tensor at a time: either way each tensor is updated alone, in the
        # same order on every device count, so resumes stay bit-identical.
        if fused:
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = False
    return kwargs


def _keep_embeddings_32bit(model) -> None:
    """bitsandbytes' advice for 8-bit Adam: embedding moments in 32 bits, for stability."""
    import bitsandbytes as bnb

    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def loraplus_optimizer(model, cfg: Config, cls: type[torch.optim.Optimizer], fused: bool = False) -> torch.optim.Optimizer:
    """PEFT's LoRA+ groups (B and 1-D adapter weights at plus_ratio x lr), each tagged with its lr_ratio."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(
        model, cls, lr=cfg.learning_rate, loraplus_lr_ratio=cfg.lora.plus_ratio,
        loraplus_weight_decay=cfg.weight_decay, **_optimizer_kwargs(cfg, fused),
    )
    for group in optimizer.param_groups:
        group["lr_ratio"] = group["lr"] / cfg.learning_rate
    return optimizer


def build_optimizer(model, cfg: Config, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (torch or 8-bit); biases and norm weights (1-D) are not decayed; LoRA+ when lora.plus_ratio is set.
    `fused`: torch's fused AdamW kernel (CUDA)."""
    cls = optimizer_class(cfg.optimizer)
    if cfg.adapter != "full" and cfg.lora.plus_ratio is not None:
        return loraplus_optimizer(model, cfg, cls, fused)
    params = [p for _, p in trainable_parameters(model)]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer != "adamw":
        _keep_embeddings_32bit(model)
    return cls(groups, lr=cfg.learning_rate, **_optimizer_kwargs(cfg, fused))
