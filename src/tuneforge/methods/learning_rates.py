"""The usual learning rates by method family and kind of training, in one table: `tuneforge plan`'s advice
and the run's diagnosis (track/diagnose.py) judge a config's learning_rate against the same ranges.

A kind of training is what the weights start from and which of them train: "lora" (an adapter on a frozen
trained model, QLoRA too), "full" (every weight of a trained model) or "scratch" (every weight of a model
built at random, init: random). Torch-free: plan reads it.
"""

from __future__ import annotations

# From random weights, whatever the objective: about 6e-4 for a GPT-2-sized model, 1e-3 to 3e-3 for a model of
# a few million parameters (nanoGPT's recipes); far above what a trained model tolerates.
SCRATCH = (1e-4, 3e-3)
# (family, kind) -> (lowest, highest) usual learning rate; the family is a method's `lr_family` (methods/facts.py).
# From the methods' papers and common recipes.
USUAL_LR = {
    ("sft", "lora"): (1e-5, 5e-4), ("sft", "full"): (5e-6, 5e-5),
    ("preference", "lora"): (5e-7, 1e-4), ("preference", "full"): (1e-7, 1e-5),
    ("grpo", "lora"): (1e-6, 1e-4), ("grpo", "full"): (1e-7, 5e-6),
    ("classifier", "lora"): (1e-5, 5e-3), ("classifier", "full"): (5e-6, 1e-4),
    ("pretrain", "lora"): (1e-5, 5e-4), ("pretrain", "full"): (1e-5, 3e-4),  # continued pre-training
    **{(family, "scratch"): SCRATCH for family in ("sft", "preference", "grpo", "classifier", "pretrain")},
}


def training_kind(adapter: str, init: str = "pretrained") -> str:
    """lora | full | scratch: the row of USUAL_LR a run's adapter and init select (QLoRA trains as LoRA)."""
    if init == "random":
        return "scratch"
    return "full" if adapter == "full" else "lora"


def kind_words(kind: str, family: str) -> str:
    """The kind of training in words, as plan and the diagnosis name it."""
    if kind == "scratch":
        return "training from random weights"
    if kind == "lora":
        return "LoRA"
    return "continued pre-training of the full weights on raw text" if family == "pretrain" else "full fine-tuning"


def range_words(family: str, kind: str) -> str:
    """The usual range in words: "full fine-tuning with sft methods (5e-06 to 5e-05)"."""
    low, high = USUAL_LR[(family, kind)]
    alone = kind == "scratch" or (kind, family) == ("full", "pretrain")  # the words already say which
    return f"{kind_words(kind, family)}{'' if alone else f' with {family} methods'} ({low:g} to {high:g})"


def far_outside(lr: float, family: str, kind: str, factor: float) -> str | None:
    """"above" or "below" when `lr` is more than `factor` times beyond the usual range, else None."""
    low, high = USUAL_LR[(family, kind)]
    if lr > high * factor:
        return "above"
    if lr < low / factor:
        return "below"
    return None
