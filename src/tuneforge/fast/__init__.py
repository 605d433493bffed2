"""The performance layer: switches that change how fast and lean a step runs, never what it computes.

`performance.mode` picks the defaults: auto (everything that helps), min_memory (also activation
checkpointing) or off (the plain path, for comparison). Each switch can be set on its own.
This module is what a config asks for, torch-free and without plan, so that plan reads the same
switches the loop runs: the switches a run uses (sized for its model, data and device by plan's
memory model) are fast/switches.py's `resolve`, and one `apply_fast_path` (fast/apply.py) applies
them to the model.
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
    # none | selective (layers 0, k, 2k, ... with k = checkpoint_every) | full | offload (fast/recompute.py);
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


def chunked_loss_requested(cfg, sharded: bool = False) -> bool:
    """Whether the loss reads the output layer in chunks: for an objective that can, unless the config
    turns it off, and never under FSDP (`sharded`), which holds only this process's shard of the output
    layer's weight outside the forward, where the chunks read it."""
    return method_facts(cfg).chunked_loss and not sharded and switch_on(cfg.performance, cfg.performance.chunked_loss)


def switch_on(perf, value: bool | None) -> bool:
    """A switch as set, or where unset (None) what performance.mode implies: on unless mode is off."""
    return perf.mode != "off" if value is None else value


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
        return False  # and no torch imported: the choice of switches stays torch-free on a CPU
    from tuneforge.fast.kernels import triton_importable

    return triton_importable()
