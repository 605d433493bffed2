"""The performance layer: switches that change how fast and lean a step runs, never what it computes.

`performance.mode` picks the defaults: auto (everything that helps), min_memory (also activation
checkpointing) or off (the plain path, for comparison). Each switch can be set on its own.
Activation checkpointing and regional compilation are applied to the model by functions
(fast/checkpointing.py, fast/compile.py); the level auto picks comes from plan's memory model.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.methods.facts import method_facts

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
    kernels: bool = False  # fused RMSNorm and gated-MLP modules, and the chunked losses' cross-entropy (fast/kernels)
    # none | selective (layers 0, k, 2k, ... with k = checkpoint_every) | full | offload (fast/checkpointing.py);
    # gradient_checkpointing above is True whenever a layer is checkpointed, for readers of older run.json files.
    activation_checkpointing: str = "none"
    checkpoint_every: int = 1
    compile: bool = False  # regional torch.compile of each decoder layer (fast/compile.py)
    varlen_attention: bool = False  # per-example attention on padding-free rows (fast/varlen.py)
    fused_lora: bool = False  # each LoRA linear as one autograd function of matmuls (fast/fused_lora.py)

    def describe(self) -> str:
        level = self.activation_checkpointing
        checkpointing = f"activation checkpointing {level}" + (
            f" (1 layer in {self.checkpoint_every})" if level == "selective" else "")
        parts = [name for name, on in (("padding-free batches", self.padding_free),
                                       ("chunked loss (no full logits)", self.chunked_loss),
                                       (checkpointing, level != "none"),
                                       ("regional compile", self.compile),
                                       ("fused AdamW", self.fused_optimizer),
                                       ("fused RMSNorm, gated-MLP and cross-entropy kernels", self.kernels),
                                       ("fused LoRA layers", self.fused_lora),
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


def resolve(cfg, device_type: str = "cpu", model=None, sharded: bool = False, device_memory: float | None = None,
            data=None) -> FastPath:
    """The switches a run uses: each explicit setting, else what its mode implies for this method.
    `model` (the loaded base) prices attention against the weights for padding-free rows, and
    says whether its attention can run per example (fast/varlen.py). Under FSDP
    (`sharded`) the chunked loss is off: it reads the output layer's weight outside the forward,
    where FSDP holds only this process's shard of it. Activation checkpointing on a GPU is sized by
    plan's memory model for the model, the prepared `data` and the GPU's `device_memory` (bytes;
    default: the current CUDA device's). The fused LoRA layers are off under FSDP too (not tested there)."""
    from tuneforge.fast.checkpointing import choose_level

    perf = cfg.performance
    on = perf.mode != "off"
    kernels = kernels_requested(perf)
    kernels = kernels_default(device_type) if kernels is None else kernels
    level, every = choose_level(cfg, device_type, model, device_memory, data, kernels)
    facts = method_facts(cfg)

    def pick(value: bool | None) -> bool:
        return on if value is None else value

    padding_free = facts.padding_free and pick(perf.padding_free)
    return FastPath(
        padding_free=padding_free,
        chunked_loss=facts.chunked_loss and not sharded and pick(perf.chunked_loss),
        loss_chunk_tokens=perf.loss_chunk_tokens,
        gradient_checkpointing=level != "none",
        fused_optimizer=on and device_type == "cuda" and cfg.optimizer == "adamw",
        pair_cost=pair_cost(model) if model is not None and hasattr(model.config, "num_hidden_layers") else 0.0,
        kernels=kernels,
        activation_checkpointing=level,
        checkpoint_every=every,
        compile=bool(perf.compile),
        varlen_attention=padding_free and perf.varlen_attention is not False and model is not None
        and varlen_supported(model),
        fused_lora=fused_lora_blocker(cfg, sharded) is None and pick(perf.fused_lora),
    )


def fused_lora_blocker(cfg, sharded: bool = False) -> str | None:
    """Why fast/fused_lora.py cannot serve this run's adapter, or None when it can."""
    if cfg.adapter != "lora":
        return f"adapter is {cfg.adapter} (only lora over unquantized weights is fused)"
    if cfg.lora.use_dora:
        return "lora.use_dora is on (DoRA keeps PEFT's forward)"
    if cfg.lora.dropout:
        return f"lora.dropout is {cfg.lora.dropout} (only dropout 0 is fused; set lora.dropout: 0)"
    if sharded:
        return "FSDP shards the weights (not tested with fused LoRA layers)"
    return None


def varlen_supported(model) -> bool:
    """Whether fast/varlen.py covers this model's attention (imported here: plan passes no model and no torch)."""
    from tuneforge.fast.varlen import supports

    return supports(model)


def kernels_requested(perf) -> bool | None:
    """performance.kernels as the config sets it, or None where the device decides (kernels_default)."""
    kernels = getattr(perf, "kernels", None)  # a run.json of an older version may lack the key
    if kernels is None:
        return None if perf.mode != "off" else False
    return bool(kernels)


def kernels_default(device_type: str) -> bool:
    """The fused kernels pay where Triton compiles them (CUDA); on CPU their PyTorch path saves
    memory but no time, so they stay off unless asked for."""
    if device_type != "cuda":
        return False  # plan resolves the switches for a CPU and must not import torch
    from tuneforge.fast.kernels import triton_importable

    return triton_importable()
