"""Fold a LoRA adapter into its base weights and write an ordinary Hugging Face folder.

A QLoRA adapter learned to correct the *quantized* base, so its default merge target is that base
dequantized with the run's own quantization config (R-MRG-1): W = dequant(quant(W0)) + scale·B·A,
added in fp32 and only then cast. `original` merges onto the 16-bit checkpoint instead; which one
was used is written into the output's run.json (R-MRG-2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.output_folders import check_out, output_folder
from tuneforge.methods.facts import function_at, method_facts
from tuneforge.models.run import Run, load_base, load_processor
from tuneforge.train.outputs import write_json

MERGE_TARGETS = ("dequantized", "original")


def default_target(run: Run) -> str:
    """dequantized for runs trained on a quantized base, original otherwise."""
    return "dequantized" if run.config.quantization is not None else "original"


def check_target(run: Run, target: str | None) -> str:
    """The merge target to use, or an error saying which ones this run has."""
    target = target or default_target(run)
    if target not in MERGE_TARGETS:
        raise TuneforgeError(f"--merge-target {target}: expected one of {', '.join(MERGE_TARGETS)}")
    if target == "dequantized" and run.config.quantization is None:
        raise TuneforgeError(f"--merge-target dequantized: {run.dir} trained on an unquantized base "
                             f"(adapter: {run.config.adapter}), so the only target is original")
    return target


def merge_base(run: Run, target: str):
    """The fp32 base weights the adapter is added to."""
    if target == "dequantized":  # quantized with the run's config (and the run's head), then dequantized (R-MRG-1)
        return load_base(run, torch.device("cpu"), torch.float32, run.config.quantization).dequantize(dtype=torch.float32)
    return load_base(run, torch.device("cpu"), torch.float32)


def merged_model(run: Run, target: str):
    """Base + adapter folded in fp32 (PEFT's merge: W + scale·B·A); refuses an adapter that changes nothing."""
    from peft import PeftModel

    if not run.is_adapter:
        raise TuneforgeError(f"{run.dir}: the run trained all weights; {run.final} is already a full model folder")
    model = PeftModel.from_pretrained(merge_base(run, target), str(run.final))
    deltas = [m.get_delta_weight("default").abs().max().item() for m in model.modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A") and "default" in m.lora_A]
    if not deltas or max(deltas) == 0.0:
        raise TuneforgeError(f"{run.final}: the adapter's update is zero everywhere; merging would write the base model unchanged")
    return model.merge_and_unload()


def merge_facts(run: Run, target: str, dtype: torch.dtype) -> dict:
    """What the merged weights are, for the output's run.json."""
    q = run.config.quantization
    return {"target": target, "dtype": str(dtype).removeprefix("torch."),
            "base_quantization": q.model_dump() if q is not None and target == "dequantized" else None}


def merge_run(run: Run, out: Path, dtype: torch.dtype = torch.float32, target: str | None = None,
              overwrite: bool = False) -> Path:
    """Merged weights (merged in fp32, saved in `dtype`), tokenizer, chat template and stop tokens, plus run.json.

    `out` must be new or empty; `overwrite` replaces an earlier merge output there (never another folder)."""
    if not run.is_adapter:
        raise TuneforgeError(f"{run.dir}: the run trained all weights; {run.final} is already a full model folder")
    target = check_target(run, target)
    check_out(out, "merge", overwrite)
    tokenizer = load_processor(run)
    merged = merged_model(run, target).to(dtype)
    with output_folder(out, "merge", overwrite) as tmp:
        function_at(method_facts(run.config).final)(merged, tokenizer, tmp, run.stop_ids)
        write_json(tmp / "run.json", {**run.manifest, "merged_from": str(run.final), "merge": merge_facts(run, target, dtype)})
    return out
