"""A byte-level BPE tokenizer trained on the corpus, and the bytes each token stands for.

Byte-level: every byte has a token, so any text encodes without an unknown token and decodes back
exactly. The bytes per token give bits per byte, the loss measure that compares across tokenizers.
It is born with a chat template (ChatML) and its turn tokens, so a later SFT stage finds what it
needs and the embedding matrix never has to grow.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from tuneforge.data.template import BUILTIN_TEMPLATES

END_OF_TEXT = "<|endoftext|>"  # separates documents; also BOS and padding
TURN_TOKENS = ("<|im_start|>", "<|im_end|>")  # the chat template's: a turn's start and its end (the stop token)
CHAT_TEMPLATE = BUILTIN_TEMPLATES["chatml"]


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A transformers fast tokenizer (saves as tokenizer.json, loads with AutoTokenizer) trained on `texts`,
    with ids 0-2 for END_OF_TEXT and the turn tokens and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT, *TURN_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, additional_special_tokens=list(TURN_TOKENS),
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def first_bytes(texts: Iterable[str], limit: int) -> Iterator[str]:
    """The texts in order until `limit` UTF-8 bytes have been given (the one crossing it included)."""
    seen = 0
    for text in texts:
        if seen >= limit:
            return
        seen += len(text.encode("utf-8"))
        yield text


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for; special tokens count 0.

    A byte-level token's string has one character per byte; other tokenizers are measured by decoding
    (a token holding part of a character then counts its replacement character)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    byte_level = type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel"
    out = np.zeros(len(vocab), dtype=np.int64)
    for i, tok in enumerate(vocab):
        if i in special or tok is None:
            continue
        out[i] = len(tok) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return out
