"""evaluation.select_best: after training, every kept checkpoint is evaluated on the validation split and the
best one by the named metric becomes final/ (the last step is not always the best model). The winner's numbers
then serve as the after-evaluation too, where that would compute them again the same way.

On several processes every one of them loads and scores each checkpoint in the model it trained, and the
caller's `evaluate` broadcasts rank 0's numbers, so all take one decision and hold the winner's weights
before final/ is gathered. Rank 0 scoring alone in a model of its own would need a whole copy of a model
that FSDP shards because it does not fit one device, a second way to load a sharded checkpoint, and the
others waiting on it; this way the loop and this function are the same for any number of processes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tuneforge.config import SelectBestSpec
from tuneforge.eval.compare import metric_value
from tuneforge.models.adapters import folds_adapter
from tuneforge.train.checkpoints import list_checkpoints, load_checkpoint


def select_checkpoint(spec: SelectBestSpec | None, run_dir: Path, model, optimizer, evaluate: Callable[[], dict],
                      note: Callable[[str], None]) -> tuple[dict | None, dict | None]:
    """Load each kept checkpoint into `model`, score it with `evaluate()` (the held-out evaluation of the
    validation split), and leave the best one's weights in the model. Returns ({metric, mode, step, values}, the
    winner's held-out numbers), (None, None) when the config does not ask. The numbers are None where the
    after-evaluation differs: it folds a LoRA into the weights first, which changes them in their last bits.
    Ties go to the later step."""
    if spec is None:
        return None, None
    ckpts = {int(c.name.removeprefix("step-")): c for c in list_checkpoints(run_dir)}
    note(f"Choosing final/ among {len(ckpts)} checkpoint(s) by {spec.metric} on the validation split...")
    numbers = {}
    for step, ckpt in ckpts.items():
        load_checkpoint(ckpt, model, optimizer)
        numbers[step] = evaluate()
    values = {step: metric_value(held_out, spec.metric) for step, held_out in numbers.items()}
    sign = -1 if spec.lower_is_better else 1
    best = max(values, key=lambda s: (sign * values[s], s))
    if best != max(values):  # the newest is loaded already
        load_checkpoint(ckpts[best], model, optimizer)
    note(f"final/ is step {best} ({spec.metric} {values[best]:.4g}; the last step's: {values[max(values)]:.4g})")
    chosen = {"metric": spec.metric, "mode": "min" if spec.lower_is_better else "max", "step": best,
              "values": {str(s): v for s, v in values.items()}}
    return chosen, None if folds_adapter(model) else numbers[best]
