"""Memory and utilisation of the machine, read cheaply once a step.

On a GPU: memory allocated, reserved and peak from PyTorch's allocator, and utilisation through
NVML when `nvidia-ml-py` is installed. On CPU: the process's resident memory (RSS).
"""

from __future__ import annotations

import os
import resource
import sys

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MB = 1024 * 1024


def rss_mb() -> float:
    """Resident memory now: /proc on Linux (one small read); elsewhere the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / MB
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def gpu_utilisation(device: torch.device) -> float | None:
    """Share of the last sample period the GPU was busy (0-1), or None without NVML."""
    try:
        return torch.cuda.utilization(device) / 100.0
    except Exception:  # no pynvml, or NVML not usable on this machine
        return None


def system_stats(device: torch.device) -> dict[str, float]:
    """The step record's memory and utilisation keys for this device."""
    out = {"rss_mb": rss_mb()}
    if device.type == "cuda":
        out["gpu_mem_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        out["gpu_mem_reserved_mb"] = torch.cuda.memory_reserved(device) / MB
        out["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        util = gpu_utilisation(device)
        if util is not None:
            out["gpu_util"] = util
    return out


def throughput(totals: dict[str, int], data_s: float, step_s: float) -> dict[str, float]:
    """Real (non-padding) tokens the model read (GRPO's rollouts included) and their rate, the padding
    share of what it read, and the data-loader wait share of a step."""
    tokens = totals["input_tokens"]
    return {"tokens": tokens, "tokens_per_s": tokens / step_s, "step_s": step_s, "data_share": data_s / step_s,
            "padding_share": 1 - tokens / max(totals["input_positions"], 1)}
