"""Tokens per second from FLOPs: training costs about 6N FLOPs a token for full fine-tuning and 4N
for LoRA (no weight gradients for the frozen base), plus attention, run at a share (MFU) of the
device's peak; the optimizer step is bound by memory bandwidth."""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.plan.hardware import Device
from tuneforge.plan.memory import Settings, checkpointed_layers, trainable_params
from tuneforge.plan.shapes import ModelShape

# Speed of LoRA on a quantised base relative to a bf16 base: bitsandbytes dequantises every
# weight on the forward and again on the backward pass. Priors until measured.
QUANT_SPEED = {4: 0.75, 8: 0.5}
# Bytes moved per trained parameter by gradient clipping and an AdamW step (weights, gradient,
# two moments read and written; weight decay and the clip's scaling pass).
STEP_BYTES = {"adamw": 40.0, "adamw_8bit": 28.0, "paged_adamw_8bit": 28.0}
# A GPU cannot finish a micro-batch faster than Python can launch its kernels: a block runs about
# 40 kernels forward and 80 backward (more with LoRA) at ~5 us each. Small models hit this floor.
BLOCK_LAUNCH_SECONDS = 6e-4


@dataclass(frozen=True)
class Speed:
    flops_per_token: float
    step_seconds: float
    tokens_per_second: float  # tokens trained on (padding excluded), as the loop's tokens/s


def forward_flops(shape: ModelShape, width: float) -> float:
    """FLOPs of one token's forward pass: 2 per weight of every matmul, and the attention scores and
    weighted sum over, on average, half of a causal window of `width` tokens (all of it for an encoder)."""
    attention = 2 * shape.layers * shape.heads * shape.dim * width * (2 if shape.bidirectional else 1)
    return 2 * shape.matmul_params() + attention


def flops_per_token(shape: ModelShape, s: Settings, width: float) -> float:
    """Training FLOPs per position: the backward pass costs two forwards when weight gradients are
    computed (full) and one when only activation gradients flow (LoRA, QLoRA), plus the adapter's
    own; checkpointing recomputes the forward of the checkpointed layers once more (offload's copies
    to and from CPU memory are not counted)."""
    forward = forward_flops(shape, width)
    if s.adapter == "full":
        total = 3 * forward
    else:
        total = 2 * forward + 6 * shape.lora_params(s.lora_r, s.lora_targets)
    return total + forward * checkpointed_layers(shape, s) / shape.layers


def speed(shape: ModelShape, s: Settings, device: Device, compute: str, width: float, padding: float) -> Speed:
    """Time of one optimizer step of micro_batch x grad_accum micro-batches `width` tokens wide,
    of which the share `padding` is padding."""
    rate = device.peak_flops(compute) * device.mfu * (QUANT_SPEED[s.bits] if s.adapter == "qlora" else 1.0)
    per_token = flops_per_token(shape, s, width)
    positions = s.micro_batch * s.rows * s.grad_accum * width
    micro_batch = max(s.micro_batch * s.rows * width * per_token / rate, 0.0 if device.is_cpu else shape.layers * BLOCK_LAUNCH_SECONDS)
    optimizer = trainable_params(shape, s) * STEP_BYTES[s.optimizer] / (device.bandwidth_gbs * 1e9)
    step = s.grad_accum * micro_batch + optimizer
    return Speed(per_token, step, positions * (1 - padding) / step)
