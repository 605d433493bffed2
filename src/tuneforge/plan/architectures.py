"""Built-in shapes of common open models, so `plan` can answer for a model not yet on this machine.

Values are the public config.json values of each model (hidden_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings,
head_dim). Instruct and base variants share a shape, so one entry serves both; a hub id such as
`meta-llama/Llama-3.1-8B-Instruct` is matched by `table_key`.
"""

from __future__ import annotations

import re

from tuneforge.plan.shapes import ModelShape


def _llama(name, hidden, layers, heads, kv, inter, vocab=128256, tied=False, head_dim=0):
    return ModelShape(hidden, layers, heads, kv, inter, vocab, tied, head_dim, name=name)


def _qwen2(name, hidden, layers, heads, kv, inter, vocab, tied):
    return ModelShape(hidden, layers, heads, kv, inter, vocab, tied, qkv_bias=True, name=name)


def _qwen3(name, hidden, layers, heads, kv, inter, tied):
    return ModelShape(hidden, layers, heads, kv, inter, 151936, tied, 128, qk_norm=True, name=name)


def _gemma(name, hidden, layers, heads, kv, inter, vocab, head_dim, qk_norm):
    return ModelShape(hidden, layers, heads, kv, inter, vocab, True, head_dim, norms_per_layer=4,
                      qk_norm=qk_norm, name=name)


ARCHITECTURES: dict[str, ModelShape] = {s.name: s for s in (
    # The built-in model (HuggingFaceTB/SmolLM2-135M-Instruct), also readable from its GGUF header.
    _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tied=True),
    _llama("llama-3.2-1b", 2048, 16, 32, 8, 8192, tied=True),
    _llama("llama-3.2-3b", 3072, 28, 24, 8, 8192, tied=True),
    _llama("llama-3.1-8b", 4096, 32, 32, 8, 14336),
    _llama("llama-3.1-70b", 8192, 80, 64, 8, 28672),
    _llama("mistral-7b-v0.1", 4096, 32, 32, 8, 14336, 32000),
    _llama("mistral-7b-v0.3", 4096, 32, 32, 8, 14336, 32768),
    _qwen2("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True),
    _qwen2("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, True),
    _qwen2("qwen2.5-3b", 2048, 36, 16, 2, 11008, 151936, True),
    _qwen2("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False),
    _qwen2("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, False),
    _qwen2("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, False),
    _qwen2("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, False),
    _qwen3("qwen3-0.6b", 1024, 28, 16, 8, 3072, True),
    _qwen3("qwen3-1.7b", 2048, 28, 16, 8, 6144, True),
    _qwen3("qwen3-4b", 2560, 36, 32, 8, 9728, True),
    _qwen3("qwen3-8b", 4096, 36, 32, 8, 12288, False),
    _qwen3("qwen3-14b", 5120, 40, 40, 8, 17408, False),
    _qwen3("qwen3-32b", 5120, 64, 64, 8, 25600, False),
    _gemma("gemma-2-2b", 2304, 26, 8, 4, 9216, 256000, 256, False),
    _gemma("gemma-2-9b", 3584, 42, 16, 8, 14336, 256000, 256, False),
    _gemma("gemma-2-27b", 4608, 46, 32, 16, 36864, 256000, 128, False),
    _gemma("gemma-3-1b", 1152, 26, 4, 1, 6912, 262144, 256, True),
    _gemma("gemma-3-4b", 2560, 34, 8, 4, 10240, 262208, 256, True),
    _gemma("gemma-3-12b", 3840, 48, 16, 8, 15360, 262208, 256, True),
    _gemma("gemma-3-27b", 5376, 62, 32, 16, 21504, 262208, 128, True),
)}

# Same shape under another name.
ALIASES = {
    "llama-3-8b": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b", "llama-3.3-70b": "llama-3.1-70b",
    "mistral-7b": "mistral-7b-v0.3", "smollm2-135m-instruct": "smollm2-135m",
}

# Words that name a variant of the same weights' shape: meta-llama/Meta-Llama-3.1-8B-Instruct -> llama-3.1-8b.
_VARIANT = re.compile(r"-(instruct|it|base|chat|hf|pt)(?=-|$)")


def table_key(name: str) -> str:
    """The table's key for a model name or hub id: lower case, organisation and variant words removed."""
    key = name.strip().rstrip("/").split("/")[-1].lower().removeprefix("meta-")
    key = _VARIANT.sub("", key)
    return ALIASES.get(key, key)


def table_shape(name: str) -> ModelShape | None:
    """The built-in shape for a name, or None."""
    return ARCHITECTURES.get(table_key(name))
