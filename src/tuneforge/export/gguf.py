"""Write a Hugging Face model folder as a GGUF file (llama.cpp, Ollama) with the `gguf` package.

The file carries what a runtime needs to behave like the tuned model: the tokenizer (byte-level BPE
or SentencePiece, see gguf_vocab), the chat template the model was trained with, and every
end-of-turn token as EOS/EOT, so generation stops where training taught it to. Gemma's tensors and
settings are written the way llama.cpp's gemma/gemma2/gemma3 graphs read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tuneforge.errors import ModelError
from tuneforge.export.gguf_vocab import adds_special_tokens, load_tokenizer_json, tokenizer_fields

# Hugging Face model_type -> GGUF architecture name (llama.cpp's)
ARCHITECTURES = {
    "llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
    "gemma": "GEMMA", "gemma2": "GEMMA2", "gemma3": "GEMMA3", "gemma3_text": "GEMMA3",
}
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows in its own rotary layout (undone by readers on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(folder: Path, names_only: bool = False):
    """(name, array) for every tensor in the folder's safetensors; (name, None) with names_only."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, None if names_only else f.get_tensor(name)


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


def _gemma_checks(model_type: str, text: dict, tensor_names: list[str], folder: Path) -> None:
    """What llama.cpp hard-codes for Gemma must hold for this model, or the GGUF would compute something else.

    llama.cpp's gemma/gemma2 graphs reuse the embedding as the output layer, scale queries by
    1/sqrt(head_dim) (hidden/heads for the 27B layer counts) and fix the sliding-window layer pattern
    and the local rope base; a model that differs is refused here rather than exported wrong.
    """
    label = f"GGUF export of {folder}"
    if model_type == "gemma":
        return _untied_head_check(model_type, tensor_names, folder)
    n_layers, n_head = text["num_hidden_layers"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // n_head
    big = {"gemma2": 46, "gemma3": 62}[_family(model_type)]
    expected = text["hidden_size"] // n_head if n_layers == big else head_dim
    if text.get("query_pre_attn_scalar", expected) != expected:
        raise ModelError(
            f"{label}: config.json query_pre_attn_scalar is {text['query_pre_attn_scalar']}, but llama.cpp scales "
            f"{_family(model_type)} queries by 1/sqrt({expected}) for a {n_layers}-layer model; export with --to hf instead"
        )
    every = {"gemma2": 2, "gemma3": 6}[_family(model_type)]
    pattern = ["sliding_attention" if i % every < every - 1 else "full_attention" for i in range(n_layers)]
    if text.get("layer_types") and text["layer_types"] != pattern:
        raise ModelError(
            f"{label}: config.json layer_types is not llama.cpp's fixed {_family(model_type)} pattern "
            f"(every {every}th layer full attention); export with --to hf instead"
        )
    if _family(model_type) == "gemma3":
        local = ((text.get("rope_parameters") or {}).get("sliding_attention") or {}).get(
            "rope_theta", text.get("rope_local_base_freq", 10000.0))
        if float(local) != 10000.0:
            raise ModelError(f"{label}: the sliding layers' rope_theta is {local}, but llama.cpp fixes it at 10000 for gemma3")
    else:
        _untied_head_check(model_type, tensor_names, folder)


def _untied_head_check(model_type: str, tensor_names: list[str], folder: Path) -> None:
    if "lm_head.weight" in tensor_names:
        raise ModelError(
            f"GGUF export of {folder}: the model has its own lm_head.weight (tie_word_embeddings false), but llama.cpp's "
            f"{model_type} architecture always uses the embedding as output layer; export with --to hf instead"
        )


def _family(model_type: str) -> str:
    return "gemma3" if model_type.startswith("gemma3") else model_type


def _rope(text: dict, model_type: str) -> dict:
    """The rope parameters of the full-attention layers (Gemma 3 keeps one set per layer type)."""
    rope = text.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    if not rope and text.get("rope_theta") is not None:
        rope = {"rope_theta": text["rope_theta"], **(text.get("rope_scaling") or {})}
    return rope


def _write_hparams(writer, model_type: str, text: dict, folder: Path) -> None:
    import gguf

    n_layers, n_head = text["num_hidden_layers"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // n_head
    writer.add_context_length(text.get("max_position_embeddings", 4096))
    writer.add_embedding_length(text["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(text.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = _rope(text, model_type)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", None):
        raise ModelError(f"GGUF export of {folder}: rope type {kind!r} is not written yet; export with --to hf instead")
    writer.add_layer_norm_rms_eps(float(text.get("rms_norm_eps", 1e-6)))
    family = _family(model_type)
    if family in ("gemma2", "gemma3"):
        writer.add_sliding_window(int(text.get("sliding_window") or 4096))
    if family == "gemma2":
        # llama.cpp applies both caps; a model without one gets a cap too large to matter.
        writer.add_attn_logit_softcapping(float(text.get("attn_logit_softcapping") or 1e9))
        writer.add_final_logit_softcapping(float(text.get("final_logit_softcapping") or 1e9))
    elif family == "gemma3" and text.get("final_logit_softcapping"):
        raise ModelError(f"GGUF export of {folder}: llama.cpp's gemma3 has no final_logit_softcapping; export with --to hf instead")


def _write_tokenizer(writer, tok: dict, folder: Path, chat_template: str | None, stop_ids: list[int] | None) -> None:
    """Vocabulary, special ids, add-BOS/EOS flags and chat template (R-GGUF-1: every end of turn as EOS/EOT)."""
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if "scores" in tok:
        writer.add_token_scores(tok["scores"])
    if "merges" in tok:
        writer.add_token_merges(tok["merges"])
    if "add_space_prefix" in tok:
        writer.add_add_space_prefix(tok["add_space_prefix"])
    tcfg = _read_json(folder / "tokenizer_config.json")
    gen = _read_json(folder / "generation_config.json")
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
    add_bos, add_eos = adds_special_tokens(load_tokenizer_json(folder), tcfg)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = chat_template or tcfg.get("chat_template") or _read_template(folder)
    if template:
        writer.add_chat_template(template)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_gguf(folder: Path, out: Path, quant: str = "f16", chat_template: str | None = None,
               stop_ids: list[int] | None = None, name: str | None = None, pre_fallback: str | None = None) -> Path:
    """Convert a Hugging Face folder (safetensors, config.json, tokenizer.json) to one GGUF file.

    Everything that can refuse (architecture, tokenizer, Gemma's fixed settings) is checked before
    the file is opened, and the file appears under its name only once it is complete.
    """
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
    n_layers, n_head = text["num_hidden_layers"], text["num_attention_heads"]
    n_kv = text.get("num_key_value_heads") or n_head
    tensor_names = [n for n, _ in _tensors(folder, names_only=True)]
    gemma = model_type.startswith("gemma")
    if gemma:
        _gemma_checks(model_type, text, tensor_names, folder)
    unk = _read_json(folder / "tokenizer_config.json").get("unk_token")
    tok = tokenizer_fields(folder, text["vocab_size"], pre_fallback, unk if isinstance(unk, str) else None)

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or folder.name)
    _write_hparams(writer, model_type, text, folder)
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    _write_tokenizer(writer, tok, folder, chat_template, stop_ids)

    names = gguf.get_tensor_name_map(arch, n_layers)
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
