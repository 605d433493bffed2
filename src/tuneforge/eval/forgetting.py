"""Forgetting check: perplexity on general text, so a fine-tune that costs general ability is caught."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tuneforge.errors import DataError, read_utf8
from tuneforge.models.precision import autocast_for

ADVICE = ("mix 5-20% general data into training (a second dataset with `ratio: 0.1`), lower the learning rate "
          "or train fewer steps")


def general_text(path: str | Path) -> str:
    """The file's text: plain text as it is, a .jsonl file's `text` fields joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"evaluation.forgetting.path: {path} does not exist; give a file of general text")
    raw = read_utf8(path, DataError, "save the general text as UTF-8")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{i}: expected an object with a string `text` field")
            texts.append(row["text"])
    return "\n\n".join(texts)


@torch.no_grad()
def general_perplexity(model, tokenizer, path: str | Path, max_tokens: int, window: int, device, dtype) -> dict:
    """Token-weighted perplexity of the first `max_tokens` tokens of the file, in windows of `window` tokens."""
    ids = tokenizer(general_text(path), add_special_tokens=False).input_ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"evaluation.forgetting.path: {path} has fewer than 2 tokens of text")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]], device=device)
        with autocast_for(device, dtype):
            logits = model(input_ids=chunk[:, :-1]).logits.float()
        total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").double().item()
        count += chunk.size(1) - 1
    model.train(was_training)
    return {"general_perplexity": math.exp(min(total / count, 50.0)), "general_tokens": count}


def forgetting_check(before: dict, after: dict, threshold: float) -> dict | None:
    """The relative rise of general-text perplexity, with a warning and advice when it passes `threshold`."""
    if "general_perplexity" not in before or "general_perplexity" not in after:
        return None
    b, a = before["general_perplexity"], after["general_perplexity"]
    rise = a / b - 1
    out = {"before": b, "after": a, "rise": rise, "threshold": threshold, "tokens": after.get("general_tokens")}
    if rise > threshold:
        out["warning"] = (f"forgetting: perplexity on general text rose {100 * rise:.1f}% ({b:.3f} -> {a:.3f}), "
                          f"more than the {100 * threshold:.0f}% allowed; {ADVICE}")
    return out
