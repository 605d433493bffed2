"""Chat templates and label masks.

Masks come from the template render itself, never from marker strings: the text is rendered
prefix by prefix, so the character span of every assistant turn (its content and the
end-of-turn token) is known exactly. The text is tokenized span by span, so a token never
straddles a prompt/reply boundary, and the tokens before a reply are those of the generation
prompt, as when the model is asked to answer. (A tokenizer may merge characters across such a
boundary when it reads the whole text at once, e.g. "\n\n" + "4"; training, evaluation and chat
here all use the span-by-span tokens, so they agree with each other.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.data.formats import as_messages
from tuneforge.errors import ConfigError, DataError

IGNORE_INDEX = -100

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}

_PROBE = "\u2063tuneforge-probe\u2063"


def resolve_chat_template(tokenizer, spec: str) -> str:
    """The template text for `chat_template:`; "auto" is the model's own."""
    if spec == "auto":
        if not tokenizer.chat_template:
            raise ConfigError(
                "chat_template: the base model has no chat template of its own. Set chat_template to one of "
                f"{', '.join(BUILTIN_TEMPLATES)}, a path to a .jinja file, or inline Jinja text "
                "(or use `format: text` / `completion` data, which needs no template)."
            )
        return tokenizer.chat_template
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if spec.endswith(".jinja"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"chat_template: file {spec} not found")
        return path.read_text()
    if "{{" in spec or "{%" in spec:
        return spec
    raise ConfigError(
        f"chat_template: {spec!r} is not a known template; use auto, {', '.join(BUILTIN_TEMPLATES)}, "
        "a .jinja file or inline Jinja"
    )


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _special_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    for token, _id in tokenizer.get_added_vocab().items():
        specials.add(token)
    return sorted((s for s in specials if s), key=len, reverse=True)


def find_end_of_turn(tokenizer) -> str:
    """The special token the template writes right after an assistant reply (e.g. <|im_end|>, <|eot_id|>)."""
    resolve_chat_template(tokenizer, "auto")  # a model without a template gets the error that names the choices
    try:
        text = _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}])
    except Exception as err:  # a template that raises on the simplest conversation is unusable
        raise ConfigError(f"chat_template: the template fails on a user/assistant pair: {err}") from None
    after = text[text.index(_PROBE) + len(_PROBE) :]
    best = None
    for special in _special_strings(tokenizer):
        pos = after.find(special)
        if pos >= 0 and after[:pos].strip() == "" and (best is None or pos < best[0]):
            best = (pos, special)
    if best is None:
        raise ConfigError(
            "chat_template: the template ends an assistant turn with no special token "
            f"(text after the reply: {after!r}), so the model could never learn to stop. "
            "Choose a template that closes turns with an end-of-turn token."
        )
    return best[1]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _adds_bos(tokenizer) -> bool:
    """Whether this tokenizer puts a BOS in front of plain text (computed once per tokenizer)."""
    cached = getattr(tokenizer, "_tuneforge_adds_bos", None)
    if cached is None:
        ids = tokenizer("a").input_ids
        cached = bool(tokenizer.bos_token is not None and ids and ids[0] == tokenizer.bos_token_id)
        tokenizer._tuneforge_adds_bos = cached
    return cached


def _bos_prefix(tokenizer, text: str) -> list[int]:
    """One BOS, only when the tokenizer would add one and the rendered text lacks it."""
    if not _adds_bos(tokenizer) or text.startswith(tokenizer.bos_token):
        return []
    return [tokenizer.bos_token_id]


def encode_segment_lists(tokenizer, segment_lists: list[list[tuple[str, bool]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) arrays for many examples, with one call into the Rust tokenizer for all pieces."""
    texts = [text for segments in segment_lists for text, _ in segments if text]
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    out, k = [], 0
    for segments in segment_lists:
        ids_parts, label_parts = [], []
        first = next((t for t, _ in segments if t), "")
        bos = _bos_prefix(tokenizer, first)
        if bos:
            ids_parts.append(np.asarray(bos, dtype=np.int32))
            label_parts.append(np.asarray(bos if segments[0][1] else [IGNORE_INDEX], dtype=np.int32))
        for text, trained in segments:
            if not text:
                continue
            ids = np.asarray(encodings[k].ids, dtype=np.int32)
            k += 1
            ids_parts.append(ids)
            label_parts.append(ids if trained else np.full(len(ids), IGNORE_INDEX, dtype=np.int32))
        if ids_parts:
            out.append((np.concatenate(ids_parts), np.concatenate(label_parts)))
        else:
            out.append((np.zeros(0, np.int32), np.zeros(0, np.int32)))
    return out


def _encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> Encoded:
    [(ids, labels)] = encode_segment_lists(tokenizer, [segments])
    return Encoded(ids.tolist(), labels.tolist())


def conversation_segments(
    tokenizer, messages: list[dict], end_of_turn: str, train_on_inputs: bool = False,
    add_generation_prompt: bool = False, train_from: int = 0,
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) pieces.

    An assistant turn is trained from the end of the generation prompt through its end-of-turn
    token; anything the template adds after that token (often a newline) is not. Assistant turns
    before message `train_from` are context (a preference prompt's history), not trained.
    """
    full = _render(tokenizer, messages, add_generation_prompt)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    if system and system.strip() not in full:
        raise DataError("the chat template silently drops the system prompt; choose a template that renders it "
                        "or move the instruction into the first user turn")
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < train_from:
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(prompt) and full.startswith(upto) and upto.startswith(prompt)):
            raise DataError(
                "chat template does not render conversations prefix by prefix (it rewrites earlier turns), "
                "so assistant spans cannot be located exactly; use a template without that behaviour"
            )
        end = upto.rfind(end_of_turn, len(prompt))
        if end < 0:
            raise DataError(f"chat template wrote no {end_of_turn} after assistant turn {i + 1}")
        spans.append((len(prompt), end + len(end_of_turn)))
    segments, pos = [], 0
    for start, stop in spans:
        segments += [(full[pos:start], train_on_inputs), (full[start:stop], True)]
        pos = stop
    segments.append((full[pos:], train_on_inputs))
    return segments


def encode_conversation(tokenizer, messages: list[dict], end_of_turn: str, train_on_inputs: bool = False) -> Encoded:
    return _encode_segments(tokenizer, conversation_segments(tokenizer, messages, end_of_turn, train_on_inputs))


def completion_segments(tokenizer, prompt: str, completion: str, train_on_inputs: bool = False) -> list[tuple[str, bool]]:
    """Raw prompt + completion + EOS, no template; the loss covers the completion and EOS."""
    return [(prompt, train_on_inputs), (completion + (tokenizer.eos_token or ""), True)]


def response_segments(tokenizer, prompt: str | list[dict], response: str | list[dict],
                      end_of_turn: str | None) -> list[tuple[str, bool]]:
    """A prompt and one answer to it (preference and kto data): only the answer's turns are trained."""
    if end_of_turn is None:
        if isinstance(prompt, str) and isinstance(response, str):
            return completion_segments(tokenizer, prompt, response)
        raise DataError("these records hold conversations but the tokenizer has no chat template; set chat_template")
    messages = as_messages(prompt, "user")
    return conversation_segments(tokenizer, messages + as_messages(response, "assistant"), end_of_turn,
                                 train_from=len(messages))


def prompt_segments(tokenizer, prompt: str | list[dict], end_of_turn: str | None) -> list[tuple[str, bool]]:
    """A prompt that asks for the next assistant turn, nothing trained (online methods sample the answer)."""
    if end_of_turn is None:
        if isinstance(prompt, str):
            return [(prompt, False)]
        raise DataError("these records hold conversations but the tokenizer has no chat template; set chat_template")
    messages = as_messages(prompt, "user")
    return conversation_segments(tokenizer, messages, end_of_turn, add_generation_prompt=True,
                                 train_from=len(messages))


def text_segments(tokenizer, text: str) -> list[tuple[str, bool]]:
    """Continued pretraining: every token is trained, EOS closes the document."""
    return [(text + (tokenizer.eos_token or ""), True)]


def encode_completion(tokenizer, prompt: str, completion: str, train_on_inputs: bool = False) -> Encoded:
    return _encode_segments(tokenizer, completion_segments(tokenizer, prompt, completion, train_on_inputs))


def encode_text(tokenizer, text: str) -> Encoded:
    return _encode_segments(tokenizer, text_segments(tokenizer, text))


def generation_prompt(tokenizer, messages: list[dict], end_of_turn: str | None = None) -> list[int]:
    """Token ids that ask the model for the next assistant turn, tokenized exactly as in training."""
    eot = end_of_turn or find_end_of_turn(tokenizer)
    return _encode_segments(tokenizer, conversation_segments(tokenizer, messages, eot, add_generation_prompt=True)).input_ids
