"""A byte-level BPE tokenizer (GPT-2 style, the built-in model's) built from a GGUF file's metadata
by the `tokenizers` library alone.

On a fresh machine plan's stand-in tokenizer comes from the built-in GGUF. transformers builds it in
about 3 s on a 2-core machine, most of it importing transformers; the vocabulary, merges and control
tokens read here give the same tokenizer.json in a fraction of a second (tests/test_plan_tokenizer.py
checks it equals transformers' conversion). Files of any other kind return None: transformers builds those.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from tuneforge.plan.gguf_header import read_gguf_header

ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
# Pre-tokenizer names whose split is plain byte-level (transformers adds a regex split for others)
PLAIN_SPLITS = {"smollm", "gpt-2"}
CONTROL = 3  # GGUF token types
SPECIALS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level spelling: printable Latin-1 bytes stand for themselves, the others are
    written with the characters from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def byte_level_tokenizer(gguf: Path) -> tuple[Tokenizer, dict, str | None] | None:
    """(tokenizer, tokenizer_config entries, chat template) of a byte-level BPE GGUF, or None for
    another kind of tokenizer (or one that adds BOS/EOS tokens itself)."""
    header = read_gguf_header(gguf, ARRAYS)
    fields, arrays = header.fields, header.arrays
    if (fields.get("tokenizer.ggml.model") != "gpt2" or fields.get("tokenizer.ggml.pre") not in PLAIN_SPLITS
            or fields.get("tokenizer.ggml.add_bos_token") or fields.get("tokenizer.ggml.add_eos_token")
            or fields.get("tokenizer.ggml.add_space_prefix") or len(arrays) != len(ARRAYS)):
        return None
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    tokens = arrays["tokenizer.ggml.tokens"]
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in arrays["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, arrays["tokenizer.ggml.token_type"])
                                  if kind == CONTROL and set(t) <= alphabet])
    config = {name: tokens[fields[f"tokenizer.ggml.{key}"]] for name, key in SPECIALS.items()
              if f"tokenizer.ggml.{key}" in fields}
    return tokenizer, config, fields.get("tokenizer.chat_template")
