"""Write a Hugging Face model folder as a GGUF file (llama.cpp, Ollama) with the `gguf` package.

The file carries what a runtime needs to behave like the tuned model: the tokenizer (vocabulary,
merges, pre-tokenizer name), the chat template the model was trained with, and every end-of-turn
token as EOS/EOT, so generation stops where training taught it to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tuneforge.errors import ModelError

# Hugging Face model_type -> GGUF architecture name (llama.cpp's)
ARCHITECTURES = {
    "llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
    "gemma2": "GEMMA2", "gemma3": "GEMMA3", "gemma3_text": "GEMMA3",
}
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")

# Pre-tokenizer split patterns llama.cpp names (the name tells a runtime how to split text before BPE).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _pre_tokenizer_name(tokenizer_json: dict, fallback: str | None) -> str:
    """llama.cpp's name for how this tokenizer splits text; a tokenizer we cannot name stops the export."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {}).get("Regex")
            if pattern in KNOWN_SPLITS:
                return KNOWN_SPLITS[pattern]
            break
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return fallback or "gpt-2"
    if fallback:
        return fallback
    raise ModelError(
        "GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows by name "
        f"({json.dumps(pre)[:200]}); export to a Hugging Face folder (--to hf) and convert it with "
        "llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers"
    )


def tokenizer_fields(folder: Path, vocab_size: int, pre_fallback: str | None) -> dict:
    """Vocabulary, token types, merges and pre-tokenizer name of a byte-level BPE tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"GGUF export: {folder} has no tokenizer.json")
    tj = json.loads(path.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(
            f"GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM); this one is {model.get('type')} "
            "(SentencePiece models such as Mistral v0.1 and Gemma are not written yet): export with --to hf and "
            "convert with llama.cpp's convert_hf_to_gguf.py"
        )
    tokens = {idx: tok for tok, idx in model["vocab"].items()}
    types = {idx: 1 for idx in tokens}  # NORMAL
    for added in tj.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    size = max(vocab_size, max(tokens) + 1)
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(size)]
    type_list = [types.get(i, 5) for i in range(size)]  # 5: UNUSED padding rows
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": token_list, "types": type_list, "merges": merges, "pre": _pre_tokenizer_name(tj, pre_fallback)}


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows in its own rotary layout (undone by readers on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(folder: Path):
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _encode_tensor(data: np.ndarray, quant: str):
    """(array, raw dtype) as stored: 1-D tensors stay F32; Q8_0 needs rows divisible by its block of 32."""
    import gguf

    data = data.astype(np.float32)
    if data.ndim < 2 or quant == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if quant == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    if quant == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if data.shape[-1] % 32:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def write_gguf(folder: Path, out: Path, quant: str = "f16", chat_template: str | None = None,
               stop_ids: list[int] | None = None, name: str | None = None, pre_fallback: str | None = None) -> Path:
    """Convert a Hugging Face folder (safetensors, config.json, tokenizer.json) to one GGUF file."""
    import gguf

    quant = quant.lower()
    if quant not in QUANTS:
        raise ModelError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    if quant == "q4_k_m":
        return _q4_k_m(folder, out, chat_template, stop_ids, name, pre_fallback)
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    text = config.get("text_config", config)
    if model_type not in ARCHITECTURES:
        raise ModelError(f"GGUF export: architecture {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers, n_head = text["num_hidden_layers"], text["num_attention_heads"]
    n_kv = text.get("num_key_value_heads", n_head)
    head_dim = text.get("head_dim") or text["hidden_size"] // n_head
    tok = tokenizer_fields(folder, text["vocab_size"], pre_fallback)

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_name(name or folder.name)
    writer.add_context_length(text.get("max_position_embeddings", 4096))
    writer.add_embedding_length(text["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = text.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", text.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(text.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    tcfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    gen = json.loads((folder / "generation_config.json").read_text()) if (folder / "generation_config.json").is_file() else {}
    ids = {t: i for i, t in enumerate(tok["tokens"])}
    for key, add in (("bos_token", writer.add_bos_token_id), ("unk_token", writer.add_unk_token_id),
                     ("pad_token", writer.add_pad_token_id)):
        if isinstance(tcfg.get(key), str) and tcfg[key] in ids:
            add(ids[tcfg[key]])
    eos = stop_ids or gen.get("eos_token_id") or ([ids[tcfg["eos_token"]]] if tcfg.get("eos_token") in ids else [])
    eos = eos if isinstance(eos, list) else [eos]
    if eos:
        writer.add_eos_token_id(eos[0])
        writer.add_eot_token_id(eos[0])  # the template's end-of-turn comes first in our stop list
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = chat_template or tcfg.get("chat_template") or _read_template(folder)
    if template:
        writer.add_chat_template(template)

    names = gguf.get_tensor_name_map(arch, n_layers)
    gemma = model_type.startswith("gemma")
    for hf_name, data in _tensors(folder):
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"GGUF export: no GGUF name for tensor {hf_name} of a {model_type} model")
        if model_type in ("llama", "mistral") and hf_name.endswith("q_proj.weight"):
            data = _permute_qk(data, n_head)
        elif model_type in ("llama", "mistral") and hf_name.endswith("k_proj.weight"):
            data = _permute_qk(data, n_kv)
        if gemma and hf_name.endswith("norm.weight"):
            data = data.astype(np.float32) + 1  # GGUF stores Gemma's (1 + w) norm scale
        array, raw = _encode_tensor(data, quant)
        writer.add_tensor(new, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def _read_template(folder: Path) -> str | None:
    path = folder / "chat_template.jinja"
    return path.read_text() if path.is_file() else None


def _q4_k_m(folder, out, chat_template, stop_ids, name, pre_fallback) -> Path:
    """Q4_K_M needs llama.cpp's quantiser: write F16, then quantise through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        raise ModelError(
            "--quant q4_k_m needs llama.cpp's quantiser: `pip install llama-cpp-python`, or export q8_0/f16 "
            "and run llama.cpp's llama-quantize yourself"
        ) from None
    f16 = out.with_name(out.stem + ".f16.gguf")
    write_gguf(folder, f16, "f16", chat_template, stop_ids, name, pre_fallback)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise ModelError(f"llama.cpp could not quantise {f16} to Q4_K_M")
    f16.unlink()
    return out
