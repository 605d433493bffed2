"""Shared fixtures: the built-in tokenizer, tokenizers with real-world templates, tiny random models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Trackers never reach the network in tests: W&B offline, no MLflow telemetry.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Under pytest-xdist (`make test` runs two workers) each worker computes on one thread: two workers
# with two threads each on CI's two cores would wait on each other's spinning threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

# A Qwen2.5-style template: default system prompt, tool results as a user turn with tags.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A Llama-3-style template: BOS from the template, header tokens, <|eot_id|> ends each turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: a second thread only waits on the first (on a busy machine, much longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def builtin_folder() -> Path:
    from tuneforge.models.resolve import resolve_base_model

    folder, _ = resolve_base_model("smollm2-135m-instruct")
    return folder


@pytest.fixture(scope="session")
def smol_tokenizer(builtin_folder):
    from tuneforge.models.load import load_tokenizer

    return load_tokenizer(builtin_folder)


def make_tokenizer(builtin_folder: Path, style: str):
    """The built-in tokenizer dressed as another family: 'smol' (as shipped), 'qwen' or 'llama3'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_folder))
    if style == "qwen":
        tok.chat_template = QWEN_TEMPLATE
        tok.bos_token = None
    elif style == "llama3":
        tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
        tok.bos_token = "<|begin_of_text|>"
        tok.eos_token = "<|end_of_text|>"
        tok.pad_token = "<|end_of_text|>"
        tok.chat_template = LLAMA3_TEMPLATE
    elif style != "smol":
        raise ValueError(style)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# Mistral v0.1's template: BOS from the template, [INST] turns, EOS after each answer, no system role.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Gemma 3's template: the system prompt is folded into the first user turn; the assistant is "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

SPM_WORDS = (
    "the quick brown fox jumps over lazy dog hello world alpha bravo charlie delta echo foxtrot golf hotel "
    "Repeat please answer question don't can't it's CamelCase tokenizer sentence piece ünïcödé 日本語 テスト 123 4567"
).split()


def make_spm_tokenizer(folder: Path, style: str):
    """A SentencePiece BPE tokenizer with byte fallback, trained here (offline) and loaded as transformers does.

    'mistral': Llama 2 / Mistral v0.1 layout (<unk> <s> </s>, a leading "▁", BOS added).
    'gemma': Gemma's layout (<pad> <eos> <bos> <unk> <mask>, turn markers, no leading "▁", BOS added).
    transformers 5 saves such a tokenizer as tokenizer.json only, as a fine-tuned folder has it.
    """
    import io
    import random

    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    rng = random.Random(0)
    lines = [" ".join(rng.choice(SPM_WORDS) for _ in range(rng.randint(3, 15))) for _ in range(2000)]
    common = dict(model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=1.0, split_digits=True,
                  allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                  normalization_rule_name="identity", minloglevel=2)
    if style == "mistral":
        layout = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    elif style == "gemma":
        layout = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                      unk_piece="<unk>", add_dummy_prefix=False,
                      user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    else:
        raise ValueError(style)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, **common, **layout)
    source = folder / "spm-source"
    source.mkdir(parents=True, exist_ok=True)
    (source / "tokenizer.model").write_bytes(proto.getvalue())
    cls = LlamaTokenizer if style == "mistral" else GemmaTokenizer
    tok = cls.from_pretrained(str(source), add_bos_token=True)
    tok.chat_template = MISTRAL_TEMPLATE if style == "mistral" else GEMMA_TEMPLATE
    if style == "gemma":  # the turn markers are special tokens, as in Gemma's tokenizer
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tokenizers(builtin_folder):
    return {style: make_tokenizer(builtin_folder, style) for style in ("smol", "qwen", "llama3")}


def tiny_config(arch: str, vocab_size: int, tie: bool = False):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        # Wide enough output rows that a frozen lm_head still lets a LoRA-only model reach confident logits.
        initializer_range=0.2,
    )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig}[arch]
    extra = {"head_dim": 16} if arch == "gemma" else {}
    return cls(**common, **extra)


def make_tiny_model(folder: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    """A random-initialised model of a real architecture, saved as a Hugging Face folder with its tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, len(tokenizer))
    # No pad_token_id: transformers would zero that embedding row, and here pad is the end-of-turn token.
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizers):
    """Tiny Llama (built-in tokenizer) and Qwen2 (Qwen-style template) folders."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": make_tiny_model(root / "llama", "llama", tokenizers["smol"]),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", tokenizers["qwen"]),
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(user: str, answer: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer},
    ]
    return {"messages": msgs}


def memorise_records(n: int = 24) -> list[dict]:
    """Variable-length chats with a learnable pattern."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return [
        chat(f"Repeat {' '.join(words[: 1 + i % 8])} please", " ".join(words[: 1 + i % 8]).upper())
        for i in range(n)
    ]


def wait_for(what, timeout: float = 180, every: float = 0.05):
    """Poll `what()` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
