"""Activation checkpointing levels, and the level a device's memory allows.

The loop (fast.switches.resolve) and `tuneforge plan` choose with the same functions, so plan shows the peak
of what a run will do. auto takes the least checkpointing whose predicted peak (plan.memory) fits
FIT_SHARE of the GPU: none, then selective with as few layers as fit, then full, then offload.
min_memory takes full, and offload only where full does not fit: offload copies every layer input to
CPU memory and back each step, which costs time and pinned RAM for memory that full rarely needs.
On a CPU nothing is offloaded (the activations are in that memory already) and auto checkpoints
nothing, as RAM is rarely the limit. Pure Python: plan never imports torch.
"""

from __future__ import annotations

from dataclasses import replace

from tuneforge.plan.memory import FIT_SHARE, Settings, checkpointed_layers, live_layers, memory
from tuneforge.plan.shapes import ModelShape

LEVELS = ("none", "selective", "full", "offload")
CPU_EVERY = 2  # selective without checkpoint_every on a CPU, where no budget sizes it: every other layer


def requested(cfg) -> tuple[str, int | None]:
    """What the config asks for: (a level, checkpoint_every), or ("budget" | "lean", None) for the device
    to choose. Reads keys an older config may lack with their defaults."""
    perf = cfg.performance
    level = getattr(perf, "activation_checkpointing", "auto")
    if level != "auto":
        return level, getattr(perf, "checkpoint_every", None)
    if getattr(cfg, "gradient_checkpointing", False):
        return "full", None  # the key users bring from other tools
    return {"auto": "budget", "min_memory": "lean", "off": "none"}[perf.mode], None


def level(s: Settings) -> str:
    """The level these settings checkpoint at."""
    if not s.checkpointing:
        return "none"
    if s.offload:
        return "offload"
    return "full" if s.checkpoint_every == 1 else "selective"


def with_level(s: Settings, name: str, every: int = 1) -> Settings:
    """The settings at one level (every: selective's k)."""
    return replace(s, checkpointing=name != "none", offload=name == "offload",
                   checkpoint_every=every if name == "selective" else 1, checkpoint_choice="given")


def from_request(s: Settings, request: str, every: int | None) -> Settings:
    """Settings for what the config asks; a choice left to the device is kept in checkpoint_choice."""
    if request in ("budget", "lean") or (request == "selective" and every is None):
        return replace(with_level(s, "none"), checkpoint_choice=request)
    return with_level(s, request, every or 1)


def least_first(shape: ModelShape, s: Settings) -> list[Settings]:
    """Every level from the least checkpointing to the most: none, selective with 1, 2, ... checkpointed
    layers, full, offload. Of the k that checkpoint as many layers, the one that keeps the fewest alive
    (the last layer not among them: it would be recomputed while the others still hold theirs)."""
    by_count: dict[int, Settings] = {}
    for every in range(shape.layers, 1, -1):
        option = with_level(s, "selective", every)
        count = checkpointed_layers(shape, option)
        if count not in by_count or live_layers(shape, option) < live_layers(shape, by_count[count]):
            by_count[count] = option
    selective = [by_count[count] for count in sorted(by_count)]
    return [with_level(s, "none"), *selective, with_level(s, "full"), with_level(s, "offload")]


def for_device(shape: ModelShape, s: Settings, memory_bytes: float, is_cpu: bool, compute: str) -> Settings:
    """The checkpointing a run of these settings uses on a device with this much memory (its total), with
    the kernels it runs there (by default on a GPU only: fast.kernels_default), which change what fits."""
    if s.kernels is None:
        s = replace(s, kernels=not is_cpu)
    choice = s.checkpoint_choice
    if is_cpu:  # nothing to offload to; no budget
        if choice == "given":
            return replace(s, offload=False)
        return with_level(s, {"budget": "none", "lean": "full"}.get(choice, "selective"), CPU_EVERY)
    if choice == "given":
        return s
    budget = FIT_SHARE * memory_bytes

    def fits(option: Settings) -> bool:
        return memory(shape, option, compute).peak <= budget

    if choice == "lean":
        full = with_level(s, "full")
        return full if fits(full) else with_level(s, "offload")
    options = least_first(shape, s)
    if choice == "selective":  # the largest k that fits, or every layer
        options = [o for o in options if level(o) == "selective"] + [with_level(s, "selective", 1)]
    return next((o for o in options if fits(o)), options[-1])


def describe(shape: ModelShape, s: Settings) -> str:
    """The level in a few words: 'none', 'selective 8/32', 'full', 'offload'."""
    name = level(s)
    return f"selective {checkpointed_layers(shape, s)}/{shape.layers}" if name == "selective" else name
