"""An encoder's sentence vectors, exactly as its sentence-transformers folder defines them.

A sentence-transformers folder says how token vectors become one sentence vector: modules.json
lists the modules (Transformer, Pooling, Normalize), 1_Pooling/config.json the pooling mode. Reading
them, rather than assuming mean pooling, is what keeps tuneforge's vectors equal to the library's
(a CLS-pooled model mean-pooled loses recall silently). A plain Hugging Face encoder folder without
those files gets mean pooling without normalisation, which is also what sentence-transformers
itself builds for such a folder. The same files are written back into final/, so the tuned folder
loads in `sentence_transformers.SentenceTransformer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.errors import ModelError

# Pooling mode -> its flag in 1_Pooling/config.json.
FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
         "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken",
         "weightedmean": "pooling_mode_weightedmean_tokens"}
MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken")  # the modes tuneforge pools by
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None  # sentence-transformers truncates inputs to this many tokens
    do_lower_case: bool = False


def read_pooling(folder: Path) -> Pooling:
    """The pooling a folder declares (modules.json + 1_Pooling/config.json), or mean pooling for a plain folder."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    settings = _json(folder / "sentence_bert_config.json") if (folder / "sentence_bert_config.json").is_file() else {}
    extra = {"max_seq_length": settings.get("max_seq_length"), "do_lower_case": bool(settings.get("do_lower_case"))}
    if not modules_file.is_file():
        return Pooling(**extra)
    modules = _json(modules_file)
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    known = {"Transformer", "Pooling", "Normalize"}
    if kinds[:1] != ["Transformer"] or not set(kinds) <= known:
        raise ModelError(f"{modules_file}: modules {', '.join(kinds)}; tuneforge trains encoders made of Transformer, "
                         "Pooling and an optional Normalize module (a Dense or other module is not supported yet)")
    pooling = next((m for m in modules if m["type"].endswith("Pooling")), None)
    mode = "mean"
    if pooling is not None:
        config = _json(folder / pooling["path"] / "config.json")
        if "pooling_mode" in config:  # newer sentence-transformers write the mode by name
            mode = config["pooling_mode"]
        else:
            chosen = [m for m, flag in FLAGS.items() if config.get(flag)]
            if len(chosen) != 1:
                raise ModelError(f"{folder / pooling['path'] / 'config.json'}: expected exactly one pooling mode, "
                                 f"found {chosen or 'none'}")
            mode = chosen[0]
    if mode not in MODES:
        raise ModelError(f"{folder}: pooling mode {mode!r} is not supported; tuneforge pools by {', '.join(MODES)}")
    return Pooling(mode=mode, normalize="Normalize" in kinds, **extra)


def _json(path: Path) -> dict | list:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read this sentence-transformers file: {err}") from None


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per row from right-padded token vectors, as sentence-transformers' Pooling (+ Normalize)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    elif pooling.mode == "lasttoken":
        out = hidden[torch.arange(hidden.size(0), device=hidden.device), mask.sum(-1) - 1]
    else:
        summed, count = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
        out = summed / (count if pooling.mode == "mean" else count.sqrt())
    return torch.nn.functional.normalize(out, p=2, dim=1) if pooling.normalize else out


def embed(model, batch: dict, pooling: Pooling) -> torch.Tensor:
    """Sentence vectors of a batch of token ids (float32): the encoder's last hidden states, pooled."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return pool(out.last_hidden_state.float(), batch["attention_mask"], pooling)


def tokenize(tokenizer, texts: list[str], pooling: Pooling, max_len: int | None = None) -> dict:
    """Padded ids of texts, truncated as sentence-transformers does (to its max_seq_length)."""
    limits = [n for n in (pooling.max_seq_length, max_len) if n]
    texts = [t.lower() for t in texts] if pooling.do_lower_case else list(texts)
    enc = tokenizer(texts, padding=True, truncation=bool(limits), max_length=min(limits) if limits else None,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def write_sentence_transformers(folder: Path, pooling: Pooling, dimension: int) -> None:
    """The files that make a folder of encoder weights and tokenizer a sentence-transformers model."""
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"})
        (folder / NORMALIZE_DIR).mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / POOLING_DIR).mkdir(parents=True, exist_ok=True)
    flags = {flag: mode == pooling.mode for mode, flag in FLAGS.items()}
    (folder / POOLING_DIR / "config.json").write_text(
        json.dumps({"word_embedding_dimension": dimension, **flags, "include_prompt": True}, indent=2) + "\n")
    settings = {"do_lower_case": pooling.do_lower_case}
    if pooling.max_seq_length:
        settings["max_seq_length"] = pooling.max_seq_length
    (folder / "sentence_bert_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"}, indent=2) + "\n")


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], pooling: Pooling, device, batch_size: int = 32,
                 max_len: int | None = None) -> torch.Tensor:
    """Sentence vectors of texts (float32, on the CPU), in eval mode: held-out retrieval, parity, serving."""
    was_training = model.training
    model.eval()
    try:
        out = [embed(model, {k: v.to(device) for k, v in tokenize(tokenizer, texts[i:i + batch_size], pooling,
                                                                  max_len).items()}, pooling).cpu()
               for i in range(0, len(texts), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)
