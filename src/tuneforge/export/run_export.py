"""`tuneforge export RUN --to hf|adapter|gguf|ollama`: the run in the format a serving stack reads.

Every artefact carries the training chat template, every end-of-turn token as a stop token, the
run's run.json and a model card, so it behaves in vLLM, llama.cpp or Ollama as it did in evaluation.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.export.merge import check_target, merge_facts, merge_run
from tuneforge.methods.facts import function_at, method_facts, row_key
from tuneforge.output_folders import output_folder
from tuneforge.models.run import Run
from tuneforge.track.card import model_card as card_text
from tuneforge.train.outputs import write_json

TARGETS = ("hf", "adapter", "gguf", "ollama")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def model_card(run: Run, kind: str) -> str:
    """README.md: what this model is, how it was made, how it scored (the suite too), how to load it."""
    return card_text(run.manifest, run.dir.name, adapter=kind == "adapter")


def _finish(run: Run, out: Path, kind: str, merge: dict | None = None) -> Path:
    extra = {"merge": merge} if merge else {}
    write_json(out / "run.json", {**run.manifest, "exported_as": kind, **extra})
    (out / "README.md").write_text(model_card(run, kind))
    return out


def export_hf(run: Run, out: Path, dtype: str = "bfloat16", merge_target: str | None = None) -> Path:
    """A merged Hugging Face folder (vLLM, TGI, SGLang, transformers)."""
    if dtype not in DTYPES:
        raise TuneforgeError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if not run.is_adapter:
        shutil.copytree(run.final, out, dirs_exist_ok=True)
        return _finish(run, out, "hf")
    target = check_target(run, merge_target)
    merge_run(run, out, DTYPES[dtype], target)
    return _finish(run, out, "hf", merge_facts(run, target, DTYPES[dtype]))


def export_adapter(run: Run, out: Path) -> Path:
    """The PEFT adapter folder (multi-LoRA serving: vLLM --lora-modules, PEFT)."""
    if not run.is_adapter:
        raise TuneforgeError(f"{run.dir}: the run trained all weights, there is no adapter; use --to hf")
    shutil.copytree(run.final, out, dirs_exist_ok=True)
    return _finish(run, out, "adapter")


def _pre_fallback(run: Run) -> str | None:
    """The tokenizer's llama.cpp name when the base came from a GGUF file that says it."""
    source = run.manifest.get("base_model", {}).get("source", "")
    if "gguf" not in source and "built-in" not in source:
        return None
    import gguf

    from tuneforge.models.resolve import BUILTIN_MODELS, builtin_gguf

    name = run.config.base_model.lower()
    path = builtin_gguf(name) if name in BUILTIN_MODELS else Path(run.config.base_model)
    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def export_gguf(run: Run, out: Path, quant: str = "q8_0", merge_target: str | None = None) -> Path:
    """One .gguf file in `out`, written from the merged fp32 weights."""
    from tuneforge.export.gguf import write_gguf

    target = check_target(run, merge_target) if run.is_adapter else None
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        merged = merge_run(run, Path(tmp) / "merged", target=target) if run.is_adapter else run.final
        chat_template = run.manifest.get("chat_template")
        path = write_gguf(merged, out / f"{run.dir.name}-{quant}.gguf", quant, chat_template, run.stop_ids,
                          run.dir.name, _pre_fallback(run))
    _finish(run, out, "gguf", merge_facts(run, target, torch.float32) if target else None)
    return path


def export_ollama(run: Run, out: Path, quant: str = "q8_0", system: str | None = None,
                  merge_target: str | None = None) -> Path:
    """A GGUF file and a Modelfile beside it: `ollama create NAME -f Modelfile`."""
    from tuneforge.export.ollama import modelfile
    from tuneforge.models.load import load_tokenizer

    path = export_gguf(run, out, quant, merge_target)
    tokenizer = load_tokenizer(run.final)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in run.stop_ids]
    (out / "Modelfile").write_text(modelfile(path.name, tokenizer, stops, system))
    return out


def check_format(run: Run, to: str) -> None:
    """Refuse, before any work, a format the run cannot be written in: llama.cpp and Ollama run language models
    only, not a classifier's, reward model's or encoder's head."""
    if to not in TARGETS:
        raise TuneforgeError(f"--to {to}: expected one of {', '.join(TARGETS)}")
    facts = method_facts(run.config)
    if to in ("gguf", "ollama") and facts.model_head != "causal_lm":
        raise TuneforgeError(f"--to {to}: {run.dir} is a {row_key(run.config)} run (a {facts.model_head} head), which llama.cpp "
                             "and Ollama do not run as trained; use --to hf (or adapter)")


def export_run(run: Run, to: str, out: Path, quant: str = "q8_0", dtype: str = "bfloat16",
               system: str | None = None, merge_target: str | None = None, overwrite: bool = False) -> Path:
    """`merge_target` (hf, gguf, ollama): dequantized or original base; default dequantized for QLoRA runs.

    `out` must be new or empty; `overwrite` replaces an earlier export there (never another folder)."""
    check_format(run, to)
    with output_folder(out, "export", overwrite) as tmp:
        if to == "hf":
            path = export_hf(run, tmp, dtype, merge_target)
        elif to == "adapter":
            path = export_adapter(run, tmp)
        elif to == "gguf":
            path = export_gguf(run, tmp, quant, merge_target)
        else:
            path = export_ollama(run, tmp, quant, system, merge_target)
    return out / path.relative_to(tmp)


def verify_run_export(run: Run, to: str, path: Path, quant: str = "q8_0", dtype: str = "bfloat16") -> dict:
    """Reload an export in a fresh process and compare it with the tuned model as its row says (methods/facts.py
    `verify`: held-out perplexity, or an embedding run's sentence vectors)."""
    if to == "ollama":
        path = next(path.glob("*.gguf"))
    weights = {"hf": dtype, "adapter": "float32"}.get(to, quant)
    return function_at(method_facts(run.config).verify)(run, path, weights)
