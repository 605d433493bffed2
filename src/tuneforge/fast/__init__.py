"""The performance layer: switches that change how fast and lean a step runs, never what it computes.

`performance.mode` picks the defaults: auto (everything that helps), min_memory (also activation
checkpointing) or off (the plain path, for comparison). Each switch can be set on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


# Objectives whose loss reads the output layer in chunks (ORPO's NLL over prompts and the reward
# model's score head read whole logits or no logits).
CHUNKED_METHODS = ("sft", "dpo", "simpo", "kto", "grpo")
CHUNK_BYTES = 256 * 1024**2  # fp32 logits of one chunk of the chunked loss


def default_chunk(vocab_size: int) -> int:
    """Positions per chunk of the chunked loss (fast/chunked_loss.py): 256 MiB of fp32 logits."""
    return max(64, CHUNK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class FastPath:
    padding_free: bool = False
    chunked_loss: bool = False
    loss_chunk_tokens: int | None = None  # None: fast.chunked_loss.default_chunk
    gradient_checkpointing: bool = False
    fused_optimizer: bool = False  # torch's fused AdamW, on CUDA
    # Attention cost of one query-key pair relative to one token through the weights (padding_free.flat_pays).
    pair_cost: float = 0.0
    varlen_attention: bool = False  # per-example attention on padding-free rows (fast/varlen.py)

    def describe(self) -> str:
        parts = [name for name, on in (("padding-free batches", self.padding_free),
                                       ("chunked loss (no full logits)", self.chunked_loss),
                                       ("activation checkpointing", self.gradient_checkpointing),
                                       ("fused AdamW", self.fused_optimizer),
                                       ("per-example attention", self.varlen_attention)) if on]
        return "Performance: " + (", ".join(parts) if parts else "plain path")


def pair_cost(model) -> float:
    """Per query-key pair, attention does 4 x layers x hidden multiply-adds (scores and values); per
    token the weights do 2 x their size. The embedding table is a lookup, not a product."""
    import torch

    config = model.config
    embedded = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    weights = sum(p.numel() for p in model.parameters()) - embedded
    return 4 * config.num_hidden_layers * config.hidden_size / max(2 * weights, 1)


def resolve(cfg, device_type: str = "cpu", model=None, sharded: bool = False) -> FastPath:
    """The switches a run uses: each explicit setting, else what its mode implies for this method.
    `model` (the loaded base) prices attention against the weights for padding-free rows, and
    says whether its attention can run per example (fast/varlen.py). Under FSDP
    (`sharded`) the chunked loss is off: it reads the output layer's weight outside the forward,
    where FSDP holds only this process's shard of it."""
    from tuneforge.fast.varlen import supports as varlen_supported

    perf = cfg.performance
    on = perf.mode != "off"
    sft = cfg.method == "sft"  # the one objective that reads padding-free rows
    chunks = cfg.method in CHUNKED_METHODS

    def pick(value: bool | None) -> bool:
        return on if value is None else value

    padding_free = sft and pick(perf.padding_free)
    return FastPath(
        padding_free=padding_free,
        chunked_loss=chunks and not sharded and pick(perf.chunked_loss),
        loss_chunk_tokens=perf.loss_chunk_tokens,
        gradient_checkpointing=cfg.gradient_checkpointing or perf.mode == "min_memory",
        fused_optimizer=on and device_type == "cuda" and cfg.optimizer == "adamw",
        pair_cost=pair_cost(model) if model is not None and hasattr(model.config, "num_hidden_layers") else 0.0,
        varlen_attention=padding_free and perf.varlen_attention is not False and model is not None
        and varlen_supported(model),
    )
