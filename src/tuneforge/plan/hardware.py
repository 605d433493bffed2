"""The machines plan compares: memory, peak matmul rate, memory bandwidth, the share of peak that
training reaches (MFU), and an hourly price from an editable YAML table.

Peak rates are the vendors' dense (no sparsity) tensor-core figures with fp32 accumulation. MFU is
what tuneforge's loop (Hugging Face model, SDPA attention, no kernel fusion) is expected to reach;
`mfu_measured` says whether a value comes from bench/PLAN_CALIBRATION.md or is still a prior.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import yaml

from tuneforge.config import read_yaml
from tuneforge.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Device:
    """One accelerator (or this machine's CPU)."""

    name: str
    memory_gib: float  # what the device reports as total (nvidia-smi), not the marketing number
    bf16_tflops: float  # dense; where bf16 is only emulated (T4) this is the rate it really runs at
    fp16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    mfu: float
    mfu_measured: bool = False
    bf16: bool = True  # native bf16 tensor cores
    overhead_gib: float = 1.0  # CUDA context, cuBLAS workspace, allocator slack not in the model
    price: float | None = None  # per hour; None: not priced
    note: str = ""

    @property
    def is_cpu(self) -> bool:
        return self.name == "CPU"

    def peak_flops(self, compute: str) -> float:
        """Matmul FLOP/s at this compute dtype."""
        tflops = {"bf16": self.bf16_tflops, "fp16": self.fp16_tflops, "fp32": self.fp32_tflops}[compute]
        return tflops * 1e12

    def usable_bytes(self) -> float:
        return (self.memory_gib - self.overhead_gib) * GIB


# MFU priors: Hugging Face models with SDPA and no fused kernels reach roughly a third of peak on
# datacenter GPUs at 2k-token micro-batches. They are not yet measured (see bench/PLAN_CALIBRATION.md).
GPUS: tuple[Device, ...] = (
    Device("H100-80GB", 79.6, 989, 989, 67, 3350, 0.35),
    Device("H200", 140.4, 989, 989, 67, 4800, 0.35),
    Device("A100-80GB", 80.0, 312, 312, 19.5, 2039, 0.40),
    Device("A100-40GB", 40.0, 312, 312, 19.5, 1555, 0.40),
    Device("L40S", 45.0, 362, 362, 91.6, 864, 0.35),
    Device("A10G", 22.5, 70, 70, 35, 600, 0.35),
    Device("RTX-4090", 24.0, 165, 165, 82.6, 1008, 0.35),
    Device("RTX-3090", 24.0, 71, 71, 35.6, 936, 0.35),
    Device("T4", 15.0, 8.1, 65, 8.1, 320, 0.30, bf16=False,
           note="T4 has no bf16 tensor cores: precision auto runs bf16 emulated at about the fp32 rate; "
                "precision: fp16 uses its 65 TFLOP/s"),
)

# This machine's CPU: FLOP/s from its cores and vector width, memory from its RAM. The MFU is the
# one that fits the six CPU rows of bench/PLAN_CALIBRATION.md (one AVX-512 core of the CI machine,
# fp32, within 8% of every row); more cores are assumed to scale linearly.
CPU_MFU = 0.445
CPU_CLOCK_GHZ = 2.5  # assumed; /proc/cpuinfo's "cpu MHz" is used where it is readable
RUNTIME_RSS_GIB = 0.8  # torch, transformers and the tokenizer in a training process
CPU_BANDWIDTH_GBS_PER_CORE = 10.0  # memory bandwidth one core draws, for the optimizer step


def cpu_facts() -> tuple[int, int, float]:
    """(cores this process may use, fp32 FLOPs a core a cycle, GHz) of this machine: two FMA units
    of the widest vector the flags in /proc/cpuinfo show; the clock from its "cpu MHz"."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    found = set(flags.group(1).split()) if flags else set()
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    per_cycle = 64 if "avx512f" in found else 32 if "fma" in found else 8
    return cores, per_cycle, float(mhz.group(1)) / 1000 if mhz else CPU_CLOCK_GHZ


def ram_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_device(cores: int | None = None, memory_gib: float | None = None, per_cycle: int | None = None,
               ghz: float | None = None) -> Device:
    """This machine's CPU, or one described by the arguments: its fp32 FMA rate and its RAM."""
    if cores is None or per_cycle is None or ghz is None:
        found = cpu_facts()
        cores, per_cycle, ghz = cores or found[0], per_cycle or found[1], ghz or found[2]
    if memory_gib is None:
        memory_gib = ram_bytes() / GIB
    tflops = cores * per_cycle * ghz / 1000
    return Device("CPU", round(memory_gib, 1), tflops, tflops, tflops, CPU_BANDWIDTH_GBS_PER_CORE * cores, CPU_MFU,
                  mfu_measured=True, bf16=False, overhead_gib=RUNTIME_RSS_GIB,
                  note=f"this machine: {cores} cores, {tflops * 1000:.0f} GFLOP/s fp32 peak")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def load_prices(path: str | Path | None = None) -> dict[str, float | None]:
    """Hourly prices by device name: the shipped table, with a user's file laid over it."""
    shipped = yaml.safe_load(resources.files("tuneforge.plan").joinpath("prices.yaml").read_text())
    prices = dict(shipped["prices"])
    if path is None:
        return prices
    path = Path(path)
    raw = read_yaml(path, "--prices file")
    table = raw.get("prices", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"--prices: {path} must map device names to hourly prices, e.g. `H100-80GB: 2.49`")
    known = {_key(n): n for n in prices}
    for name, value in table.items():
        if _key(str(name)) not in known:
            raise ConfigError(f"--prices: {path}: unknown device {name!r}; known: {', '.join(prices)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"--prices: {path}: {name}: the price must be a number >= 0 per hour (or null), got {value!r}")
        prices[known[_key(str(name))]] = None if value is None else float(value)
    return prices


def devices(names: list[str] | None = None, prices: dict[str, float | None] | None = None) -> list[Device]:
    """The GPU table and this machine's CPU, priced; `names` picks some by case-insensitive part of
    the name (`a100` gives both A100s)."""
    table = [*GPUS, cpu_device()]
    if prices:
        table = [replace(d, price=prices.get(d.name)) for d in table]
    if not names:
        return table
    picked = []
    for name in names:
        found = [d for d in table if _key(name) in _key(d.name)]
        if not found:
            raise ConfigError(f"--gpu {name}: no such device; known: {', '.join(d.name for d in table)}")
        picked += [d for d in found if d not in picked]
    return picked
