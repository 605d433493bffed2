"""Model FLOPs utilisation (MFU) of a GPU run: the share of the GPU's dense peak the model's own arithmetic uses.

The FLOPs per trained token are plan's count (plan/throughput.py) at the run's adapter: 2 per weight of every
matmul and the attention over max_seq_len, forward; the backward twice that for full weights, once plus the
adapter's own for LoRA. Recomputation (activation checkpointing) is not counted, as PaLM defines MFU, so a
checkpointed run shows a lower MFU for the same work. The peak is the GPU's row in plan's device table at the
compute dtype; a GPU not in the table, and the CPU, get no MFU.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from tuneforge.config import Config
from tuneforge.errors import ModelError
from tuneforge.plan.hardware import GPUS, Device
from tuneforge.plan.memory import Settings
from tuneforge.plan.model import shape_from_hf_config
from tuneforge.plan.throughput import flops_per_token


def _words(name: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", name.lower()))


def gpu_row(torch_name: str) -> Device | None:
    """Plan's row for the GPU torch names (e.g. "NVIDIA H100 80GB HBM3" -> H100-80GB): every word of the row's name
    among the device name's words, the row with the most words winning; None when no row fits."""
    words = _words(torch_name)
    rows = [d for d in GPUS if _words(d.name) <= words]
    return max(rows, key=lambda d: len(_words(d.name)), default=None)


def model_flops_per_token(model_config: dict, cfg: Config) -> float:
    """Training FLOPs per real token of this model and adapter, without recomputation."""
    shape, _ = shape_from_hf_config(model_config)
    targets = cfg.lora.target_modules
    s = Settings(adapter="full" if cfg.adapter == "full" else "lora", lora_r=cfg.lora.r,
                 lora_targets=targets if isinstance(targets, str) else tuple(targets))
    return flops_per_token(shape, s, cfg.max_seq_len)


def mfu_meter(model_config: dict, cfg: Config, device: torch.device, dtype: torch.dtype) -> Callable[[float], dict]:
    """tokens/s -> {"mfu": share of peak} on a GPU in plan's table; {} elsewhere (the CPU, a GPU not in the table,
    a model plan cannot count, such as a mixture of experts)."""
    row = gpu_row(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    try:
        per_token = model_flops_per_token(model_config, cfg) if row else None
    except ModelError:
        per_token = None
    if row is None or per_token is None:
        return lambda tokens_per_s: {}
    peak = row.peak_flops({torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"))
    return lambda tokens_per_s: {"mfu": tokens_per_s * per_token / peak}
