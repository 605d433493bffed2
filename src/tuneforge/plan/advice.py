"""What to change when a run does not fit, and settings known to train badly.

The search tries the changes practitioners reach for, cheapest first: a smaller micro-batch with
more accumulation (same effective batch, same maths), then activation checkpointing (full: a third
more compute; offload: also copies to CPU memory), then a quantised base (QLoRA) or an 8-bit
optimizer for full fine-tuning. Where the run lets each device choose its checkpointing
(activation_checkpointing auto), that choice is already made for every candidate.
"""

from __future__ import annotations

from dataclasses import replace

from tuneforge.methods.learning_rates import far_outside, range_words, training_kind
from tuneforge.plan.recompute import LEVELS, level, with_level
from tuneforge.plan.memory import Settings

MIN_EXAMPLES = 500
# LoRA's capacity grows with its rank; past a few million trained tokens per unit of rank the
# adapter, not the data, limits what is learnt (Biderman et al. 2024, "LoRA Learns Less and Forgets Less").
TOKENS_PER_RANK = 5_000_000
# A learning rate more than this many times beyond the usual range (methods/learning_rates.py) is warned of
# before the run: nearer than the diagnosis's (track/diagnose.py), which speaks once the run has started.
LR_FACTOR = 3.0
OVER_LENGTH_SHARE = 0.05


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _adapter_variants(s: Settings) -> list[tuple[Settings, list[str]]]:
    """The run as configured, then the memory-saving form of its adapter."""
    out = [(s, [])]
    if s.adapter == "lora":
        out.append((replace(s, adapter="qlora", bits=4, double_quant=True), ["adapter: qlora (4-bit NF4 base)"]))
    elif s.adapter == "qlora" and s.bits == 8:
        out.append((replace(s, bits=4, double_quant=True), ["quantization.bits: 4"]))
    elif s.adapter == "full" and s.optimizer == "adamw":
        out.append((replace(s, optimizer="adamw_8bit"), ["optimizer: adamw_8bit"]))
    return out


def _checkpointing_variants(s: Settings) -> list[tuple[Settings, list[str]]]:
    """The run's checkpointing, then the leaner levels; none where each device chooses it anyway."""
    out = [(s, [])]
    if s.checkpoint_choice == "given":
        for name in LEVELS[LEVELS.index(level(s)) + 1:]:
            if name != "selective":
                out.append((with_level(s, name), [f"performance.activation_checkpointing: {name}"]))
    return out


def candidates(s: Settings) -> list[tuple[Settings, list[str]]]:
    """Settings to try, in the order to prefer them, each with the config changes it takes.
    The effective batch (micro_batch x grad_accum) is kept."""
    batch = s.micro_batch * s.grad_accum
    out = []
    for base, adapter_changes in _adapter_variants(s):
        for checkpointed, checkpoint_changes in _checkpointing_variants(base):
            for mb in _halvings(s.micro_batch):
                ga = -(-batch // mb)
                changes = adapter_changes + checkpoint_changes
                if mb != s.micro_batch:
                    changes += [f"micro_batch_size: {mb}", f"grad_accum: {ga}"]
                out.append((replace(checkpointed, micro_batch=mb, grad_accum=ga), changes))
    return out


def settings_warnings(s: Settings, learning_rate: float, train_examples: float, trained_tokens: float,
                      over_share: float, max_seq_len: int, truncation: str) -> list[str]:
    """Settings that are known to train badly, each with what to do instead."""
    out = []
    if train_examples < MIN_EXAMPLES:
        out.append(f"only {train_examples:,.0f} training examples: fewer than ~{MIN_EXAMPLES} rarely teach a "
                   "behaviour that generalises (the model memorises them); add varied examples, and watch "
                   "val_loss for overfitting")
    if s.adapter != "full" and trained_tokens > s.lora_r * TOKENS_PER_RANK:
        out.append(f"lora.r={s.lora_r} is low for {trained_tokens / 1e6:,.0f}M trained tokens per epoch: the "
                   f"adapter limits what is learnt; try lora.r={_suggested_rank(trained_tokens)} (or adapter: full)")
    kind = training_kind(s.adapter, s.init)
    side = far_outside(learning_rate, s.family, kind, LR_FACTOR)
    if side is not None:
        effect = "expect a diverging loss or a damaged model" if side == "above" else "the run will barely move the weights"
        out.append(f"learning_rate {learning_rate:g} is far {side} the usual range for "
                   f"{range_words(s.family, kind)}; {effect}")
    if over_share > OVER_LENGTH_SHARE and truncation != "error":
        action = "dropped" if truncation == "drop" else "cut"
        out.append(f"{over_share:.0%} of the examples are longer than max_seq_len {max_seq_len} and are {action}; "
                   "raise max_seq_len if they matter")
    return out


def _suggested_rank(trained_tokens: float) -> int:
    rank = 8
    while rank * TOKENS_PER_RANK < trained_tokens and rank < 256:
        rank *= 2
    return rank
