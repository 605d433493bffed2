"""Fold a LoRA adapter into its base weights and write an ordinary Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.models.run import Run, load_tuned
from tuneforge.train.outputs import save_final, write_json


def merge_run(run: Run, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Merged weights (merged in fp32, saved in `dtype`), tokenizer, chat template and stop tokens, plus run.json."""
    if not run.is_adapter:
        raise TuneforgeError(f"{run.dir}: the run trained all weights; {run.final} is already a full model folder")
    model, tokenizer = load_tuned(run, torch.device("cpu"))
    deltas = [m.get_delta_weight("default").abs().max().item() for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A") and "default" in m.lora_A]
    if not deltas or max(deltas) == 0.0:
        raise TuneforgeError(f"{run.final}: the adapter's update is zero everywhere; merging would write the base model unchanged")
    merged = model.merge_and_unload().to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_final(merged, tokenizer, out, run.stop_ids)
    write_json(out / "run.json", {**run.manifest, "merged_from": str(run.final)})
    return out
