"""What trains: LoRA-family settings for PEFT, frozen weights for full fine-tuning, and the report of both.

R-FEAT-4: a run states which linear-like weights it adapted (or trains) and which it skipped, grouped
by name, so a target list that silently misses most of the model (fused MoE experts, a typo'd
module list, a layer filter) is seen before any step is taken.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from tuneforge.config import Config
from tuneforge.errors import ConfigError

# Above this share of linear-like weights (by parameter count, output head and embeddings left
# out) being skipped, the report carries a warning.
SKIPPED_WARNING_SHARE = 0.25
# Where a PiSSA/OLoRA run keeps its adapter as initialised; the final save subtracts it.
INITIAL_ADAPTER = "adapter_init"
_LAYER = re.compile(r"\.(?:layers|h|block|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter or module belongs to, from its dotted name."""
    m = _LAYER.search(f".{name}.")
    return int(m.group(1)) if m else None


def is_linear_like(module: torch.nn.Module) -> bool:
    """Modules holding a matmul weight: nn.Linear (quantized bitsandbytes layers subclass it), GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def weight_size(module: torch.nn.Module) -> int:
    """Parameters of a linear-like weight as trained, not as stored (4-bit weights pack two per byte)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features * module.out_features
    return module.weight.numel()


def linear_module_names(model, layers: list[int] | None = None) -> list[str]:
    """Leaf names of the linear layers inside decoder layers (optionally only `layers`): what all-linear means."""
    names = set()
    for name, module in model.named_modules():
        idx = layer_index(name)
        if idx is not None and is_linear_like(module) and (layers is None or idx in layers):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def group_name(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj: one line per kind of weight."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _outside_body(model) -> set[int]:
    """Output head and embeddings: never counted in the skipped share (LoRA on them is unusual)."""
    out = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if fn else None
        if module is not None:
            out.add(id(module))
    return out


def _plain_name(name: str) -> str:
    """A module's name in the base model: without PEFT's wrapper prefix and base_layer segments."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _weights(name: str, module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, int]]:
    """(name, weight, size) of the linear-like weights a module holds itself, fused 3-D experts included."""
    found = [(name, module.weight, weight_size(module))] if is_linear_like(module) else []
    return found + [(f"{name}.{n}", p, p.numel()) for n, p in module.named_parameters(recurse=False) if p.ndim == 3]


def adapted_modules(model, full: bool = False) -> dict:
    """Linear-like weights that train (LoRA-wrapped, or trainable under full) and those skipped, grouped.

    Fused MoE experts (3-D parameters) count as linear-like: PEFT adapts them through target_parameters
    when it can, and they are listed as skipped when it does not.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    outside = _outside_body(model)
    adapted, skipped, excluded, sizes = Counter(), Counter(), Counter(), Counter()
    covered: set[str] = set()
    for name, module in model.named_modules():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue  # the adapter's own matrices
        plain = _plain_name(name)
        if isinstance(module, BaseTunerLayer):
            base, pname = module.get_base_layer(), getattr(module, "parameter_name", None)
            wname = f"{plain}.{pname}" if pname else plain
            covered.add(wname)
            adapted[group_name(wname)] += 1
            sizes["adapted"] += getattr(base, pname).numel() if pname else weight_size(base)
            continue
        for wname, weight, size in _weights(plain, module):
            if wname in covered:
                continue
            trains = full and weight.requires_grad
            if trains:
                adapted[group_name(wname)] += 1
                sizes["adapted"] += size
            elif id(module) in outside:
                excluded[group_name(wname)] += 1
            else:
                skipped[group_name(wname)] += 1
                sizes["skipped"] += size
    body = sizes["adapted"] + sizes["skipped"]
    share = sizes["skipped"] / body if body else 0.0
    report = {
        "adapted": dict(sorted(adapted.items())), "skipped": dict(sorted(skipped.items())),
        "not_counted": dict(sorted(excluded.items())),
        "adapted_weights": sizes["adapted"], "skipped_weights": sizes["skipped"], "skipped_share": round(share, 4),
        "warning": None,
    }
    if not full and share > SKIPPED_WARNING_SHARE:
        report["warning"] = (
            f"{100 * share:.0f}% of the linear-like weights (output head and embeddings not counted) get no adapter: "
            f"{', '.join(report['skipped'])}. If that is not what you meant, use lora.target_modules: all-linear "
            "and drop lora.layers."
        )
    return report


def describe_adapted(report: dict, full: bool = False) -> str:
    """The report as terminal lines: groups with counts, then the warning if any."""
    verb = "Training" if full else "Adapted"
    lines = [f"{verb} {sum(report['adapted'].values())} linear-like weights "
             f"({report['adapted_weights']:,} parameters):"]
    lines += [f"  {name} x{n}" for name, n in report["adapted"].items()]
    if report["skipped"]:
        lines.append(f"{'Frozen' if full else 'Skipped'} {sum(report['skipped'].values())} "
                     f"({100 * report['skipped_share']:.0f}% of the parameters in linear-like weights):")
        lines += [f"  {name} x{n}" for name, n in report["skipped"].items()]
    if report["not_counted"]:
        lines.append("Not adapted, not counted: " + ", ".join(report["not_counted"]))
    if report["warning"]:
        lines.append(f"[yellow]warning: {report['warning']}[/yellow]")
    return "\n".join(lines)


def freeze_matches(pattern: str, name: str) -> bool:
    """Whether a `freeze` entry covers a parameter: layers.N-M, a glob, or a dotted module name."""
    from tuneforge.config import parse_layer_range

    m = re.fullmatch(r"layers\.(\d+(?:-\d+)?)", pattern)
    if m:
        return layer_index(name) in parse_layer_range(m.group(1))
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


def apply_freeze(model, patterns: list[str]) -> None:
    """Everything trains except what `freeze` names; an entry that matches nothing is a config error."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    for i, pattern in enumerate(patterns):
        hits = [n for n in params if freeze_matches(pattern, n)]
        if not hits:
            example = next(iter(params), "")
            raise ConfigError(f"freeze[{i}]: {pattern!r} matches no weight of this model; give a module name "
                              f"(embed_tokens, lm_head), a glob over names like {example!r}, or a range like layers.0-3")
        for n in hits:
            params[n].requires_grad_(False)
    if not any(p.requires_grad for p in params.values()):
        raise ConfigError("freeze: every weight of the model is frozen, so nothing would train; freeze fewer")


def train_in_fp32(model) -> None:
    """Hold every weight that trains in fp32. PEFT makes its LoRA matrices fp32 itself, but copies a head it
    trains whole (modules_to_save: a reward model's or classifier's score head) in the base's dtype, bf16 under
    LoRA/QLoRA on a GPU, where AdamW's small updates would round away; autocast still runs its matmul in bf16."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def initial_adapter_dir(cfg: Config) -> Path | None:
    """Where a PiSSA/OLoRA run keeps its initial adapter, so the final adapter can be saved as plain LoRA."""
    if cfg.adapter == "full" or not cfg.lora.changes_base:
        return None
    return Path(cfg.output_dir) / INITIAL_ADAPTER


def peft_init(init: str) -> bool | str:
    """Our lora.init name as PEFT's init_lora_weights value."""
    return True if init == "default" else init


def check_layers(model, layers: list[int] | None) -> None:
    """lora.layers must name decoder layers that exist in this model."""
    if layers is None:
        return
    present = {layer_index(n) for n, _ in model.named_modules()} - {None}
    missing = sorted(set(layers) - present)
    if missing:
        raise ConfigError(f"lora.layers: the model has decoder layers 0-{max(present, default=-1)}, "
                          f"so {missing} do not exist")


def folds_adapter(model) -> bool:
    """Whether adapter_merged changes this model's weights (in their last bits): a LoRA on an unquantized base."""
    quantized = any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    return hasattr(model, "merge_adapter") and not quantized


@contextmanager
def adapter_merged(model):
    """LoRA folded into the base weights while the block runs, then taken out again: generating through
    merged weights skips each adapted layer's two extra matmuls (evaluation at the base model's speed).
    A quantized base is left as it is, since folding into 4- or 8-bit weights rounds them; PEFT itself
    unmerges if the block turns the adapter off (a preference method's reference)."""
    if not folds_adapter(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()

