"""Open a finished run: its config, its tokenizer (with the training template) and the tuned model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config import Config, config_from_dict
from tuneforge.errors import TuneforgeError
from tuneforge.methods.facts import method_facts
from tuneforge.models.adapter_files import adapter_weights
from tuneforge.methods.facts import function_at
from tuneforge.models.load import load_model
from tuneforge.models.resolve import resolve_base_model


@dataclass
class Run:
    dir: Path
    config: Config
    manifest: dict

    @property
    def final(self) -> Path:
        return self.dir / "final"

    @property
    def is_adapter(self) -> bool:
        return (self.final / "adapter_config.json").is_file()

    @property
    def stop_ids(self) -> list[int]:
        return self.manifest.get("stop_token_ids") or []


def open_run(path: str | Path, trust_remote_code: bool = False) -> Run:
    """A finished run, with its adapter checked to be safetensors.

    A run folder is data (it may have come from anyone), so its run.json never switches on code execution:
    `trust_remote_code` comes from the command line alone, and a run trained with remote code refuses without it.
    """
    run_dir = Path(path)
    manifest_path = run_dir / "run.json"
    if not manifest_path.is_file():
        raise TuneforgeError(f"{run_dir}: not a finished run (no run.json); train it first with `tuneforge train CONFIG`")
    manifest = json.loads(manifest_path.read_text())
    if not (run_dir / "final").is_dir():
        raise TuneforgeError(f"{run_dir}: the run has no final/ folder; resume it with `tuneforge train CONFIG --resume`")
    cfg = config_from_dict(manifest["config"], str(manifest_path), run_dir)
    if cfg.trust_remote_code and not trust_remote_code:
        raise TuneforgeError(f"{manifest_path}: the run was trained with trust_remote_code, so loading it runs Python "
                             "code from its model folder; pass --trust-remote-code if you trust that code")
    run = Run(run_dir, cfg.model_copy(update={"trust_remote_code": trust_remote_code}), manifest)
    if run.is_adapter:
        adapter_weights(run.final, str(run_dir))
    return run


def base_folder(run: Run) -> Path:
    folder = Path(run.manifest.get("base_model", {}).get("folder", ""))
    return folder if (folder / "config.json").is_file() else resolve_base_model(run.config.base_model)[0]


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it (half the memory for answering), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_processor(run: Run):
    """The run's tokenizer (with the training template), or its image processor: what its row reads inputs with."""
    return function_at(method_facts(run.config).processor)(run.final, "auto", run.config.trust_remote_code)


def load_base(run: Run, device: torch.device, dtype: torch.dtype, quantization=None, pad_token_id: int | None = None):
    """The run's base model with the run's head (a classifier's head sized for its classes, from run.json).
    `pad_token_id` defaults to the run's tokenizer's: a reward model's score head (run.json keeps no `head` for it)
    needs one on a base whose config has none, since transformers' own pooling finds each row's last token by it."""
    if pad_token_id is None:
        pad_token_id = getattr(load_processor(run), "pad_token_id", None)
    return load_model(base_folder(run), device, run.config.trust_remote_code, dtype, quantization,
                      method_facts(run.config).model_head, pad_token_id, run.manifest.get("head"))


def load_tuned(run: Run, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the base with the adapter on top (a QLoRA run's base quantized as in training),
    or the fully tuned weights."""
    tokenizer = load_processor(run)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if run.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(run, device, dtype, run.config.quantization, pad_id), str(run.final))
    else:
        model = load_model(run.final, device, run.config.trust_remote_code, dtype,
                           head=method_facts(run.config).model_head, pad_token_id=pad_id)
    model.eval()
    return model, tokenizer
