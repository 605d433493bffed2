"""`POST /v1/classify` for a reward run (`method: reward`): each input scored exactly as training scored a
chosen or rejected answer.

An input is one of:
- a text: tokenized as `pipeline("text-classification")` tokenizes it;
- {"messages": [...]}: a conversation ending in the assistant turn(s) to score (OpenAI's message shape);
- {"prompt": ..., "response": ...}: a preference record's prompt and one answer, each text or messages.

A conversation or a prompt and response is rendered and tokenized as training rendered the pair's sides
(data/template.py `response_segments`: the chat template, or prompt + response + EOS for a run without one),
so its reward equals the one the run logged. The reward is the score head's output at the last real token
(methods/reward.py `sequence_scores`), the number Bradley-Terry compared; the pipeline's "score" is its sigmoid.
"""

from __future__ import annotations

import torch
from jinja2 import TemplateError

from tuneforge.data.template import encode_segment_lists, response_segments
from tuneforge.errors import TuneforgeError
from tuneforge.methods.reward import sequence_scores
from tuneforge.serve.protocol import ApiError, parse_messages

MAX_SCORED = 64  # texts or conversations in one request: one padded forward pass holds them all

Scored = str | tuple[str | list[dict], str | list[dict]]  # a text, or (prompt, response) as training pairs them


def reward_inputs(given: list) -> list[Scored]:
    """The inputs of a request, checked; 400 naming the entry otherwise."""
    if len(given) > MAX_SCORED:
        raise ApiError(400, f"input: {len(given)} inputs; send at most {MAX_SCORED} per request", param="input")
    return [_input(item, f"input[{i}]") for i, item in enumerate(given)]


def _input(item, where: str) -> Scored:
    if isinstance(item, str) and item:
        return item
    if isinstance(item, dict) and set(item) == {"messages"}:
        messages = _messages(item["messages"], f"{where}.messages")
        start = len(messages)
        while start > 0 and messages[start - 1]["role"] == "assistant":
            start -= 1
        if start == len(messages):
            raise ApiError(400, f"{where}.messages: end with the assistant turn to score", param="input")
        return messages[:start], messages[start:]
    if isinstance(item, dict) and set(item) == {"prompt", "response"}:
        return tuple(_text_or_messages(item[key], f"{where}.{key}") for key in ("prompt", "response"))
    raise ApiError(400, f"{where}: give a non-empty string, {{\"messages\": [...]}} ending in the assistant turn to "
                   "score, or {\"prompt\": ..., \"response\": ...}", param="input")


def _text_or_messages(value, where: str) -> str | list[dict]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list):
        return _messages(value, where)
    raise ApiError(400, f"{where}: give a non-empty string or a list of messages", param="input")


def _messages(value, where: str) -> list[dict]:
    """OpenAI-shaped messages as the chat routes read them, errors naming the entry of `input`."""
    try:
        return parse_messages(value)
    except ApiError as err:
        raise ApiError(400, where + err.message.removeprefix("messages"), param="input") from None


def reward_batch(tokenizer, model, inputs: list[Scored], end_of_turn: str | None) -> dict:
    """Right-padded token ids and attention mask, as training collates a pair batch; 400 past the context."""
    texts = [i for i in inputs if isinstance(i, str)]
    pairs = [i for i in inputs if not isinstance(i, str)]
    try:
        segments = [response_segments(tokenizer, prompt, response, end_of_turn) for prompt, response in pairs]
    except (TuneforgeError, TemplateError) as err:
        raise ApiError(400, f"input: cannot be rendered as the run's training data was: {err}", param="input") from None
    encoded = iter([ids.tolist() for ids, _ in encode_segment_lists(tokenizer, segments)])
    plain = iter(tokenizer(texts)["input_ids"] if texts else [])
    rows = [next(plain) if isinstance(i, str) else next(encoded) for i in inputs]
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    for i, row in enumerate(rows):
        if not row or len(row) > context:
            raise ApiError(400, f"input[{i}]: {len(row)} tokens; this model reads 1 to {context}", param="input")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def reward_scores(model, batch: dict, device) -> tuple[torch.Tensor, list[dict]]:
    """(the pipeline's sigmoid score as a one-class probability, {"reward": raw score head output}) per input."""
    rewards = sequence_scores(model, {k: v.to(device) for k, v in batch.items()}).cpu()
    return torch.sigmoid(rewards)[:, None], [{"reward": float(r)} for r in rewards]
