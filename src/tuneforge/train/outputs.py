"""What a run leaves behind: final/ (adapter or weights + tokenizer + template) and run.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from tuneforge.output_folders import output_folder

# What a run writes at the top of its output_dir: a new run refuses a folder that has any of them
# and is not marked as a run's, since it would replace them.
RUN_ENTRIES = ("run.json", "run_started.json", "metrics.jsonl", "diagnosis.jsonl", "rejected.jsonl", "eval_before.json",
               "eval_after.json", "trackers.json", "checkpoints", "final", "best", "tensorboard", "wandb")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import peft
    import transformers

    import tuneforge

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tuneforge": tuneforge.__version__,
    }


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_final(model, tokenizer, out: Path, stop_ids: list[int], initial_adapter: Path | None = None,
               state_dict: dict | None = None, write=None) -> Path:
    """final/: written beside it and renamed into place; replaces only an earlier final/ that tuneforge wrote.
    `write` fills it (a row's `final` function; default write_final)."""
    with output_folder(out, "final", overwrite=True) as tmp:
        (write or write_final)(model, tokenizer, tmp, stop_ids, initial_adapter, state_dict)
    return out


def write_final(model, tokenizer, folder: Path, stop_ids: list[int], initial_adapter: Path | None = None,
                state_dict: dict | None = None) -> None:
    """An adapter (PEFT format, safetensors) or full weights, beside the tokenizer, chat template and stop tokens.

    `initial_adapter`: a PiSSA/OLoRA run's adapter as initialised; the saved adapter is then the
    difference, as plain LoRA of twice the rank that applies to the original base weights.
    `state_dict`: whole tensors gathered from a sharded (FSDP) model, written instead of the model's own.
    """
    from transformers import GenerationConfig

    convert = {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter else {}
    if state_dict is not None:
        convert["state_dict"] = state_dict
    model.save_pretrained(folder, safe_serialization=True, **convert)
    tokenizer.save_pretrained(folder)  # or an image classifier's image processor
    if not stop_ids:  # a model that does not generate (a classifier, an encoder) has no generation config
        return
    gen = GenerationConfig(
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    gen.save_pretrained(folder)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def run_manifest(cfg_dict: dict, **facts) -> dict:
    """The facts needed to rerun and trust a run."""
    return {
        "config": cfg_dict,
        "versions": versions(),
        "git_sha": git_sha(),
        "command": " ".join(sys.argv),
        "host": platform.node(),
        **facts,
    }
