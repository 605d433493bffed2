"""The tokenizer as GGUF metadata: byte-level BPE (`gpt2`) or SentencePiece (`llama`).

Everything is read from tokenizer.json, the file Hugging Face tokenizes with, so the GGUF holds the
vocabulary the model was trained with even when the folder has no tokenizer.model (transformers 5
saves none). A SentencePiece vocabulary needs a score per token, because llama.cpp's tokenizer
merges the adjacent pair whose result scores highest; scores are rebuilt here from the BPE merge
ranks, and token types from the added tokens. Unigram vocabularies are refused: llama.cpp's
`llama` tokenizer merges greedily and would not reproduce their segmentation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tuneforge.errors import ModelError

# Pre-tokenizer split patterns llama.cpp names (the name tells a runtime how to split text before BPE).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

SPIECE_SPACE = "\u2581"  # the "▁" SentencePiece writes for a space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def load_tokenizer_json(folder: Path) -> dict:
    """tokenizer.json, or the one transformers builds from tokenizer.model when the folder only has that."""
    path = folder / "tokenizer.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not (folder / "tokenizer.model").is_file():
        raise ModelError(f"GGUF export: {folder} has neither tokenizer.json nor tokenizer.model; save the tokenizer there")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception as err:
        raise ModelError(f"GGUF export: {folder}/tokenizer.model could not be read as a tokenizer ({err})") from None


def _parts(node: dict | None) -> list[dict]:
    """A normalizer or pre-tokenizer as a flat list of steps (a Sequence unrolled)."""
    if not node:
        return []
    for key in ("pretokenizers", "normalizers"):
        if node.get("type") == "Sequence" and key in node:
            return [p for child in node[key] for p in _parts(child)]
    return [node]


def is_sentencepiece(tokenizer_json: dict) -> bool:
    """A SentencePiece-style vocabulary (Llama 2, Mistral v0.1, Gemma): spaces spelled "▁", bytes as <0xNN>."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        return False
    steps = _parts(tokenizer_json.get("normalizer")) + _parts(tokenizer_json.get("pre_tokenizer"))
    spells_space = any(s.get("type") == "Metaspace" or s.get("content") == SPIECE_SPACE for s in steps)
    return bool(model.get("byte_fallback")) or spells_space


def _pre_tokenizer_name(tokenizer_json: dict, fallback: str | None) -> str:
    """llama.cpp's name for how this tokenizer splits text; a tokenizer we cannot name stops the export."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    for part in _parts(pre):
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


def _added(tokenizer_json: dict) -> dict[int, dict]:
    return {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}


def byte_level_fields(tokenizer_json: dict, vocab_size: int, pre_fallback: str | None) -> dict:
    """Vocabulary, token types, merges and pre-tokenizer name of a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM)."""
    import gguf

    model = tokenizer_json["model"]
    tokens = {idx: tok for tok, idx in model["vocab"].items()}
    types = {idx: gguf.TokenType.NORMAL for idx in tokens}
    for idx, added in _added(tokenizer_json).items():
        tokens[idx] = added["content"]
        types[idx] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(tokens) + 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "model": "gpt2", "pre": _pre_tokenizer_name(tokenizer_json, pre_fallback),
        "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(size)],
        "types": [types.get(i, gguf.TokenType.UNUSED) for i in range(size)],  # UNUSED: padding rows
        "merges": merges,
    }


def _merge_scores(model: dict) -> dict[str, float]:
    """Score of each token a BPE merge makes: minus the rank of the first merge that makes it.

    llama.cpp merges the adjacent pair whose result has the highest score, so higher-ranked
    merges must score higher; transformers' GGUF reader rebuilds the merges from the same order.
    """
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether text gets a leading "▁" (Llama 2, Mistral) or not (Gemma): Metaspace prepend or a Prepend normalizer."""
    for step in _parts(tokenizer_json.get("normalizer")) + _parts(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
        if step.get("type") == "Prepend" and step.get("prepend") == SPIECE_SPACE:
            return True
    return False


def sentencepiece_fields(tokenizer_json: dict, vocab_size: int, unk_token: str | None) -> dict:
    """Tokens, scores and types of a SentencePiece vocabulary, as llama.cpp's `llama` tokenizer reads them.

    Types: the unknown token UNKNOWN, special added tokens CONTROL, other added tokens USER_DEFINED
    (their "▁" written as the space llama.cpp matches in raw text), <0xNN> byte-fallback pieces BYTE,
    and rows past the tokenizer (embedding padding) UNUSED.
    """
    import gguf

    model = tokenizer_json["model"]
    T = gguf.TokenType
    tokens = {idx: tok for tok, idx in model["vocab"].items()}
    made = _merge_scores(model)
    floor = -float(len(model.get("merges", [])))  # unmerged pieces rank below every merge
    scores = {i: made.get(t, floor - i) for i, t in tokens.items()}
    unk = model.get("unk_token") or unk_token
    byte_fallback = model.get("byte_fallback", False)
    types = {i: T.BYTE if byte_fallback and _BYTE_TOKEN.fullmatch(t) else T.NORMAL for i, t in tokens.items()}
    for i, t in tokens.items():
        if types[i] == T.BYTE:
            scores[i] = 0.0
        if t == unk:
            types[i], scores[i] = T.UNKNOWN, 0.0
    for idx, added in _added(tokenizer_json).items():
        if added["content"] == unk:
            types[idx], tokens[idx], scores[idx] = T.UNKNOWN, unk, 0.0
        elif added.get("special"):
            types[idx], tokens[idx], scores[idx] = T.CONTROL, added["content"], 0.0
        else:
            types[idx], tokens[idx], scores[idx] = T.USER_DEFINED, added["content"].replace(SPIECE_SPACE, " "), -1000.0
    size = max(vocab_size, max(tokens) + 1)
    return {
        "model": "llama", "pre": "default",
        "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(size)],
        "scores": [scores.get(i, -10000.0) for i in range(size)],
        "types": [types.get(i, T.UNUSED) for i in range(size)],
        "add_space_prefix": _adds_space_prefix(tokenizer_json),
    }


def adds_special_tokens(tokenizer_json: dict, tokenizer_config: dict) -> tuple[bool, bool]:
    """(add BOS, add EOS) when encoding a single text: read from the post-processor the tokenizer runs."""
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            kinds = ["A" if "Sequence" in s else "special" for s in step.get("single", [])]
            if "A" in kinds:
                at = kinds.index("A")
                return "special" in kinds[:at], "special" in kinds[at + 1:]
    return bool(tokenizer_config.get("add_bos_token", False)), bool(tokenizer_config.get("add_eos_token", False))


def tokenizer_fields(folder: Path, vocab_size: int, pre_fallback: str | None, unk_token: str | None = None) -> dict:
    """The folder's tokenizer as GGUF fields; a kind llama.cpp cannot represent stops the export."""
    tj = load_tokenizer_json(folder)
    kind = tj.get("model", {}).get("type")
    if is_sentencepiece(tj):
        return sentencepiece_fields(tj, vocab_size, unk_token)
    if kind == "BPE":
        return byte_level_fields(tj, vocab_size, pre_fallback)
    raise ModelError(
        f"GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM) and SentencePiece BPE ones "
        f"(Llama 2, Mistral, Gemma); {folder}/tokenizer.json has a {kind} model: export with --to hf and "
        "convert with llama.cpp's convert_hf_to_gguf.py"
    )
